{{/* The RayCluster spec, shared by the RayCluster and the RayService. */}}
{{- define "indai.rayPodSpec" -}}
{{- $ := .root -}}
serviceAccountName: {{ include "indai.fullname" $ }}-ray
{{- /* Never the pod: job drivers run in the head's ray-head container, and with the token they could
patch the RayCluster (another image, any Secret of the namespace mounted). Only the autoscaler
sidecar, the one container that talks to the API server, mounts it (indai.autoscalerApiMount). */}}
automountServiceAccountToken: false
securityContext: {{- include "indai.podSecurity" $ | nindent 2 }}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
nodeSelector: {{- toYaml .group.nodeSelector | nindent 2 }}
tolerations: {{- toYaml .group.tolerations | nindent 2 }}
{{- $volumes := include "indai.rayPodVolumes" $ | trim }}
{{- if and .head $.Values.ray.autoscaling.enabled }}
{{- $volumes = printf "%s\n%s" $volumes (include "indai.autoscalerApiVolume" $) | trim }}
{{- end }}
{{- with $volumes }}
volumes: {{- . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .container }}
    image: {{ include "indai.image" .image }}
    imagePullPolicy: {{ $.Values.images.pullPolicy }}
    securityContext: {{- include "indai.containerSecurity" $ | nindent 6 }}
    env:
      {{- include "indai.platformEnv" $ | nindent 6 }}
      - name: INDAI_RAY_ADDRESS
        value: auto
      {{- if $.Values.serve.enabled }}
      {{- /* Serve's ingress replicas (on any Ray pod) check members' tokens and access rules and meter
      each call in the platform database; without it they would open an empty pod-local SQLite file */}}
      {{- include "indai.dbUrlEnv" $ | nindent 6 }}
      {{- end }}
      {{- if include "indai.rayAuth" $ }}
      {{- /* KubeRay copies env and mounts into the workers' wait-gcs-ready init container, whose
      `ray health-check` needs the token too */}}
      {{- include "indai.rayAuthEnv" $ | nindent 6 }}
      {{- end }}
      {{- if $.Values.ray.memberKeys.existingSecret }}
      - {name: INDAI_SECRETS_DIR, value: {{ include "indai.memberKeysDir" $ }}}
      {{- end }}
    {{- if or (include "indai.rayAuth" $) $.Values.ray.memberKeys.existingSecret }}
    volumeMounts:
      {{- if include "indai.rayAuth" $ }}
      {{- include "indai.rayAuthMount" $ | nindent 6 }}
      {{- end }}
      {{- if $.Values.ray.memberKeys.existingSecret }}
      - {name: member-keys, mountPath: {{ include "indai.memberKeysDir" $ }}, readOnly: true}
      {{- end }}
    {{- end }}
    resources:
      requests: {{- toYaml .group.resources.requests | nindent 8 }}
        {{- if .gpus }}
        nvidia.com/gpu: {{ .gpus }}
        {{- end }}
      limits: {{- toYaml .group.resources.limits | nindent 8 }}
        {{- if .gpus }}
        nvidia.com/gpu: {{ .gpus }}
        {{- end }}
    {{- with .ports }}
    ports: {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end -}}

{{- define "indai.rayClusterSpec" -}}
rayVersion: {{ .Values.ray.rayVersion | quote }}
enableInTreeAutoscaling: {{ .Values.ray.autoscaling.enabled }}
{{- if .Values.ray.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ .Values.ray.autoscaling.idleTimeoutSeconds }}
  securityContext: {{- include "indai.containerSecurity" . | nindent 4 }}
  {{- if include "indai.rayAuth" . }}
  {{- /* the sidecar talks to the GCS: the head pod's token volume, and Ray's settings */}}
  env: {{- include "indai.rayAuthEnv" . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "indai.autoscalerApiMount" . | nindent 4 }}
    {{- if include "indai.rayAuth" . }}
    {{- include "indai.rayAuthMount" . | nindent 4 }}
    {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    num-cpus: "0"
  template:
    metadata:
      labels: {{- include "indai.selector" . | nindent 8 }}
        indai.io/component: ray-head
    spec: {{- include "indai.rayPodSpec" (dict "root" . "head" true "group" .Values.ray.head "container" "ray-head" "image" .Values.images.platform "gpus" 0 "ports" (list (dict "name" "gcs" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001) (dict "name" "serve" "containerPort" 8000))) | nindent 6 }}
{{- if not (or .Values.ray.cpuWorkers.enabled .Values.ray.gpuWorkers.enabled) }}
workerGroupSpecs: []
{{- else }}
workerGroupSpecs:
{{- end }}
{{- with .Values.ray.cpuWorkers }}
{{- if .enabled }}
  - groupName: cpu
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams: {}
    template:
      metadata:
        labels: {{- include "indai.selector" $ | nindent 10 }}
          indai.io/component: ray-worker-cpu
      spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" false "group" . "container" "ray-worker" "image" $.Values.images.platform "gpus" 0) | nindent 8 }}
{{- end }}
{{- end }}
{{- with .Values.ray.gpuWorkers }}
{{- if .enabled }}
  - groupName: gpu
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams:
      num-gpus: {{ .gpusPerWorker | quote }}
    template:
      metadata:
        labels: {{- include "indai.selector" $ | nindent 10 }}
          indai.io/component: ray-worker-gpu
      spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" false "group" . "container" "ray-worker" "image" $.Values.images.platformGpu "gpus" .gpusPerWorker) | nindent 8 }}
{{- end }}
{{- end }}
{{- end -}}
