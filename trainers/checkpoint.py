"""Checkpoints in the object store, committed last, so a restarted run finds the latest whole one.

Every rank saves its DeepSpeed shard into a private local folder and uploads it under
`checkpoints/<run>/<tag>/`; after a barrier rank 0 writes the commit marker. A reader (the
same run restarted by Ray Train, `indai train` run again, or a new process) takes the newest
committed tag and ignores anything half-written. DeepSpeed's own files are loaded only from
checkpoints this platform wrote for this run; user-supplied files never reach torch.load.

A checkpoint leaves out the parameters training does not change (a frozen backbone, the frozen
LM under LoRA adapters: 4.1 of the report writer's 5.3 GiB, bench/checkpoint_size.py): a resumed
run builds them again from the same pretrained weights. What it left out is recorded with an
exact checksum of each such tensor, and a resume whose rebuilt model differs there (the mirror
entry replaced, the tune policy changed) is refused rather than trained on other weights.

Tags say how far the run had got: `epoch-00002` after the third epoch ended (validated), and,
with run.checkpoint_every_steps, `epoch-00002-batch-000025` after 25 batches of it, so a restart
loses at most that interval of steps and resumes at that position of the epoch's sample order. Tags
are ordered by that progress, not by name. An epoch's end inside an accumulation window is saved as
of the window's start, and a resume goes on from there (WindowStart). Next to the checkpoints the driver keeps the run's
resolved config (`config.json`, one object, written whole), which `indai train resume` reloads.
"""
from __future__ import annotations

import base64
import json
import re
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from indai.platform.errors import UserError
from indai.platform.storage import ObjectStore
from indai.trainers import relay

FINAL = "final"


def prefix(run_name: str) -> str:
    return f"checkpoints/{run_name}"


RUN_CONFIG = "config.json"
_TAG = re.compile(r"^epoch-(\d{5,})(?:-batch-(\d{6,}))?$")


def epoch_tag(epoch: int) -> str:
    """The checkpoint after epoch `epoch` (0-based) ended."""
    return f"epoch-{epoch:05d}"


def mid_epoch_tag(epoch: int, batches: int) -> str:
    """The checkpoint after `batches` batches of epoch `epoch` (0-based), before it ended."""
    return f"epoch-{epoch:05d}-batch-{batches:06d}"


def progress(tag: str) -> tuple[int, float] | None:
    """(epoch, batches done in it; inf once it ended) of a checkpoint tag, None for other folders."""
    m = _TAG.match(tag)
    if not m:
        return None
    return int(m.group(1)), float(m.group(2)) if m.group(2) is not None else float("inf")


def _checkpoint_tags(store: ObjectStore, run_name: str) -> list[str]:
    """The run's committed checkpoint tags, oldest progress first."""
    return sorted((t for t in store.committed_children(prefix(run_name)) if progress(t)), key=progress)


def latest(store: ObjectStore, run_name: str) -> tuple[str, dict] | None:
    tags = _checkpoint_tags(store, run_name)
    if not tags:
        return None
    tag = tags[-1]
    return tag, store.read_commit(f"{prefix(run_name)}/{tag}")


def _committed(store: ObjectStore, run_name: str) -> list[str]:
    """The run's committed checkpoints and final weights (what a new run under its name would mix with)."""
    return [t for t in store.committed_children(prefix(run_name)) if progress(t) or t == FINAL]


RUN_OWNER = "owner.json"


