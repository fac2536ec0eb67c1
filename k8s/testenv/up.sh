#!/usr/bin/env bash
# Start the local control plane (state in ${INDAI_K8S_HOME:-~/.indai-k8s}); builds the tools first if needed.
# The logic lives in cluster.py (standard library only), which the pytest fixture uses too.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$py" "$here/cluster.py" up "$@"
