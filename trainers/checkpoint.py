"""Checkpoints in the object store, committed last, so a restarted run finds the latest whole one.

Every rank saves its DeepSpeed shard into a private local folder and uploads it under
`checkpoints/<run>/<tag>/`; after a barrier rank 0 writes the commit marker. A reader (the
same run restarted by Ray Train, `indai train` run again, or a new process) takes the newest
committed tag and ignores anything half-written. DeepSpeed's own files are loaded only from
checkpoints this platform wrote for this run; user-supplied files never reach torch.load.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch.distributed as dist

from indai.platform.storage import ObjectStore

FINAL = "final"


def prefix(run_name: str) -> str:
    return f"checkpoints/{run_name}"


def epoch_tag(epoch: int) -> str:
    return f"epoch-{epoch:05d}"


def latest(store: ObjectStore, run_name: str) -> tuple[str, dict] | None:
    tags = [t for t in store.committed_children(prefix(run_name)) if t.startswith("epoch-")]
    if not tags:
        return None
    tag = max(tags)
    return tag, store.read_commit(f"{prefix(run_name)}/{tag}")


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
    tags = sorted(t for t in store.committed_children(prefix(run_name)) if t.startswith("epoch-"))
    for tag in tags[:-keep]:
        store.delete_prefix(f"{prefix(run_name)}/{tag}")
