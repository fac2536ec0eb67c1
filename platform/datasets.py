"""Dataset versions: immutable, content-addressed, with a manifest, committed last.

A dataset version is a `manifest.json` and a commit marker under `datasets/<name>/<version>/`;
the manifest names every array of every shard of every split (`train/00003/label.npy`) by
the sha256 of its `.npy` bytes, and the bytes live once in `datasets/<name>/blobs/`. The
version is a hash of the manifest, so the same content always gets the same version and a
version never changes. Readers resolve `name@latest` to the
newest *committed* version, so a crashed ingest is never seen; files are verified against
the hashes recorded in the commit before they are used.

A name belongs to one member: the first commit under it records the manifest's member in
`datasets/<name>/owner.json`, a commit for any other member is refused, and `name@latest`
only ever resolves to a version of that owner. Without this one member could commit under
another's name and take over its `@latest` (the training data of the other's next run).
Committing content that is already committed again refreshes its commit record, so
`@latest` is the version committed (or re-committed) last; the layout stays the one older
readers know (a version folder with a commit marker, ordered by `committed_at`).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from indai.platform.errors import UserError
from indai.platform.storage import ObjectStore, StoreError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
MANIFEST = "manifest.json"
OWNER = "owner.json"
SPLIT_NAMES = ("train", "val", "test")
MAX_ARRAY_NAME = 200


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


def check_array_name(key: str) -> str:
    """An array's name becomes one segment of its logical path (`train/00003/<name>.npy`), which
    readers split on '/': a name holding '/' (a typed column such as `P/N` or `L/min`) would
    commit a version no one can read. Letters of any script, spaces and punctuation are fine."""
    if not isinstance(key, str) or not key or key in (".", "..") or "/" in key or len(key) > MAX_ARRAY_NAME or \
            any(unicodedata.category(c) in ("Cc", "Cf") for c in key):
        column = f" (from the typed column {key[4:]!r})" if isinstance(key, str) and key.startswith("tab_") else ""
        raise UserError(f"array name {key!r}{column} cannot be stored: an array name may not be empty, '.' or '..', "
                        f"contain '/' or control characters, or be longer than {MAX_ARRAY_NAME} characters; "
                        "rename the column in the source file (for example 'P/N' to 'P_N'), or leave it out of columns: "
                        "(it can still be a text:, label: or key column)")
    return key


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
        # every check before the first blob is written: a refused shard leaves nothing behind
        if split not in SPLIT_NAMES:
            raise ValueError(f"split {split!r} is not one of {SPLIT_NAMES}")
        sid = f"{shard:05d}" if isinstance(shard, int) else shard
        if not isinstance(sid, str) or not re.fullmatch(r"[0-9a-z-]{1,32}", sid):
            raise ValueError(f"shard id {sid!r} is not valid")
        for key, arr in arrays.items():
            check_array_name(key)
            if arr.dtype == object:
                raise ValueError(f"array {split}/{key} has dtype object; only plain dtypes are stored")
        out = {}
        for key, arr in arrays.items():
            data = _npy_bytes(arr)
            sha = hashlib.sha256(data).hexdigest()
            if not self.store.exists(_blob_key(self.name, sha)):
                self.store.put_bytes(_blob_key(self.name, sha), data)
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
        """Write the manifest and the commit marker; the name must be free or the manifest's
        member's (see the module doc). Equal content committed again keeps its version and
        becomes `@latest` again."""
        body = dict(manifest, name=self.name, files=dict(sorted(self.files.items())))
        body.pop("version", None)
        version = hashlib.sha256(_canonical(body)).hexdigest()[:16]
        body["version"] = version
        member = body.get("member")
        claim_name(self.store, self.name, member)
        prefix = _prefix(self.name, version)
        if self.store.is_committed(prefix):
            # a version is immutable, but "latest" means the one committed last: refresh its commit
            # time (the marker is replaced atomically; its manifest hash is kept, its first time too)
            old = self.store.read_commit(prefix)
            self.store.commit(prefix, {**{k: v for k, v in old.items() if k != "committed_at"}, "member": member,
                                       "first_committed_at": old.get("first_committed_at", old.get("committed_at"))})
            return version, read_manifest(self.store, DatasetRef(self.name, version))
        manifest_bytes = json.dumps(body, indent=2, ensure_ascii=False).encode()
        self.store.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes)
        self.store.commit(prefix, {"version": version, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                                   "member": member})
        return version, body


def write_version(store: ObjectStore, name: str, manifest: dict, splits: dict[str, dict[str, np.ndarray]]) -> tuple[str, dict]:
    """Write a small dataset held in memory as one shard per split; idempotent for equal content."""
    writer = VersionWriter(store, name)
    for split, arrays in splits.items():
        writer.put_shard(split, 0, arrays)
    return writer.commit(manifest)


# ---- who owns a name --------------------------------------------------------------------------


def _owner_text(member: str | None) -> str:
    return f"member {member}" if member else "no member (it holds industry-common / consortium data)"


def _version_member(store: ObjectStore, name: str, version: str) -> str | None:
    """The member a committed version was written for: in its commit record since owners were
    recorded, in its (verified) manifest before."""
    record = store.read_commit(_prefix(name, version))
    if "member" in record:
        return record["member"]
    return read_manifest_at(store, DatasetRef(name, version)).get("member")


def owner_of(store: ObjectStore, name: str, versions: list[str] | None = None) -> tuple[bool, str | None]:
    """(claimed, member): who owns `name`. The owner record, or for a name committed before
    owners were recorded, the member of its oldest version (versions were never re-committed
    then, so the oldest is the first). (False, None) for a name no one has committed under."""
    key = f"datasets/{check_name(name)}/{OWNER}"
    if store.exists(key):
        try:
            record = json.loads(store.get_bytes(key))
            return True, record["member"]
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"owner record {key!r} in {store.uri} is damaged: the admin must restore it "
                             "(it names the member of the first version under that name)") from None
    versions = store.committed_children(f"datasets/{name}") if versions is None else versions
    if not versions:
        return False, None
    return True, _version_member(store, name, versions[0])


def check_owner(store: ObjectStore, name: str, member: str | None) -> None:
    """UserError unless `member` may commit under `name` (the name is free or already its own)."""
    claimed, owner = owner_of(store, name)
    if claimed and owner != member:
        raise UserError(f"dataset {name} belongs to {_owner_text(owner)}: choose another name "
                        f"({_owner_text(member)} cannot commit under it)")


def claim_name(store: ObjectStore, name: str, member: str | None) -> None:
    """Record the owner of `name` on its first commit (or, for a name committed before owners
    were recorded, the member of its first version); then refuse any other member.

    The store has no create-if-absent write, so two first commits racing under one name could
    both write the record; reading it back after writing lets the one that lost the race see
    it in nearly every interleaving, and `resolve` only ever follows the owner recorded, so a
    version that slipped through never becomes anyone's `@latest`."""
    key = f"datasets/{check_name(name)}/{OWNER}"
    if not store.exists(key):
        # written before any re-commit can reorder the versions, which the derivation relies on
        claimed, owner = owner_of(store, name)
        store.put_bytes(key, json.dumps({"member": owner if claimed else member}).encode())
    check_owner(store, name, member)


