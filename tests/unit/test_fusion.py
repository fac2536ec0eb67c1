"""Fusion earns its place: on a constructed three-modality set whose label needs two
modalities, the fused model beats every single-modality model.

Constructed set (label it as such): bit a is the frequency of a sensor sine (4 or 12 cycles
per window), bit b is the side of a bright square in the image (left or right), the text is
a random maintenance phrase that carries nothing; label = a XOR b. Each modality alone is at
chance (50 %); sensor + image together decide the label.
"""
import numpy as np
import pytest

from indai.platform import datasets
from indai.platform.storage import open_store
from indai.trainers.loop import train_loop

PHRASES = ["replace hyd pump seal", "유압 펌프 씰 교체", "check belt tension", "bearing noise reported", "oil leak at valve"]


def constructed(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    a = rng.integers(0, 2, n)
    b = rng.integers(0, 2, n)
    t = np.arange(128) / 128
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    freq = np.where(a == 1, 12, 4)[:, None]
    sensor = np.sin(2 * np.pi * freq * t + phase) + 0.3 * rng.normal(size=(n, 128))
    image = (rng.random((n, 32, 32, 3)) * 60).astype(np.uint8)
    for i in range(n):
        x0 = 18 if b[i] else 2
        image[i, 10:22, x0: x0 + 12] = 230
    text = np.array([PHRASES[k] for k in rng.integers(0, len(PHRASES), n)])
    return {"sensor": sensor[:, None, :].astype(np.float32), "image": image, "text": text, "label": (a ^ b).astype(np.int64)}


@pytest.fixture(scope="module")
def store_and_ref(tmp_path_factory):
    rng = np.random.default_rng(0)
    store = open_store(tmp_path_factory.mktemp("fusion-store"))
    splits = {"train": constructed(1024, rng), "val": constructed(128, rng), "test": constructed(256, rng)}
    manifest = {"member": "constructed", "classes": ["even", "odd"], "constructed": True,
                "split": {"windows": {k: len(v["label"]) for k, v in splits.items()}}}
    version, _ = datasets.write_version(store, "fusion-xor", manifest, splits)
    return store, f"fusion-xor@{version}"


def run(store, ref: str, modalities: list[str], tmp_name: str) -> float:
    config = {
        "recipe": "test_fusion", "data": {"dataset": ref},
        "model": {"flavour": "debug", "modalities": modalities, "num_classes": 2, "dropout": 0.0,
                  "sensor": {"channels": 1, "length": 128}, "image": {"timm_name": "test_resnet", "size": 32}},
        "optim": {"epochs": 8, "batch_size": 64, "lr": 3e-3, "warmup_frac": 0.1},
        "run": {"name": tmp_name, "launcher": "local", "progress": False, "resume": False},
        "store_uri": store.uri,
    }
    return train_loop(config)["test"]["accuracy"]


def test_fusion_beats_every_single_modality(store_and_ref):
    store, ref = store_and_ref
    acc = {m: run(store, ref, [m], f"fusion-{m}") for m in ("sensor", "image", "text")}
    fused = run(store, ref, ["sensor", "image", "text"], "fusion-all")
    print(f"test accuracy: single {acc}, fused {fused:.3f}")
    assert fused >= 0.9, f"fused model reached only {fused:.3f}"
    for m, a in acc.items():
        assert a <= 0.65, f"{m} alone reached {a:.3f}: the constructed set leaks the label into one modality"
        assert fused - a >= 0.25
