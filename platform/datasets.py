"""Dataset versions: immutable, content-addressed, with a manifest, committed last.

A dataset version is a `manifest.json` and a commit marker under `datasets/<name>/<version>/`;
the manifest names every array of every shard of every split (`train/00003/label.npy`) by
the sha256 of its `.npy` bytes, and the bytes live once in `datasets/<name>/blobs/`. The
version is a hash of the manifest, so the same content always gets the same version and a
version never changes. Readers resolve `name@latest` to the
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
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetRef:
    name: str
    version: str  # a 16-hex version or "latest"

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: "$" alone lets "x\n" through
        raise UserError(f"dataset name {name!r} is not valid: use lower-case letters, digits, '.', '_' and '-' (at most 64)")
    return name


def parse_ref(text: str) -> DatasetRef:
    """`name`, `name@latest` or `name@<16-hex version>`."""
    name, _, version = str(text).partition("@")
    check_name(name)
    version = version or "latest"
    if version != "latest" and not VERSION_RE.fullmatch(version):
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


def _blob_key(name: str, sha: str) -> str:
    return f"datasets/{name}/blobs/{sha}.npy"


class VersionWriter:
    """Writes a dataset version shard by shard, so memory holds one shard, not the dataset.

    Every array goes to a content-addressed blob (`datasets/<name>/blobs/<sha256>.npy`) as
    soon as it is ready; a shard whose blobs are already there costs nothing, which makes an
    interrupted ingest resumable and identical content free. The version itself, a manifest
    naming every blob and the commit marker, is written last by `commit`.
    """

    def __init__(self, store: ObjectStore, name: str):
        self.store, self.name = store, check_name(name)
        self.files: dict[str, str] = {}

    def put_shard(self, split: str, shard: int | str, arrays: dict[str, np.ndarray]) -> dict[str, str]:
        """Store one shard's arrays; return {logical path: sha256}. Shards are read back in the
        sorted order of their ids (an int, or a string such as `003-00012`)."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"split {split!r} is not one of {SPLIT_NAMES}")
        out = {}
        for key, arr in arrays.items():
            if arr.dtype == object:
                raise ValueError(f"array {split}/{key} has dtype object; only plain dtypes are stored")
            data = _npy_bytes(arr)
            sha = hashlib.sha256(data).hexdigest()
            if not self.store.exists(_blob_key(self.name, sha)):
                self.store.put_bytes(_blob_key(self.name, sha), data)
            sid = f"{shard:05d}" if isinstance(shard, int) else shard
            if not re.fullmatch(r"[0-9a-z-]{1,32}", sid):
                raise ValueError(f"shard id {sid!r} is not valid")
            out[f"{split}/{sid}/{key}.npy"] = sha
        self.files.update(out)
        return out

    def add_files(self, files: dict[str, str]) -> None:
        """Record shards written earlier (a resumed ingest) after checking their blobs exist."""
        missing = [p for p, sha in files.items() if not self.store.exists(_blob_key(self.name, sha))]
        if missing:
            raise StoreError(f"resumed ingest of {self.name}: blobs of {missing[:3]} are gone; start over with --restart")
        self.files.update(files)

    def commit(self, manifest: dict) -> tuple[str, dict]:
        body = dict(manifest, name=self.name, files=dict(sorted(self.files.items())))
        body.pop("version", None)
        version = hashlib.sha256(_canonical(body)).hexdigest()[:16]
        body["version"] = version
        prefix = _prefix(self.name, version)
        if self.store.is_committed(prefix):
            return version, read_manifest(self.store, DatasetRef(self.name, version))
        manifest_bytes = json.dumps(body, indent=2, ensure_ascii=False).encode()
        self.store.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes)
        self.store.commit(prefix, {"version": version, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()})
        return version, body


def write_version(store: ObjectStore, name: str, manifest: dict, splits: dict[str, dict[str, np.ndarray]]) -> tuple[str, dict]:
    """Write a small dataset held in memory as one shard per split; idempotent for equal content."""
    writer = VersionWriter(store, name)
    for split, arrays in splits.items():
        writer.put_shard(split, 0, arrays)
    return writer.commit(manifest)


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


