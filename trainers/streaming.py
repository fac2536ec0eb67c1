"""Dataset versions as Ray Data streams, so a training split larger than memory trains.

A stream is the list of the split's shards; Ray Data reads each shard from the object store
(the same verified reader as everywhere: local folder or S3/MinIO), turns it into samples
(`data.to_samples`) and streams blocks to the Ray Train workers, which iterate with a local
shuffle buffer. Memory holds a few shards per worker, whatever the dataset's size.
"""
from __future__ import annotations

import json

import numpy as np

from indai.platform import datasets
from indai.platform.storage import open_store
from indai.trainers.data import to_samples


def split_stream(store_uri: str, name: str, manifest: dict, split: str, window: int | None, text_len: int,
                 modalities: list[str] | None, tokenizer=None):
    import ray.data

    shards = [{"shard": json.dumps(sh, sort_keys=True)} for sh in datasets.shards(manifest, split)]
    if not shards:
        raise ValueError(f"dataset {name} has no split {split}")

    def expand(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        store = open_store(store_uri)
        parts = [to_samples(datasets.load_shard(store, name, json.loads(str(s))), window, text_len, modalities, tokenizer)
                 for s in batch["shard"]]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(expand, batch_size=1)


def split_size(manifest: dict, split: str) -> int:
    counts = manifest["split"].get("windows") or manifest["split"].get("records") or {}
    return int(counts.get(split, 0))


def train_bytes(manifest: dict) -> int:
    """A cheap upper bound of the train split's size in memory (from the .npy files' count is
    not enough; use the record count and the shapes the manifest declares)."""
    n = split_size(manifest, "train")
    mods = manifest.get("modalities", {})
    per = 16
    if "sensor" in mods:
        per += 4 * len(mods["sensor"]["channels"]) * (mods["sensor"].get("hop") or mods["sensor"]["window"])
    if "image" in mods:
        per += 3 * mods["image"]["size"] ** 2
    if "text" in mods:
        per += 4 * mods["text"].get("max_chars", 1000)
    return n * per
