#!/usr/bin/env sh
# The MLflow tracking server as indai runs it. On a cluster (image entrypoint):
#   MLFLOW_BACKEND_STORE_URI=postgresql://...  MLFLOW_ARTIFACTS_DESTINATION=s3://indai/mlflow-artifacts  mlflow/start-server.sh
# The embedded default (`indai up`, platform/services.py) starts the same server with SQLite and
# the local object-store folder. Artefacts are proxied by the server (--serve-artifacts), so
# clients never need object-store credentials of their own.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (sqlite:///... or postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (a folder or s3://bucket/mlflow-artifacts)}"
exec python -m mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}"