def shards(manifest: dict, split: str) -> list[dict[str, str]]:
    """The split's shards in order, each {array name: sha256}."""
    out: dict[str, dict[str, str]] = {}
    for path, sha in manifest["files"].items():
        folder, shard, fname = path.split("/")
        if folder == split:
            out.setdefault(shard, {})[fname.removesuffix(".npy")] = sha
    return [out[k] for k in sorted(out)]


def load_shard(store: ObjectStore, name: str, shard: dict[str, str]) -> dict[str, np.ndarray]:
    """One shard's arrays, each verified against its sha256 before it is parsed."""
    arrays = {}
    for key, sha in shard.items():
        data = store.get_bytes(_blob_key(name, sha))
        if hashlib.sha256(data).hexdigest() != sha:
            raise StoreError(f"array {key} ({sha[:12]}) of dataset {name} does not match its recorded hash: the store was altered; ingest again")
        arrays[key] = np.load(io.BytesIO(data), allow_pickle=False)
    return arrays


def concat_shards(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join shards; windowed sensor shards keep their window starts pointing into the joined signal."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, list] = {}
    offset = 0
    for part in parts:
        for key, arr in part.items():
            if key == "sensor_starts":
                arr = arr + offset
            out.setdefault(key, []).append(arr)
        if "sensor_signal" in part:
            offset += part["sensor_signal"].shape[1]
    return {k: np.concatenate(v, axis=1 if k == "sensor_signal" else 0) for k, v in out.items()}


def load_split(store: ObjectStore, ref: DatasetRef, split: str, manifest: dict | None = None) -> dict[str, np.ndarray]:
    """All arrays of one split (small datasets; large ones stream shard by shard)."""
    ref = resolve(store, ref)
    manifest = manifest or read_manifest(store, ref)
    parts = [load_shard(store, ref.name, sh) for sh in shards(manifest, split)]
    if not parts:
        raise UserError(f"dataset {ref} has no split {split!r}; it has {sorted({p.split('/')[0] for p in manifest['files']})}")
    return concat_shards(parts)


def list_versions(store: ObjectStore) -> list[tuple[str, str]]:
    names = store.children("datasets")  # one listing level, not every blob
    return [(n, v) for n in names for v in store.committed_children(f"datasets/{n}")]


# ---- who may read what ------------------------------------------------------------------------

STAGES = ("raw", "released", "common")


def stage_of(manifest: dict) -> str:
    return manifest.get("stage", "raw")


def may_read(manifest: dict, member: str | None, role: str) -> bool:
    """A member's raw data is readable by that member and the admin only; released and
    industry-common versions are readable by every member of the consortium."""
    if role == "admin" or stage_of(manifest) in ("released", "common"):
        return True
    return member is not None and manifest.get("member") == member


def check_read(store: ObjectStore, ref: DatasetRef, member: str | None, role: str) -> dict:
    """The manifest if `member` may read the version; UserError naming the rule otherwise."""
    manifest = read_manifest(store, ref)
    if not may_read(manifest, member, role):
        raise UserError(f"dataset {manifest['name']}@{manifest['version']} is raw data of member {manifest.get('member')!r}; "
                        f"member {member!r} may read only its own, released and industry-common versions "
                        "(ask the owner to run `indai data release`)")
    return manifest


def job_identity() -> tuple[str | None, str]:
    """(member, role) of the job this process runs for, as set by the job gateway; a process
    started outside a gateway job (the admin's shell, the demo) acts as the admin."""
    import os

    member = os.environ.get("INDAI_JOB_MEMBER") or None
    return member, (os.environ.get("INDAI_JOB_ROLE") or ("researcher" if member else "admin"))


def open_for_job(store: ObjectStore, ref: DatasetRef) -> tuple[DatasetRef, dict]:
    """Resolve and read a version the way every training job must: through the access rule."""
    ref = resolve(store, ref)
    member, role = job_identity()
    return ref, check_read(store, ref, member, role)
