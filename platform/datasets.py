"""Dataset versions: immutable, content-addressed, with a manifest, committed last.

A dataset version lives under `datasets/<name>/<version>/` in the object store: one `.npy`
file per array and split (`train/label.npy`, ...), a `manifest.json`, and the commit marker.
The version is a hash of the manifest and every array's bytes, so the same content always
gets the same version and a version never changes. Readers resolve `name@latest` to the
newest *committed* version, so a crashed ingest is never seen; files are verified against
the hashes recorded in the commit before they are used.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import numpy as np

from indai.platform.errors import UserError
from indai.platform.storage import ObjectStore, StoreError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DatasetRef:
    name: str
    version: str  # a 16-hex version or "latest"

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise UserError(f"dataset name {name!r} is not valid: use lower-case letters, digits, '.', '_' and '-' (at most 64)")
    return name


def parse_ref(text: str) -> DatasetRef:
    """`name`, `name@latest` or `name@<16-hex version>`."""
    name, _, version = str(text).partition("@")
    check_name(name)
    version = version or "latest"
    if version != "latest" and not VERSION_RE.match(version):
        raise UserError(f"dataset version {version!r} is not valid: use 'latest' or the 16-character version that ingest printed")
    return DatasetRef(name, version)


def _prefix(name: str, version: str) -> str:
    return f"datasets/{name}/{version}"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_version(store: ObjectStore, name: str, manifest: dict, splits: dict[str, dict[str, np.ndarray]]) -> tuple[str, dict]:
    """Write a dataset version; return (version, manifest). Idempotent for equal content."""
    check_name(name)
    files: dict[str, bytes] = {}
    for split, arrays in splits.items():
        for key, arr in arrays.items():
            if arr.dtype == object:
                raise ValueError(f"array {split}/{key} has dtype object; only plain dtypes are stored")
            files[f"{split}/{key}.npy"] = _npy_bytes(arr)
    hashes = {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())}
    body = dict(manifest, name=name, files=hashes)
    version = hashlib.sha256(_canonical(body)).hexdigest()[:16]
    body["version"] = version
    prefix = _prefix(name, version)
    if store.is_committed(prefix):
        return version, read_manifest(store, DatasetRef(name, version))
    store.delete_prefix(prefix)  # leftovers of an interrupted write of the same content
    for path, data in files.items():
        store.put_bytes(f"{prefix}/{path}", data)
    manifest_bytes = json.dumps(body, indent=2, ensure_ascii=False).encode()
    store.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes)
    store.commit(prefix, {"version": version, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()})
    return version, body


def resolve(store: ObjectStore, ref: DatasetRef) -> DatasetRef:
    """Turn `name@latest` into the newest committed version; check that a given version exists."""
    if ref.version == "latest":
        versions = store.committed_children(f"datasets/{ref.name}")
        if not versions:
            raise UserError(f"dataset {ref.name!r} has no committed version in {store.uri}: run `indai data ingest <spec.yaml>` first")
        return DatasetRef(ref.name, versions[-1])
    if not store.is_committed(_prefix(ref.name, ref.version)):
        raise UserError(f"dataset {ref} is not in {store.uri} (or its write never finished): `indai data ls` lists what is there")
    return ref


def read_manifest(store: ObjectStore, ref: DatasetRef) -> dict:
    ref = resolve(store, ref)
    prefix = _prefix(ref.name, ref.version)
    data = store.get_bytes(f"{prefix}/{MANIFEST}")
    expected = store.read_commit(prefix).get("manifest_sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise StoreError(f"manifest of dataset {ref} does not match its commit record: the store was altered; ingest again")
    return json.loads(data)


def load_split(store: ObjectStore, ref: DatasetRef, split: str, manifest: dict | None = None) -> dict[str, np.ndarray]:
    """All arrays of one split, each verified against the manifest's sha256."""
    ref = resolve(store, ref)
    manifest = manifest or read_manifest(store, ref)
    prefix = _prefix(ref.name, ref.version)
    out: dict[str, np.ndarray] = {}
    for path, sha in manifest["files"].items():
        folder, _, fname = path.partition("/")
        if folder != split:
            continue
        data = store.get_bytes(f"{prefix}/{path}")
        if hashlib.sha256(data).hexdigest() != sha:
            raise StoreError(f"file {path} of dataset {ref} does not match its recorded hash: the store was altered; ingest again")
        out[fname.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
    if not out:
        raise UserError(f"dataset {ref} has no split {split!r}; it has {sorted({p.split('/')[0] for p in manifest['files']})}")
    return out


def list_versions(store: ObjectStore) -> list[tuple[str, str]]:
    names = sorted({k.split("/")[1] for k in store.list("datasets/") if k.count("/") >= 2})
    return [(n, v) for n in names for v in store.committed_children(f"datasets/{n}")]
