"""The training engine: strategy choice, optimizer, and the object the loop steps.

The loop only calls `engine(**inputs)`, `backward`, `step`, `train`/`eval`, `save_checkpoint`,
`load_checkpoint`, `zero_optimization_stage` and `module`, so two engines serve it:

- DeepSpeed (strategies zero0..zero3_offload) for models whose states must be sharded;
- `TorchEngine` (strategy ddp): the model as it is on one device, torch DDP across several. On
  one GPU this is the careful plain PyTorch loop itself, which DeepSpeed ZeRO-0 trails (GPU.md).

Both keep the fast paths of ../shared/GPU.md: bf16 through torch autocast only (DeepSpeed's own
bf16 mode casts the model and breaks BatchNorm), parameters left contiguous (DeepSpeed's
flattening rejects channels_last parameters; channels_last is applied to image inputs in
`trainers.feed`), fused AdamW on CUDA, cuDNN autotuning, and `run.compile`. DeepSpeed is
imported only when a ZeRO strategy is chosen, so ddp runs where DeepSpeed is not installed.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from indai.platform.errors import UserError
from indai.trainers import checkpoint, relay
from indai.trainers.strategy import Choice, choose, requested_strategy

TORCH_ENGINE_FORMAT = "indai-torch-engine/1"


def bf16_enabled(cfg, cuda: bool) -> bool:
    return cfg.deepspeed.bf16 == "on" or (cfg.deepspeed.bf16 == "auto" and cuda)


def ds_config(micro_batch: int, grad_accum: int, stage: int, offload: bool, clip: float, bf16: bool) -> dict:
    """A DeepSpeed config with autocast bf16 and fp32 master weights."""
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # the torch AdamW we pass in, also when offloaded
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds["gradient_clipping"] = clip  # always: DeepSpeed's default is 1.0, which would clip where optim.clip 0 says off
    if bf16:
        # DeepSpeed's own bf16 mode casts the model and breaks BatchNorm (../shared/GPU.md);
        # autocast keeps fp32 master weights and runs matmuls and convolutions in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def deepspeed_config(cfg, cuda: bool, choice: Choice | None = None) -> dict:
    """The DeepSpeed config of a TrainConfig (ZeRO stage from `choice`, else from the config)."""
    if choice is None:
        requested = requested_strategy(cfg.deepspeed.strategy, cfg.deepspeed.zero_stage)
        stage, offload = (int(requested[4]), requested == "zero3_offload") if requested.startswith("zero") else (0, False)
    else:
        stage, offload = choice.zero_stage or 0, choice.offload
    return ds_config(cfg.optim.batch_size, cfg.optim.grad_accum, stage, offload, cfg.optim.clip, bf16_enabled(cfg, cuda))


# ---- strategy -----------------------------------------------------------------------------------

def model_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, trainable parameters)."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, trainable


def _host_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(device: torch.device, world: int) -> int:
    """Free memory of this rank's device; on CPU the host's available memory shared by the
    ranks on this host. The smallest over all ranks, so that every rank chooses alike."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        free = _host_available_bytes() // max(1, local)
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([float(free)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        free = int(t.item())
    return free


def decide(model: torch.nn.Module, cfg, device: torch.device, world: int, store=None) -> Choice:
    """The run's strategy. A resumed run keeps the strategy its checkpoint was written with
    (the two engines' checkpoints are not interchangeable, and free memory varies)."""
    params, trainable = model_sizes(model)
    free = free_device_bytes(device, world)
    if device.type == "cuda":  # the weights already sit on the device: their memory counts as the states' own
        free += sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)
    requested = requested_strategy(cfg.deepspeed.strategy, cfg.deepspeed.zero_stage)
    found = checkpoint.latest(store, cfg.run.name) if store is not None and cfg.run.resume else None
    if found:
        # checkpoints written before strategies were recorded are DeepSpeed's, at the configured stage
        prior = found[1].get("strategy") or f"zero{cfg.deepspeed.zero_stage or 0}"
        if requested not in ("auto", prior):
            raise UserError(f"run {cfg.run.name} has checkpoints written with strategy {prior}, not {requested}: "
                            f"resume with deepspeed.strategy={prior} or train under a new run.name")
        choice = choose(prior, params, trainable, free, world, cfg.deepspeed.state_memory_fraction)
        return Choice(choice.strategy, choice.zero_stage, choice.offload, choice.state_bytes,
                      f"{prior} kept from checkpoint {found[0]}; " + choice.reason)
    return choose(requested, params, trainable, free, world, cfg.deepspeed.state_memory_fraction)


def log_choice(cfg, choice: Choice) -> None:
    """On stderr, and in MLflow: the strategy as a param, the reason as a tag."""
    relay.say(f"[indai] strategy: {choice.reason}")
    if cfg.mlflow_uri and cfg.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg.mlflow_uri)
        client.log_param(cfg.mlflow_run_id, "strategy.chosen", choice.strategy)
        client.set_tag(cfg.mlflow_run_id, "indai.strategy_reason", choice.reason[:5000])


