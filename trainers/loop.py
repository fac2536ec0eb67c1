"""The train loop: one function, configured only by its TrainConfig.

`train_loop(config)` runs inside each Ray Train worker (TorchTrainer) and equally under a plain
launch (`python -m indai.trainers.loop cfg.json`, alone or under torchrun), so the GPU path can
be measured where Ray is not installed. Inside, the model is wrapped by the engine that
trainers.engine chooses by model size and free memory (torch DDP, or DeepSpeed ZeRO when the model
states must be sharded; gloo on CPU, NCCL and bf16 autocast on GPU). It resumes from the
run's latest committed checkpoint, logs metrics to MLflow from rank 0 in the background
(trainers.tracking), and finally
writes the trained weights (safetensors) as the run's `final` checkpoint. What the head learns,
its loss and how a split is scored belong to the task (trainers.tasks: classification,
regression, anomaly); the loop only calls that interface.
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

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.progress import bar
from indai.platform.storage import open_store
from indai.trainers import checkpoint, feed, finetune, relay, tasks
from indai.trainers.config import TrainConfig
from indai.trainers.engine import (build_engine, deepspeed_config, full_state_dict,  # noqa: F401  (deepspeed_config: kept importable from here)
                                   grad_norm, lockstep, optimizer_steps)
from indai.trainers.streaming import split_size
from indai.trainers.profiling import Profile, record_profile
from indai.trainers.tracking import MetricBuffer
from indai.trainers.data import ShardSampler, SplitDataset, resize_images
from indai.trainers.models import create_model
from indai.trainers.models.multimodal.text_hf import model_tokenizer


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


def _ray_train_reports_at(level: str) -> None:
    """Ray Train 2.60 logs each `ray.train.report` of a worker ("Reporting training result N:
    TrainingReport(...)", every epoch, every rank) through `logging.getLogger(__file__)`: a logger
    named by a path, outside `ray.train`, which Ray Train's own level (RunConfig.logging_config,
    set from run.ray_log_level) does not reach. Give that logger the same level."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(level)


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Ray Train has already made the process group; a plain launch makes it here."""
    cuda = cfg.run.use_gpu and torch.cuda.is_available()
    if cfg.run.launcher == "ray":
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        _ray_train_reports_at(cfg.run.ray_log_level)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: its rendezvous (env://)
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    else:
        # one process: a private rendezvous on a free port, kept out of os.environ. Written there, it
        # outlived the run and every child process inherited it: a second local run, started while
        # this process group still held the port, failed with EADDRINUSE
        rank, world, local = 0, 1, 0
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it (no port in it: harmless to inherit)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1)
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local, device, cfg.run.launcher == "ray")


def warmup_cosine(total_steps: int, warmup_frac: float):
    warm = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("sensor", "image", "text", "mask") if k in batch}
    return engine(**inputs)


def outputs(engine, loader, device: torch.device, spare=None):
    """(model output, batch) over this rank's shard of a split in eval mode, without gradients.
    Under ZeRO-3 every rank runs as many forwards as the rank with the most batches
    (trainers.engine.lockstep; `spare()` gives a filler batch to a rank whose shard is empty):
    the filler forwards' outputs are dropped, so nothing is counted twice. Consume it whole."""
    engine.eval()
    try:
        with torch.no_grad():
            for batch, real in lockstep(engine, loader, device, spare):
                batch = _to(batch, device)
                out = _forward(engine, batch).float()
                if real:
                    yield out, batch
    finally:
        engine.train()


def evaluate(engine, loader, task: tasks.Task, device: torch.device, spare=None) -> dict:
    """The task's metrics over the whole split (trainers.tasks; counts summed across ranks)."""
    scorer = task.scorer(device)
    for out, batch in outputs(engine, loader, device, spare):
        scorer.add(out, batch)
    return scorer.result()


def first_sample(ds):
    """A one-sample batch of a split, for `outputs`' filler forwards."""
    return lambda: torch.utils.data.default_collate([ds[0]])


def _loader(ds, sampler, cfg: TrainConfig, device: torch.device) -> feed.ToDevice:
    """Batches on the device: gathered, pinned and copied ahead of the step (trainers.feed)."""
    return feed.batches(ds, sampler, cfg, device)