def claim_run(store: ObjectStore, run_name: str) -> None:
    """A run name belongs to the member whose job first opened it, as a dataset name does
    (`datasets.claim_name`). Run names are chosen by researchers and share one namespace, and
    `run.resume` is on by default: without this, a member's run that happened to take another
    member's run name would load that member's weights and optimizer state and log into, and
    register from, that member's MLflow run. So the first job records its member (`datasets.job_identity`;
    none outside a gateway job) under `checkpoints/<run>/owner.json`, and a researcher's job of any
    other member is refused before anything is read. The admin (a process outside a gateway job, or
    an admin's token) may open any run. A run written before owners were recorded belongs to no
    member: the admin may go on with it, a researcher's job takes a new run.name.

    The store has no create-if-absent write: two members' first jobs racing on one new name could
    both write the record, and the later writer's record stands; the loser's workers read it back
    (`fresh_or_resumed`) and stop."""
    from indai.platform.datasets import job_identity

    member, role = job_identity()
    key = f"{prefix(run_name)}/{RUN_OWNER}"
    if store.exists(key):
        try:
            owner = json.loads(store.get_bytes(key))["member"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"owner record {key!r} in {store.uri} is damaged: the admin must restore it "
                            "(it names the member whose job started the run)") from None
    else:
        legacy = bool(_committed(store, run_name)) or store.exists(f"{prefix(run_name)}/{RUN_CONFIG}")
        owner = None if legacy else member
        if not legacy:  # a new name: this job's member takes it (a run from before owners stays as it was)
            store.put_bytes(key, json.dumps({"member": owner}).encode())
    if role != "admin" and owner != member:
        whose = f"member {owner}" if owner else "no member (it was started outside a member's job, or before runs had owners)"
        raise UserError(f"run {run_name} belongs to {whose}; this job runs for member {member}: choose another run.name")


def refuse_existing(store: ObjectStore, run_name: str, own_mlflow_run: str | None = None) -> bool:
    """For `run.resume: false`, which starts a run from nothing. Checkpoints already under the run's
    name would mix with the new run's: tags are ordered by progress, so pruning deletes the new
    run's early checkpoints at once, `latest` stays the old run's, and a later resume would load
    the old weights and reopen the old MLflow run. So a UserError when the run has committed
    checkpoints; except those of MLflow run `own_mlflow_run` (the run a worker belongs to: Ray Train
    restarted its workers inside the job), for which this returns True (the worker goes on from
    them). False when the run has none."""
    tags = _committed(store, run_name)
    if not tags:
        return False
    owners = {store.read_commit(f"{prefix(run_name)}/{t}").get("mlflow_run_id") for t in tags}
    if own_mlflow_run is not None and owners == {own_mlflow_run}:
        return True
    done = _checkpoint_tags(store, run_name)
    upto = done[-1] if done else FINAL
    raise UserError(f"run {run_name} already has checkpoints up to {upto}: resume it (run.resume=true, or "
                    f"`indai train resume {run_name}`) or choose a new run.name")


def fresh_or_resumed(store: ObjectStore, cfg):
    """A worker's TrainConfig after the `claim_run` and `refuse_existing` checks: unchanged, or, when a worker of this
    very job finds the checkpoints its own earlier attempt wrote, set to resume from them."""
    claim_run(store, cfg.run.name)  # a run of another member's: refused before anything is read
    if cfg.run.resume or not refuse_existing(store, cfg.run.name, cfg.mlflow_run_id):
        return cfg
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})})


PARTITIONED = ("zero1", "zero2", "zero3", "zero3_offload")  # strategies that split the optimizer state over ranks


def check_resumable(run_name: str, tag: str, meta: dict, world: int, batch_size: int) -> None:
    """A UserError when a job of `world` workers and batches of `batch_size` cannot go on from
    checkpoint `tag` (its commit record `meta`), before anything is loaded:
    - under a ZeRO strategy of stage 1 or more each worker saved its own partition of the
      optimizer state (and under ZeRO-3 of the weights), and DeepSpeed loads such a checkpoint
      only with the same number of workers;
    - a checkpoint inside an epoch holds the position in each worker's shard of the epoch's
      sample order, in batches; other workers or batch sizes cut other shards, and going on at
      that position would skip some samples and repeat others.
    Checkpoints written before the world was recorded are not checked."""
    was_world, was_batch = meta.get("world"), meta.get("batch_size")
    if was_world is None:
        return
    strategy = meta.get("strategy")
    if strategy in PARTITIONED and was_world != world:
        raise UserError(f"checkpoint {tag} of run {run_name} was written by {was_world} workers under {strategy}, which "
                        f"splits the optimizer state into {was_world} partitions, and this job has {world}: DeepSpeed loads "
                        f"it only with the same number. Resume with run.workers={was_world}")
    if (was_world, was_batch) == (world, batch_size):
        return
    if meta.get("batch") is not None:
        raise UserError(f"checkpoint {tag} of run {run_name} stopped inside epoch {int(meta['epoch']) + 1}, at a position in "
                        f"the shards of {was_world} workers with batches of {was_batch}, and this job has {world} workers "
                        f"with batches of {batch_size}: their shards differ, so some samples would be skipped and others "
                        f"repeated. Resume with run.workers={was_world} and optim.batch_size={was_batch}")
    at = meta.get("resume_at") or {}
    if at.get("batch"):
        raise UserError(f"checkpoint {tag} of run {run_name} was written inside an accumulation window that began in epoch "
                        f"{int(at['epoch']) + 1}, and goes on from there, at a position in the shards of {was_world} workers "
                        f"with batches of {was_batch}; this job has {world} workers with batches of {batch_size}: their "
                        f"shards differ, so some samples would be skipped and others repeated. Resume with "
                        f"run.workers={was_world} and optim.batch_size={was_batch}")


