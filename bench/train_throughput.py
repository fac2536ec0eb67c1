"""Training samples/s three ways on the same model, data and batch: a plain PyTorch loop written
as well as we can, indai's train loop without Ray, and indai's train loop under Ray Train.

- plain: the split's tensors resident on the device (no input cost at all), bf16 autocast on
  CUDA, channels_last model and images, fused AdamW, cuDNN autotuning, gradient clipping and the
  same warm-up/cosine schedule as indai, optionally torch.compile (`--ways plain_compile`);
- indai: `trainers.loop.train_loop` itself, in this process (launcher local), reading a dataset
  version from a local-folder store: strategy auto (on one device the torch engine) and, as
  `indai_zero0`, DeepSpeed ZeRO-0; on CUDA a split that fits stays on the device and each batch is
  gathered there (`data.device_resident: auto`), as the plain loop does; `indai_host_feed` takes
  its batches from host memory through trainers.feed's pinned side-stream copies instead, and
  `indai_compile` sets `run.compile` (to compare with `plain_compile`);
- indai_ray: the same loop under Ray Train (TorchTrainer, one worker), only where Ray imports.

Every way runs warm-up + measured steps of one epoch; samples/s counts the measured steps only
(indai's loop reports them itself: trainers.feed.StepClock). Ratios: indai ways / plain and
indai_ray / indai, each the median over rounds (`--repeats`) of the ratio within a round. Results
go to bench/results/train_throughput.jsonl (or $INDAI_BENCH_RESULTS).

    .venv/bin/python bench/train_throughput.py                       # CPU, small shapes
    python3 bench/train_throughput.py --shape reference --models fusion   # the GPU machine
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _trainbench as tb  # noqa: E402
from _record import write  # noqa: E402

WAYS = ("plain", "plain_compile", "indai", "indai_zero0", "indai_ray", "indai_host_feed", "indai_compile")


def plain_loop(cfg, store, compile_model: bool) -> dict:
    """The hand-written loop (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from indai.platform import datasets
    from indai.trainers.data import ShardSampler, SplitDataset
    from indai.trainers.engine import bf16_enabled
    from indai.trainers.feed import channels_last_enabled, gather
    from indai.trainers.loop import warmup_cosine
    from indai.trainers.models import create_model
    from indai.trainers.profiling import Profile

    device = torch.device("cuda:0" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    bf16, channels_last = bf16_enabled(cfg, cuda), channels_last_enabled(cfg, cuda)
    ref = datasets.parse_ref(cfg.data.dataset)
    manifest = datasets.read_manifest(store, ref)
    ds = SplitDataset(datasets.load_split(store, ref, "train", manifest), None, cfg.model.text.max_len, cfg.model.modalities)
    data = {k: v.to(device) for k, v in gather(ds, torch.arange(len(ds))).items()}
    del ds
    torch.manual_seed(cfg.run.seed)
    model = create_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=cuda or None)
    bs = cfg.optim.batch_size
    n_steps = len(data["label"]) // bs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(n_steps, cfg.optim.warmup_frac))
    forward = torch.compile(model) if compile_model else model
    order = torch.as_tensor(list(ShardSampler(len(data["label"]), 0, 1, shuffle=True, seed=cfg.run.seed)), device=device)
    inputs = [k for k in ("sensor", "image", "text", "mask") if k in data]
    model.train()
    profile = Profile(cfg, 0, device, store)  # --profile: the same recorder as the indai loop's run.profile_steps
    launched = time.time()
    t0 = None
    for i in profile.steps(range(n_steps)):
        if i == cfg.run.timing_skip:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = order[i * bs: (i + 1) * bs]
        batch = {k: v.index_select(0, idx) for k, v in data.items()}
        if channels_last and "image" in batch:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(**{k: batch[k] for k in inputs})
        loss = F.cross_entropy(logits.float(), batch["label"])
        loss.backward()
        if cfg.optim.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip, foreach=cuda or None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    measured = n_steps - cfg.run.timing_skip
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    out = {"device": str(device), "world": 1, "threads": torch.get_num_threads(), "steps": n_steps,
           "skipped_steps": cfg.run.timing_skip, "steady_steps": measured, "steady_seconds": round(secs, 4),
           "samples_per_s": round(measured * bs / secs, 2), "step_ms_mean": round(1000 * secs / measured, 3),
           "peak_memory_gib": round(peak, 3) if peak is not None else None, "startup_s": None,
           "final_loss": round(loss.item(), 4), "launched_unix": launched, "profile": profile.finish()}
    del model, opt, data, forward
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_way(way: str, cfg, store, manifest: dict, tmp: Path, cuda: bool, threads: int) -> dict:
    run = f"{cfg.run.name}-{way.replace('_', '-')}"
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": run})})
    if way in ("plain", "plain_compile"):
        return plain_loop(cfg, store, compile_model=way == "plain_compile")
    ds = cfg.deepspeed.model_copy(update={"strategy": "zero0" if way == "indai_zero0" else "auto"})
    cfg = cfg.model_copy(update={"deepspeed": ds})
    if way == "indai_host_feed":
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"device_resident": "off"})})
    if way == "indai_compile":
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"compile": True})})
    if way == "indai_ray":
        import os

        cpus = max(1, (os.cpu_count() or 2) - 1) if cuda else threads  # Ray: OMP_NUM_THREADS = the worker's CPUs
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"workers": 1, "use_gpu": cuda, "cpus_per_worker": cpus})})
        return tb.run_ray(cfg, store, manifest, tmp)
    return tb.run_in_process(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(tb.SHAPES), default="small")
    ap.add_argument("--models", choices=tb.MODELS, nargs="+", default=list(tb.MODELS))
    ap.add_argument("--ways", choices=WAYS, nargs="+", default=["plain", "indai", "indai_zero0", "indai_ray"])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--steps", type=int, help="measured steps (default: the shape's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU only: torch threads of every way (Ray: CPUs per worker). One is the default: with two "
                         "threads on a shared 2-core machine a step took anywhere from 10 ms to 1.5 s (OpenMP "
                         "threads waiting for a core), with one a steady 12 ms")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all ways; medians are reported")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the rounds, run each way once more with STEPS steps under torch.profiler (run.profile_steps; "
                         "not counted in the throughput): how busy the GPU was and the costliest operators, per way")
    a = ap.parse_args()
    import torch

    from indai.trainers.profiling import describe

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if not cuda:
        torch.set_num_threads(a.threads)
    ways = list(a.ways)
    ray_start = None
    if "indai_ray" in ways:
        if tb.ray_importable():
            import os

            ray_start = tb.start_ray(os.cpu_count() or 2, 1 if cuda else 0)
            print(f"Ray started in {ray_start:.1f} s", file=sys.stderr)
        else:
            ways.remove("indai_ray")
            print("Ray is not importable here: the indai_ray way is skipped", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="indai-bench-train-") as tmp:
        from indai.platform.storage import open_store

        store = open_store(Path(tmp) / "store")
        for model in a.models:
            p = tb.plan(model, a.shape)
            if a.steps:
                p["steps"] = a.steps
            t0 = time.perf_counter()
            ref, manifest = tb.make_dataset(store, f"bench-{model}", p)
            print(f"{model}: dataset {ref} ({(p['warmup'] + p['steps']) * p['batch']} samples) written in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            cfg = tb.train_config(store, ref, manifest, p, f"bench-{model}", **{"run.use_gpu": cuda})
            runs: dict[str, list[dict]] = {w: [] for w in ways}
            for rnd in range(a.repeats):  # rounds of every way in turn: drift on a shared machine hits all alike
                for way in ways:
                    t0 = time.perf_counter()
                    r = run_way(way, cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"bench-{model}-{rnd}"})}),
                                store, manifest, Path(tmp), cuda, a.threads)
                    runs[way].append(r)
                    print(f"{model} {way} (round {rnd + 1}): {r['samples_per_s']} samples/s, {r['step_ms_mean']} ms/step "
                          f"({time.perf_counter() - t0:.1f} s in all)", file=sys.stderr)
            profiles = {}
            for way in ways if a.profile else []:  # an extra run each: the profiler slows the steps it records
                run_cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"bench-{model}-profile",
                                                                                    "profile_steps": a.profile})})
                profiles[way] = run_way(way, run_cfg, store, manifest, Path(tmp), cuda, a.threads).get("profile")
                print(f"{model} {way} (profiled): {describe(profiles[way]) if profiles[way] else 'no profile'}", file=sys.stderr)
            for way, rs in runs.items():
                ratios = {}
                # compiled indai against the compiled plain loop when both ran, else against plain
                plain_ref = "plain_compile" if way == "indai_compile" and "plain_compile" in runs else "plain"
                for ref_way, key in ((plain_ref, "ratio_to_plain"), ("indai", "ratio_to_indai")):
                    if ref_way in runs and ref_way != way and (key == "ratio_to_plain" or way == "indai_ray"):
                        ratios[key] = round(statistics.median(r["samples_per_s"] / b["samples_per_s"]
                                                              for r, b in zip(rs, runs[ref_way])), 4)
                row = {"model": model, "shape": a.shape, "way": way, "batch": p["batch"], "warmup_steps": p["warmup"],
                       "measured_steps": rs[0]["steady_steps"], "rounds": len(rs),
                       "samples_per_s": round(statistics.median(r["samples_per_s"] for r in rs), 2),
                       "samples_per_s_each": [r["samples_per_s"] for r in rs],
                       "step_ms": round(statistics.median(r["step_ms_mean"] for r in rs), 3),
                       "peak_memory_gib": rs[0]["peak_memory_gib"], "startup_s": rs[0].get("startup_s"),
                       "threads": rs[0]["threads"], "device": rs[0]["device"],
                       "ratio_to_plain": ratios.get("ratio_to_plain", 1.0 if way == "plain" else None),
                       "ratio_to_indai": ratios.get("ratio_to_indai"),
                       "ray_start_s": round(ray_start, 2) if ray_start is not None and way == "indai_ray" else None,
                       "gpu": torch.cuda.get_device_name(0) if cuda else None, "note": a.note,
                       "profile": profiles.get(way)}
                rows.append(row)
                write("train_throughput", row)
    if ray_start is not None:
        import ray

        ray.shutdown()
    print(f"{'model':<8}{'way':<15}{'samples/s':>11}{'ms/step':>10}{'peak GiB':>10}{'/plain':>8}{'/indai':>8}")
    for r in rows:
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"{r['model']:<8}{r['way']:<15}{r['samples_per_s']:>11.1f}{r['step_ms']:>10.1f}"
              f"{fmt(r['peak_memory_gib']):>10}{fmt(r['ratio_to_plain']):>8}{fmt(r['ratio_to_indai']):>8}")
    if any(r["profile"] for r in rows):
        print("\nprofiled (an extra run of each way):")
        for r in rows:
            if r["profile"]:
                print(f"{r['model']:<8}{r['way']:<15} {describe(r['profile'])}")


if __name__ == "__main__":
    main()