def progress_event(**fields) -> None:
    """A progress event from rank 0: to the driver's progress bar under Ray, else one
    machine-readable `[indai] progress {...}` line on stdout (trainers.relay)."""
    relay.event(**fields)


def log_step(metrics: MetricBuffer, engine, sched, loss: torch.Tensor, step: int, show: bool, **event) -> None:
    """Every `run.log_every` batches: the batch's loss, the learning rate and the gradient norm of
    the last optimizer step (before clipping, across ranks; none yet during the first
    accumulation window; trainers.engine.grad_norm) as MLflow metrics, and as a
    progress line from rank 0. Reading them is the host's one wait for the device here."""
    last_loss = loss.item()
    metrics.add("train_loss", last_loss, step)
    metrics.add("lr", sched.get_last_lr()[0], step)
    fields = dict(event, step=step, loss=round(last_loss, 5))
    norm = grad_norm(engine) if engine.global_steps else None
    if norm is not None:
        norm = float(norm)
        metrics.add("grad_norm", norm, step)
        fields["grad_norm"] = round(norm, 6)
    if show:
        progress_event(**fields)


def train_loop(config: dict) -> dict:
    if (config.get("model") or {}).get("family") == "report_writer":  # the LM family's own worker, same launchers
        from indai.trainers.models.report_writer.train import train_report_writer

        return train_report_writer(config)
    cfg = TrainConfig.model_validate(config)
    d = setup_distributed(cfg)
    torch.manual_seed(cfg.run.seed)
    store = open_store(cfg.store_uri)
    cfg = checkpoint.fresh_or_resumed(store, cfg)  # run.resume false on a run with checkpoints: refused here
    ref, manifest = datasets.open_for_job(store, datasets.parse_ref(cfg.data.dataset))
    window = manifest.get("modalities", {}).get("sensor", {}).get("window")
    present = manifest["split"].get("windows") or manifest["split"].get("records") or {}
    streaming = d.under_ray and cfg.data.loader == "stream"
    tokenizer = model_tokenizer(cfg.model, store) if "text" in cfg.model.modalities else None
    if streaming and cfg.model.task != "classification":
        raise UserError(f"task {cfg.model.task} loads its splits into memory: set data.loader: memory")
    if streaming and cfg.run.checkpoint_every_steps:
        raise UserError("run.checkpoint_every_steps resumes at a position of the epoch's sample order, which a streamed "
                        "split does not have: set data.loader: memory or drop run.checkpoint_every_steps")
    arrays = {s: datasets.load_split(store, ref, s, manifest)
              for s in ("train", "val", "test") if s in present and not (s == "train" and streaming)}
    if "image" in cfg.model.modalities:  # data.image_size: the model's size, not the ingested one
        arrays = {s: dict(a, image=resize_images(a["image"], cfg.model.image.size)) if "image" in a else a
                  for s, a in arrays.items()}
    if cfg.model.task == "regression" and cfg.model.target_mean is None:  # standardise with the training targets
        mean, std = tasks.target_stats(arrays["train"]["target"])
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"target_mean": mean, "target_std": std})})
    task = tasks.make(cfg.model, manifest.get("classes", []), cfg.optim.label_smoothing)
    if task.needs_fit and "val" not in arrays:
        raise UserError(f"task {task.name} calibrates its threshold on the validation split: dataset {ref} has none")
    splits = {s: SplitDataset(task.split_arrays(a, s), window, cfg.model.text.max_len, cfg.model.modalities, tokenizer)
              for s, a in arrays.items()}
    del arrays
    clock = feed.StepClock(cfg.run.timing_skip, d.world, d.device)  # steady-state throughput, in the result
    profile = Profile(cfg, d.rank, d.device, store)  # run.profile_steps (trainers.profiling)
    if streaming:  # Ray Data streams the train split's shards from the object store (trainers.streaming)
        import ray.train

        train_stream = ray.train.get_dataset_shard("train")
        n_batches = max(1, split_size(manifest, "train") // (cfg.optim.batch_size * d.world))
        train_sampler = None

        def train_batches(epoch: int, skip: int = 0):  # skip: always 0 (no mid-epoch checkpoints when streaming)
            it = train_stream.iter_torch_batches(batch_size=cfg.optim.batch_size, drop_last=True,
                                                 local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                                 local_shuffle_seed=cfg.run.seed + epoch if cfg.data.shuffle_buffer else None)
            # equal steps on every worker keeps collectives in lockstep
            return profile.steps(clock.steps(feed.to_device(itertools.islice(it, n_batches), cfg, d.device)))
    else:
        train_sampler = ShardSampler(len(splits["train"]), d.rank, d.world, shuffle=True, seed=cfg.run.seed)
        train_loader = _loader(splits["train"], train_sampler, cfg, d.device)
        n_batches = len(train_loader)

        def train_batches(epoch: int, skip: int = 0):
            train_sampler.set_epoch(epoch, start=skip * cfg.optim.batch_size)  # a mid-epoch resume: after `skip` batches
            return profile.steps(clock.steps(train_loader))
    eval_loaders = {s: _loader(ds, ShardSampler(len(ds), d.rank, d.world, shuffle=False), cfg, d.device)
                    for s, ds in splits.items() if s != "train" or task.needs_fit}  # train: anomaly fits on it
    spares = {s: first_sample(splits[s]) for s in eval_loaders}  # filler batches of ZeRO-3's lockstep forwards

    def score(split: str) -> dict:
        if task.needs_fit:  # the anomaly Gaussian of the current weights, on the training normals
            task.fit(outputs(engine, eval_loaders["train"], d.device, spares["train"]), engine.module)
        return evaluate(engine, eval_loaders[split], task, d.device, spares[split])

    model = create_model(cfg.model, store=store)
    finetune.apply_tuning(model, cfg.model, log=d.rank == 0)  # freezing, LoRA adapters (trainers.finetune)
    model = model.to(d.device)
    groups = finetune.param_groups(model, cfg.model, cfg.optim.lr, cfg.optim.weight_decay)
    total_batches = n_batches * cfg.optim.epochs  # `step` counts these: what progress is reported in
    # the schedule spans the optimizer steps the engine will take (accumulation runs across epoch ends)
    total_updates = optimizer_steps(n_batches, cfg.optim.grad_accum, cfg.optim.epochs)
    # strategy (ddp or DeepSpeed ZeRO), fused AdamW over the groups, fast paths: trainers.engine
    engine, sched = build_engine(model, cfg, d, warmup_cosine(total_updates, cfg.optim.warmup_frac), store, param_groups=groups)

    start = checkpoint.start_point(engine, store, cfg, d.world, d.rank)  # run.resume: the latest checkpoint, loaded
    step = start.step
    every_steps = cfg.run.checkpoint_every_steps
    # what an epoch-end checkpoint inside an accumulation window goes on from (trainers.checkpoint)
    window = checkpoint.WindowStart(cfg.optim.grad_accum, n_batches, total_batches, engine.module, start.epoch,
                                    start.batch, step)

    metrics = MetricBuffer(cfg, enabled=d.rank == 0)  # sent in the background (trainers.tracking)
    # what MLflow had not confirmed when the checkpoint was written; steps run again are not logged twice
    metrics.restore(start.unsent_metrics, start.logged_through)
    val: dict = {}
    headline = tasks.HEADLINE[task.name]
    for epoch in range(start.epoch, cfg.optim.epochs):
        t0, seen = time.perf_counter(), 0
        skip = start.skip(epoch)  # batches this epoch ran before the checkpoint resumed from
        batches_run = 0
        # the epoch's summed batch losses, on the device (no host sync every step); a resumed epoch
        # starts from the sum before its resume point (the checkpoint's, every rank's)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        counted_from = start.open_epoch(epoch, loss_sum, d.rank)
        show_bar = cfg.run.progress and d.rank == 0 and not d.under_ray  # Ray relays worker output line by line
        for batch in bar(train_batches(epoch, skip), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", total=n_batches - skip,
                         enabled=show_bar):
            batch = _to(batch, d.device)
            batch = task.train_batch(batch)  # anomaly: its self-supervised transforms
            loss = task.loss(_forward(engine, batch), batch)
            engine.backward(loss)
            engine.step()
            step += 1
            batches_run += 1
            loss_sum += loss.detach()
            window.after(epoch, skip + batches_run, step, loss_sum)
            seen += batch["label"].shape[0]
            if step % cfg.run.log_every == 0:
                log_step(metrics, engine, sched, loss, step, d.rank == 0, epoch=epoch + 1, epochs=cfg.optim.epochs,
                         steps=total_batches)
            if every_steps and step % every_steps == 0 and skip + batches_run < n_batches:  # the epoch's end saves its own
                metrics.flush()
                meta = {"epoch": epoch, "batch": skip + batches_run, "batch_size": cfg.optim.batch_size, "step": step,
                        "mlflow_run_id": cfg.mlflow_run_id, "unsent_metrics": metrics.unsent()}  # a restart sends these again and logs the later steps anew
                checkpoint.save(engine, store, cfg.run.name, checkpoint.mid_epoch_tag(epoch, skip + batches_run), meta, d.rank,
                                sums=loss_sum)
                if d.rank == 0:
                    checkpoint.prune(store, cfg.run.name, cfg.run.keep_checkpoints)
        total = loss_sum.clone()
        if dist.is_initialized():
            dist.all_reduce(total)  # the epoch's loss over every rank's batches
        epoch_loss = float(total) / max(1, (skip + batches_run - counted_from) * d.world)
        took = time.perf_counter() - t0
        metrics.add("epoch_train_loss", epoch_loss, step)
        metrics.add("samples_per_s", seen * d.world / took, step)
        if "val" in eval_loaders:
            val = score("val")
            for key, value in tasks.scalars(val).items():
                metrics.add(f"val_{key}", value, step)
        metrics.flush()
        if d.rank == 0:
            progress_event(epoch=epoch + 1, epochs=cfg.optim.epochs, step=step, steps=total_batches,
                           loss=round(epoch_loss, 5), val_accuracy=val.get("accuracy"))
            relay.say(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {epoch_loss:.4f}"
                      + (f", val {headline} {val.get(headline, float('nan')):.4f}" if val else "") + f" ({took:.1f} s)")
        last = epoch + 1 == cfg.optim.epochs
        if (epoch + 1) % cfg.run.checkpoint_every == 0 or last or (every_steps and step % every_steps == 0):
            meta = {"epoch": epoch, "step": step, "batch_size": cfg.optim.batch_size, "mlflow_run_id": cfg.mlflow_run_id,
                    "val_accuracy": val.get("accuracy"), "unsent_metrics": metrics.unsent()}
            checkpoint.save(engine, store, cfg.run.name, checkpoint.epoch_tag(epoch), meta, d.rank, window)
            if d.rank == 0:
                checkpoint.prune(store, cfg.run.name, cfg.run.keep_checkpoints)
        if d.under_ray:
            import ray.train

            ray.train.report({"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in tasks.scalars(val).items()}})

    result = {"step": step, "timing": clock.summary()}
    profiled = profile.finish()
    if profiled:
        result["profile"] = profiled
        record_profile(metrics, profiled, step)
    if "test" in eval_loaders:
        if task.needs_fit and not val and "val" in eval_loaders:  # resumed after the last epoch: calibrate again
            val = score("val")
        test = task.finish(score("test"), val)  # anomaly: the threshold from the validation normals
        for key, value in tasks.scalars(test).items():
            metrics.add(f"test_{key}", value, step)
        result["test"] = test
        if val:
            result["val"] = val
    metrics.close()  # waits for the sender: the driver reads these metrics next
    state = full_state_dict(engine)  # every rank takes part in a ZeRO-3 gather
    if d.rank == 0:
        write_final(state, store, cfg, result)
    if dist.is_initialized():
        dist.barrier()
    return result


def write_final(state: dict[str, torch.Tensor], store, cfg: TrainConfig, result: dict) -> None:
    """The trained weights (safetensors, no pickle) and the model config, committed."""
    from safetensors.torch import save_file

    weights = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
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
    try:
        out = train_loop(config)
    finally:
        # tear the process group down before the interpreter exits: its communication threads,
        # left to die at exit, abort the process under load ("terminate called without an active exception")
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in out.items() if k != "test"} | {"test_accuracy": out.get("test", {}).get("accuracy")}))


if __name__ == "__main__":
    main()
