{{/* Resource name prefix. */}}
{{- define "indai.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "indai.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels that mark a pod as one of this release's platform pods (NetworkPolicy peers). */}}
{{- define "indai.selector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
indai.io/platform: "true"
{{- end -}}

{{/* A part's replicas spread over nodes where the scheduler can (a preference, never a reason to
leave a pod pending): with its disruption budget (availability/disruption-budgets.yaml), a node that
is lost or drained takes at most one of them. Takes (dict "root" $ "component" "<name>"). */}}
{{- define "indai.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels: {{- include "indai.selector" .root | nindent 8 }}
        indai.io/component: {{ .component }}
{{- end -}}

{{- define "indai.image" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{/* Pod-level security context: Pod Security "restricted". */}}
{{- define "indai.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "indai.containerSecurity" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "indai.secretName" -}}{{ include "indai.fullname" . }}-secrets{{- end -}}

{{/* S3 endpoint, bucket and credentials: the release's MinIO or an external S3. */}}
{{- define "indai.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}{{ include "indai.fullname" . }}-minio:9000{{- else -}}{{ required "externalS3.endpoint is required when minio.enabled is false" .Values.externalS3.endpoint }}{{- end -}}
{{- end -}}
{{- define "indai.s3Bucket" -}}
{{- if .Values.minio.enabled -}}{{ .Values.minio.bucket }}{{- else -}}{{ required "externalS3.bucket is required when minio.enabled is false" .Values.externalS3.bucket }}{{- end -}}
{{- end -}}
{{- define "indai.s3Secret" -}}
{{- if .Values.minio.enabled -}}{{ include "indai.secretName" . }}{{- else -}}{{ required "externalS3.existingSecret is required when minio.enabled is false" .Values.externalS3.existingSecret }}{{- end -}}
{{- end -}}
{{- define "indai.s3Secure" -}}
{{- if .Values.minio.enabled -}}0{{- else if .Values.externalS3.secure -}}1{{- else -}}0{{- end -}}
{{- end -}}

{{- define "indai.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}http://{{ include "indai.fullname" . }}-mlflow:5000{{- else -}}{{ required "mlflow.external.uri is required when mlflow.enabled is false" .Values.mlflow.external.uri }}{{- end -}}
{{- end -}}

{{- define "indai.dbHost" -}}
{{- if .Values.postgresql.enabled -}}{{ include "indai.fullname" . }}-postgresql{{- else -}}{{ required "externalDatabase.host is required when postgresql.enabled is false" .Values.externalDatabase.host }}{{- end -}}
{{- end -}}
{{- define "indai.dbPort" -}}
{{- if .Values.postgresql.enabled -}}5432{{- else -}}{{ .Values.externalDatabase.port }}{{- end -}}
{{- end -}}
{{- define "indai.dbUser" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.user }}{{- else -}}{{ .Values.externalDatabase.user }}{{- end -}}
{{- end -}}
{{/* The platform's database (members, tokens, audit) and MLflow's: two databases, because both
keep their schema version in an Alembic table of the same name. */}}
{{- define "indai.dbName" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.database }}{{- else -}}{{ .Values.externalDatabase.database }}{{- end -}}
{{- end -}}
{{- define "indai.mlflowDbName" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.mlflowDatabase }}{{- else -}}{{ .Values.externalDatabase.mlflowDatabase }}{{- end -}}
{{- end -}}
{{/* host:port/ of the database server; DB_PASSWORD must be in the container's env first. */}}
{{- define "indai.dbServer" -}}
{{ include "indai.dbUser" . }}:$(DB_PASSWORD)@{{ include "indai.dbHost" . }}:{{ include "indai.dbPort" . }}
{{- end -}}
{{- define "indai.dbPasswordEnv" -}}
- name: DB_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "indai.dbSecret" . }}, key: password}}
{{- end -}}

{{/* The platform database's URL (DB_PASSWORD from indai.dbPasswordEnv before it). */}}
{{- define "indai.dbUrlEnv" -}}
{{ include "indai.dbPasswordEnv" . }}
- name: INDAI_DB_URL
  value: postgresql+psycopg://{{ include "indai.dbServer" . }}/{{ include "indai.dbName" . }}
{{- end -}}

{{- define "indai.dbSecret" -}}
{{- if .Values.postgresql.enabled -}}{{ include "indai.secretName" . }}{{- else -}}{{ required "externalDatabase.existingSecret is required when postgresql.enabled is false" .Values.externalDatabase.existingSecret }}{{- end -}}
{{- end -}}

{{/* Environment of the platform's pods: where the object store and MLflow are, and the accounts
for them. (dict "root" . "serving" false) for the gateway and the jobs' Ray cluster; "serving" true
for the serving cluster, which reads models from MLflow only: no object-store keys, and MLflow's
read-only user indai-serve instead of the jobs' indai-jobs (platform/mlflow_users.py). */}}
{{- define "indai.platformEnv" -}}
{{- $serving := .serving -}}
{{- with .root -}}
{{- if not $serving }}
- name: INDAI_STORE_URI
  value: s3://{{ include "indai.s3Bucket" . }}
- name: INDAI_S3_ENDPOINT
  value: {{ include "indai.s3Endpoint" . | quote }}
- name: INDAI_S3_SECURE
  value: {{ include "indai.s3Secure" . | quote }}
{{- /* with the chart's MinIO, the jobs' own user (platform/store_users.py: the platform bucket, no
MLflow artefacts, no admin rights), never MinIO's root keys: Ray pods run researchers' code */}}
- name: INDAI_S3_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ include "indai.s3Secret" . }}, key: {{ ternary "jobsAccessKey" "accessKey" .Values.minio.enabled }}}}
- name: INDAI_S3_SECRET_KEY
  valueFrom: {secretKeyRef: {name: {{ include "indai.s3Secret" . }}, key: {{ ternary "jobsSecretKey" "secretKey" .Values.minio.enabled }}}}
{{- end }}
- name: INDAI_MLFLOW_URI
  value: {{ include "indai.mlflowUri" . | quote }}
{{- /* pretrained weights come from the platform's mirror only (platform/settings.py OFFLINE_ENV) */}}
- {name: HF_HUB_OFFLINE, value: "1"}
- {name: TRANSFORMERS_OFFLINE, value: "1"}
- {name: HF_HUB_DISABLE_TELEMETRY, value: "1"}
{{- /* a dead Serve HTTP proxy is replaced after 3 health checks: 2 s apart, not 10 (platform/settings.py RAY_SERVE_ENV) */}}
- {name: RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S, value: "2"}
{{- if .Values.serve.enabled }}
- name: INDAI_SERVE_URL
  value: http://{{ include "indai.fullname" . }}-serve-serve-svc:8000
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth $serving }}
{{- /* made by the provision-mlflow hook Job (templates/mlflow/mlflow.yaml) */}}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ include "indai.mlflowServeUser" . }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "indai.secretName" . }}, key: mlflowServePassword}}
{{- else if and .Values.mlflow.enabled .Values.mlflow.auth }}
{{- /* the jobs' own user (EDIT on everything, no admin: it cannot manage users), made by the same
hook Job; one for all members' jobs until jobs run on Ray clusters of their own */}}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ include "indai.mlflowJobsUser" . }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "indai.secretName" . }}, key: mlflowJobsPassword}}
{{- else if and (not .Values.mlflow.enabled) .Values.mlflow.external.existingSecret }}
{{- /* the external server's account, from the admin's own Secret (never a value in values.yaml) */}}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom: {secretKeyRef: {name: {{ .Values.mlflow.external.existingSecret }}, key: username}}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .Values.mlflow.external.existingSecret }}, key: password}}
{{- end }}
{{- end }}
{{- end -}}

