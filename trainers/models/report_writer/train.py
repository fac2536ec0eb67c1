"""Training the report writer: the worker loop and the driver behind `indai train <recipe>`.

The same launcher path as every recipe: `indai train` validates the TrainConfig, and
`trainers.launch.train` hands a config whose `model.family` is `report_writer` to `train` here.
The driver resolves the instruction dataset through the access rule, opens the MLflow run
(params, dataset input), runs `train_report_writer` on Ray Train workers (or in-process / under
torchrun: `python -m indai.trainers.loop cfg.json`), and registers the merged model. The worker
reuses the loop's pieces (process group, metric batches, progress lines, warm-up + cosine,
checkpoints in the object store with resume) and the engine's strategy choice by size
(trainers.engine: `deepspeed.strategy: auto`, or a ZeRO stage set in the recipe).
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from indai.platform import datasets, registry
from indai.platform.errors import UserError
from indai.platform.instruct import read_records
from indai.platform.progress import Stages, bar
from indai.platform.storage import open_store
from indai.trainers import checkpoint, relay
from indai.trainers.config import TrainConfig
from indai.trainers.data import ShardSampler
from indai.trainers.engine import bf16_enabled, build_engine, full_state_dict, lockstep, optimizer_steps
from indai.trainers.loop import log_step, progress_event, setup_distributed, warmup_cosine
from indai.trainers.profiling import Profile, log_traces, record_profile
from indai.trainers.tracking import MetricBuffer
from indai.trainers.models.report_writer.data import InstructDataset, collate, to_device
from indai.trainers.models.report_writer.model import hold_frozen_in_bf16

FINAL_WEIGHTS = "trained.safetensors"


def lm_folder(cfg: TrainConfig, store) -> Path:
    from indai.trainers.pretrained import hf_dir

    return Path(hf_dir(cfg.model.lm, store))


def build_model(cfg: TrainConfig, store, load_pretrained: bool = True):
    from indai.trainers.models import build
    from indai.trainers.models.report_writer import model  # noqa: F401  (registers the family)

    return build("model", "report_writer", cfg=cfg.model, lm_folder=lm_folder(cfg, store), store=store,
                 load_pretrained=load_pretrained)


def _loader(ds, sampler, cfg: TrainConfig, cuda: bool) -> DataLoader:
    # its own generator: a DataLoader draws its workers' base seed at every iter(), from the global
    # generator otherwise, which would shift the dropout masks of a run resumed inside an epoch
    return DataLoader(ds, batch_size=cfg.optim.batch_size, sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate,
                      pin_memory=cuda, persistent_workers=cfg.data.num_workers > 0,
                      generator=torch.Generator().manual_seed(cfg.run.seed))


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("prompts", "responses", "sensor", "image", "mask") if k in batch}


class TokenWindows:
    """The loss of an optimizer step is the mean over every response token of its accumulation
    window, on every rank, as if the window were one batch.

    The model returns each micro-batch's mean per token, and the engines (DeepSpeed and
    TorchEngine alike) divide what `backward` gets by the accumulation steps and average the
    gradients across ranks. That weights a micro-batch of 3 response tokens as much as one of
    300, so the gradient would depend on how the same samples are cut into micro-batches and
    ranks (the gradient-accumulation error Hugging Face Trainer fixed in 2024). Here each
    micro-batch's mean is scaled by `its tokens * grad_accum * world / the window's tokens`, which
    the engines' division and averaging turn into the window's per-token mean.

    The token counts need no look-ahead: responses are tokenised up front and the sampler's
    order is a function of seed and epoch, so every micro-batch's count of every epoch is known
    at the start, on the host. One all-reduce of those counts (epochs x batches integers) gives
    the windows' totals on every rank; a window that crosses an epoch's end, as accumulation
    does (trainers.engine.optimizer_steps), is summed like any other. Micro-batch `i` of epoch `e`
    is the engine's micro-step `e * batches + i`."""

    def __init__(self, lengths: np.ndarray, sampler: ShardSampler, batch_size: int, grad_accum: int, epochs: int,
                 world: int, device: torch.device):
        batches = math.ceil(len(sampler) / batch_size)
        mine = np.zeros((epochs, batches), dtype=np.int64)
        for epoch in range(epochs):
            order = ShardSampler(sampler.n, sampler.rank, sampler.world, sampler.shuffle, sampler.seed)
            order.set_epoch(epoch)
            idx = np.fromiter(iter(order), dtype=np.int64, count=len(order))
            mine[epoch] = np.add.reduceat(lengths[idx], np.arange(0, len(idx), batch_size))
        total = torch.from_numpy(mine.ravel().copy())
        if dist.is_initialized() and world > 1:
            total = total.to(device)
            dist.all_reduce(total)
            total = total.cpu()
        self.batches, self.grad_accum, self.world = batches, grad_accum, world
        self.mine, self.all = mine.ravel(), total.numpy()
        starts = np.arange(0, len(self.all), grad_accum)
        self.window = np.add.reduceat(self.all, starts) if len(self.all) else np.zeros(0, dtype=np.int64)

    def scale(self, epoch: int, i: int) -> float:
        """What micro-batch `i` of `epoch`'s mean loss is multiplied by before `backward`."""
        g = epoch * self.batches + i
        return float(self.mine[g] * self.grad_accum * self.world) / max(1, int(self.window[g // self.grad_accum]))

    def epoch_tokens(self, epoch: int, start: int = 0) -> int:
        """Response tokens of the epoch's micro-batches from batch `start` on, all ranks together."""
        return int(self.all[epoch * self.batches + start: (epoch + 1) * self.batches].sum())


def train_step(engine, batch: dict, device: torch.device, sums: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """One micro-step on a collated batch: forward, backward of the mean loss per response token
    times `scale` (TokenWindows.scale), and the engine's step (the optimizer's at the end of an
    accumulation window). Adds (summed loss, response tokens) to `sums` on the device: nothing
    here makes the host wait for the GPU, the loop reads the sums once per epoch
    (tests/gpu/test_gpu_host_waits.py counts the waits). Returns the mean loss, on the device."""
    loss, n = engine(**_inputs(to_device(batch, device)))
    engine.backward(loss * scale if scale != 1.0 else loss)
    engine.step()
    sums += torch.stack([loss.detach().double() * n, n.double()])
    return loss


@torch.no_grad()
def evaluate(engine, loader, device: torch.device) -> dict:
    """Mean loss per response token over the whole split (summed across ranks).

    Under ZeRO-3 every forward gathers parameters from all ranks, so every rank runs as many
    forwards as the rank with the most batches (trainers.engine.lockstep, as the train loop's
    evaluation does); the filler forwards count nothing."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, real in lockstep(engine, loader, device, lambda: collate([loader.dataset[0]])):
        loss, n = engine(**_inputs(to_device(batch, device)))
        if real:
            sums += torch.stack([loss.double() * n, n.double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.train()
    return {"loss": (sums[0] / sums[1].clamp(min=1)).item(), "tokens": int(sums[1].item())}


def train_report_writer(config: dict) -> dict:
    """The worker: one function, configured only by its TrainConfig (a dict: Ray ships it)."""
    cfg = TrainConfig.model_validate(config)
    d = setup_distributed(cfg)
    cuda = d.device.type == "cuda"
    torch.manual_seed(cfg.run.seed)
    store = open_store(cfg.store_uri)
    cfg = checkpoint.fresh_or_resumed(store, cfg)  # run.resume false on a run with checkpoints: refused here
    ref, manifest = datasets.open_for_job(store, datasets.parse_ref(cfg.data.dataset))
    model = build_model(cfg, store).to(d.device)
    present = manifest["split"].get("records") or {}
    splits = {s: InstructDataset(read_records(store, ref, s, manifest), model.tokens, cfg.model)
              for s in ("train", "val", "test") if present.get(s)}
    sampler = ShardSampler(len(splits["train"]), d.rank, d.world, shuffle=True, seed=cfg.run.seed)
    train_loader = _loader(splits["train"], sampler, cfg, cuda)
    eval_loaders = {s: _loader(ds, ShardSampler(len(ds), d.rank, d.world, shuffle=False), cfg, cuda)
                    for s, ds in splits.items() if s != "train"}
    total_batches = len(train_loader) * cfg.optim.epochs  # `step` counts these: what progress is reported in
    # the schedule spans the optimizer steps the engine will take (accumulation runs across epoch ends)
    total_updates = optimizer_steps(len(train_loader), cfg.optim.grad_accum, cfg.optim.epochs)
    engine, sched = build_engine(model, cfg, d, warmup_cosine(total_updates, cfg.optim.warmup_frac), store)
    if cuda and bf16_enabled(cfg, cuda) and engine.zero_optimization_stage() < 3:  # ZeRO-3 holds the weights partitioned
        cast = hold_frozen_in_bf16(model.lm)
        if d.rank == 0:
            relay.say(f"[indai] the frozen LM is held in bf16 ({cast / 1e6:.1f} M parameters); adapters train in fp32")

    # run.resume: the latest checkpoint, loaded; going on after an epoch or where the accumulation
    # window it ended in began (trainers.checkpoint.WindowStart)
    start = checkpoint.start_point(engine, store, cfg, d.world, d.rank)
    step = start.step
    window = checkpoint.WindowStart(cfg.optim.grad_accum, len(train_loader), total_batches, engine.module, start.epoch,
                                    start.batch, step)
    metrics = MetricBuffer(cfg, enabled=d.rank == 0)  # sent in the background (trainers.tracking)
    profile = Profile(cfg, d.rank, d.device, store)  # run.profile_steps (trainers.profiling)
    metrics.restore(start.unsent_metrics, start.logged_through)  # steps run again are logged once
    windows = TokenWindows(np.array([len(r) for r in splits["train"].responses], dtype=np.int64), sampler,
                           cfg.optim.batch_size, cfg.optim.grad_accum, cfg.optim.epochs, d.world, d.device)
    val: dict = {}
    for epoch in range(start.epoch, cfg.optim.epochs):
        skip = start.skip(epoch)  # batches of this epoch that ran before the resume point
        sampler.set_epoch(epoch, start=skip * cfg.optim.batch_size)
        t0, batches = time.perf_counter(), skip
        sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # loss, response tokens: summed on the device
        counted_from = start.open_epoch(epoch, sums, d.rank)  # the whole epoch's, the resumed one's too
        show_bar = cfg.run.progress and d.rank == 0 and not d.under_ray
        for batch in bar(profile.steps(train_loader), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                         total=len(train_loader), enabled=show_bar):  # the sampler's length: what is left of the epoch
            loss = train_step(engine, batch, d.device, sums, windows.scale(epoch, batches))
            step, batches = step + 1, batches + 1
            window.after(epoch, batches, step, sums)
            if step % cfg.run.log_every == 0:
                log_step(metrics, engine, sched, loss, step, d.rank == 0, epoch=epoch + 1, epochs=cfg.optim.epochs,
                         steps=total_batches)
        if dist.is_initialized():
            dist.all_reduce(sums)  # the epoch's loss per response token, over every rank
        loss_sum, tokens = sums.tolist()
        if int(tokens) != windows.epoch_tokens(epoch, counted_from):
            raise RuntimeError(f"the loss was weighted for {windows.epoch_tokens(epoch, counted_from)} response tokens in epoch "
                               f"{epoch + 1}, but the model scored {int(tokens)}: TokenWindows and the model count "
                               "response tokens differently")
        took = time.perf_counter() - t0
        epoch_loss = loss_sum / max(1, tokens)
        metrics.add("epoch_train_loss", epoch_loss, step)
        metrics.add("response_tokens_per_s", tokens / took, step)
        if "val" in eval_loaders:
            val = evaluate(engine, eval_loaders["val"], d.device)
            metrics.add("val_loss", val["loss"], step)
        metrics.flush()
        if d.rank == 0:
            progress_event(epoch=epoch + 1, epochs=cfg.optim.epochs, step=step, steps=total_batches,
                           loss=round(epoch_loss, 5), val_loss=val.get("loss"))
            relay.say(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {epoch_loss:.4f}"
                      + (f", val loss {val['loss']:.4f}" if val else "") + f" ({took:.1f} s)")
        if (epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs:
            meta = {"epoch": epoch, "step": step, "batch_size": cfg.optim.batch_size, "mlflow_run_id": cfg.mlflow_run_id,
                    "val_loss": val.get("loss"),
                    "unsent_metrics": metrics.unsent()}
            checkpoint.save(engine, store, cfg.run.name, checkpoint.epoch_tag(epoch), meta, d.rank, window)
            if d.rank == 0:
                checkpoint.prune(store, cfg.run.name, cfg.run.keep_checkpoints)
        if d.under_ray:
            import ray.train

            ray.train.report({"epoch": epoch, "step": step, "val_loss": val.get("loss")})

    result: dict = {"step": step}
    profiled = profile.finish()
    if profiled:
        result["profile"] = profiled
        record_profile(metrics, profiled, step)
    if "test" in eval_loaders:
        result["test"] = evaluate(engine, eval_loaders["test"], d.device)
        metrics.add("test_loss", result["test"]["loss"], step)
    metrics.close()  # waits for the sender: the driver reads these metrics next
    state = full_state_dict(engine)  # every rank takes part in a ZeRO-3 gather
    if d.rank == 0:
        write_final(state, store, cfg, result)
    if dist.is_initialized():
        dist.barrier()
    return result


def write_final(state: dict, store, cfg: TrainConfig, result: dict) -> None:
    """What training changed (adapters, prefix modules: safetensors) and the model config, committed."""
    from safetensors.torch import save_file

    from indai.trainers.models.report_writer.export import trained_state

    with tempfile.TemporaryDirectory(prefix="indai-final-") as tmp:
        save_file(trained_state(state), str(Path(tmp) / FINAL_WEIGHTS))
        (Path(tmp) / "model_config.json").write_text(cfg.model.model_dump_json(indent=2))
        (Path(tmp) / "result.json").write_text(json.dumps(result))
        target = f"{checkpoint.prefix(cfg.run.name)}/{checkpoint.FINAL}"
        store.delete_prefix(target)
        store.upload_dir(target, tmp)
    store.commit(target, {"step": result["step"], "mlflow_run_id": cfg.mlflow_run_id})


# ---- the driver ---------------------------------------------------------------------------------

def complete_from_manifest(cfg: TrainConfig, manifest: dict) -> TrainConfig:
    """Fields the dataset decides: which prefixes, sensor shape and normalisation, image size."""
    from indai.trainers.launch import completing_from

    with completing_from(manifest):
        return _complete_from_manifest(cfg, manifest)


def _complete_from_manifest(cfg: TrainConfig, manifest: dict) -> TrainConfig:
    if manifest.get("layout") != "instruct":
        raise UserError(f"dataset {manifest['name']}@{manifest['version']} is not an instruction dataset: the report writer "
                        "trains on `indai data instruct` output")
    m = cfg.model.model_copy(deep=True)
    mods = manifest.get("modalities", {})
    m.modalities = [k for k in ("sensor", "image") if k in mods]
    if "sensor" in mods:
        s = mods["sensor"]
        m.sensor.channels, m.sensor.length = len(s["channels"]), s["window"]
        m.sensor_mean, m.sensor_std = s["norm"]["mean"], s["norm"]["std"]
    if "image" in mods:
        m.image.size = mods["image"]["size"]
    return cfg.model_copy(update={"model": m, "data": cfg.data.model_copy(update={"loader": "memory"})})


def default_instruction(store, ref, manifest: dict) -> str:
    """The instruction a request without one gets: the most frequent one of the train split."""
    counts = Counter(str(i) for i in read_records(store, ref, "train", manifest)["instruction"])
    return counts.most_common(1)[0][0]


def log_and_register(cfg: TrainConfig, store, ref, manifest: dict, run_id: str) -> tuple[int | None, dict]:
    """Build the artefact from the final weights, log it as an MLflow model, register it once per run."""
    from safetensors.torch import load_file

    from indai.platform.mirror import read_card
    from indai.platform.report_format import mlflow_signature
    from indai.trainers.launch import fetch_final, log_model_once, tag_registered
    from indai.trainers.models.report_writer.config import ReportWriterConfig
    from indai.trainers.models.report_writer.export import card_inputs, export, load_trained

    with tempfile.TemporaryDirectory(prefix="indai-model-") as tmp:
        tmp = Path(tmp)
        result = fetch_final(cfg, store, tmp / "final")
        mcfg = ReportWriterConfig.model_validate_json((tmp / "final" / "model_config.json").read_text())
        run_cfg = cfg.model_copy(update={"model": mcfg})
        model = build_model(run_cfg, store)
        load_trained(model, load_file(str(tmp / "final" / FINAL_WEIGHTS)))
        card = {"family": "report_writer", "modalities": mcfg.modalities, "classes": [],
                "inputs": card_inputs(model, manifest.get("modalities", {}).get("sensor")),
                "generation": {"max_new_tokens": mcfg.max_new_tokens, "temperature": mcfg.temperature,
                               "default_instruction": default_instruction(store, ref, manifest)},
                "lm": {"base": mcfg.lm, "base_card_sha256": read_card(store, mcfg.lm)["card_sha256"], "lora_merged": True,
                       "lora": mcfg.lora.model_dump()},
                "languages": manifest.get("instruct", {}).get("languages", []),
                "dataset": f"{manifest['name']}@{manifest['version']}", "recipe": cfg.recipe, "run_id": run_id,
                "attribution": manifest.get("attribution", "")}
        pkg = tmp / "indai_model"
        export(model, lm_folder(run_cfg, store), pkg, card)
        name = cfg.run.register_as
        version = log_model_once(cfg, run_id, result["step"], pkg, mlflow_signature())
        if name and version:
            tag_registered(cfg, manifest, name, version, card["dataset"], result["step"],
                           {"indai.family": "report_writer", "indai.lm": mcfg.lm})
    return version, result


def train(cfg: TrainConfig, settings, parent_run_id: str | None = None):
    """`indai train` for the report writer: dataset -> workers -> MLflow model -> registry
    (`parent_run_id`: an MLflow run this one is nested under)."""
    from indai.trainers.launch import TrainResult, _open_run, prepare, run_workers

    stages = Stages()
    store, ref, manifest, cfg, tracking = prepare(cfg, settings, complete_from_manifest)
    with stages.stage("open the MLflow run"):
        run, resumed = _open_run(cfg, store, manifest, ref, parent_run_id)
    with run:
        run_id = run.info.run_id
        cfg = cfg.model_copy(update={"store_uri": settings.store_uri, "mlflow_uri": tracking, "mlflow_run_id": run_id})
        if resumed:
            print(f"resuming run {cfg.run.name} (MLflow run {run_id}) from checkpoint {resumed}", file=sys.stderr)
        with stages.stage(f"train ({cfg.run.launcher} launcher, {cfg.run.workers if cfg.run.launcher == 'ray' else 1} worker(s))"):
            run_workers(cfg, settings, manifest, loop=train_report_writer)
            log_traces(cfg, store)  # run.profile_steps: the workers' traces beside the run's metrics
        with stages.stage("merge, export and register"):
            version, result = log_and_register(cfg, store, ref, manifest, run_id)
    print(stages.summary(), file=sys.stderr, flush=True)
    test = {"loss": result["test"]["loss"]} if "test" in result else {}
    out = TrainResult(run_id=run_id, dataset=str(ref), test_accuracy=None, model_name=cfg.run.register_as,
                      model_version=version, resumed_from=resumed, task="report", test_metrics=test)
    if version and cfg.run.alias:
        registry.label_alias(tracking, cfg.run.register_as, version, cfg.run.alias)  # a label: `indai model promote` serves it
        out.alias = cfg.run.alias
    return out
