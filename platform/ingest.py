"""Ingest a member's raw sensor recordings into a dataset version.

The dataset spec (YAML) says which files hold which class, at which sampling rate, which
channels to keep, how to window and how to split. Everything is read and checked before a
single byte is written, then the version is written with its commit marker last.

Two traps of real vibration data are handled here rather than left to the model:
- recordings of one dataset can have different sampling rates (CWRU's normal baseline is at
  48 kHz, its fault files at 12 kHz); every source is resampled to the spec's rate, or a model
  learns the rate instead of the fault;
- overlapping windows leak across a shuffled split; the split is by time (first part of each
  recording train, then validation, last part test) and windows are cut inside each part, so
  no window crosses a split boundary.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from indai.platform import datasets
from indai.platform.config import Strict, load_config
from indai.platform.errors import UserError
from indai.platform.progress import bar
from indai.platform.storage import ObjectStore

SPLITS = ("train", "val", "test")


class SensorSource(Strict):
    path: str = Field(description="file relative to the spec's folder (.npz with one array per channel, or .npy [samples, channels])")
    label: str = Field(min_length=1, max_length=64, description="class of every window of this recording")
    sampling_rate_hz: float = Field(gt=0, description="rate the file was recorded at")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or "\\" in v or v.startswith("~"):
            raise ValueError(f"source path {v!r} must be relative to the spec's folder and may not contain '..'")
        return v


class SensorSpec(Strict):
    channels: list[str] = Field(min_length=1, description="channel names to keep, in model order")
    sampling_rate_hz: float = Field(gt=0, description="every source is resampled to this rate")
    window: int = Field(ge=16, le=1_000_000, description="samples per window")
    hop: int = Field(ge=1, description="step between training windows (overlap allowed inside train)")
    eval_hop: int | None = Field(default=None, ge=1, description="step between val/test windows (default: window, no overlap)")


class SplitSpec(Strict):
    by: Literal["time"] = Field(default="time", description="split each recording by time: train, then val, then test")
    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.1, ge=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self):
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions train + val + test must add up to 1")
        return self


class DatasetSpec(Strict):
    name: str = Field(description="dataset name; versions live under datasets/<name>/")
    member: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="member that owns the data")
    description: str = ""
    attribution: str = Field(default="", description="licence and credit that travel with every version")
    modality: Literal["sensor"] = "sensor"
    sensor: SensorSpec
    sources: list[SensorSource] = Field(min_length=1)
    split: SplitSpec = SplitSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        datasets.check_name(v)
        return v


def _resolve_source(base: Path, rel: str) -> Path:
    path = (base / rel).resolve()
    if not path.is_relative_to(base.resolve()):
        raise UserError(f"source {rel!r} points outside the spec's folder {base} (symlink?): copy the file into it")
    if not path.is_file():
        raise UserError(f"source file {rel!r} does not exist in {base}")
    return path


def read_recording(path: Path, channels: list[str]) -> np.ndarray:
    """float64 [channels, samples] from .npz (one array per channel) or .npy [samples, channels]."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [c for c in channels if c not in z.files]
                if missing:
                    raise UserError(f"{path.name} lacks channel(s) {missing}; it has {sorted(z.files)}")
                cols = [np.asarray(z[c], dtype=np.float64).reshape(-1) for c in channels]
                if len({c.size for c in cols}) != 1:
                    raise UserError(f"{path.name}: channels {channels} have different lengths")
                return np.stack(cols)
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim != 2 or arr.shape[1] != len(channels):
                raise UserError(f"{path.name} has shape {list(arr.shape)}; a .npy source must be [samples, {len(channels)}] for channels {channels}")
            return np.asarray(arr, dtype=np.float64).T.copy()
    except (ValueError, OSError) as e:
        raise UserError(f"{path.name} could not be read as a numeric array file ({e}); pickled arrays are never loaded") from None
    raise UserError(f"{path.name}: unsupported sensor file type {path.suffix!r}; use .npz or .npy")