def resume_position(state: dict) -> tuple[int, int, int]:
    """(epoch to run, global step, batches of that epoch already done) after a checkpoint's state:
    for a checkpoint written inside an accumulation window, the window's start (WindowStart)."""
    at = state.get("resume_at")
    if at:
        return int(at["epoch"]), int(at["step"]), int(at["batch"])
    epoch, step = int(state["epoch"]), int(state["step"])
    if state.get("batch") is not None:  # mid-epoch: the same epoch again, from that batch on
        return epoch, step, int(state["batch"])
    return epoch + 1, step, 0


@dataclass
class Start:
    """Where a train loop starts: at the beginning, or where the run's latest checkpoint goes on from (`start_point`)."""
    epoch: int = 0
    step: int = 0  # micro-steps done
    batch: int = 0  # batches of `epoch` done
    sums: list[float] | None = None  # the epoch's running sums at that point, over every rank (`save`)
    unsent_metrics: list | None = None  # what MLflow had not confirmed when the checkpoint was written
    # the checkpoint's step where the run goes on from before it (an accumulation window's start): the
    # metrics of the steps it runs again are in MLflow already, or among the unsent ones (MetricBuffer.restore)
    logged_through: int | None = None

    def skip(self, epoch: int) -> int:
        """Batches of epoch `epoch` done before the start."""
        return self.batch if epoch == self.epoch else 0

    def open_epoch(self, epoch: int, sums: torch.Tensor, rank: int) -> int:
        """Start epoch `epoch`'s running sums (`sums`: zeros, this rank's, on the device) and return
        the batch from which they count: 0, the whole epoch, unless the run resumes inside it from a
        checkpoint that did not record them (written before they were), which counts from there."""
        skip = self.skip(epoch)
        if not skip:
            return 0
        if self.sums is None:
            return skip
        if rank == 0:  # every rank's sums before the start, held once
            sums += torch.tensor(self.sums, dtype=sums.dtype, device=sums.device).reshape(sums.shape)
        return 0


def start_point(engine, store: ObjectStore, cfg, world: int, rank: int) -> Start:
    """The run's latest checkpoint loaded into `engine` where `run.resume` is on and it has one
    (refused where this job's workers or batch size cannot go on from it), and where to go on."""
    found = latest(store, cfg.run.name) if cfg.run.resume else None
    if not found:
        return Start()
    tag, meta = found
    check_resumable(cfg.run.name, tag, meta, world, cfg.optim.batch_size)
    state = load(engine, store, cfg.run.name, tag)
    epoch, step, batch = resume_position(state)  # after an epoch, mid-epoch, or an accumulation window's start
    sums = state.get("epoch_sums")
    if rank == 0:
        relay.say(f"resumed run {cfg.run.name} from {tag} (epoch {epoch}, step {step}"
                  + (f", batch {batch} of the epoch" if batch else "") + ")")
    return Start(epoch, step, batch, [float(v) for v in sums] if sums else None, state.get("unsent_metrics"),
                 int(state["step"]) if state.get("resume_at") else None)


