"""From a member's raw dataset version to shareable ones: release, industry-common, diff.

- `release`: de-identifies a raw version into a new, immutable version (stage "released",
  named `<name>-released` unless told otherwise). Every string array is free text and goes
  through `indai.platform.deid` unless release has a rule for it (default deny: a writer that
  adds a string array later is safe without touching this module): event/asset/group keys,
  and the typed `tab_<col>` copies ingest keeps of those key columns, get the member's keyed
  pseudonyms (the same asset stays the same asset across releases of that member, and a copy
  still joins its key); times are shifted by the member's offset, including a time column
  kept as text; a copy of the time column that is a plain number (e.g. yyyymmdd) cannot be
  shifted and is dropped; `language` and `task` are kept while they hold only their fixed
  values. Source paths and the raw spec are dropped from the manifest, source labels are
  de-identified like the classes. The manifest says what was done to each array and which
  arrays were dropped and why, with the de-identification report (counts by kind and where,
  never the values). Images hold only pixels and drawings lost their title blocks at ingest,
  so nothing else needs removing.
- `share`: builds an industry-common version from released versions of several members,
  remapping their classes onto one list and recording exactly which versions went in.
- `diff`: what changed between two versions (files, splits, classes, lineage).
"""
from __future__ import annotations

import datetime as _dt

import numpy as np

from indai.platform import datasets
from indai.platform.connectors.tables import MISSING_TOKENS
from indai.platform.errors import UserError
from indai.platform.instruct import LANGUAGES, TASKS
from indai.platform.progress import bar
from indai.platform.storage import ObjectStore

NO_TIME = np.iinfo(np.int64).min
KEY_KINDS = {"key_event": "event", "key_asset": "asset", "key_group": "group"}
# String arrays known to hold no free text, with the only values they may hold: the instruction
# builder writes them from fixed lists. Such an array is kept while every value is one of these
# (anything else in it is treated as free text). Every other string array is de-identified.
FIXED_VOCABULARY = {"language": frozenset(LANGUAGES), "task": frozenset(TASKS)}


def load_deid_config(path: str | None):
    from indai.platform.config import load_config
    from indai.platform.deid import DeidConfig

    return load_config(DeidConfig, path) if path else DeidConfig()


