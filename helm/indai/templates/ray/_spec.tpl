{{/* The Ray clusters' pod and cluster specs. Two clusters, never one: the jobs' RayCluster
(`<fullname>-ray`: researchers' code, Ray's token, the members' keys, no platform database) and,
with serve.enabled, the serving RayService (`<fullname>-serve`: the Serve application, which checks
tokens and meters calls in the platform database, so its pods hold the database password). Ray is
one trust domain inside a cluster: a job may place its tasks on any node (custom resources are not
a boundary), call or kill any named actor, Serve's included, and read the environment of the
processes beside it, which run as the same user. So what serving holds is never on a node of the
cluster where jobs run. */}}
{{- define "indai.rayPodSpec" -}}
{{- $ := .root -}}
serviceAccountName: {{ include "indai.fullname" $ }}-{{ ternary "serve" "ray" .serving }}
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
{{- if and .serving (not .head) }}
{{ include "indai.spread" (dict "root" $ "component" "serve-worker") }}
{{- end }}
{{- $volumes := ternary "" (include "indai.rayPodVolumes" $ | trim) .serving }}
{{- if and .head (not .serving) $.Values.ray.autoscaling.enabled }}
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
      {{- include "indai.platformEnv" (dict "root" $ "serving" .serving) | nindent 6 }}
      - name: INDAI_RAY_ADDRESS
        value: auto
      {{- if .serving }}
      {{- /* Serve's ingress replicas check members' tokens and access rules and meter each call in
      the platform database; without it they would open an empty pod-local SQLite file. Only the
      serving cluster's pods get it: no researcher's job runs there */}}
      {{- include "indai.dbUrlEnv" $ | nindent 6 }}
      {{- else }}
      {{- if include "indai.rayAuth" $ }}
      {{- /* KubeRay copies env and mounts into the workers' wait-gcs-ready init container, whose
      `ray health-check` needs the token too */}}
      {{- include "indai.rayAuthEnv" $ | nindent 6 }}
      {{- end }}
      {{- if $.Values.ray.memberKeys.existingSecret }}
      - {name: INDAI_SECRETS_DIR, value: {{ include "indai.memberKeysDir" $ }}}
      {{- end }}
      {{- end }}
    {{- if and (not .serving) (or (include "indai.rayAuth" $) $.Values.ray.memberKeys.existingSecret) }}
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

{{/* A RayCluster spec: (dict "root" . "serving" false) for the jobs' cluster, "serving" true for
the RayService's. */}}
{{- define "indai.rayClusterSpec" -}}
{{- $ := .root -}}
{{- $serving := .serving -}}
{{- $autoscaling := and (not $serving) $.Values.ray.autoscaling.enabled -}}
{{- $part := ternary "serve" "ray" $serving -}}
rayVersion: {{ $.Values.ray.rayVersion | quote }}
enableInTreeAutoscaling: {{ $autoscaling }}
{{- if $autoscaling }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $.Values.ray.autoscaling.idleTimeoutSeconds }}
  securityContext: {{- include "indai.containerSecurity" $ | nindent 4 }}
  {{- if include "indai.rayAuth" $ }}
  {{- /* the sidecar talks to the GCS: the head pod's token volume, and Ray's settings */}}
  env: {{- include "indai.rayAuthEnv" $ | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "indai.autoscalerApiMount" $ | nindent 4 }}
    {{- if include "indai.rayAuth" $ }}
    {{- include "indai.rayAuthMount" $ | nindent 4 }}
    {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    num-cpus: "0"
  template:
    metadata:
      labels: {{- include "indai.selector" $ | nindent 8 }}
        indai.io/component: {{ $part }}-head
    {{- if $serving }}
    spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" true "serving" true "group" $.Values.serve.head "container" "ray-head" "image" $.Values.images.platform "gpus" 0 "ports" (list (dict "name" "gcs" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "serve" "containerPort" 8000))) | nindent 6 }}
    {{- else }}
    spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" true "serving" false "group" $.Values.ray.head "container" "ray-head" "image" $.Values.images.platform "gpus" 0 "ports" (list (dict "name" "gcs" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001))) | nindent 6 }}
    {{- end }}
{{- if $serving }}
workerGroupSpecs:
{{- with $.Values.serve.workers }}
  - groupName: cpu
    replicas: {{ .replicas }}
    minReplicas: {{ .replicas }}
    maxReplicas: {{ .replicas }}
    rayStartParams: {}
    template:
      metadata:
        labels: {{- include "indai.selector" $ | nindent 10 }}
          indai.io/component: serve-worker
      spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" false "serving" true "group" . "container" "ray-worker" "image" $.Values.images.platform "gpus" 0 "ports" (list (dict "name" "serve" "containerPort" 8000))) | nindent 8 }}
{{- end }}
{{- else }}
{{- if not (or $.Values.ray.cpuWorkers.enabled $.Values.ray.gpuWorkers.enabled) }}
workerGroupSpecs: []
{{- else }}
workerGroupSpecs:
{{- end }}
{{- with $.Values.ray.cpuWorkers }}
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
      spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" false "serving" false "group" . "container" "ray-worker" "image" $.Values.images.platform "gpus" 0) | nindent 8 }}
{{- end }}
{{- end }}
{{- with $.Values.ray.gpuWorkers }}
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
      spec: {{- include "indai.rayPodSpec" (dict "root" $ "head" false "serving" false "group" . "container" "ray-worker" "image" $.Values.images.platformGpu "gpus" .gpusPerWorker) | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
