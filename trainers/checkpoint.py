"""Checkpoints in the object store, committed last, so a restarted run finds the latest whole one.

Every rank saves its DeepSpeed shard into a private local folder and uploads it under
`checkpoints/<run>/<tag>/`; after a barrier rank 0 writes the commit marker. A reader (the
same run restarted by Ray Train, `indai train` run again, or a new process) takes the newest
committed tag and ignores anything half-written. DeepSpeed's own files are loaded only from
checkpoints this platform wrote for this run; user-supplied files never reach torch.load.

Tags say how far the run had got: `epoch-00002` after the third epoch ended (validated), and,
with run.checkpoint_every_steps, `epoch-00002-batch-000025` after 25 batches of it, so a restart
loses at most that interval of steps and resumes at that position of the epoch's sample order. Tags
are ordered by that progress, not by name. Next to the checkpoints the driver keeps the run's
resolved config (`config.json`, one object, written whole), which `indai train resume` reloads.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch.distributed as dist

from indai.platform.storage import ObjectStore

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


def resume_position(state: dict) -> tuple[int, int, int]:
    """(epoch to run, global step, batches of that epoch already done) after a checkpoint's state."""
    epoch, step = int(state["epoch"]), int(state["step"])
    if state.get("batch") is not None:  # mid-epoch: the same epoch again, from that batch on
        return epoch, step, int(state["batch"])
    return epoch + 1, step, 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, store: ObjectStore, run_name: str, tag: str, meta: dict, rank: int) -> None:
    # the strategy (trainers.engine) decides the checkpoint's layout; a resumed run keeps it
    meta = {**meta, "strategy": getattr(engine, "indai_strategy", None)}
    with tempfile.TemporaryDirectory(prefix="indai-ckpt-") as local:
        engine.save_checkpoint(local, tag=tag, client_state=meta)
        shard = Path(local) / tag
        if shard.is_dir():
            store.upload_dir(f"{prefix(run_name)}/{tag}", shard)
    _barrier()
    if rank == 0:
        store.commit(f"{prefix(run_name)}/{tag}", meta)
    _barrier()


def load(engine, store: ObjectStore, run_name: str, tag: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="indai-ckpt-") as local:
        store.download_dir(f"{prefix(run_name)}/{tag}", Path(local) / tag)
        _, client_state = engine.load_checkpoint(local, tag=tag)
    return client_state or {}


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
