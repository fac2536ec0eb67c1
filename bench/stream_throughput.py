"""Samples/s from the object store to the train loop: Ray Data streaming against a plain
in-process loader, for sensor windows (CWRU), images (ELPV) and text records (NIST work orders).

Both read the same dataset version from the same store, in the same process: the baseline
loads the split whole (`datasets.load_split`) and iterates a torch DataLoader; the stream is
`trainers.streaming.split_stream` iterated with `iter_torch_batches`, as the Ray Train workers
do. Timings include reading from the store. Ratios are stream / baseline.

    .venv/bin/python bench/stream_throughput.py [--epochs 2] [--batch 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write  # noqa: E402

SPECS = {"windows": REPO / "examples/cwru-0hp/dataset.yaml", "images": REPO / "examples/elpv/dataset.yaml",
         "text records": REPO / "examples/nestor-excavators/dataset.yaml"}
MODALITIES = {"windows": ["sensor"], "images": ["image"], "text records": ["text"]}


def baseline(store, ref, manifest, mods, batch: int, epochs: int) -> tuple[int, float]:
    from torch.utils.data import DataLoader

    from indai.platform import datasets
    from indai.trainers.data import SplitDataset

    t0 = time.perf_counter()
    window = manifest.get("modalities", {}).get("sensor", {}).get("window")
    ds = SplitDataset(datasets.load_split(store, ref, "train", manifest), window, 128, mods)
    n = 0
    for _ in range(epochs):
        for b in DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True):
            n += b["label"].shape[0]
    return n, time.perf_counter() - t0


def streamed(store_uri, ref, manifest, mods, batch: int, epochs: int) -> tuple[int, float]:
    from indai.trainers.streaming import split_stream

    t0 = time.perf_counter()
    window = manifest.get("modalities", {}).get("sensor", {}).get("window")
    stream = split_stream(store_uri, ref.name, manifest, "train", window, 128, mods)
    n = 0
    for _ in range(epochs):
        for b in stream.iter_torch_batches(batch_size=batch, drop_last=True, local_shuffle_buffer_size=2048):
            n += b["label"].shape[0]
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", choices=sorted(SPECS), nargs="*")
    a = ap.parse_args()
    import ray

    from indai.platform import datasets
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory(prefix="indai-stream-") as tmp:
        store = open_store(Path(tmp) / "store")
        for kind, spec in SPECS.items():
            if a.only and kind not in a.only:
                continue
            name, version, manifest = ingest(spec, store, progress=False)
            ref = datasets.DatasetRef(name, version)
            mods = MODALITIES[kind]
            streamed(store.uri, ref, manifest, mods, a.batch, 1)  # warm-up: Ray Data's first plan and workers
            nb, tb = baseline(store, ref, manifest, mods, a.batch, a.epochs)
            ns, ts = streamed(store.uri, ref, manifest, mods, a.batch, a.epochs)
            row = {"kind": kind, "dataset": f"{name}@{version}", "shards": len(datasets.shards(manifest, "train")),
                   "samples": nb, "baseline_per_s": round(nb / tb, 1), "stream_per_s": round(ns / ts, 1),
                   "ratio": round((ns / ts) / (nb / tb), 3), "epochs": a.epochs, "batch": a.batch}
            rows.append(row)
            write("stream_throughput", row)
    ray.shutdown()
    print(f"{'kind':<14}{'samples':>9}{'in-process/s':>15}{'Ray Data/s':>13}{'ratio':>8}")
    for r in rows:
        print(f"{r['kind']:<14}{r['samples']:>9}{r['baseline_per_s']:>15.0f}{r['stream_per_s']:>13.0f}{r['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
