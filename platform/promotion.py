"""Promotion: what members are served.

The registry (MLflow) is written by every training job through one account (`indai-jobs`, EDIT on
every model), so neither its aliases nor a version's files are, on their own, something serving
may trust: a job of one member could move another member's `champion` alias, or rewrite the files
of a version through MLflow's artefact proxy. A promotion is made outside the jobs' reach (the
admin's `indai model promote`, with the platform database) and records there:

- the version and the sha256 of its files as they are now (`model_versions`), the first time the
  version is promoted; a later promotion of the same version whose files hash differently is
  refused, because the registry's copy changed after it was trusted;
- where the alias points (`model_aliases`), with who moved it and when (and an audit row).

Serving resolves `name@alias` from these rows only, serves a `name/version` to members only if the
version was promoted, and loads a version only while its downloaded files hash to the recorded
digest. The registry's alias is set too, as a label for the MLflow UI; nothing reads it for serving.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from indai.platform.errors import UserError

DIGEST_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
# written beside a `models:/` download by MLflow's client (the name and version it asked for), not
# one of the version's stored files: left out, so the digest is the artefact store's files alone
CLIENT_WRITTEN = "registered_model_meta"


class ModelAltered(UserError):
    """A version's files no longer hash to the digest recorded when it was promoted."""


@dataclass(frozen=True)
class Digest:
    sha256: str
    files: int
    bytes: int


def files_digest(folder: Path) -> Digest:
    """One sha256 over a model version's files (as downloaded, less CLIENT_WRITTEN): each file's
    path (relative, '/'-separated) and the sha256 of its bytes, in path order, so a renamed,
    added, removed or changed file changes it. A link or anything but a plain file or folder is
    refused (a download never makes one)."""
    folder = Path(folder)
    entries, total = [], 0
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        rel = path.relative_to(folder).as_posix()
        if rel == CLIENT_WRITTEN:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ModelAltered(f"{rel} in the model's files is not a plain file or folder")
        if path.is_dir():
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
                total += len(block)
        entries.append(f"{len(rel.encode())}:{rel}:{h.hexdigest()}\n")
    outer = hashlib.sha256(b"indai model files 1\n")
    for line in entries:
        outer.update(line.encode())
    return Digest(outer.hexdigest(), len(entries), total)


def check_digest(folder: Path, expected: str, what: str) -> Digest:
    """The folder's digest, or ModelAltered naming both digests when it is not `expected`."""
    got = files_digest(folder)
    if got.sha256 != expected:
        raise ModelAltered(f"{what}: its files in the registry hash to {got.sha256[:16]}..., not to the "
                           f"{expected[:16]}... recorded when it was promoted: they were changed after the promotion. "
                           "It is not served; register and promote a new version, and find out who wrote the registry")
    return got


def who() -> str:
    """Who runs this process, for the record ("cli:<login>")."""
    try:
        login = getpass.getuser()
    except Exception:  # no login name in a container without a passwd entry
        login = str(os.getuid())
    return f"cli:{login}"[:64]


def promote(eng: Engine, tracking_uri: str, name: str, version: int, alias: str, by: str | None = None,
            log=print, member: str | None = None) -> dict:
    """Promote `name/version` under `alias`: hash the version's files, record the version (or check
    it against its record), point the alias at it in the platform database, audit it, and set the
    registry's alias as a label. `by`, `member`: who, for the audit row (default: this process's
    login). Returns what was done."""
    from indai.platform import registry
    from indai.platform.db import Audit, ModelAlias, ModelVersion, utcnow

    registry.check_model_name(name)
    registry.check_alias(alias)
    by = (by or who())[:64]
    with tempfile.TemporaryDirectory(prefix="indai-promote-") as tmp:
        folder, got_version = registry.download(tracking_uri, registry.ModelRef(name, version=version), Path(tmp))
        digest = files_digest(folder)
    with Session(eng) as s:
        known = s.get(ModelVersion, (name, got_version))
    if known is not None and known.digest != digest.sha256:
        with Session(eng) as s, s.begin():  # the refusal is on record too
            s.add(Audit(at=utcnow(), user_id=by, member_id=member, action="model.promote", target=f"{name}@{alias}", status=409,
                        detail=f"version {got_version}: files hash to {digest.sha256}, recorded {known.digest}"))
        raise ModelAltered(f"model {name} version {got_version} was promoted on {known.recorded_at:%Y-%m-%d %H:%M} by "
                           f"{known.recorded_by} with files hashing to {known.digest[:16]}...; they now hash to "
                           f"{digest.sha256[:16]}...: the registry's copy was changed since. Not promoted: register the "
                           "model again as a new version and promote that one")
    with Session(eng) as s, s.begin():
        known = s.get(ModelVersion, (name, got_version))  # (again: another promotion may have recorded it meanwhile)
        if known is not None and known.digest != digest.sha256:
            raise ModelAltered(f"model {name} version {got_version} was recorded meanwhile with other files: promote it again")
        if known is None:
            s.add(ModelVersion(model=name, version=got_version, digest=digest.sha256, files=digest.files, bytes=digest.bytes,
                               recorded_by=by, recorded_at=utcnow()))
        pin = s.get(ModelAlias, (name, alias))
        previous = pin.version if pin else None
        if pin is None:
            pin = ModelAlias(model=name, alias=alias)
            s.add(pin)
        pin.version, pin.set_by, pin.set_at = got_version, by, utcnow()
        s.add(Audit(at=utcnow(), user_id=by, member_id=member, action="model.promote", target=f"{name}@{alias}", status=200,
                    detail=f"version {got_version} (was {previous}), files sha256 {digest.sha256}"))
    try:  # the registry's label, for people reading MLflow; serving never reads it
        with registry.refusals_named(tracking_uri, f"setting alias {alias} of {name}"):
            registry.label_alias(tracking_uri, name, got_version, alias)
    except Exception as e:
        log(f"promoted in the platform, but the registry's alias label was not set ({str(e).splitlines()[0][:200]}); "
            "serving follows the platform's record either way")
    return {"model": name, "alias": alias, "version": got_version, "previous": previous, "sha256": digest.sha256,
            "files": digest.files, "bytes": digest.bytes}


