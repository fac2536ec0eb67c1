#!/usr/bin/env bash
# Trims an unpacked Ray wheel to what Ray core, Ray Train, Ray Tune and Ray Data need, so that
# Ray fits into the 64 MiB working tree that one call of the lent GPU machine can carry
# (the whole wheel is about 79 MB zipped, 201 MB unpacked; trimmed and xz-compressed about 19 MB).
#
# Usage: bench/gpu/trim_ray.sh DIR   (DIR holds ray/ and ray-*.dist-info/, e.g. an unzipped wheel)
#
# The rule, the same for every Python version (make_carry.sh checks it on this machine's Python):
#   removed  ray/jars (Java workers), ray/rllib, ray/serve, ray/llm, every tests/ and examples/
#            folder, the dashboard's JavaScript source maps (*.map);
#   stripped the debug symbols of the three large ELF files (_raylet.so, raylet, gcs_server),
#            when `strip` is there; nothing else in them changes.
# Everything else stays, the dashboard's Python code and its built page included: the raylet
# starts the dashboard agent and the runtime-env agent (with its vendored aiohttp) on every node.
set -euo pipefail
dir=${1:?usage: trim_ray.sh DIR}
ray="$dir/ray"
[ -f "$ray/__init__.py" ] || { echo "trim_ray.sh: $ray/__init__.py not found" >&2; exit 2; }
before=$(du -sm "$dir" | cut -f1)
rm -rf "$ray/jars" "$ray/rllib" "$ray/serve" "$ray/llm"
find "$ray" -depth -type d \( -name tests -o -name examples \) -exec rm -rf {} +
find "$ray" -type f -name '*.map' -delete
if command -v strip >/dev/null; then
  for elf in "$ray/_raylet.so" "$ray/core/src/ray/raylet/raylet" "$ray/core/src/ray/gcs/gcs_server"; do
    [ -f "$elf" ] && strip --strip-unneeded "$elf"
  done
fi
echo "trim_ray.sh: $dir ${before} MiB -> $(du -sm "$dir" | cut -f1) MiB"