class _Arrays:
    """The rules that turn one raw shard into its released form, and the record of what they did
    to each array (it goes into the manifest, so a reader can check nothing was left raw)."""

    def __init__(self, deid, spec: dict | None, shift_days: int) -> None:
        self.deid = deid
        self.shift_days = int(shift_days)
        self.shift_ns = self.shift_days * 86_400 * 10**9
        # what the ingest spec says about its typed columns: type (last source wins, as in
        # ingest), strptime format, and which are event/asset/group keys or the record time
        self.types: dict[str, str] = {}
        self.formats: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self.times: set[str] = set()
        for src in (spec or {}).get("sources", []):
            for col, t in (src.get("columns") or {}).items():
                self.types[col] = (t or {}).get("type", "str")
                if (t or {}).get("format"):
                    self.formats[col] = t["format"]
            if src.get("kind") == "table":
                for role in ("event", "asset", "group"):
                    if src.get(role):
                        self.keys.setdefault(src[role], role)
                if src.get("time"):
                    self.times.add(src["time"])
        self.actions: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        self.blanked: dict[str, int] = {}
        self.shifted = 0
        self._pseudonyms: dict[tuple[str, str], str] = {}

    # ---- one shard ---------------------------------------------------------------------------

    def shard(self, arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        out = {}
        for key, arr in arrays.items():
            new = self._array(key, arr, arrays, where)
            if new is not None:
                out[key] = new
        return out

    def _array(self, key: str, arr: np.ndarray, arrays: dict[str, np.ndarray], where: str) -> np.ndarray | None:
        if key in KEY_KINDS:
            return self._pseudonymise(key, KEY_KINDS[key], arr, None)
        if key == "key_time":
            return self._shift_numeric(key, arr)
        if key.startswith("tab_") and key[4:] in self.types:
            col, kind = key[4:], self.types[key[4:]]
            if col in self.keys:
                # a typed copy of a key column: the very pseudonym of its key, whatever its dtype,
                # because the raw id (a number too) is as identifying here as in the key array
                role = self.keys[col]
                return self._pseudonymise(key, role, arr, arrays.get(f"key_{role}"))
            if kind == "datetime":
                return self._shift_numeric(key, arr)
            if col in self.times and self.shift_ns:
                if kind in ("int", "float"):
                    # a time held as a number (yyyymmdd, epoch seconds, ...) has no unit release
                    # could shift it by; keeping it would undo the key time's shift
                    self.dropped[key] = (f"copy of the time column {col!r} typed {kind}: a number cannot be shifted like "
                                         f"the key time; type the column datetime (or str) in the ingest spec to keep it")
                    return None
                return self._shift_text(key, arr, self.formats.get(col))
        if arr.dtype.kind in "US":
            return self._text(key, arr, where)
        self._note(key, "kept: not text")
        return arr

    def _note(self, key: str, action: str) -> None:
        # the strongest treatment any shard needed is the one reported
        if key not in self.actions or self.actions[key].startswith("kept"):
            self.actions[key] = action

    @staticmethod
    def _strings(arr: np.ndarray) -> list[str]:
        flat = arr.reshape(-1)
        if arr.dtype.kind == "S":
            return [bytes(v).decode("utf-8", "replace") for v in flat]
        return [str(v) for v in flat]

    def _text(self, key: str, arr: np.ndarray, where: str) -> np.ndarray:
        values = self._strings(arr)
        vocab = FIXED_VOCABULARY.get(key)
        if vocab is not None and set(values) <= vocab:
            self._note(key, "kept: fixed vocabulary")
            return arr
        self._note(key, "free text" if vocab is None else "free text (values outside the fixed vocabulary)")
        out = [self.deid.text(v, f"{where}/{i}/{key}") for i, v in enumerate(values)]
        return np.array(out, dtype=str).reshape(arr.shape)

    def _pseudonym(self, kind: str, value: str) -> str:
        k = (kind, value)
        if k not in self._pseudonyms:
            self._pseudonyms[k] = self.deid.pseudonym(kind, value)
        return self._pseudonyms[k]

    def _pseudonymise(self, key: str, kind: str, arr: np.ndarray, raw_key: np.ndarray | None) -> np.ndarray:
        """Pseudonyms of a key array, or of a typed copy of a key column. A numeric copy lost the
        raw text of the id (700000.0 for "700000", or for "0700000"), so where the row's raw key is
        the same number the key's text is used: the copy gets exactly the pseudonym of its key."""
        self._note(key, f"pseudonymised ({kind})")
        numeric = arr.dtype.kind in "fiu"
        raw = self._strings(raw_key) if raw_key is not None and raw_key.shape == arr.shape else None
        out = []
        for i, v in enumerate(arr.reshape(-1) if numeric else self._strings(arr)):
            if numeric:
                if (arr.dtype.kind == "f" and np.isnan(v)) or (arr.dtype.kind == "i" and int(v) == NO_TIME):
                    out.append("")  # missing stays missing, as an empty key does
                    continue
                text = str(int(v)) if float(v).is_integer() else repr(float(v))
                if raw is not None and _same_number(raw[i], float(v)):
                    text = raw[i]
            else:
                text = v
            out.append(self._pseudonym(kind, text) if text else "")
        return np.array(out, dtype=str).reshape(arr.shape)

    def _shift_numeric(self, key: str, arr: np.ndarray) -> np.ndarray:
        if not self.shift_ns:
            self._note(key, "kept: not shifted (time_shift_days is 0)")
            return arr
        self._note(key, f"shifted {self.shift_days} days")
        present = arr != NO_TIME
        self.shifted += int(present.sum())
        return np.where(present, arr + self.shift_ns, arr)

    def _shift_text(self, key: str, arr: np.ndarray, fmt: str | None) -> np.ndarray:
        """A time column kept as text, shifted by whole days in its own form: the column's
        strptime format if the spec names one, else ISO 8601 (as ingest parses the key time).
        A value that is neither cannot be shifted; it is blanked (and counted) so no raw time stays."""
        self._note(key, f"shifted {self.shift_days} days")
        out = []
        for v in self._strings(arr):
            if v.strip().lower() in MISSING_TOKENS:
                out.append(v)
                continue
            shifted = None
            if fmt:
                try:
                    shifted = (_dt.datetime.strptime(v.strip(), fmt) + _dt.timedelta(days=self.shift_days)).strftime(fmt)
                except ValueError:
                    pass
            if shifted is None:
                try:
                    shifted = self.deid.shift_time(v)  # the member's time_shift_days; keeps the value's ISO form
                except UserError:
                    pass
            if shifted is None:
                self.blanked[key] = self.blanked.get(key, 0) + 1
                out.append("")
            else:
                self.shifted += 1
                out.append(shifted)
        return np.array(out, dtype=str).reshape(arr.shape)

    # ---- the manifest's account -------------------------------------------------------------

    def summary(self) -> dict[str, str]:
        out = {}
        for key, action in sorted(self.actions.items()):
            if key in self.dropped:
                continue
            n = self.blanked.get(key)
            out[key] = f"{action} ({n} value(s) that are not dates blanked)" if n else action
        return out


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == value
    except ValueError:
        return False


def release(store: ObjectStore, ref: datasets.DatasetRef, secret: bytes, deid_config=None, name: str | None = None,
            progress: bool = True) -> tuple[str, str, dict]:
    from indai.platform.deid import DeidConfig, Deidentifier

    ref = datasets.resolve(store, ref)
    src = datasets.read_manifest(store, ref)
    if datasets.stage_of(src) != "raw":
        raise UserError(f"{ref} is already {datasets.stage_of(src)}; release a raw version")
    cfg = deid_config or DeidConfig()
    deid = Deidentifier(cfg, secret)
    out_name = datasets.check_name(name or f"{ref.name}-released"[:64])
    if out_name == ref.name:
        raise UserError("a release needs its own dataset name, so raw and released versions never mix")
    rules = _Arrays(deid, src.get("spec"), cfg.time_shift_days)
    writer = datasets.VersionWriter(store, out_name)
    for split in datasets.SPLIT_NAMES:
        shard_ids = sorted({p.split("/")[1] for p in src["files"] if p.startswith(f"{split}/")})
        for sid, shard in bar(list(zip(shard_ids, datasets.shards(src, split))), desc=f"release {split}", enabled=progress):
            arrays = datasets.load_shard(store, ref.name, shard)
            writer.put_shard(split, sid, rules.shard(arrays, f"{split}/{sid}"))
    sources = []
    for i, s in enumerate(src.get("sources", [])):
        keep = {k: v for k, v in s.items() if k in ("kind", "modality", "sha256", "files", "sampling_rate_hz", "samples",
                                                    "samples_resampled", "seconds")}
        if s.get("label"):  # a recording's label is its class name: de-identified the same way as the classes
            keep["label"] = deid.text(str(s["label"]), f"manifest/sources/{i}/label")
        if "path" in s:
            keep["path"] = deid.pseudonym("file", s["path"])
        for k in ("asset", "group"):
            if s.get(k):
                keep[k] = deid.pseudonym(k, s[k])
        sources.append(keep)
    manifest = {k: v for k, v in src.items() if k not in ("spec", "files", "version", "name", "sources", "deidentification")}
    report = deid.report()
    # release shifts numeric times itself (not through deid.shift_time): count every one it shifted
    report["timestamps_shifted"] = rules.shifted
    manifest.update(
        stage="released", parent=str(ref), sources=sources,
        description=deid.text(src.get("description", ""), "manifest/description"),
        classes=[deid.text(c, "manifest/classes") for c in src.get("classes", [])],
        deidentification={"applied": True, "mode": cfg.mode, "kinds": list(cfg.kinds) if hasattr(cfg, "kinds") else None,
                          "time_shifted": bool(rules.shift_ns), "keys_pseudonymised": sorted(KEY_KINDS.values()),
                          "arrays": rules.summary(), "dropped_arrays": dict(sorted(rules.dropped.items())),
                          "raw": src.get("deidentification", {}), "report": report})
    version, body = writer.commit(manifest)
    return out_name, version, body


def _compatible(manifests: list[dict]) -> None:
    first = manifests[0]
    for m in manifests[1:]:
        ref = f"{m['name']}@{m['version']}"
        if m.get("layout") != first.get("layout"):
            raise UserError(f"{ref} is laid out as {m.get('layout')}, the first input as {first.get('layout')}: share like with like")
        if m.get("label_type", "classification") != first.get("label_type", "classification"):
            raise UserError(f"{ref} has labels of type {m.get('label_type')}, the first input {first.get('label_type')}")
        a, b = first.get("modalities", {}), m.get("modalities", {})
        if set(a) != set(b):
            raise UserError(f"{ref} has modalities {sorted(b)}, the first input {sorted(a)}: share datasets of the same modalities")
        for mod in ("channels", "sampling_rate_hz", "window"):
            if "sensor" in a and a["sensor"].get(mod) != b["sensor"].get(mod):
                raise UserError(f"{ref}: sensor {mod} {b['sensor'].get(mod)} differs from {a['sensor'].get(mod)}: ingest with the same sensor settings")
        if "image" in a and a["image"].get("size") != b["image"].get("size"):
            raise UserError(f"{ref}: image size {b['image']['size']} differs from {a['image']['size']}")


def share(store: ObjectStore, industry: str, name: str, refs: list[datasets.DatasetRef], progress: bool = True) -> tuple[str, str, dict]:
    """An industry-common version from released (or common) versions; raw ones are refused.
    Only the admin builds one: it is owned by no member, and a member's job that could write it
    would choose what every member of the industry trains on as `<industry>-common@latest`."""
    job_member, role = datasets.job_identity()
    if role != "admin":
        raise UserError(f"this job runs for member {job_member!r}: only the platform admin builds industry-common datasets "
                        "(`indai data share`); ask the admin, or train on the released versions themselves")
    if not refs:
        raise UserError(f"no released dataset versions of {industry} members to share: run `indai data release` first")
    resolved = [datasets.resolve(store, r) for r in refs]
    manifests = [datasets.read_manifest(store, r) for r in resolved]
    for r, m in zip(resolved, manifests):
        if datasets.stage_of(m) == "raw":
            raise UserError(f"{r} is raw data of member {m.get('member')}: only released versions can be shared; run `indai data release {r}`")
    _compatible(manifests)
    classes: list[str] = []
    for m in manifests:
        classes += [c for c in m.get("classes", []) if c not in classes]
    writer = datasets.VersionWriter(store, name)
    counts = {s: 0 for s in datasets.SPLIT_NAMES}
    per_class = {s: [0] * len(classes) for s in datasets.SPLIT_NAMES}
    sums = None
    for i, (r, m) in enumerate(zip(resolved, manifests)):
        remap = np.array([classes.index(c) for c in m.get("classes", [])] or [0], dtype=np.int64)
        for split in datasets.SPLIT_NAMES:
            shard_ids = sorted({p.split("/")[1] for p in m["files"] if p.startswith(f"{split}/")})
            for sid, shard in bar(list(zip(shard_ids, datasets.shards(m, split))), desc=f"{r.name} {split}", enabled=progress):
                arrays = datasets.load_shard(store, r.name, shard)
                if m.get("classes"):
                    # -1 marks a record without a label (ingest with drop_missing: false): it stays -1
                    # and is not counted in any class (remap[-1] would make it the member's last class)
                    lab = arrays["label"]
                    known = lab >= 0
                    if known.any() and int(lab[known].max()) >= len(m["classes"]):
                        raise UserError(f"{r} has label {int(lab[known].max())} but only {len(m['classes'])} classes: "
                                        "the version is inconsistent; release it again from its raw version")
                    arrays["label"] = np.where(known, remap[np.where(known, lab, 0)], lab)
                    per_class[split] = (np.array(per_class[split])
                                        + np.bincount(arrays["label"][known], minlength=len(classes))).tolist()
                counts[split] += len(arrays["label"])
                if split == "train" and "sensor_signal" in arrays:
                    x = arrays["sensor_signal"].astype(np.float64)
                    part = np.stack([np.full(x.shape[0], x.shape[1]), x.sum(axis=1), (x * x).sum(axis=1)])
                    sums = part if sums is None else sums + part
                writer.put_shard(split, f"{i:03d}-{sid}"[:32], arrays)
    first = manifests[0]
    modalities = {k: dict(v) for k, v in first.get("modalities", {}).items()}
    if sums is not None:
        n = sums[0]
        mean = sums[1] / n
        modalities["sensor"]["norm"] = {"mean": mean.tolist(), "std": (np.sqrt(np.maximum(sums[2] / n - mean**2, 0)) + 1e-8).tolist()}
    unit = "windows" if first.get("layout") == "recordings" else "records"
    manifest = {
        "member": None, "stage": "common", "industry": industry, "layout": first.get("layout"),
        "label_type": first.get("label_type", "classification"),
        "description": f"industry-common dataset of {industry}: {len(resolved)} released version(s) of {len({m.get('member') for m in manifests})} member(s)",
        "attribution": "; ".join(sorted({m.get("attribution", "") for m in manifests if m.get("attribution")})),
        "classes": classes, "modalities": modalities,
        "split": {"by": "inherited", unit: {k: v for k, v in counts.items() if v}, "per_class": {k: v for k, v in per_class.items() if counts[k]}},
        "inputs": [{"dataset": str(r), "member": m.get("member"), "stage": datasets.stage_of(m), "classes": m.get("classes", []),
                    "parent": m.get("parent")} for r, m in zip(resolved, manifests)],
        "deidentification": {"applied": True, "inherited_from": [str(r) for r in resolved]},
    }
    return (name, *writer.commit(manifest))


def diff(a: dict, b: dict) -> dict:
    """What differs between two manifests, as a small JSON-able summary."""
    fa, fb = set(a["files"].items()), set(b["files"].items())
    unit = "windows" if "windows" in a.get("split", {}) else "records"

    def counts(m):
        s = m.get("split", {})
        return s.get("windows") or s.get("records") or {}

    out = {
        "a": f"{a['name']}@{a['version']}", "b": f"{b['name']}@{b['version']}",
        "same_content": a["files"] == b["files"],
        "files": {"only_a": len(fa - fb), "only_b": len(fb - fa), "shared": len(fa & fb)},
        unit: {k: [counts(a).get(k, 0), counts(b).get(k, 0)] for k in sorted(set(counts(a)) | set(counts(b)))},
    }
    for key in ("stage", "member", "layout", "parent", "industry"):
        if a.get(key) != b.get(key):
            out[key] = [a.get(key), b.get(key)]
    ca, cb = a.get("classes", []), b.get("classes", [])
    if ca != cb:
        out["classes"] = {"only_a": [c for c in ca if c not in cb], "only_b": [c for c in cb if c not in ca],
                          "order_changed": [c for c in ca if c in cb] != [c for c in cb if c in ca]}
    if a.get("modalities") != b.get("modalities"):
        out["modalities"] = [sorted(a.get("modalities", {})), sorted(b.get("modalities", {}))]
    sa = {s.get("sha256") for s in a.get("sources", [])}
    sb = {s.get("sha256") for s in b.get("sources", [])}
    if sa != sb:
        out["sources"] = {"only_a": len(sa - sb), "only_b": len(sb - sa)}
    return out
