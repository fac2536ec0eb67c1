"""The train loop: one function, configured only by its TrainConfig.

`train_loop(config)` runs inside each Ray Train worker (TorchTrainer) and equally under a plain
launch (`python -m indai.trainers.loop cfg.json`, alone or under torchrun), so the GPU path can
be measured where Ray is not installed. Inside, the model is wrapped by a DeepSpeed engine
(ZeRO stage from the config; gloo on CPU, NCCL and bf16 autocast on GPU). It resumes from the
run's latest committed checkpoint, logs metrics to MLflow in batches from rank 0, and finally
writes the trained weights (safetensors) as the run's `final` checkpoint.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from indai.platform import datasets
from indai.platform.progress import bar
from indai.platform.storage import open_store
from indai.trainers import checkpoint
from indai.trainers.config import TrainConfig
from indai.trainers.streaming import split_size
from indai.trainers.data import ShardSampler, SplitDataset
from indai.trainers.models import create_model


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    under_ray: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Ray Train has already made the process group; a plain launch makes it here."""
    cuda = cfg.run.use_gpu and torch.cuda.is_available()
    if cfg.run.launcher == "ray":
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    else:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local, device, cfg.run.launcher == "ray")


def deepspeed_config(cfg: TrainConfig, cuda: bool) -> dict:
    bf16 = cfg.deepspeed.bf16 == "on" or (cfg.deepspeed.bf16 == "auto" and cuda)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.clip > 0:
        ds["gradient_clipping"] = cfg.optim.clip
    if bf16:
        # DeepSpeed's own bf16 mode casts the model and breaks BatchNorm (../shared/GPU.md);
        # autocast keeps fp32 master weights and runs matmuls in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def warmup_cosine(total_steps: int, warmup_frac: float):
    warm = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class MetricBuffer:
    """Collects metrics on rank 0 and sends them to MLflow in batches (one request per flush)."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.items: list = []
        self.client = None
        if enabled and cfg.mlflow_uri and cfg.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=cfg.mlflow_uri)
            self.run_id = cfg.mlflow_run_id

    def add(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        if self.client is not None:
            self.items.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def flush(self) -> None:
        if self.client is not None and self.items:
            for i in range(0, len(self.items), 1000):  # MLflow accepts at most 1000 metrics a batch
                self.client.log_batch(self.run_id, metrics=self.items[i: i + 1000])
            self.items = []


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("sensor", "image", "text", "mask") if k in batch}
    return engine(**inputs)


@torch.no_grad()
def evaluate(engine, loader, num_classes: int, device: torch.device) -> dict:
    """Loss, accuracy and confusion matrix over the whole split (summed across ranks)."""
    engine.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in loader:
        batch = _to(batch, device)
        logits = _forward(engine, batch).float()
        loss_sum += F.cross_entropy(logits, batch["label"], reduction="sum").double()
        idx = batch["label"] * num_classes + logits.argmax(-1)
        confusion += torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    if dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    engine.train()
    n = confusion.sum().item()
    return {"loss": loss_sum.item() / max(n, 1), "accuracy": confusion.trace().item() / max(n, 1),
            "n": int(n), "confusion": confusion.long().cpu().tolist()}


def _loader(ds, sampler, cfg: TrainConfig, cuda: bool) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.optim.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                      pin_memory=cuda, persistent_workers=cfg.data.num_workers > 0, drop_last=False)


PROGRESS_PREFIX = "[indai] progress "


def progress_event(**fields) -> None:
    """One machine-readable line on stdout (relayed into the Ray job's log), from which
    `indai train submit` draws its progress bar."""
    print(PROGRESS_PREFIX + json.dumps(fields), flush=True)


def train_loop(config: dict) -> dict:
    import deepspeed

    cfg = TrainConfig.model_validate(config)
    d = setup_distributed(cfg)
    cuda = d.device.type == "cuda"
    torch.manual_seed(cfg.run.seed)
    store = open_store(cfg.store_uri)
    ref, manifest = datasets.open_for_job(store, datasets.parse_ref(cfg.data.dataset))
    window = manifest.get("modalities", {}).get("sensor", {}).get("window")
    present = manifest["split"].get("windows") or manifest["split"].get("records") or {}
    streaming = d.under_ray and cfg.data.loader == "stream"
    splits = {s: SplitDataset(datasets.load_split(store, ref, s, manifest), window, cfg.model.text.max_len, cfg.model.modalities)
              for s in ("train", "val", "test") if s in present and not (s == "train" and streaming)}
    if streaming:  # Ray Data streams the train split's shards from the object store (trainers.streaming)
        import ray.train

        train_stream = ray.train.get_dataset_shard("train")
        n_batches = max(1, split_size(manifest, "train") // (cfg.optim.batch_size * d.world))
        train_sampler = None

        def train_batches(epoch: int):
            it = train_stream.iter_torch_batches(batch_size=cfg.optim.batch_size, drop_last=True,
                                                 local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                                 local_shuffle_seed=cfg.run.seed + epoch if cfg.data.shuffle_buffer else None)
            return itertools.islice(it, n_batches)  # equal steps on every worker keeps collectives in lockstep
    else:
        train_sampler = ShardSampler(len(splits["train"]), d.rank, d.world, shuffle=True, seed=cfg.run.seed)
        train_loader = _loader(splits["train"], train_sampler, cfg, cuda)
        n_batches = len(train_loader)

        def train_batches(epoch: int):
            train_sampler.set_epoch(epoch)
            return train_loader
    eval_loaders = {s: _loader(ds, ShardSampler(len(ds), d.rank, d.world, shuffle=False), cfg, cuda)
                    for s, ds in splits.items() if s != "train"}

    model = create_model(cfg.model).to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=cuda or None)
    steps_per_epoch = max(1, n_batches // cfg.optim.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps_per_epoch * cfg.optim.epochs, cfg.optim.warmup_frac))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, cuda), dist_init_required=False)

    start_epoch, step = 0, 0
    found = checkpoint.latest(store, cfg.run.name) if cfg.run.resume else None
    if found:
        state = checkpoint.load(engine, store, cfg.run.name, found[0])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        if d.rank == 0:
            print(f"resumed run {cfg.run.name} from {found[0]} (epoch {start_epoch}, step {step})", file=sys.stderr, flush=True)

    metrics = MetricBuffer(cfg, enabled=d.rank == 0)
    num_classes = cfg.model.num_classes
    val: dict = {}
    for epoch in range(start_epoch, cfg.optim.epochs):
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        show_bar = cfg.run.progress and d.rank == 0 and not d.under_ray  # Ray relays worker output line by line
        for batch in bar(train_batches(epoch), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", total=n_batches, enabled=show_bar):
            batch = _to(batch, d.device)
            loss = F.cross_entropy(_forward(engine, batch).float(), batch["label"], label_smoothing=cfg.optim.label_smoothing)
            engine.backward(loss)
            engine.step()
            step += 1
            seen += batch["label"].shape[0]
            loss_sum += loss.item()
            if step % cfg.run.log_every == 0:
                metrics.add("train_loss", loss.item(), step)
                metrics.add("lr", sched.get_last_lr()[0], step)
                if d.rank == 0:
                    progress_event(epoch=epoch + 1, epochs=cfg.optim.epochs, step=step,
                                   steps=steps_per_epoch * cfg.optim.epochs, loss=round(loss.item(), 5))
        took = time.perf_counter() - t0
        metrics.add("epoch_train_loss", loss_sum / max(1, n_batches), step)
        metrics.add("samples_per_s", seen * d.world / took, step)
        if "val" in eval_loaders:
            val = evaluate(engine, eval_loaders["val"], num_classes, d.device)
            metrics.add("val_loss", val["loss"], step)
            metrics.add("val_accuracy", val["accuracy"], step)
        metrics.flush()
        if d.rank == 0:
            progress_event(epoch=epoch + 1, epochs=cfg.optim.epochs, step=step, steps=steps_per_epoch * cfg.optim.epochs,
                           loss=round(loss_sum / max(1, n_batches), 5), val_accuracy=val.get("accuracy"))
            print(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {loss_sum / max(1, n_batches):.4f}"
                  + (f", val accuracy {val['accuracy']:.4f}" if val else "") + f" ({took:.1f} s)", file=sys.stderr, flush=True)
        last = epoch + 1 == cfg.optim.epochs
        if (epoch + 1) % cfg.run.checkpoint_every == 0 or last:
            meta = {"epoch": epoch, "step": step, "mlflow_run_id": cfg.mlflow_run_id,
                    "val_accuracy": val.get("accuracy")}
            checkpoint.save(engine, store, cfg.run.name, checkpoint.epoch_tag(epoch), meta, d.rank)
            if d.rank == 0:
                checkpoint.prune(store, cfg.run.name, cfg.run.keep_checkpoints)
        if d.under_ray:
            import ray.train

            ray.train.report({"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in val.items() if k != "confusion"}})

    result = {"step": step}
    if "test" in eval_loaders:
        test = evaluate(engine, eval_loaders["test"], num_classes, d.device)
        metrics.add("test_accuracy", test["accuracy"], step)
        metrics.add("test_loss", test["loss"], step)
        metrics.flush()
        result["test"] = test
    if d.rank == 0:
        write_final(engine, store, cfg, result)
    if dist.is_initialized():
        dist.barrier()
    return result


def _state_dict(engine) -> dict[str, torch.Tensor]:
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def write_final(engine, store, cfg: TrainConfig, result: dict) -> None:
    """The trained weights (safetensors, no pickle) and the model config, committed."""
    from safetensors.torch import save_file

    weights = {k: v.detach().float().contiguous().cpu() for k, v in _state_dict(engine).items()}
    with tempfile.TemporaryDirectory(prefix="indai-final-") as tmp:
        save_file(weights, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "model_config.json").write_text(cfg.model.model_dump_json(indent=2))
        (Path(tmp) / "result.json").write_text(json.dumps(result))
        target = f"{checkpoint.prefix(cfg.run.name)}/{checkpoint.FINAL}"
        store.delete_prefix(target)
        store.upload_dir(target, tmp)
    store.commit(target, {"step": result["step"], "mlflow_run_id": cfg.mlflow_run_id})


def main(argv: list[str] | None = None) -> None:
    """Plain launch: `python -m indai.trainers.loop cfg.json` (alone or under torchrun)."""
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 1:
        raise SystemExit("usage: python -m indai.trainers.loop <train-config.json>")
    config = json.loads(Path(argv[0]).read_text())
    config.setdefault("run", {})["launcher"] = "local"
    out = train_loop(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in out.items() if k != "test"} | {"test_accuracy": out.get("test", {}).get("accuracy")}))


if __name__ == "__main__":
    main()
