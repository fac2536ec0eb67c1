"""Synthetic multimodal datasets of any shape, written as real dataset versions.

Benchmarks need the reference shapes of ../shared/GPU.md (16 x 1024 sensor windows, 224-pixel
images, 128-token texts) at whatever sample count a run needs, and tests need a set a small
model learns in a few epochs. Both go through the platform's own dataset writer
(`datasets.VersionWriter`) into an object store, so the train loop reads them exactly as it reads
ingested data. The label shows in every modality present: a sensor tone whose frequency depends
on the class, a bright square whose position does, and the class's word in the text; everything
else is noise. Constructed data: never report accuracy on it as a model's quality.
"""
from __future__ import annotations

import numpy as np

from indai.platform import datasets

WORDS = ["bearing", "valve", "pump", "belt", "motor", "gear", "seal", "fan"]


def samples(n: int, classes: int, rng: np.random.Generator, sensor: tuple[int, int] | None = None,
            image: int | None = None, text_len: int | None = None) -> dict[str, np.ndarray]:
    """`n` samples: label, and `sensor` [n, C, L] float32, `image` [n, H, H, 3] uint8, `text` str."""
    label = rng.integers(0, classes, n)
    out: dict[str, np.ndarray] = {"label": label.astype(np.int64)}
    if sensor:
        channels, length = sensor
        t = np.arange(length, dtype=np.float32) / length
        tone = np.sin(2 * np.pi * (4 + 4 * label)[:, None] * t[None, :] + rng.uniform(0, 6.28, (n, 1)))
        noise = rng.standard_normal((n, channels, length), dtype=np.float32)
        out["sensor"] = (noise * 0.5 + tone[:, None, :].astype(np.float32)).astype(np.float32)
    if image:
        img = rng.integers(0, 60, (n, image, image, 3), dtype=np.uint8)
        side = max(2, image // 4)
        for i, y in enumerate(label):  # a bright square in one of four places per class (mod 4)
            r, c = divmod(int(y) % 4, 2)
            img[i, r * image // 2: r * image // 2 + side, c * image // 2: c * image // 2 + side] = 230
        out["image"] = img
    if text_len:
        filler = "check unit and report "
        texts = [(f"{WORDS[int(y) % len(WORDS)]} {y} " + filler * (text_len // len(filler) + 1))[:text_len] for y in label]
        out["text"] = np.array(texts)
    return out


def write_dataset(store, name: str, splits: dict[str, int], classes: int = 4, sensor: tuple[int, int] | None = None,
                  image: int | None = None, text_len: int | None = None, seed: int = 0) -> tuple[str, dict]:
    """Write a version with `splits` ({"train": 512, "test": 128}); return ("name@version", manifest)."""
    rng = np.random.default_rng(seed)
    writer = datasets.VersionWriter(store, name)
    counts = {}
    for split, n in splits.items():
        writer.put_shard(split, 0, samples(n, classes, rng, sensor, image, text_len))
        counts[split] = n
    modalities: dict = {}
    if sensor:
        modalities["sensor"] = {"channels": [f"ch{i}" for i in range(sensor[0])], "window": sensor[1],
                                "norm": {"mean": [0.0] * sensor[0], "std": [1.0] * sensor[0]}}
    if image:
        modalities["image"] = {"size": image}
    if text_len:
        modalities["text"] = {"max_chars": text_len}
    manifest = {"member": "synthetic", "constructed": True, "classes": [f"class{i}" for i in range(classes)],
                "modalities": modalities, "split": {"records": counts}}
    version, body = writer.commit(manifest)
    return f"{name}@{version}", body


def windowed_split(n: int = 20, text_len: int = 16):
    """A small SplitDataset whose sensor windows are cut from one long signal (trainers.data):
    the layout the fast gather handles with window starts, with images and text besides."""
    from indai.trainers.data import SplitDataset

    rng = np.random.default_rng(1)
    arrays = samples(n, 3, rng, image=8, text_len=text_len)
    arrays["sensor_signal"] = rng.standard_normal((2, 400)).astype(np.float16)
    arrays["sensor_starts"] = rng.integers(0, 400 - 32, n)
    return SplitDataset(arrays, window=32, text_len=text_len, modalities=["sensor", "image", "text"])
