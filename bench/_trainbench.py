"""What the training benchmarks share: model shapes, synthetic dataset versions in a local-folder
store, train configs, and running indai's real train loop in this process, under torchrun or
under Ray Train, reading its steady-state timing back from the run's final result in the store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The reference fusion model of ../shared/GPU.md (flavour base: resnet50 at 224 px, a 4-layer
# d=384 sensor transformer over 16 x 1024 samples in patches of 16, a 4-layer text transformer
# over 128 tokens), and a CPU-sized one of the same architecture. `demo` is the model of the
# demo recipe trainers/recipes/cwru_sensor.yaml (1-D CNN) on windows of the CWRU shape.
SHAPES = {
    "reference": {"batch": 128, "warmup": 10, "steps": 30, "classes": 10,
                  "fusion": {"sensor": (16, 1024), "image": 224, "text_len": 128,
                             "model": {"flavour": "base", "dropout": 0.1}},
                  "demo": {"sensor": (2, 1024), "batch": 64, "warmup": 10, "steps": 100}},
    "small": {"batch": 32, "warmup": 5, "steps": 20, "classes": 10,
              "fusion": {"sensor": (16, 256), "image": 32, "text_len": 64,
                         "model": {"flavour": "small", "dim": 128, "fusion_heads": 4, "dropout": 0.1,
                                   "sensor": {"kind": "patch_transformer", "width": 128, "layers": 2, "patch": 16},
                                   "image": {"timm_name": "resnet18"}, "text": {"width": 128, "layers": 2, "heads": 4}}},
              "demo": {"sensor": (2, 1024), "batch": 64, "warmup": 10, "steps": 100}},  # steps of ~15 ms: more of them
}
MODELS = ("fusion", "demo")


def demo_model() -> dict:
    import yaml

    recipe = yaml.safe_load((REPO / "trainers/recipes/cwru_sensor.yaml").read_text())
    return recipe["model"]


def plan(model: str, shape: str) -> dict:
    """Shapes, batch and step counts of one benchmark model."""
    s = SHAPES[shape]
    m = s[model]
    out = {"batch": m.get("batch", s["batch"]), "warmup": m.get("warmup", s["warmup"]), "steps": m.get("steps", s["steps"]),
           "classes": s["classes"],
           "sensor": m.get("sensor"), "image": m.get("image"), "text_len": m.get("text_len")}
    out["modalities"] = [k for k in ("sensor", "image", "text") if out[k if k != "text" else "text_len"]]
    out["model"] = demo_model() if model == "demo" else m["model"]
    return out


def make_dataset(store, name: str, p: dict, world: int = 1) -> tuple[str, dict]:
    """A train split of exactly (warm-up + measured steps) batches per rank, no val or test
    split (nothing but training is timed), written through the platform's dataset writer."""
    from indai.trainers.synthetic import write_dataset

    n = (p["warmup"] + p["steps"]) * p["batch"] * world
    return write_dataset(store, name, {"train": n}, classes=p["classes"], sensor=p["sensor"], image=p["image"],
                         text_len=p["text_len"])


def train_config(store, ref: str, manifest: dict, p: dict, run: str, **over):
    """The indai TrainConfig of one run: one epoch, the plan's batch, timing after the warm-up."""
    from indai.platform.config import apply_overrides
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import complete_from_manifest

    model = dict(p["model"], modalities=p["modalities"])
    if p["text_len"]:
        model["text"] = dict(model.get("text", {}), max_len=p["text_len"])
    data = {"recipe": "bench", "data": {"dataset": ref, "loader": "memory"}, "model": model,
            "optim": {"epochs": 1, "batch_size": p["batch"], "lr": 1e-3, "warmup_frac": 0.05},
            "run": {"name": run, "launcher": "local", "progress": False, "resume": False, "timing_skip": p["warmup"],
                    "log_every": 10**6, "keep_checkpoints": 1},
            "store_uri": store.uri}
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    cfg = TrainConfig.model_validate(data)
    return complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})


def final_result(store, run: str) -> dict:
    """What the loop's rank 0 wrote as the run's result (its timing included)."""
    return json.loads(store.get_bytes(f"checkpoints/{run}/final/result.json"))


def with_startup(timing: dict, launched_unix: float) -> dict:
    first = timing.get("first_step_unix")
    return dict(timing, startup_s=round(first - launched_unix, 2) if first else None)


def run_in_process(cfg) -> dict:
    """indai's train loop in this process (the local launcher: no Ray)."""
    import torch

    from indai.trainers.loop import train_loop

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    launched = time.time()
    out = train_loop(cfg.model_dump(mode="json"))
    return dict(with_startup(out["timing"], launched), profile=out.get("profile"))


def run_torchrun(cfg, store, workdir: Path, threads: int) -> dict:
    """The same loop as separate processes: `torchrun -m indai.trainers.loop cfg.json`."""
    path = workdir / f"{cfg.run.name}.json"
    path.write_text(cfg.model_dump_json())
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = ([str(torchrun), "--standalone", f"--nproc-per-node={cfg.run.workers}"] if cfg.run.workers > 1
           else [sys.executable]) + ["-m", "indai.trainers.loop", str(path)]
    launched = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=1800,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = final_result(store, cfg.run.name)
    return dict(with_startup(result["timing"], launched), profile=result.get("profile"))


def start_ray(num_cpus: int, num_gpus: int) -> float:
    """A local Ray instance for Ray Train runs; returns its start-up seconds."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    return time.perf_counter() - t0


def run_ray(cfg, store, manifest: dict, home: Path) -> dict:
    """The same loop under Ray Train (TorchTrainer through trainers.launch.run_workers)."""
    from indai.platform.settings import Settings
    from indai.trainers.launch import run_workers

    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"launcher": "ray"})})
    settings = Settings(store_uri=store.uri, mlflow_uri=None, ray_address=None, serve_url=None, home=home)
    launched = time.time()
    run_workers(cfg, settings, manifest)
    result = final_result(store, cfg.run.name)
    return dict(with_startup(result["timing"], launched), profile=result.get("profile"))


def ray_importable() -> bool:
    try:
        import ray.train  # noqa: F401
    except ImportError:
        return False
    return True