{{- define "indai.mlflowServeUser" -}}indai-serve{{- end -}}
{{- define "indai.mlflowJobsUser" -}}indai-jobs{{- end -}}


{{/* Peers that are one Ray cluster's own pods: (dict "root" . "part" "ray") for the jobs'
RayCluster (head and both worker groups), "serve" for the serving RayService's. */}}
{{- define "indai.clusterPeers" -}}
podSelector:
  matchLabels: {app.kubernetes.io/instance: {{ .root.Release.Name }}}
  matchExpressions:
    {{- if eq .part "serve" }}
    - {key: indai.io/component, operator: In, values: [serve-head, serve-worker]}
    {{- else }}
    - {key: indai.io/component, operator: In, values: [ray-head, ray-worker-cpu, ray-worker-gpu]}
    {{- end }}
{{- end -}}

{{- define "indai.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "indai.fullname" .) -}}
{{- $hosts := list -}}
{{- range $name := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) "localhost" "127.0.0.1" -}}
{{- $hosts = append (append $hosts $name) (printf "%s:*" $name) -}}
{{- end -}}
{{- join "," (concat $hosts .Values.mlflow.allowedHosts) -}}
{{- end -}}

{{/* Ray's token authentication (RAY_AUTH_MODE=token; Ray reads the token from the file that
RAY_AUTH_TOKEN_PATH names). One Secret key, mounted read-only into the RayCluster's pods and the
job gateway and into nothing else. The file is root's with mode 0400; the pods' fsGroup makes the
kubelet give their group read access to it, which the non-root Ray and gateway processes need.
"true" when on, "" when off. */}}
{{- define "indai.rayAuth" -}}
{{- if and .Values.ray.enabled .Values.ray.auth.enabled -}}true{{- end -}}
{{- end -}}
{{- define "indai.rayAuthSecret" -}}
{{- .Values.ray.auth.existingSecret | default (include "indai.secretName" .) -}}
{{- end -}}
{{- define "indai.rayAuthDir" -}}/var/run/secrets/indai/ray-auth{{- end -}}
{{- define "indai.rayAuthVolume" -}}
- name: ray-auth-token
  secret:
    secretName: {{ include "indai.rayAuthSecret" . }}
    items: [{key: rayAuthToken, path: token}]
    defaultMode: 0400
{{- end -}}
{{- define "indai.rayAuthMount" -}}
- {name: ray-auth-token, mountPath: {{ include "indai.rayAuthDir" . }}, readOnly: true}
{{- end -}}
{{- define "indai.memberKeysDir" -}}/var/run/secrets/indai/member-keys{{- end -}}
{{/* Volumes of a Ray pod: Ray's token, the members' de-identification keys (each when on). */}}
{{- define "indai.rayPodVolumes" -}}
{{- if include "indai.rayAuth" . }}
{{ include "indai.rayAuthVolume" . }}
{{- end }}
{{- with .Values.ray.memberKeys.existingSecret }}
- name: member-keys
  secret: {secretName: {{ . }}, defaultMode: 0400}
{{- end }}
{{- end -}}
{{/* The Ray service account's API credentials, as the ServiceAccount admission plugin would inject
them (a short-lived token, the cluster's CA, the namespace), but in the head pod only and
mounted into the autoscaler sidecar only: the pod itself has automountServiceAccountToken false. */}}
{{- define "indai.autoscalerApiVolume" -}}
- name: autoscaler-api-access
  projected:
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3607}
      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
      - downwardAPI: {items: [{path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}]}
{{- end -}}
{{- define "indai.autoscalerApiMount" -}}
- {name: autoscaler-api-access, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
{{- end -}}
{{- define "indai.rayAuthEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
- {name: RAY_AUTH_TOKEN_PATH, value: {{ include "indai.rayAuthDir" . }}/token}
{{- end -}}

{{- /* The serving cluster's GCS fault tolerance (serve.highAvailability): on only with serve. Its
Redis: the admin's (address, existingSecret with `password`) or the chart's own StatefulSet (the
release secret's redisPassword). */}}
{{- define "indai.serveHa" -}}
{{- if and .Values.serve.enabled .Values.serve.highAvailability.enabled }}true{{ end -}}
{{- end -}}

{{- define "indai.ownRedis" -}}
{{- if and (include "indai.serveHa" .) (not .Values.serve.highAvailability.redis.address) }}true{{ end -}}
{{- end -}}

{{- define "indai.redisAddress" -}}
{{- with .Values.serve.highAvailability.redis.address -}}{{ . }}{{- else -}}{{ include "indai.fullname" . }}-redis:6379{{- end -}}
{{- end -}}

{{- define "indai.redisSecretRef" -}}
{{- if .Values.serve.highAvailability.redis.address -}}
{name: {{ required "serve.highAvailability.redis.existingSecret (a Secret with key password) is required with serve.highAvailability.redis.address" .Values.serve.highAvailability.redis.existingSecret }}, key: password}
{{- else -}}
{name: {{ include "indai.secretName" . }}, key: redisPassword}
{{- end -}}
{{- end -}}
