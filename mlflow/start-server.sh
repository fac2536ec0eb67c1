#!/usr/bin/env sh
# The MLflow tracking server as indai runs it. On a cluster (image entrypoint):
#   MLFLOW_BACKEND_STORE_URI=postgresql://...  MLFLOW_ARTIFACTS_DESTINATION=s3://indai/mlflow-artifacts  mlflow/start-server.sh
# The embedded default (`indai up`, platform/services.py) starts the same server with SQLite and
# the local object-store folder. Artefacts are proxied by the server (--serve-artifacts), so
# clients never need object-store credentials of their own.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (sqlite:///... or postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (a folder or s3://bucket/mlflow-artifacts)}"
set --
if [ -n "${MLFLOW_APP_NAME:-}" ]; then
  # basic auth: the admin password and the users' database come from the environment, never
  # from the image or the ConfigMap
  : "${MLFLOW_AUTH_CONFIG_PATH:?set MLFLOW_AUTH_CONFIG_PATH to the basic_auth.ini template}"
  : "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
  conf="${TMPDIR:-/tmp}/indai-basic-auth.ini"  # never the template itself (sed would read an emptied file)
  umask 077
  sed -e "s|^admin_password = .*|admin_password = ${MLFLOW_AUTH_ADMIN_PASSWORD}|" \
      -e "s|^database_uri = .*|database_uri = ${MLFLOW_BACKEND_STORE_URI}|" "$MLFLOW_AUTH_CONFIG_PATH" > "$conf"
  export MLFLOW_AUTH_CONFIG_PATH="$conf"
  set -- --app-name "$MLFLOW_APP_NAME"
fi
exec python -m mlflow server "$@" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}"