def _rng_tensors() -> dict[str, torch.Tensor]:
    """The generators' state as tensors (copies, on the host; reading the CUDA generator's waits for nothing)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def rng_state(tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """The torch random generators' state (dropout masks, the anomaly task's pretext draws), now or
    as `_rng_tensors` took it: saved with a checkpoint and put back by `load`, so a resumed run
    draws what the uninterrupted run would have drawn. Every rank seeds and draws alike, so rank
    0's state is every rank's."""
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in (tensors or _rng_tensors()).items()}


def rewinds(step: int, grad_accum: int, total_steps: int) -> bool:
    """Whether a checkpoint after micro-step `step` of a run of `total_steps` goes on from the start of
    its accumulation window (WindowStart): it lies inside one, and the run closes that window."""
    return step % grad_accum != 0 and step - step % grad_accum + grad_accum <= total_steps


class WindowStart:
    """Where the engine's current accumulation window began: what a checkpoint written inside the
    window goes on from.

    The engines count micro-batches across epoch ends and step the optimizer at every
    `grad_accum`-th (trainers.engine.optimizer_steps), so an epoch can end inside a window. A
    checkpoint written there holds the weights, optimizer state and schedule of the window's start
    (nothing steps inside a window), but not the gradients its micro-batches have summed so far,
    which neither engine saves: going on after the checkpoint would drop them, and the window's
    step would see only the micro-batches after the restart. So such a checkpoint is written as of
    the window's start: it records that position (`resume_at`: epoch, batches of that epoch done,
    micro-step), the random generators' state there, and the module's buffers there (BatchNorm's
    running statistics move with every forward); a resumed run goes on from the start and runs the
    window's micro-batches again, so it steps where and as the uninterrupted run does. A window the
    run never closes (the micro-batches after its last step, which add no update) needs no rewind.

    The loop calls `after` after every micro-step. At the start of a window in which an epoch ends
    (the only place a checkpoint can fall inside one: run.checkpoint_every_steps is a multiple of
    optim.grad_accum) it copies the generators' state (host tensors) and the buffers (one fused
    copy on the device): once an epoch, nothing waits."""

    def __init__(self, grad_accum: int, batches_per_epoch: int, total_steps: int, module: torch.nn.Module,
                 epoch: int, batch: int, step: int):
        self.grad_accum, self.batches, self.total, self.module = grad_accum, batches_per_epoch, total_steps, module
        self.point: dict | None = None  # the current window's start, when an epoch ends inside the window
        self.rng: dict[str, torch.Tensor] | None = None
        self.sums: torch.Tensor | None = None
        self._saved: list[torch.Tensor] | None = None
        self.after(epoch, batch, step)  # a run starts on a boundary, a resumed one too (a checkpoint written before
        # resume_at existed may not: then nothing is known until the next boundary, and such a checkpoint goes on as before)

    def _buffers(self) -> list[torch.Tensor]:
        ids = {id(b) for b in self.module.buffers()}
        return [v for v in self.module.state_dict(keep_vars=True).values() if id(v) in ids]  # persistent ones

    def after(self, epoch: int, batch: int, step: int, sums: torch.Tensor | None = None) -> None:
        """After micro-step `step`, the `batch`-th batch of epoch `epoch` (0 before the first);
        `sums`: the loop's running sums of the epoch so far (this rank's, on the device), which a
        run going on from here starts the epoch's tally with (`save` records them)."""
        if self.grad_accum == 1 or step % self.grad_accum:
            return
        if batch >= self.batches:  # the window begins with the next epoch
            epoch, batch, sums = epoch + 1, 0, None
        self.point = None
        if batch + self.grad_accum <= self.batches:  # the window closes inside this epoch
            return
        self.point, self.rng = {"epoch": epoch, "batch": batch, "step": step}, _rng_tensors()
        self.sums = None if sums is None or not batch else sums.detach().clone()  # a copy on the device: nothing waits
        buffers = self._buffers()
        with torch.no_grad():
            if self._saved is None or len(self._saved) != len(buffers):
                self._saved = [b.detach().clone() for b in buffers]
            elif buffers:
                torch._foreach_copy_(self._saved, [b.detach() for b in buffers])

    def open_at(self, step: int) -> bool:
        """Whether a checkpoint after micro-step `step` lies inside a window the run will close."""
        return self.point is not None and rewinds(step, self.grad_accum, self.total)

    @contextmanager
    def buffers_at_start(self):
        """The module's buffers as they were at the window's start, for the time of a save."""
        buffers = [b.detach() for b in self._buffers()]
        now = [b.clone() for b in buffers]
        with torch.no_grad():
            if buffers:
                torch._foreach_copy_(buffers, self._saved)
            try:
                yield
            finally:
                if buffers:
                    torch._foreach_copy_(buffers, now)


