#!/usr/bin/env bash
# Rebuilds .whl/, what one call of the lent GPU machine carries so that indai's train loop,
# DeepSpeed and Ray Train run there. That machine has Python 3.12, torch 2.11+cu130 and no
# network, and lacks ray, deepspeed, pydantic and a few small packages (see
# /work/.library/device/KINDS.md); a call carries at most 64 MiB, the repository included.
#
# Usage (from the repository root, with network to PyPI):
#   bench/gpu/make_carry.sh                          # .whl/ for the GPU machine (cp312)
#   PYVER=3.11 DEST=/tmp/whl311 bench/gpu/make_carry.sh   # the same set for this machine's Python,
#                                                    # to check setup.sh and the Ray trimming here
# Then carry `.whl` and `source bench/gpu/setup.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
tag=cp${PYVER/./}
pip_download() {
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$@"
}

# Versions are requirements.lock's. DeepSpeed travels as its source (about 2 MB): setup.sh builds
# it there with DS_BUILD_OPS=0 against the torch already installed.
DEEPSPEED=deepspeed==0.19.8
RAY=ray==2.60.0
WHEELS=(
  # DeepSpeed's needs that the GPU machine lacks (einops, msgpack, ninja, numpy, packaging,
  # psutil, py-cpuinfo, tqdm are there)
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0
  # Ray core's and ray[train,tune,data]'s needs that it lacks (click, filelock, msgpack,
  # protobuf, pyyaml, requests, pandas, pyarrow, fsspec, attrs are there)
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
  tensorboardX==2.6.5
)

rm -rf "$DEST" && mkdir -p "$DEST"
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary=deepspeed -d "$DEST" "$DEEPSPEED"
pip_download "$DEST" "${WHEELS[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_download "$work" "$RAY"
mkdir "$work/tree"
python3 -m zipfile -e "$work"/ray-*.whl "$work/tree"
# zipfile drops the exec bits; the raylet and gcs_server must stay executable
chmod +x "$work/tree/ray/core/src/ray/raylet/raylet" "$work/tree/ray/core/src/ray/gcs/gcs_server"
bench/gpu/trim_ray.sh "$work/tree"
out="$PWD/$DEST/${RAY/==/-}-$tag-trimmed.tar.xz"
[[ $DEST = /* ]] && out="$DEST/${RAY/==/-}-$tag-trimmed.tar.xz"
(cd "$work/tree" && tar -cf - ray ray-*.dist-info) | xz -9e -T2 > "$out"

ls -l "$DEST"
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
echo "make_carry.sh: $DEST holds $((total / 1048576)) MiB"
[ "$total" -lt $((50 * 1048576)) ] || { echo "make_carry.sh: over 50 MiB, too much to carry" >&2; exit 1; }
