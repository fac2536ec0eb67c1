#!/usr/bin/env bash
# The prepared GPU check: one call of the lent GPU machine, 9-10 minutes, everything under $OUT.
#
#   run(command="bash bench/gpu/run.sh", carry=[".whl"], timeout_s=590)
#
# Steps, each with its own time limit, all inside INDAI_GPU_BUDGET seconds (default 540; a step
# that would not fit in what is left is skipped and says so). INDAI_GPU_STEPS picks the steps after
# setup, in this order (default "train rw tests": the measurements first; the LM steps were
# measured in stop 12):
#   setup        source bench/gpu/setup.sh: the carried wheels (.whl/), DeepSpeed built from its
#                source (TORCH_CUDA_ARCH_LIST=9.0, DS_BUILD_OPS=0), the trimmed Ray, indai
#                importable from this checkout; all into /tmp/site                   (<= 150 s)
#   train        bench/train_throughput.py --shape reference --models fusion, 2 rounds: plain
#                PyTorch, indai (device-resident split), indai_host_feed, and indai under Ray
#                Train only if `import ray.train` works (ZeRO-0: add INDAI_GPU_ZERO0=1); then
#                each way once more with 5 steps under torch.profiler (--profile 5): how busy
#                the GPU was, and the costliest operators                           (<= 270 s)
#   rw           bench/report_writer_throughput.py: the report writer (~1.1B LM + prefix
#                encoders) eager and compiled, against a plain LoRA loop, then 3 steps of
#                each under torch.profiler (--profile 3)                            (<= 150 s)
#   tests        python3 -m pytest tests/gpu, the host-wait counts first            (<= 150 s)
#   llm          bench/llm_throughput.py: the ~1.1B Llama, full fine-tuning and LoRA, plain (<= 90 s)
#   llm-ds       the same through DeepSpeed ZeRO-2, only if DeepSpeed imports          (<= 90 s)
#   compile      plain loops with torch.compile (fusion model and the LM)              (<= 300 s)
#   ckpt         bench/checkpoint_size.py: a report-writer checkpoint without and with the
#                frozen LM, save and load, 2 rounds (the checksum on the GPU)        (<= 120 s)
# Output: $OUT/results/*.jsonl (bench/_record.py lines), $OUT/logs/<step>.log, $OUT/summary.txt.
# A dry run of the script's logic on a CPU machine: PYTHON=.venv/bin/python INDAI_GPU_SHAPE=small
# INDAI_GPU_RW_SHAPE=tiny INDAI_GPU_LLM_ARGS='--shape tiny --steps 2 --warmup 1' OUT=/tmp/gpu-dry bash bench/gpu/run.sh
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/indai-gpu-out}
BUDGET=${INDAI_GPU_BUDGET:-540}
SHAPE=${INDAI_GPU_SHAPE:-reference}
RW_SHAPE=${INDAI_GPU_RW_SHAPE:-reference}
STEPS=" ${INDAI_GPU_STEPS:-train rw tests} "
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

wanted() { [[ "$STEPS" == *" $1 "* ]]; }

if wanted train; then
  ways=(plain indai indai_host_feed)
  [ "$HAVE_DS" = 1 ] && [ "${INDAI_GPU_ZERO0:-0}" = 1 ] && ways+=(indai_zero0)
  [ "$HAVE_RAY" = 1 ] && ways+=(indai_ray)
  step train 270 "$PYTHON" bench/train_throughput.py --shape "$SHAPE" --models fusion --repeats 2 --profile 5 --ways "${ways[@]}" --note "bench/gpu/run.sh"
fi

wanted rw && step rw 150 "$PYTHON" bench/report_writer_throughput.py --shape "$RW_SHAPE" --profile 3 --note "bench/gpu/run.sh"

wanted tests && step tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_host_waits.py tests/gpu \
  --junitxml="$OUT/logs/tests-gpu.xml"

wanted llm && step llm 90 "$PYTHON" bench/llm_throughput.py --engines plain "${LLM_ARGS[@]}" --note "bench/gpu/run.sh"
if wanted llm-ds; then
  if [ "$HAVE_DS" = 1 ]; then
    step llm-ds 90 "$PYTHON" bench/llm_throughput.py --engines deepspeed --ds-stage 2 "${LLM_ARGS[@]}" --note "bench/gpu/run.sh"
  else
    echo "== llm-ds: skipped, DeepSpeed does not import" | tee -a "$STATUS"
  fi
fi

if wanted compile; then
  step train-compile 150 "$PYTHON" bench/train_throughput.py --shape "$SHAPE" --models fusion --ways plain_compile indai_compile --note "bench/gpu/run.sh compile"
  step llm-compile 150 "$PYTHON" bench/llm_throughput.py --engines plain --modes full --compile "${LLM_ARGS[@]}" --note "bench/gpu/run.sh compile"
fi

wanted ckpt && step ckpt 120 "$PYTHON" bench/checkpoint_size.py --shape "$RW_SHAPE" --repeats 2 --note "bench/gpu/run.sh"

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
            pr = r.get("profile") or {}
            if pr:
                print(f"        profiled: {pr.get('wall_ms_per_step')} ms/step, device busy {pr.get('device_busy')}; "
                      + ", ".join(f"{t['op']} {t['ms_per_step']} ms" for t in pr.get("top", [])[:5]))
        elif path.stem == "llm_throughput":
            if "error" in r:
                print(f"{r['engine']:<9} {r['mode']:<5} batch {r['batch']}: {r['error'][:80]}")
            else:
                print(f"{r['engine']:<9} {r['mode']:<5} batch {r['batch']} compile {r['compile']}: {r['tokens_per_s']:>9.0f} tokens/s "
                      f"{r['tflops']:>6.1f} TFLOP/s MFU {r['mfu']:.3f} (GPU.md count {r['mfu_gpu_md']}) peak {r['peak_memory_gib']} GiB")
        elif path.stem == "report_writer_throughput":
            if "error" in r:
                print(f"{r['way']:<14} batch {r['batch']}: {r['error'][:80]}")
            else:
                print(f"{r['way']:<14} batch {r['batch']} ckpt {r['grad_ckpt']}: {r['tokens_per_s']:>9.0f} tokens/s "
                      f"{r['step_ms']:>8.1f} ms/step {r['tflops']:>6.1f} TFLOP/s MFU {r['mfu']:.3f} /lm_lora {r['ratio_to_lm_lora']} "
                      f"peak {r['peak_memory_gib']} GiB warm-up {r['warmup_s']} s")
                pr = r.get("profile") or {}
                if pr:
                    print(f"        profiled: {pr.get('wall_ms_per_step')} ms/step, device busy {pr.get('device_busy')}; "
                          + ", ".join(f"{t['op']} {t['ms_per_step']} ms" for t in pr.get("top", [])[:5]))
        elif path.stem == "checkpoint_size":
            print(f"{r['shape']} on {r['device']}: frozen left out {r['frozen_left_out_bytes'] / 2**20:,.0f} MiB, save "
                  f"{r['frozen_left_out_save_s']} s, load {r['frozen_left_out_load_s']} s; every weight "
                  f"{r['every_weight_bytes'] / 2**20:,.0f} MiB, save {r['every_weight_save_s']} s, load {r['every_weight_load_s']} s; "
                  f"ratios bytes {r['bytes_ratio']} save {r['save_ratio']} load {r['load_ratio']}")
        else:
            print(json.dumps(r)[:300])
EOF
echo "== total $SECONDS s"
cat "$STATUS"
cat "$OUT/summary.txt"