def demote(eng: Engine, tracking_uri: str | None, name: str, alias: str, by: str | None = None, member: str | None = None,
           log=print) -> int:
    """Stop serving `name@alias` (members calling it get 404); the versions' records stay, so a
    version promoted under another alias is still served there. Returns the version it pointed at."""
    from indai.platform import registry
    from indai.platform.db import Audit, ModelAlias, utcnow

    registry.check_model_name(name)
    registry.check_alias(alias)
    by = (by or who())[:64]
    with Session(eng) as s, s.begin():
        pin = s.get(ModelAlias, (name, alias))
        if pin is None:
            raise UserError(f"{name}@{alias} is not promoted: `indai model ls` shows each model's promoted aliases")
        version = pin.version
        s.delete(pin)
        s.add(Audit(at=utcnow(), user_id=by, member_id=member, action="model.demote", target=f"{name}@{alias}", status=200,
                    detail=f"version {version}"))
    if tracking_uri:
        try:  # the registry's label goes too, so MLflow does not show an alias nobody is served
            with registry.refusals_named(tracking_uri, f"deleting alias {alias} of {name}"):
                registry.client(tracking_uri).delete_registered_model_alias(name, alias)
        except Exception as e:
            log(f"demoted in the platform, but the registry's alias label stays ({str(e).splitlines()[0][:200]})")
    return version


def alias_version(eng: Engine, name: str, alias: str) -> int | None:
    """The version `name@alias` was promoted to, or None."""
    from indai.platform.db import ModelAlias

    with Session(eng) as s:
        pin = s.get(ModelAlias, (name, alias))
        return pin.version if pin else None


def version_digest(eng: Engine, name: str, version: int) -> str | None:
    """The sha256 recorded when `name/version` was first promoted, or None if it never was."""
    from indai.platform.db import ModelVersion

    with Session(eng) as s:
        row = s.get(ModelVersion, (name, version))
        return row.digest if row else None


def promoted_aliases(eng: Engine) -> dict[str, dict[str, int]]:
    """{model: {alias: version}} of every promotion."""
    from indai.platform.db import ModelAlias

    out: dict[str, dict[str, int]] = {}
    with Session(eng) as s:
        for pin in s.scalars(select(ModelAlias).order_by(ModelAlias.model, ModelAlias.alias)):
            out.setdefault(pin.model, {})[pin.alias] = pin.version
    return out


def adopt_registry_aliases(eng: Engine, tracking_uri: str, by: str | None = None, log=print) -> list[dict]:
    """Promote, once, every alias the registry holds that the platform has no promotion for: for
    an installation upgraded from a release whose serving followed the registry's aliases. The
    admin runs it knowingly: it trusts the registry as it is at that moment."""
    from indai.platform import registry

    have = promoted_aliases(eng)
    done = []
    for m in registry.list_models(tracking_uri):
        for alias, version in sorted(m["aliases"].items()):
            if alias in have.get(m["name"], {}):
                continue
            try:
                registry.check_alias(alias)
            except UserError:
                log(f"skipped {m['name']}@{alias}: the platform does not take that alias name")
                continue
            done.append(promote(eng, tracking_uri, m["name"], int(version), alias, by, log))
    return done

