"""From a member's raw dataset version to shareable ones: release, industry-common, diff.

- `release`: de-identifies a raw version into a new, immutable version (stage "released",
  named `<name>-released` unless told otherwise): free text through `indai.platform.deid`,
  event/asset/group keys replaced by the member's keyed pseudonyms (the same asset stays the
  same asset across releases of that member), times shifted by the member's offset, source
  paths and the raw spec dropped from the manifest. The de-identification report (counts by
  kind and where, never the values) goes into the manifest. Images hold only pixels and
  drawings lost their title blocks at ingest, so nothing else needs removing.
- `share`: builds an industry-common version from released versions of several members,
  remapping their classes onto one list and recording exactly which versions went in.
- `diff`: what changed between two versions (files, splits, classes, lineage).
"""
from __future__ import annotations

import numpy as np

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.progress import bar
from indai.platform.storage import ObjectStore

NO_TIME = np.iinfo(np.int64).min
KEY_KINDS = {"key_event": "event", "key_asset": "asset", "key_group": "group"}


def load_deid_config(path: str | None):
    from indai.platform.config import load_config
    from indai.platform.deid import DeidConfig

    return load_config(DeidConfig, path) if path else DeidConfig()


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
    shift_ns = int(cfg.time_shift_days) * 86_400 * 10**9
    tab_types = {}
    for s in (src.get("spec") or {}).get("sources", []):
        for c, t in (s.get("columns") or {}).items():
            tab_types[c] = t.get("type", "str")
    writer = datasets.VersionWriter(store, out_name)
    for split in datasets.SPLIT_NAMES:
        shard_ids = sorted({p.split("/")[1] for p in src["files"] if p.startswith(f"{split}/")})
        for sid, shard in bar(list(zip(shard_ids, datasets.shards(src, split))), desc=f"release {split}", enabled=progress):
            arrays = datasets.load_shard(store, ref.name, shard)
            for key, arr in list(arrays.items()):
                if key == "text":
                    arrays[key] = np.array([deid.text(str(t), f"{split}/{sid}/{i}/text") for i, t in enumerate(arr)], dtype=str)
                elif key in KEY_KINDS:
                    arrays[key] = np.array([deid.pseudonym(KEY_KINDS[key], str(v)) if str(v) else "" for v in arr], dtype=str)
                elif key == "key_time" and shift_ns:
                    arrays[key] = np.where(arr == NO_TIME, arr, arr + shift_ns)
                elif key.startswith("tab_"):
                    kind = tab_types.get(key[4:], "str")
                    if kind == "datetime" and shift_ns:
                        arrays[key] = np.where(arr == NO_TIME, arr, arr + shift_ns)
                    elif kind in ("str", "category"):
                        arrays[key] = np.array([deid.text(str(v), f"{split}/{sid}/{i}/{key[4:]}") for i, v in enumerate(arr)], dtype=str)
            writer.put_shard(split, sid, arrays)
    sources = []
    for s in src.get("sources", []):
        keep = {k: v for k, v in s.items() if k in ("kind", "modality", "sha256", "files", "sampling_rate_hz", "samples",
                                                    "samples_resampled", "seconds", "label")}
        if "path" in s:
            keep["path"] = deid.pseudonym("file", s["path"])
        for k in ("asset", "group"):
            if s.get(k):
                keep[k] = deid.pseudonym(k, s[k])
        sources.append(keep)
    manifest = {k: v for k, v in src.items() if k not in ("spec", "files", "version", "name", "sources", "deidentification")}
    manifest.update(
        stage="released", parent=str(ref), sources=sources,
        description=deid.text(src.get("description", ""), "manifest/description"),
        classes=[deid.text(c, "manifest/classes") for c in src.get("classes", [])],
        deidentification={"applied": True, "mode": cfg.mode, "kinds": list(cfg.kinds) if hasattr(cfg, "kinds") else None,
                          "time_shifted": bool(shift_ns), "keys_pseudonymised": sorted(KEY_KINDS.values()),
                          "raw": src.get("deidentification", {}), "report": deid.report()})
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
    """An industry-common version from released (or common) versions; raw ones are refused."""
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
                    arrays["label"] = remap[arrays["label"]]
                    per_class[split] = (np.array(per_class[split]) + np.bincount(arrays["label"], minlength=len(classes))).tolist()
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