def resample(x: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    if from_hz == to_hz:
        return x
    from scipy.signal import resample_poly

    ratio = Fraction(to_hz / from_hz).limit_denominator(1000)
    return resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


def split_bounds(n: int, split: SplitSpec) -> dict[str, tuple[int, int]]:
    a = int(n * split.train)
    b = int(n * (split.train + split.val))
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


def window_starts(begin: int, end: int, window: int, hop: int) -> np.ndarray:
    return np.arange(begin, end - window + 1, hop, dtype=np.int64)


def build_splits(spec: DatasetSpec, recordings: list[np.ndarray]) -> tuple[dict, dict]:
    """Cut each recording by time, window each part; return (arrays per split, stats)."""
    s = spec.sensor
    classes = sorted({src.label for src in spec.sources}, key=[src.label for src in spec.sources].index)
    eval_hop = s.eval_hop or s.window
    parts: dict[str, list] = {k: [] for k in SPLITS}
    for src, rec in zip(spec.sources, recordings):
        for split, (lo, hi) in split_bounds(rec.shape[1], spec.split).items():
            seg = rec[:, lo:hi]
            hop = s.hop if split == "train" else eval_hop
            starts = window_starts(0, seg.shape[1], s.window, hop)
            if split != "val" and starts.size == 0:
                raise UserError(f"{src.path}: its {split} part has {seg.shape[1]} samples, fewer than one window of {s.window}: shorten the window or change the split")
            parts[split].append((seg, starts, classes.index(src.label)))
    out = {}
    for split, items in parts.items():
        offset, signals, starts_all, labels = 0, [], [], []
        for seg, starts, label in items:
            signals.append(seg.astype(np.float32))
            starts_all.append(starts + offset)
            labels.append(np.full(starts.size, label, dtype=np.int64))
            offset += seg.shape[1]
        if sum(a.size for a in labels) == 0:
            continue
        out[split] = {"sensor_signal": np.concatenate(signals, axis=1), "sensor_starts": np.concatenate(starts_all),
                      "label": np.concatenate(labels)}
    train_signal = out["train"]["sensor_signal"].astype(np.float64)
    stats = {"mean": train_signal.mean(axis=1).tolist(), "std": (train_signal.std(axis=1) + 1e-8).tolist()}
    return out, {"classes": classes, "norm": stats}


def ingest(spec_path: str | Path, store: ObjectStore, progress: bool = True) -> tuple[str, str, dict]:
    """Read, check, resample, split and window the spec's sources; write a dataset version."""
    import hashlib

    spec = load_config(DatasetSpec, spec_path)
    base = Path(spec_path).resolve().parent
    paths = [_resolve_source(base, src.path) for src in spec.sources]  # all checked before any work
    recordings, sources = [], []
    for src, path in bar(list(zip(spec.sources, paths)), desc="read + resample", enabled=progress):
        raw = read_recording(path, spec.sensor.channels)
        rec = resample(raw, src.sampling_rate_hz, spec.sensor.sampling_rate_hz)
        recordings.append(rec)
        sources.append({"path": src.path, "label": src.label, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "sampling_rate_hz": src.sampling_rate_hz, "samples": int(raw.shape[1]),
                        "samples_resampled": int(rec.shape[1]), "seconds": raw.shape[1] / src.sampling_rate_hz})
    splits, info = build_splits(spec, recordings)
    s = spec.sensor
    manifest = {
        "member": spec.member,
        "description": spec.description,
        "attribution": spec.attribution,
        "spec": spec.model_dump(mode="json"),
        "classes": info["classes"],
        "modalities": {"sensor": {"channels": s.channels, "sampling_rate_hz": s.sampling_rate_hz, "window": s.window,
                                  "hop": s.hop, "eval_hop": s.eval_hop or s.window, "norm": info["norm"]}},
        "split": {"by": spec.split.by, "fractions": {k: getattr(spec.split, k) for k in SPLITS},
                  "windows": {k: int(v["label"].size) for k, v in splits.items()},
                  "per_class": {k: np.bincount(v["label"], minlength=len(info["classes"])).tolist() for k, v in splits.items()}},
        "sources": sources,
        "deidentification": {"applied": False, "reason": "numeric sensor recordings carry no names or text"},
    }
    version, manifest = datasets.write_version(store, spec.name, manifest, splits)
    return spec.name, version, manifest
