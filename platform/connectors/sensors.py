"""Sensor recordings: NPZ, NPY, WAV and CSV (wide and long) into float64 [channels, samples].

A recording is held in memory one at a time (the ingest streams recordings, not samples).
The declared sampling rate is checked against what the file itself says (WAV header, a CSV
time column) because a wrong rate silently teaches a model the rate instead of the fault.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from indai.platform.errors import UserError

RATE_TOLERANCE = 0.01  # 1 %: timestamps of real loggers jitter


def check_rate(name: str, declared: float, measured: float, what: str) -> None:
    if abs(measured - declared) > RATE_TOLERANCE * declared:
        raise UserError(f"{name}: mismatched sampling rate: the spec declares {declared:g} Hz but the {what} says {measured:g} Hz; "
                        "fix sampling_rate_hz of this source (indai resamples every source to the dataset's rate)")


def _npz(path: Path, channels: list[str]) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        missing = [c for c in channels if c not in z.files]
        if missing:
            raise UserError(f"{path.name} lacks channel(s) {missing}; it has {sorted(z.files)}")
        cols = [np.asarray(z[c], dtype=np.float64).reshape(-1) for c in channels]
    if len({c.size for c in cols}) != 1:
        raise UserError(f"{path.name}: channels {channels} have different lengths")
    return np.stack(cols)


def _npy(path: Path, channels: list[str]) -> np.ndarray:
    arr = np.load(path, allow_pickle=False, mmap_mode="r")
    if arr.ndim != 2 or arr.shape[1] != len(channels):
        raise UserError(f"{path.name} has shape {list(arr.shape)}; a .npy source must be [samples, {len(channels)}] for channels {channels}")
    return np.asarray(arr, dtype=np.float64).T.copy()


def _wav(path: Path, channels: list[str], rate: float, columns: dict[str, int | str]) -> np.ndarray:
    from scipy.io import wavfile

    try:
        file_rate, data = wavfile.read(path, mmap=False)
    except (ValueError, EOFError) as e:
        raise UserError(f"{path.name} is not a readable WAV file ({e}): export it again as PCM or float WAV") from None
    check_rate(path.name, rate, float(file_rate), "WAV header")
    data = data.reshape(len(data), -1)
    if np.issubdtype(data.dtype, np.integer):  # PCM: scale to [-1, 1) by the type's range
        data = data.astype(np.float64) / float(np.iinfo(data.dtype).max + 1)
    out = []
    for c in channels:
        idx = columns.get(c, c)
        try:
            idx = int(idx)
        except ValueError:
            raise UserError(f"{path.name}: WAV channels have no names; map channel {c!r} to an index with columns: {{{c}: 0}}") from None
        if not 0 <= idx < data.shape[1]:
            raise UserError(f"{path.name}: channel {c!r} maps to index {idx}, but the file has {data.shape[1]} channel(s)")
        out.append(data[:, idx].astype(np.float64))
    return np.stack(out)


def _csv(path: Path, channels: list[str], rate: float, layout: str, columns: dict[str, int | str], time_column: str | None) -> np.ndarray:
    from indai.platform.connectors.tables import read_csv_frame

    if layout == "wide":
        names = [str(columns.get(c, c)) for c in channels]
        frame = read_csv_frame(path, names + ([time_column] if time_column else []), names + ([time_column] if time_column else []))
        data = frame[names].to_numpy(dtype=np.float64).T
        times = frame[time_column].to_numpy(dtype=np.float64) if time_column else None
    else:  # long: one row per (time, channel, value)
        t, ch, val = (time_column or "time"), str(columns.get("channel", "channel")), str(columns.get("value", "value"))
        frame = read_csv_frame(path, [t, ch, val], [t, val])
        frame[ch] = frame[ch].astype(str)
        missing = [c for c in channels if c not in set(frame[ch].unique())]
        if missing:
            raise UserError(f"{path.name} has no rows for channel(s) {missing} in column {ch!r}")
        wide = frame[frame[ch].isin(channels)].pivot_table(index=t, columns=ch, values=val, aggfunc="mean")
        if wide.isna().any().any():
            raise UserError(f"{path.name}: channels do not share timestamps (long CSV with gaps); resample the export or use one file per rate")
        data = wide[channels].to_numpy(dtype=np.float64).T
        times = wide.index.to_numpy(dtype=np.float64)
    if not np.isfinite(data).all():
        raise UserError(f"{path.name}: sensor values contain NaN or infinity (empty cells?); clean or interpolate the export")
    if times is not None and times.size > 2:
        dt = float(np.median(np.diff(times)))
        if dt <= 0:
            raise UserError(f"{path.name}: the time column {time_column or 'time'!r} is not increasing")
        check_rate(path.name, rate, 1.0 / dt, f"time column ({time_column or 'time'!r}, seconds)")
    return data


def read_recording(path: Path, channels: list[str], rate: float, fmt: str = "auto", columns: dict | None = None,
                   time_column: str | None = None) -> np.ndarray:
    """float64 [channels, samples] of one recording, checked against the declared rate."""
    columns = columns or {}
    fmt = fmt if fmt != "auto" else {".npz": "npz", ".npy": "npy", ".wav": "wav", ".csv": "csv_wide"}.get(path.suffix.lower(), "")
    try:
        if fmt == "npz":
            return _npz(path, channels)
        if fmt == "npy":
            return _npy(path, channels)
        if fmt == "wav":
            return _wav(path, channels, rate, columns)
        if fmt in ("csv_wide", "csv_long"):
            return _csv(path, channels, rate, fmt[4:], columns, time_column)
    except UserError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path.name} could not be read as a {fmt or 'sensor'} file ({e}); pickled arrays are never loaded") from None
    raise UserError(f"{path.name}: unsupported sensor file type {path.suffix!r}; use .npz, .npy, .wav or .csv (format: csv_wide or csv_long)")


def resample(x: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    if from_hz == to_hz:
        return x
    from fractions import Fraction

    from scipy.signal import resample_poly

    ratio = Fraction(to_hz / from_hz).limit_denominator(1000)
    return resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
