#!/usr/bin/env bash
# The prepared GPU check: one call of the lent GPU machine, about 6 minutes, everything under $OUT.
#
#   run(command="bash bench/gpu/run.sh", carry=[".whl"], timeout_s=540)
#
# Steps, each with its own time limit, all inside INDAI_GPU_BUDGET seconds (default 450; a step
# that would not fit in what is left is skipped and says so):
#   1. setup     source bench/gpu/setup.sh: the carried wheels (.whl/), DeepSpeed built from its
#                source (TORCH_CUDA_ARCH_LIST=9.0, DS_BUILD_OPS=0), the trimmed Ray, indai
#                importable from this checkout; all into /tmp/site                   (<= 150 s)
#   2. tests     python3 -m pytest tests/gpu                                           (<= 120 s)
#   3. train     bench/train_throughput.py --shape reference --models fusion: plain PyTorch,
#                indai loop without Ray (strategy auto), indai with DeepSpeed ZeRO-0, and indai
#                under Ray Train only if `import ray.train` works here                 (<= 150 s)
#   4. llm       bench/llm_throughput.py: the ~1.1B Llama, full fine-tuning and LoRA, plain (<= 90 s)
#   5. llm-ds    the same through DeepSpeed ZeRO-2, only if DeepSpeed imports          (<= 90 s)
#   6. extra     INDAI_GPU_COMPILE=1: plain loops with torch.compile (fusion model and the LM)
# Output: $OUT/results/*.jsonl (bench/_record.py lines), $OUT/logs/<step>.log, $OUT/summary.txt.
# A dry run of the script's logic on a CPU machine: PYTHON=.venv/bin/python INDAI_GPU_SHAPE=small
# INDAI_GPU_LLM_ARGS='--shape tiny --steps 2 --warmup 1' OUT=/tmp/gpu-dry bash bench/gpu/run.sh
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/indai-gpu-out}
BUDGET=${INDAI_GPU_BUDGET:-450}
SHAPE=${INDAI_GPU_SHAPE:-reference}
read -r -a LLM_ARGS <<< "${INDAI_GPU_LLM_ARGS:-}"
mkdir -p "$OUT/logs" "$OUT/results"
export INDAI_BENCH_RESULTS="$OUT/results" PYTHON=${PYTHON:-python3} TORCH_CUDA_ARCH_LIST=9.0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STATUS="$OUT/status.txt"
: > "$STATUS"

# step NAME LIMIT COMMAND...: run with `timeout`, log to $OUT/logs/NAME.log, record the outcome
step() {
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  left=$((BUDGET - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "== $name: skipped, only ${left} s of the ${BUDGET} s budget left" | tee -a "$STATUS"
    return 0
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/logs/$name.log" | grep -v -i "warning" | tail -n 15
  case $rc in
    0) echo "== $name: ok in $((SECONDS - t0)) s" | tee -a "$STATUS" ;;
    124|137) echo "== $name: TIMED OUT after $((SECONDS - t0)) s (limit ${limit} s)" | tee -a "$STATUS" ;;
    *) echo "== $name: FAILED with exit code $rc after $((SECONDS - t0)) s" | tee -a "$STATUS" ;;
  esac
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/logs/gpu.txt"
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'

# 1. setup (sourced: it exports PYTHONPATH and PATH into this shell)
t0=$SECONDS
if source bench/gpu/setup.sh > "$OUT/logs/setup.log" 2>&1; then
  echo "== setup: ok in $((SECONDS - t0)) s" | tee -a "$STATUS"
else
  echo "== setup: FAILED after $((SECONDS - t0)) s (logs/setup.log); going on with what imports" | tee -a "$STATUS"
  tail -n 8 "$OUT/logs/setup.log"
  site=${INDAI_SITE:-/tmp/site}
  mkdir -p "$site/indai" && : > "$site/indai/__init__.py"
  for pkg in platform trainers serving; do ln -sfn "$PWD/$pkg" "$site/indai/$pkg"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
grep "^setup.sh:" "$OUT/logs/setup.log" | tail -n 3
HAVE_DS=0; HAVE_RAY=0
"$PYTHON" -c 'import deepspeed' > /dev/null 2>&1 && HAVE_DS=1
"$PYTHON" -c 'import ray.train' > /dev/null 2>&1 && HAVE_RAY=1
echo "== deepspeed importable: $HAVE_DS; ray.train importable: $HAVE_RAY" | tee -a "$STATUS"
[ "$HAVE_RAY" = 1 ] || echo "== Ray Train does not import here: the indai-under-Ray way is skipped (no Ray numbers from this run)" | tee -a "$STATUS"

# 2. GPU tests
step tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu --junitxml="$OUT/logs/tests-gpu.xml"

# 3. the fusion model three ways
ways=(plain indai indai_host_feed)
[ "$HAVE_DS" = 1 ] && ways+=(indai_zero0)
[ "$HAVE_RAY" = 1 ] && ways+=(indai_ray)
step train 150 "$PYTHON" bench/train_throughput.py --shape "$SHAPE" --models fusion --ways "${ways[@]}" --note "bench/gpu/run.sh"

# 4./5. the ~1.1B LM
step llm 90 "$PYTHON" bench/llm_throughput.py --engines plain "${LLM_ARGS[@]}" --note "bench/gpu/run.sh"
if [ "$HAVE_DS" = 1 ]; then
  step llm-ds 90 "$PYTHON" bench/llm_throughput.py --engines deepspeed --ds-stage 2 "${LLM_ARGS[@]}" --note "bench/gpu/run.sh"
else
  echo "== llm-ds: skipped, DeepSpeed does not import" | tee -a "$STATUS"
fi

# 6. optional: torch.compile
if [ "${INDAI_GPU_COMPILE:-0}" = 1 ]; then
  step train-compile 150 "$PYTHON" bench/train_throughput.py --shape "$SHAPE" --models fusion --ways plain_compile indai_compile --note "bench/gpu/run.sh compile"
  step llm-compile 150 "$PYTHON" bench/llm_throughput.py --engines plain --modes full --compile "${LLM_ARGS[@]}" --note "bench/gpu/run.sh compile"
fi

"$PYTHON" - "$OUT/results" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    print(f"# {path.name}")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if path.stem == "train_throughput":
            print(f"{r['model']:<7} {r['way']:<14} {r['samples_per_s']:>9.1f} samples/s {r['step_ms']:>8.1f} ms/step "
                  f"peak {r['peak_memory_gib']} GiB  /plain {r['ratio_to_plain']}  /indai {r['ratio_to_indai']}  {r['gpu']}")
        elif path.stem == "llm_throughput":
            if "error" in r:
                print(f"{r['engine']:<9} {r['mode']:<5} batch {r['batch']}: {r['error'][:80]}")
            else:
                print(f"{r['engine']:<9} {r['mode']:<5} batch {r['batch']} compile {r['compile']}: {r['tokens_per_s']:>9.0f} tokens/s "
                      f"{r['tflops']:>6.1f} TFLOP/s MFU {r['mfu']:.3f} (GPU.md count {r['mfu_gpu_md']}) peak {r['peak_memory_gib']} GiB")
        else:
            print(json.dumps(r)[:300])
EOF
echo "== total $SECONDS s"
cat "$STATUS"
cat "$OUT/summary.txt"