# ---- engine construction ------------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, cfg, fused: bool, param_groups: list | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (dicts in torch's format, e.g. per-layer learning rates) when
    given, else over the trainable parameters; fused kernels on CUDA."""
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = []
    for g in param_groups:
        g = dict(g) if isinstance(g, dict) else {"params": g}
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if g["params"]:
            groups.append(g)
    if not groups:
        raise UserError("the model has no trainable parameters: check the encoders' tune policies")
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused or None)


def compile_regions(model: torch.nn.Module) -> str | None:
    """Regional compilation (`run.compile` for a model that has `compile_regions()`): each region
    is compiled in place, and repeated blocks of one class (an LM's decoder layers) share one
    compiled graph, so compiling takes seconds instead of minutes. A model whose forward takes
    Python values that change every batch (the report writer's token id lists) needs it: compiled
    whole, it would recompile on every new batch. Returns what was compiled, or None when the
    model names no regions and is compiled whole."""
    regions = getattr(model, "compile_regions", None)
    if regions is None:
        return None
    kinds: dict[str, int] = {}
    for module in regions():
        module.compile()
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return "regions " + ", ".join(f"{n} x {k}" for k, n in kinds.items())


def use_the_environments_ninja() -> None:
    """Put this Python environment's `bin` first on PATH when it holds a `ninja`, so every process
    that JIT-builds DeepSpeed's ops (its CPU shared-memory all-reduce on CPUs, CPU Adam under
    offload) runs the same ninja. torch runs the first `ninja` on PATH; Ray starts its workers with
    the environment's `bin` first and a plain `indai train --launcher local` (or a test) may not,
    so one process found pip's ninja 1.13 and another Debian's 1.11. The two hash commands
    differently in the build log they share (in TORCH_EXTENSIONS_DIR), each took the other's
    entries for changed commands, and the op was compiled again at every alternation: 1.5 to 2.5
    minutes on 2 cores each time, ten times in one run of the test suite."""
    here = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (here / "ninja").is_file() and path.split(os.pathsep)[0] != str(here):
        os.environ["PATH"] = str(here) + (os.pathsep + path if path else "")


def clip_in_step_hook(optimizer: torch.optim.Optimizer, clip: float, foreach: bool) -> None:
    """Under DeepSpeed ZeRO-0 the torch optimizer steps as it is: its pre-step hook takes the
    gradients' norm (DeepSpeed has all-reduced them by then), clips them to `clip` when it is
    set, and keeps the norm on the optimizer for `grad_norm`. ZeRO 1-3 and the torch engine keep
    their own (DeepSpeed's `get_global_grad_norm`)."""
    def hook(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if clip > 0:
            opt.indai_grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=foreach or None)
        else:
            opt.indai_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=foreach or None)

    optimizer.register_step_pre_hook(hook)


def grad_norm(engine) -> torch.Tensor | float | None:
    """The 2-norm of the gradients of the engine's last optimizer step, before clipping, across
    ranks; None before the first step or where the engine computes none."""
    kept = getattr(engine.optimizer, "indai_grad_norm", None)
    return kept if kept is not None else engine.get_global_grad_norm()


def build_engine(model: torch.nn.Module, cfg, d, lr_lambda: Callable[[int], float], store=None,
                 param_groups: list | None = None):
    """(engine, lr scheduler) for `model` (already on d.device) under the strategy `decide`
    picks; rank 0 logs the choice. `d` is the loop's Dist (rank, world, device)."""
    cuda = d.device.type == "cuda"
    choice = decide(model, cfg, d.device, d.world, store)
    if d.rank == 0:
        log_choice(cfg, choice)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune convolutions once
    opt = build_optimizer(model, cfg, fused=cuda and not choice.offload, param_groups=param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    regional = cfg.run.compile and compile_regions(model)  # None: the engine compiles the whole model
    if choice.uses_deepspeed:
        use_the_environments_ninja()  # before DeepSpeed builds its ops
        if not torch.cuda.is_available():  # what DeepSpeed's detection picks here, said up front: detecting,
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # it warns "unable to detect" a GPU in every worker
        import deepspeed

        config = deepspeed_config(cfg, cuda, choice)
        if not choice.zero_stage:  # DeepSpeed clips ZeRO-0 gradients but keeps no norm: indai clips them
            config["gradient_clipping"] = 0.0
            clip_in_step_hook(opt, cfg.optim.clip, foreach=cuda)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=config, dist_init_required=False)
        if cfg.run.compile and not regional:
            engine.compile()
    else:
        engine = TorchEngine(model, opt, sched, device=d.device, world=d.world, rank=d.rank,
                             grad_accum=cfg.optim.grad_accum, clip=cfg.optim.clip, bf16=bf16_enabled(cfg, cuda),
                             compile=cfg.run.compile and not regional)
    if cfg.run.compile and d.rank == 0:
        relay.say(f"[indai] compile: {regional or 'the whole model'}")
    engine.indai_strategy = choice.strategy  # recorded with each checkpoint (trainers.checkpoint.save)
    return engine, sched


# ---- the torch engine ---------------------------------------------------------------------------

def _plain(value):
    """JSON for optimizer and scheduler state: tuples become lists, 0-d tensors numbers."""
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class TorchEngine:
    """Plain data parallel without DeepSpeed, with the surface of a DeepSpeed engine that the
    loop and trainers.checkpoint use. Gradient accumulation, clipping and the scheduler step
    follow DeepSpeed's semantics (loss divided by the accumulation steps, the optimizer and
    scheduler step once per accumulation boundary). Checkpoints are safetensors and JSON."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, *, device: torch.device,
                 world: int, rank: int, grad_accum: int = 1, clip: float = 0.0, bf16: bool = False, compile: bool = False):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.device, self.world, self.rank = device, world, rank
        self.grad_accum, self.clip, self.bf16 = grad_accum, clip, bf16
        self.micro_steps = self.global_steps = 0
        self._grad_norm: torch.Tensor | None = None
        self.ddp = None
        wrapped = module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)
            wrapped = self.ddp
        self._train_forward = torch.compile(wrapped) if compile else wrapped
        # evaluation bypasses DDP: ranks evaluate different numbers of batches, and DDP's forward
        # would wait for the others (buffer broadcast)
        self._eval_forward = self._train_forward if self.ddp is None else module
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    # -- what the loop calls
    def __call__(self, *args, **kwargs):
        if self.ddp is not None:  # gradients are all-reduced only in the backward of a boundary micro-step
            self.ddp.require_backward_grad_sync = (self.micro_steps + 1) % self.grad_accum == 0
        forward = self._train_forward if self.module.training else self._eval_forward
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        foreach = self.device.type == "cuda" or None
        if self.clip > 0:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip, foreach=foreach)
        else:
            self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None],
                                                            foreach=foreach)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1

    def train(self, mode: bool = True) -> "TorchEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "TorchEngine":
        return self.train(False)

    def zero_optimization_stage(self) -> int:
        return 0

    def get_global_grad_norm(self) -> torch.Tensor | None:
        """The 2-norm of the gradients the last optimizer step used, before clipping, across all
        ranks (DDP has averaged them); on the device, so reading it is the caller's host wait."""
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    # -- checkpoints: identical on every rank, so rank 0 writes them and every rank reads them
    @staticmethod
    def _storage(t: torch.Tensor) -> tuple:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype

    def _saved_names(self, state: dict[str, torch.Tensor], exclude_frozen: bool) -> list[str]:
        """The names a checkpoint holds: each shared tensor once (tied weights), frozen parameters
        left out when asked (as DeepSpeed's exclude_frozen_parameters; trainers.checkpoint)."""
        frozen = ({n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
                  if exclude_frozen else set())
        names, seen = [], set()
        for name, t in state.items():
            if name in frozen or self._storage(t) in seen:
                continue
            seen.add(self._storage(t))
            names.append(name)
        return names

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        exclude_frozen_parameters: bool = False) -> None:
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        weights = self.module.state_dict()
        save_file({n: weights[n].detach().cpu().contiguous() for n in self._saved_names(weights, exclude_frozen_parameters)},
                  str(folder / "model.safetensors"))
        state = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        save_file(tensors, str(folder / "optimizer.safetensors"))
        meta = {"format": TORCH_ENGINE_FORMAT, "strategy": "ddp", "client_state": client_state or {},
                "optimizer_scalars": scalars, "param_groups": state["param_groups"],
                "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "micro_steps": self.micro_steps, "global_steps": self.global_steps}
        (folder / "engine.json").write_text(json.dumps(meta, default=_plain))

    def load_checkpoint(self, load_dir: str, tag: str, custom_load_fn=None):
        """`custom_load_fn(src=weights, dst=module)` puts the weights in, as in DeepSpeed
        (trainers.checkpoint.module_loader); by default every tensor must be there."""
        from safetensors.torch import load_file

        folder = Path(load_dir) / tag
        if not (folder / "engine.json").is_file():
            raise UserError(f"checkpoint {tag} was not written by the torch engine (strategy ddp): resume with the "
                            "strategy it was trained with (deepspeed.strategy=zeroN) or train under a new run.name")
        meta = json.loads((folder / "engine.json").read_text())
        if meta.get("format") != TORCH_ENGINE_FORMAT:
            raise UserError(f"checkpoint {tag} has format {meta.get('format')!r}, not {TORCH_ENGINE_FORMAT}")
        saved = load_file(str(folder / "model.safetensors"), device=str(self.device))
        (custom_load_fn or checkpoint.module_loader(False, tag))(src=saved, dst=self.module)
        tensors = load_file(str(folder / "optimizer.safetensors"))
        state: dict = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        for idx, entry in meta["optimizer_scalars"].items():
            state.setdefault(int(idx), {}).update(entry)
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.lr_scheduler is not None and meta["scheduler"] is not None:
            self.lr_scheduler.load_state_dict(meta["scheduler"])
        self.micro_steps, self.global_steps = meta["micro_steps"], meta["global_steps"]
        return str(folder), meta["client_state"]


def optimizer_steps(batches_per_epoch: int, grad_accum: int, epochs: int) -> int:
    """The optimizer steps a run of `epochs` epochs takes. Both engines count micro-batches
    across epoch ends (DeepSpeed's `micro_steps`, TorchEngine's the same, and a resumed run's
    counter set to the checkpoint's step by trainers.checkpoint.load) and step at every
    `grad_accum`-th: an epoch of 7 batches with grad_accum 4 takes one step in its first epoch and
    two in its second, 17 in 10 epochs (not 10 x 7 // 4). The micro-batches after the last step
    add no update. A UserError when not one step would run."""
    micro = batches_per_epoch * epochs
    if micro < grad_accum:
        raise UserError(f"optim.grad_accum {grad_accum} is more than the {micro} batches of the whole run "
                        f"({epochs} epoch(s) of {batches_per_epoch}): no optimizer step would run. Lower "
                        "optim.grad_accum or optim.batch_size, or train more epochs")
    return micro // grad_accum


def shards_parameters(engine) -> bool:
    """Whether every forward is a collective: under ZeRO-3 each rank holds a partition of the
    parameters, and a forward gathers them from all ranks, layer by layer."""
    return engine.zero_optimization_stage() == 3


def lockstep(engine, batches, device: torch.device, spare: Callable[[], object]):
    """(batch, real) for each of `batches` (real: True), then, when the engine shards its
    parameters over several ranks, filler batches (real: False) until this rank has given as
    many as the rank with the most. Ranks evaluate shards of unequal size (trainers.data.ShardSampler
    never repeats a sample), and under ZeRO-3 a rank with one batch more would wait in that
    forward's parameter gather while the others wait in the scorer's all-reduce: a deadlock. The
    caller runs the filler batches' forwards too and discards their outputs. A filler repeats
    this rank's last batch, or is `spare()` where the rank had none. `batches` needs a length."""
    count = len(batches)
    most = count
    if shards_parameters(engine) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        most = int(t.item())
    last, given = None, 0
    for batch in batches:
        last, given = batch, given + 1
        yield batch, True
    for _ in range(most - given):
        yield (last if last is not None else spare()), False


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights. Under ZeRO-3 this is a collective: every rank must call it
    (rank 0 receives the gathered tensors); otherwise the module holds them all already."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()
