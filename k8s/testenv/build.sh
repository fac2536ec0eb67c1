#!/usr/bin/env bash
# Build the pinned cluster tools once (cached in ${INDAI_TOOLS_CACHE:-~/.cache/indai/tools}/k8s-<hash>/bin); fast when cached.
# The logic lives in cluster.py (standard library only), which the pytest fixture uses too.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$py" "$here/cluster.py" build "$@"
