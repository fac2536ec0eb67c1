"""What Ray Train costs the train loop on CPU: the same `train_loop` under Ray Train
(TorchTrainer, through trainers.launch.run_workers) against the same loop launched directly
(`python -m indai.trainers.loop` for one worker, `torchrun --nproc-per-node=2` for two), with 1
and 2 workers, the same threads per worker (`--threads`, default 1: Ray gives a worker
OMP_NUM_THREADS = its CPUs, the direct launch gets the same), the same dataset version, model
and steps.

Reported per worker count: steady-state step time of each (indai's StepClock: warm-up left
out), the ratio Ray / direct (target: at most 1.03), and start-up seconds from launch to the
first step (Ray: from `TorchTrainer.fit`, with the Ray instance already running; its own
start is reported apart). Rounds alternate direct and Ray so that drift on a shared machine
hits both; medians over rounds are reported.

    .venv/bin/python bench/ray_overhead.py [--workers 1 2] [--repeats 2] [--steps 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _trainbench as tb  # noqa: E402
from _record import write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--model", choices=tb.MODELS, default="demo")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker, both launchers (see train_throughput.py)")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    if not tb.ray_importable():
        raise SystemExit("ray_overhead.py needs Ray (pip install 'ray[train]')")
    cpus = os.cpu_count() or 2
    ray_start = tb.start_ray(cpus, 0)
    print(f"Ray started in {ray_start:.1f} s", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="indai-bench-ray-") as tmp:
        from indai.platform.storage import open_store

        store = open_store(Path(tmp) / "store")
        for workers in a.workers:
            p = tb.plan(a.model, "small")
            p.update(steps=a.steps, warmup=a.warmup)
            ref, manifest = tb.make_dataset(store, f"ray-overhead-{workers}", p, world=workers)
            threads = a.threads
            runs: dict[str, list[dict]] = {"direct": [], "ray": []}
            for rnd in range(a.repeats):
                for how in ("direct", "ray"):
                    cfg = tb.train_config(store, ref, manifest, p, f"ray-overhead-{workers}-{how}-{rnd}",
                                          **{"run.workers": workers, "run.cpus_per_worker": threads})
                    t0 = time.perf_counter()
                    r = tb.run_torchrun(cfg, store, Path(tmp), threads) if how == "direct" else tb.run_ray(cfg, store, manifest, Path(tmp))
                    runs[how].append(r)
                    print(f"{workers} worker(s), {how} (round {rnd + 1}): {r['step_ms_mean']} ms/step, start-up "
                          f"{r['startup_s']} s, {r['threads']} thread(s) ({time.perf_counter() - t0:.1f} s in all)", file=sys.stderr)
            ratio = statistics.median(r["step_ms_mean"] / d["step_ms_mean"] for r, d in zip(runs["ray"], runs["direct"]))
            med = {how: statistics.median(r["step_ms_mean"] for r in rs) for how, rs in runs.items()}
            start = {how: statistics.median(r["startup_s"] for r in rs) for how, rs in runs.items()}
            row = {"model": a.model, "workers": workers, "threads_per_worker": threads, "batch": p["batch"],
                   "warmup_steps": p["warmup"], "measured_steps": runs["direct"][0]["steady_steps"], "rounds": a.repeats,
                   "direct_step_ms": round(med["direct"], 2), "ray_step_ms": round(med["ray"], 2),
                   "ray_over_direct": round(ratio, 4), "overhead_pct": round(100 * (ratio - 1), 2),
                   "direct_startup_s": round(start["direct"], 2), "ray_startup_s": round(start["ray"], 2),
                   "ray_instance_start_s": round(ray_start, 2),
                   "each": {how: [(r["step_ms_mean"], r["startup_s"], r["threads"]) for r in rs] for how, rs in runs.items()},
                   "note": a.note}
            rows.append(row)
            write("ray_overhead", row)
    import ray

    ray.shutdown()
    print(f"{'workers':>7}{'direct ms':>11}{'Ray ms':>9}{'Ray/direct':>12}{'direct start s':>16}{'Ray start s':>13}")
    for r in rows:
        print(f"{r['workers']:>7}{r['direct_step_ms']:>11.1f}{r['ray_step_ms']:>9.1f}{r['ray_over_direct']:>12.3f}"
              f"{r['direct_startup_s']:>16.1f}{r['ray_startup_s']:>13.1f}")
    print(f"(Ray instance start: {ray_start:.1f} s, not in the start-up columns)")


if __name__ == "__main__":
    main()