def resolve(store: ObjectStore, ref: DatasetRef) -> DatasetRef:
    """Turn `name@latest` into the newest committed version of the name's owner; check that a
    given version exists."""
    if ref.version == "latest":
        versions = store.committed_children(f"datasets/{ref.name}")
        if not versions:
            raise UserError(f"dataset {ref.name!r} has no committed version in {store.uri}: run `indai data ingest <spec.yaml>` first")
        _, owner = owner_of(store, ref.name, versions)
        # a version of another member (committed before names had owners) is never "latest"
        for version in reversed(versions):
            if _version_member(store, ref.name, version) == owner:
                return DatasetRef(ref.name, version)
        raise UserError(f"dataset {ref.name!r} has no committed version of its owner ({_owner_text(owner)}) in {store.uri}: "
                        "name the version you mean (`indai data ls` lists them)")
    if not store.is_committed(_prefix(ref.name, ref.version)):
        raise UserError(f"dataset {ref} is not in {store.uri} (or its write never finished): `indai data ls` lists what is there")
    return ref


def read_manifest(store: ObjectStore, ref: DatasetRef) -> dict:
    return read_manifest_at(store, resolve(store, ref))


def read_manifest_at(store: ObjectStore, ref: DatasetRef) -> dict:
    """The manifest of one committed version (no `latest`), checked against its commit record."""
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


def check_job_may_write(member: str) -> None:
    """A job writes data only for its own member (the admin for any): the job gateway sets the
    job's member and role and refuses jobs that try to set them; a process outside a gateway job
    (the admin's shell, the embedded default) acts as the admin, as `job_identity` says."""
    job_member, role = job_identity()
    if role != "admin" and job_member != member:
        raise UserError(f"this job runs for member {job_member!r} and may write only that member's data, but the spec says "
                        f"member: {member}: set member: {job_member} in the spec, or ask the admin to ingest it")


def open_for_job(store: ObjectStore, ref: DatasetRef) -> tuple[DatasetRef, dict]:
    """Resolve and read a version the way every training job must: through the access rule."""
    ref = resolve(store, ref)
    member, role = job_identity()
    return ref, check_read(store, ref, member, role)
