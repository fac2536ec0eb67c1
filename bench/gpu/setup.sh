# Sourced (not run) by bench/gpu/run.sh on the lent GPU machine, from the repository root:
#   source bench/gpu/setup.sh || exit 1
# That machine has python3 3.12 with torch, but no network and no ray, deepspeed, pydantic or
# indai; make_carry.sh put what it lacks into .whl/ (carried with the call). This installs it
# into $INDAI_SITE without a network, builds DeepSpeed from its source with no compiled ops,
# unpacks the trimmed Ray, and makes indai.platform / indai.trainers / indai.serving importable
# from the repository's folders (the repository is not pip-installed there).
# Knobs: PYTHON (python3), INDAI_WHL ($PWD/.whl), INDAI_SITE (/tmp/site), INDAI_REPO ($PWD).
# Exports PYTHONPATH, PATH (ray CLI in $INDAI_SITE/bin), TORCH_CUDA_ARCH_LIST=9.0,
# RAY_USAGE_STATS_ENABLED=0. Takes about a minute, most of it DeepSpeed's build.

indai_gpu_setup() {
  local py=${PYTHON:-python3} whl=${INDAI_WHL:-$PWD/.whl} site=${INDAI_SITE:-/tmp/site}
  local repo=${INDAI_REPO:-$PWD} t0=$SECONDS pkg
  py=$(command -v "$py") || { echo "setup.sh: no $PYTHON" >&2; return 1; }
  ls "$whl"/*.whl "$whl"/deepspeed-*.tar.gz "$whl"/ray-*-trimmed.tar.xz >/dev/null ||
    { echo "setup.sh: $whl is incomplete; rebuild it with bench/gpu/make_carry.sh and carry .whl" >&2; return 1; }
  mkdir -p "$site/bin"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # The machine sets 9.0a, on which DeepSpeed's build fails ("invalid literal for int() ... '0a'").
  export TORCH_CUDA_ARCH_LIST=9.0
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$whl"/*.whl || { echo "setup.sh: installing the wheels failed" >&2; return 1; }
  echo "setup.sh: wheels installed ($((SECONDS - t0)) s)"
  DS_BUILD_OPS=0 "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --upgrade --target "$site" "$whl"/deepspeed-*.tar.gz ||
    { echo "setup.sh: building DeepSpeed from its source failed" >&2; return 1; }
  echo "setup.sh: deepspeed built ($((SECONDS - t0)) s)"
  rm -rf "$site/ray" "$site"/ray-*.dist-info
  if command -v xz >/dev/null; then
    tar -xJf "$whl"/ray-*-trimmed.tar.xz -C "$site"
  else
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
      "$whl"/ray-*-trimmed.tar.xz "$site"
  fi || { echo "setup.sh: unpacking Ray failed" >&2; return 1; }
  printf '#!/bin/sh\nexec "%s" -c "import sys; from ray.scripts.scripts import main; sys.exit(main())" "$@"\n' \
    "$py" > "$site/bin/ray" && chmod +x "$site/bin/ray"
  echo "setup.sh: ray unpacked ($((SECONDS - t0)) s)"
  # indai's packages are the folders platform/, trainers/ and serving/ (setuptools package-dir).
  rm -rf "$site/indai" && mkdir -p "$site/indai" && : > "$site/indai/__init__.py"
  for pkg in platform trainers serving; do ln -s "$repo/$pkg" "$site/indai/$pkg"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
  export RAY_USAGE_STATS_ENABLED=0
  echo "setup.sh: installed into $site: $(cd "$site" && ls -d *.dist-info | sed 's/\.dist-info$//' | tr '\n' ' ')"
  "$py" -c 'import deepspeed, ray, pydantic, indai.trainers, indai.platform.storage
print(f"setup.sh: deepspeed {deepspeed.__version__}, ray {ray.__version__}, pydantic {pydantic.__version__}, indai from {indai.trainers.__path__[0]}")' ||
    { echo "setup.sh: import deepspeed, ray failed" >&2; return 1; }
  echo "setup.sh: done in $((SECONDS - t0)) s"
}
indai_gpu_setup