def streamed_window_starts(batches_per_epoch: int, grad_accum: int, epochs: int, checkpoint_every: int) -> list[int]:
    """The epochs (0-based) whose end checkpoint would go on from the middle of an epoch
    (WindowStart): a streamed split has no position there to go on from."""
    out, total = [], epochs * batches_per_epoch
    for epoch in range(epochs):
        end = (epoch + 1) * batches_per_epoch
        start = end - end % grad_accum  # the window the epoch ends in began there
        if ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs) and rewinds(end, grad_accum, total) \
                and start % batches_per_epoch:
            out.append(epoch)
    return out


def set_rng_state(state: dict) -> None:
    """Put back a `rng_state()`; the CUDA generator only where CUDA runs (a run saved on a GPU and
    resumed on CPUs draws anew there)."""
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

    torch.set_rng_state(tensor(state["cpu"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _world() -> int:
    """The workers (data-parallel ranks) of this job: what check_resumable compares."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- frozen parameters: left out, fingerprinted --------------------------------------------------

_CHUNK = 1 << 20  # elements per chunk of the checksum
_P = 2**31 - 1  # a prime: chunk sums are taken modulo it
_weights: dict[torch.device, torch.Tensor] = {}


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _position_weights(device: torch.device) -> torch.Tensor:
    """A weight in 1..65521 for each position of a chunk (int32: a bf16 bit pattern times one fits)."""
    if device not in _weights:
        _weights[device] = (torch.arange(_CHUNK, dtype=torch.int64, device=device) * 40503 % 65521 + 1).to(torch.int32)
    return _weights[device]


def _checksum(flat: torch.Tensor, start: int) -> torch.Tensor:
    """[sum of v, sum over chunks c of (1 + 48271 c) * (sum of v * w) mod P] over the bf16 bit
    patterns v of `flat`, whose first element is element `start` of its tensor. Integers, so the
    result is exact: the same on any device, in any order, however ZeRO-3 partitioned the tensor;
    and any changed weight changes it (each position has its own nonzero weight w)."""
    out = torch.zeros(2, dtype=torch.int64, device=flat.device)
    w = _position_weights(flat.device)
    pos = 0
    while pos < flat.numel():
        chunk, at = divmod(start + pos, _CHUNK)
        n = min(_CHUNK - at, flat.numel() - pos)
        v = flat[pos:pos + n].to(torch.bfloat16).view(torch.int16).to(torch.int32)
        out[0] += v.sum()
        out[1] += torch.remainder((v * w[at:at + n]).sum(), _P) * ((1 + 48271 * chunk) % _P) % _P
        pos += n
    return out


def frozen_fingerprint(module: torch.nn.Module) -> dict[str, list[int]]:
    """{name: [elements, checksum, checksum]} of each parameter that needs no gradient, over its
    values rounded to bf16 (so a model that holds its frozen weights in bf16, the report writer on a
    GPU, and one that holds them in fp32 agree). Computed where the weights are, one read back at
    the end. Under ZeRO-3 each rank sums its own partition and the sums are all-reduced: every
    rank must call it then."""
    names, numels, sums, sharded = [], [], [], False
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition, its padding left out
            sharded = True
            part = p.ds_tensor.reshape(-1)
            start = dist.get_rank(group=p.ds_process_group) * part.numel()
            flat, numel = part.narrow(0, 0, max(0, min(part.numel(), p.ds_numel - start))), p.ds_numel
        else:
            flat, numel, start = p.detach().reshape(-1), p.numel(), 0
        names.append(name)
        numels.append(numel)
        sums.append(_checksum(flat, start))
    if not names:
        return {}
    totals = torch.stack([s.to(_comm_device() if sharded else sums[0].device) for s in sums])
    if sharded and dist.is_available() and dist.is_initialized():
        # every rank reaches this with the same parameters, in the model's order
        dist.all_reduce(totals)
    totals[:, 1] %= _P
    values = totals.tolist()  # one wait for the device, not one per tensor
    return {n: [k, a, b] for n, k, (a, b) in zip(names, numels, values)}


def check_frozen(saved: dict[str, list[int]], now: dict[str, list[int]], run_name: str, tag: str) -> None:
    """Refuse to resume when the rebuilt model's frozen parameters are not the ones checkpoint
    `tag` left out (it does not hold them, so training would go on from other weights)."""
    if saved.keys() != now.keys():
        gone, new = sorted(saved.keys() - now.keys()), sorted(now.keys() - saved.keys())
        raise UserError(
            f"checkpoint {tag} of run {run_name} left out {len(saved)} frozen parameters, but this model freezes "
            f"{len(now)}" + (f"; no longer frozen: {', '.join(gone[:3])}" if gone else "")
            + (f"; newly frozen: {', '.join(new[:3])}" if new else "")
            + ". The model or its tune policy changed since: resume with the run's own config (`indai train resume`) "
            "or train under a new run.name")
    differ = [n for n in saved if list(saved[n]) != list(now[n])]
    if differ:
        raise UserError(
            f"checkpoint {tag} of run {run_name} does not hold its frozen parameters, and this model's differ from the "
            f"ones it trained with ({len(differ)} of {len(saved)}, e.g. {', '.join(differ[:3])}): the pretrained weights "
            "they come from changed (a mirror entry replaced or a different model id). Resume with the weights the run "
            "started from, or train under a new run.name")


def module_loader(frozen_left_out: bool, tag: str):
    """How a checkpoint's module weights go into the model, for both engines (DeepSpeed's
    `custom_load_fn`): every tensor the model has must be there, except the frozen parameters
    when the checkpoint left them out and the other names of a tied weight; nothing else may be."""
    def load_into(src: dict, dst: torch.nn.Module) -> None:
        missing, unexpected = dst.load_state_dict(src, strict=False)
        names: dict[int, list[str]] = {}
        for n, p in dst.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        tied = {n for group in names.values() if len(group) > 1 and any(m in src for m in group) for n in group}
        frozen = ({n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
                  if frozen_left_out else set())
        wrong = sorted(set(missing) - tied - frozen) + sorted(unexpected)
        if wrong:
            raise UserError(f"checkpoint {tag} does not fit this model ({len(wrong)} tensor(s) missing or unexpected, "
                            f"e.g. {', '.join(wrong[:3])}): resume with the run's own config or train under a new run.name")
    return load_into


def save(engine, store: ObjectStore, run_name: str, tag: str, meta: dict, rank: int,
         window: WindowStart | None = None, sums: torch.Tensor | None = None) -> None:
    """Every rank's shard of the checkpoint after micro-step `meta["step"]`, uploaded, then committed
    by rank 0; inside an accumulation window (`window`), with the window's start to go on from.
    Where the run goes on inside an epoch (a mid-epoch checkpoint: `meta["batch"]`, or a window's
    start), the epoch's running sums there (`sums`, this rank's; the window's own copy for a
    window) are recorded summed over the ranks (`epoch_sums`): the resumed epoch's loss is then
    the whole epoch's, not that of the batches after the restart."""
    # the strategy (trainers.engine) decides the checkpoint's layout; a resumed run keeps it
    t0 = time.perf_counter()
    rng, as_of = rng_state(), nullcontext()
    if window is not None and window.open_at(int(meta["step"])):  # written as of the window's start
        meta, rng, as_of = {**meta, "resume_at": window.point}, rng_state(window.rng), window.buffers_at_start()
        sums = window.sums
    elif meta.get("batch") is None:
        sums = None  # the run goes on with the next epoch: nothing of this one to carry
    if sums is not None:  # every rank takes part: the condition above is the same on each
        total = sums.detach().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        meta = {**meta, "epoch_sums": [float(v) for v in total.reshape(-1).tolist()]}
    frozen = frozen_fingerprint(engine.module)  # every rank: a collective under ZeRO-3
    meta = {**meta, "strategy": getattr(engine, "indai_strategy", None), "frozen": frozen, "world": _world()}
    written = 0
    if rank == 0:
        # the tag may exist already (a restarted run saving the same epoch again): uncommitted
        # first (the marker goes first), so no reader takes a mix of old and new files for whole,
        # and emptied, so no file of the older checkpoint (another world size's shards) stays in it
        store.delete_prefix(f"{prefix(run_name)}/{tag}")
    _barrier()  # no rank uploads before the tag is empty
    with tempfile.TemporaryDirectory(prefix="indai-ckpt-") as local:
        with as_of:
            engine.save_checkpoint(local, tag=tag, client_state={**meta, "rng": rng}, exclude_frozen_parameters=bool(frozen))
        shard = Path(local) / tag
        if shard.is_dir():
            written = sum(f.stat().st_size for f in shard.rglob("*") if f.is_file())
            store.upload_dir(f"{prefix(run_name)}/{tag}", shard)
    _barrier()
    if rank == 0:
        store.commit(f"{prefix(run_name)}/{tag}", meta)
        left = sum(v[0] for v in frozen.values())
        relay.say(f"[indai] checkpoint {tag}: {written / 2**20:,.1f} MiB from rank 0 in {time.perf_counter() - t0:.1f} s"
                  + (f"; {len(frozen)} frozen tensors ({left:,} parameters) left out" if frozen else ""))
    _barrier()


def load(engine, store: ObjectStore, run_name: str, tag: str) -> dict:
    # checkpoints written before frozen parameters were left out hold every weight: loaded strictly
    frozen = store.read_commit(f"{prefix(run_name)}/{tag}").get("frozen")
    if frozen is not None:
        check_frozen(frozen, frozen_fingerprint(engine.module), run_name, tag)
    with tempfile.TemporaryDirectory(prefix="indai-ckpt-") as local:
        store.download_dir(f"{prefix(run_name)}/{tag}", Path(local) / tag)
        _, client_state = engine.load_checkpoint(local, tag=tag, custom_load_fn=module_loader(bool(frozen), tag))
    client_state = client_state or {}
    if client_state.get("step") is not None:
        # the engine counts micro-batches to place its accumulation boundaries. DeepSpeed does not
        # save that counter and would start again at 0, TorchEngine saves it: set from the loop's
        # step where the run goes on (the same count; a window's start for a checkpoint inside one),
        # both engines step the optimizer where an uninterrupted run does, and the LR schedule ends
        # with the run (trainers.engine.optimizer_steps)
        engine.micro_steps = resume_position(client_state)[1]
    if client_state.get("rng"):  # checkpoints written before it was saved go on with the run's seed
        set_rng_state(client_state["rng"])
    return client_state


def prune(store: ObjectStore, run_name: str, keep: int) -> None:
    for tag in _checkpoint_tags(store, run_name)[:-keep]:
        store.delete_prefix(f"{prefix(run_name)}/{tag}")


def save_run_config(store: ObjectStore, run_name: str, config: dict) -> None:
    """The run's resolved config, as `indai train resume` needs it. One object written whole
    (a local rename, an S3 put), so a reader sees the old one or the new one, never a part."""
    store.put_bytes(f"{prefix(run_name)}/{RUN_CONFIG}", json.dumps(config, indent=2, sort_keys=True).encode())


def read_run_config(store: ObjectStore, run_name: str) -> dict | None:
    """The saved config of run `run_name`, or None when it has none."""
    key = f"{prefix(run_name)}/{RUN_CONFIG}"
    return json.loads(store.get_bytes(key)) if store.exists(key) else None
