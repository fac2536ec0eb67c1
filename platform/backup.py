"""Backups of everything the platform keeps, and restores from them.

What is kept, and where it lives (the embedded default / the chart):
- the platform database (members, users, token hashes, access rules, jobs, calls, feedback,
  KPIs): `INDAI_DB_URL`, else `$INDAI_HOME/platform.db`;
- MLflow's database (experiments, runs, metrics, the model registry, and on the cluster MLflow's
  users and permissions): `INDAI_MLFLOW_DB_URL`, else `$INDAI_HOME/mlflow/mlflow.db`;
- the object store (raw data, dataset versions, checkpoints, mirrored weights, and MLflow's
  artefacts under `mlflow-artifacts/`): the platform's store URI.

A backup is a snapshot in a backup store (a folder or an S3 bucket, never inside the store it
backs up):

    snapshots/<id>/platform.jsonl.gz    every row of the platform database
    snapshots/<id>/mlflow.jsonl.gz      every row of MLflow's database
    snapshots/<id>/objects.jsonl.gz     [key, size, change tag, sha256] for every object
    snapshots/<id>/manifest.json        written last: a snapshot without it does not exist
    blobs/<sha256[:2]>/<sha256>         object contents, shared by all snapshots
    config.json, locks/                 the store's format and keys, the runs in progress
                                        (platform/backup_store.py)

With a backup key (INDAI_BACKUP_KEY_FILE or INDAI_BACKUP_KEY, from `indai admin backup-key`) a
new backup store is sealed: every dump, list, manifest and content is encrypted and authenticated
(platform/encryption.py), and contents are stored under keyed names instead of their sha256, so
whoever reads the store without the key learns neither what is in it nor which files it holds.
A store is sealed or not from its first snapshot on, and `config.json` records which, and which
keys open it.

Objects are kept by content, so a snapshot holds only what changed since the one before: an
object whose size and change tag (S3 ETag, a file's mtime) match the previous snapshot's record
is not read again. Every snapshot is complete by itself, and `--keep N` deletes older snapshots
and then the contents no kept snapshot names.

The databases are dumped as rows (JSON lines, typed values tagged), not as SQL: the dump is read
in one consistent snapshot of each database (a read-only REPEATABLE READ transaction on
PostgreSQL, SQLite's online backup), and a restore recreates the schema with the owners'
migrations (indai's, MLflow's tracking and auth migrations) at the revision the backup was made
at, loads the rows, then upgrades to the installed code's newest revision. So a backup made by
an older release restores into a newer one, and the embedded default's SQLite files restore into
the cluster's PostgreSQL. Nothing in a backup is ever executed or unpickled: table and column
names are matched against the schema the migrations made, object keys pass the store's key
checks, and each content is checked against its sha256 before it is written back.

Databases are dumped before the objects are listed: a row that names an object (a dataset
version, a model's artefacts) was written after that object, so the snapshot holds it.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import re
import secrets
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator

from indai.platform import progress
from indai.platform.backup_store import (BLOBS, SNAPSHOTS, BackupError, Repository, open_backup_store,
                                         open_repository)
from indai.platform.storage import LocalStore, ObjectStore, S3Store, StoreError, open_store, sha256_file, validate_key

MANIFEST_FORMAT = 1
MANIFEST = "manifest.json"
DATABASES = ("platform", "mlflow")
_SNAPSHOT_ID = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{6}")  # UTC to the millisecond: ids sort as snapshots were made
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BATCH = 1000
# each statement of a dump or a load (a fetch or an insert of _BATCH rows) may take this long, far
# more than it needs, and no longer: a database that stops answering fails the command instead of
# hanging the nightly job. Migrations and drops run without a limit, as `db.upgrade` does.
DB_TIMEOUT_S = 900.0


# ---- where the platform's state is ---------------------------------------------------------

@dataclass
class Sources:
    """The three things a backup holds (and a restore writes)."""
    platform_db: str
    mlflow_db: str | None
    store_uri: str


def mlflow_database_url() -> str | None:
    """INDAI_MLFLOW_DB_URL ("none": MLflow's database is not the platform's to keep, as with an
    external MLflow server), else the embedded MLflow server's SQLite file. On Kubernetes it must
    be given: MLflow's database is the release's PostgreSQL."""
    from indai.platform.settings import home

    url = os.environ.get("INDAI_MLFLOW_DB_URL", "").strip()
    if url == "none":  # an external MLflow server, whose database its owner keeps
        return None
    if url:
        return url
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise BackupError("INDAI_MLFLOW_DB_URL is not set in this pod: a backup on the cluster needs MLflow's database "
                          "(the chart's backup CronJob sets it); set it to postgresql+psycopg://user:password@host/mlflow")
    path = home() / "mlflow" / "mlflow.db"
    return f"sqlite:///{path}"


def current_sources() -> Sources:
    from indai.platform import db
    from indai.platform.settings import load_settings

    return Sources(platform_db=db.database_url(), mlflow_db=mlflow_database_url(), store_uri=load_settings().store_uri)


def _same_server(a: ObjectStore, b: ObjectStore) -> bool:
    return getattr(a, "endpoint", None) == getattr(b, "endpoint", None)


def _inside(inner: ObjectStore, outer: ObjectStore) -> bool:
    """Whether `inner`'s keys are a part of `outer`'s (the same server, and a folder below)."""
    if not any(isinstance(inner, kind) and isinstance(outer, kind) for kind in (S3Store, LocalStore)):
        return False  # a folder and a bucket never overlap
    if not _same_server(inner, outer):
        return False
    if isinstance(inner, S3Store):
        return inner.bucket == outer.bucket and (not outer.base or inner.base == outer.base
                                                 or inner.base.startswith(outer.base + "/"))
    a, b = inner.root.resolve(), outer.root.resolve()
    return a == b or b in a.parents


def _check_apart(store: ObjectStore, backups: ObjectStore) -> None:
    if _inside(backups, store) or _inside(store, backups):
        raise BackupError(f"the backup store {backups.uri} and the platform's store {store.uri} overlap: a backup must "
                          "live apart from what it protects (another folder, bucket or server)")


def _redact(url: str | None) -> str | None:
    if not url:
        return url
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


# ---- values ------------------------------------------------------------------------------------

def _encode(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, datetime):  # an instant with a zone is written in UTC
        return {"$dt": (v.astimezone(timezone.utc) if v.tzinfo else v).isoformat()}
    if isinstance(v, date):
        return {"$d": v.isoformat()}
    if isinstance(v, dtime):
        return {"$t": v.isoformat()}
    if isinstance(v, Decimal):
        return {"$n": str(v)}
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (dict, list)):
        return {"$j": v}
    raise TypeError(f"a value of type {type(v).__name__} cannot be written to a backup")


_DECODERS: dict[str, Callable] = {
    "$b": lambda s: base64.b64decode(s, validate=True),
    "$dt": datetime.fromisoformat,
    "$d": date.fromisoformat,
    "$t": dtime.fromisoformat,
    "$n": Decimal,
    "$j": lambda v: v,
}


def _decode(v, where: str):
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in _DECODERS:
            raise BackupError(f"{where}: a value {str(v)[:80]} is not one a backup writes; the dump is damaged")
        tag, raw = next(iter(v.items()))
        try:
            return _DECODERS[tag](raw)
        except (ValueError, TypeError, ArithmeticError) as e:
            raise BackupError(f"{where}: a value {str(v)[:80]} cannot be read ({e}); the dump is damaged") from None
    if isinstance(v, list):
        raise BackupError(f"{where}: an untagged list is not a value a backup writes; the dump is damaged")
    return v


# ---- databases ---------------------------------------------------------------------------------

def _is_version_table(name: str) -> bool:
    return name.startswith("alembic_version")


def _engine(url: str):
    from indai.platform import db

    return db.engine(url, query_timeout_s=DB_TIMEOUT_S)


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def _sqlite_snapshot(url: str, into: Path) -> str:
    """A consistent copy of a SQLite database (SQLite's online backup: a writer beside it, such as
    the embedded MLflow server, is not stopped and not seen half-way)."""
    import sqlite3

    src = sqlite3.connect(f"file:{_sqlite_path(url)}?mode=ro", uri=True)
    dst = sqlite3.connect(into)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return f"sqlite:///{into}"


def dump_database(url: str, out: Path, work: Path) -> dict:
    """Every row of every table of the database at `url`, read in one consistent snapshot, into
    the gzip JSON-lines file `out`. Returns the tables' row counts and the migration revisions."""
    from sqlalchemy import MetaData, select
    from sqlalchemy.exc import SQLAlchemyError

    if url.startswith("sqlite:///"):
        if not _sqlite_path(url).is_file():
            raise BackupError(f"the database {url} does not exist: nothing to back up there (is INDAI_HOME right?)")
        url = _sqlite_snapshot(url, work / f"snap-{secrets.token_hex(4)}.db")
    eng = _engine(url)
    counts: dict[str, int] = {}
    revisions: dict[str, list[str]] = {}
    try:
        with eng.connect() as conn:
            if eng.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with gzip.open(out, "wt", encoding="utf-8", compresslevel=6) as fh:
                md = MetaData()
                md.reflect(bind=conn)
                for table in md.sorted_tables:
                    if _is_version_table(table.name):
                        revisions[table.name] = sorted(r[0] for r in conn.execute(select(*table.c)))
                        continue
                    columns = [c for c in table.c if c.computed is None]
                    fh.write(json.dumps({"table": table.name, "columns": [c.name for c in columns]}) + "\n")
                    query = select(*columns)
                    pk = list(table.primary_key.columns)
                    if pk:
                        query = query.order_by(*pk)
                    n = 0
                    for row in conn.execution_options(stream_results=True, yield_per=_BATCH).execute(query):
                        fh.write(json.dumps([_encode(v) for v in row]) + "\n")
                        n += 1
                    counts[table.name] = n
    except SQLAlchemyError as e:
        said = str(getattr(e, "orig", None) or e).splitlines()[0][:300]
        raise BackupError(f"reading the database {_redact(url)} failed ({said}); this snapshot was not made: check the "
                          "database and run the backup again") from None
    finally:
        eng.dispose()
    return {"tables": counts, "revisions": revisions}


def _read_dump(path: Path) -> Iterator[tuple[str, list[str], Iterator[list]]]:
    """(table, columns, rows) per table of a dump, in the order it was written (parents first)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = iter(fh)
        pending = next(lines, None)
        while pending is not None:
            try:
                head = json.loads(pending)
            except ValueError:
                raise BackupError(f"{path.name}: a line is not JSON; the dump is damaged") from None
            if not (isinstance(head, dict) and isinstance(head.get("table"), str)
                    and isinstance(head.get("columns"), list) and all(isinstance(c, str) for c in head["columns"])):
                raise BackupError(f"{path.name}: a table header was expected; the dump is damaged")
            box: dict = {"next": None}

            def rows(head=head, box=box):
                for line in lines:
                    try:
                        value = json.loads(line)
                    except ValueError:
                        raise BackupError(f"{path.name}: a line of {head['table'][:80]} is not JSON; the dump is damaged") from None
                    if isinstance(value, dict):
                        box["next"] = line
                        return
                    if not isinstance(value, list) or len(value) != len(head["columns"]):
                        raise BackupError(f"{path.name}: a row of {head['table']} does not match its columns; "
                                          "the dump is damaged")
                    yield value

            table_rows = rows()
            yield head["table"], head["columns"], table_rows
            for _ in table_rows:  # what the caller left unread
                pass
            pending = box["next"]


def _create_schema(kind: str, url: str, eng, revisions: dict[str, list[str]]) -> None:
    """The schema the backup's rows were read from: the owners' migrations, at its revisions."""
    from alembic import command
    from alembic.util import CommandError

    from indai.platform import db

    def one(table: str) -> str | None:
        found = revisions.get(table) or []
        if len(found) > 1:
            raise BackupError(f"the {kind} dump records {len(found)} revisions in {table}; indai restores one")
        return found[0] if found else None

    try:
        if kind == "platform":
            from alembic.config import Config

            rev = one("alembic_version")
            if rev is None:
                raise BackupError("the platform dump records no schema revision; it was not made by `indai admin backup`")
            cfg = Config()
            cfg.set_main_option("script_location", str(db.MIGRATIONS))
            with eng.begin() as conn, db.unbounded(conn):
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, rev)
        else:
            from mlflow.store.db.utils import _get_alembic_config
            from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

            rev = one("alembic_version")
            if rev is None:
                raise BackupError("the MLflow dump records no schema revision; it was not made by `indai admin backup`")
            cfg = _get_alembic_config(url)
            with eng.begin() as conn, db.unbounded(conn):
                # MLflow's first tables come from its initial models, its migrations start after
                # them (committed first: MLflow's migration runner opens a connection of its own)
                InitialBase.metadata.create_all(conn)
            with eng.begin() as conn, db.unbounded(conn):
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, rev)
            auth_rev = one("alembic_version_auth")
            if auth_rev is not None:
                _mlflow_auth_utils().migrate(eng, auth_rev)
    except CommandError as e:
        raise BackupError(f"the {kind} dump was made at a schema revision this installation does not know ({e}): "
                          "restore it with the indai and MLflow versions in the backup's manifest, then upgrade") from None


def _mlflow_auth_utils():
    """MLflow's auth migrations; importing them imports MLflow's server, whose FastAPI app warns
    about a Starlette module on every import (nothing indai can act on)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")
        from mlflow.server.auth.db import utils
    return utils


def _upgrade_to_head(kind: str, eng) -> None:
    from indai.platform import db

    if kind == "platform":
        db.upgrade(eng)
        return
    from sqlalchemy import inspect

    from mlflow.store.db.utils import _upgrade_db

    _upgrade_db(eng)
    if "alembic_version_auth" in inspect(eng).get_table_names():
        _mlflow_auth_utils().migrate(eng, "head")


def _drop_everything(eng) -> list[str]:
    from sqlalchemy import MetaData

    md = MetaData()
    md.reflect(bind=eng)
    names = [t.name for t in md.sorted_tables]
    with eng.begin() as conn:
        from indai.platform import db

        with db.unbounded(conn):
            md.drop_all(bind=conn)
    return names


def _occupied(kind: str, url: str, tables: list[str]) -> BackupError:
    return BackupError(f"the {kind} database {_redact(url)} already holds {len(tables)} tables "
                       f"({', '.join(sorted(tables)[:5])}{', ...' if len(tables) > 5 else ''}): restore into a new, "
                       "empty database, or pass --replace to drop them and everything in them first")


def _tables_in(url: str) -> list[str]:
    from sqlalchemy import inspect

    if url.startswith("sqlite:///") and not _sqlite_path(url).exists():
        return []
    eng = _engine(url)
    try:
        return inspect(eng).get_table_names()
    finally:
        eng.dispose()


def _other_sessions(url: str) -> list[str]:
    """Who else is connected to a PostgreSQL database: its user, application and address, as
    far as PostgreSQL shows them to this user (SQLite: nothing to ask, `indai down` is checked)."""
    from sqlalchemy import text

    if not url.startswith("postgresql"):
        return []
    eng = _engine(url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(text(
                "SELECT usename, application_name, client_addr FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).all()
    finally:
        eng.dispose()
    return [f"{user or '?'}" + (f" ({app[:40]})" if app else "") + (f" from {addr}" if addr else "")
            for user, app, addr in rows]


def restore_database(kind: str, url: str, dump: Path, revisions: dict[str, list[str]], replace: bool,
                     say: Callable[[str], None]) -> dict[str, int]:
    """Load a dump into the database at `url`: it must hold no tables, or `replace` drops them
    first. The schema is made by migrations at the dump's revisions, the rows are loaded in one
    transaction, then the schema is upgraded to this installation's newest revision."""
    from sqlalchemy import MetaData, delete, inspect, text


    if url.startswith("sqlite:///"):
        _sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
    eng = _engine(url)
    try:
        existing = inspect(eng).get_table_names()
        if existing and not replace:
            raise _occupied(kind, url, existing)
        if existing:
            say(f"{kind} database: dropping {len(existing)} tables (--replace)")
            _drop_everything(eng)
        _create_schema(kind, url, eng, revisions)
        md = MetaData()
        md.reflect(bind=eng)
        counts: dict[str, int] = {}
        with eng.begin() as conn:
            # rows a migration seeds (MLflow's Default experiment) come back from the dump
            for table in reversed(md.sorted_tables):
                if not _is_version_table(table.name):
                    conn.execute(delete(table))
            for name, columns, rows in _read_dump(dump):
                table = md.tables.get(name)
                if table is None or _is_version_table(name):
                    raise BackupError(f"the {kind} dump has a table {name[:80]!r} that the schema at its revision does "
                                      "not have; the dump is damaged or was not made by `indai admin backup`")
                unknown = [c for c in columns if c not in table.c]
                if unknown:
                    raise BackupError(f"the {kind} dump's table {name} has columns the schema does not have "
                                      f"({', '.join(c[:40] for c in unknown[:5])}); the dump is damaged")
                keep = [i for i, c in enumerate(columns) if table.c[c].computed is None]
                names = [columns[i] for i in keep]
                # SQLite keeps no zone: indai writes UTC there (tenancy.aware reads it so), and a
                # naive time into PostgreSQL's timestamptz would be read in the session's zone
                zoned = {columns[i] for i in keep if getattr(table.c[columns[i]].type, "timezone", False)}
                n, batch = 0, []
                for row in rows:
                    where = f"{kind} dump, table {name}, row {n + 1}"
                    record = {names[j]: _decode(row[i], where) for j, i in enumerate(keep)}
                    for c in zoned:
                        v = record[c]
                        if isinstance(v, datetime):  # SQLite stores the wall time it is given
                            record[c] = v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)
                    batch.append(record)
                    n += 1
                    if len(batch) >= _BATCH:
                        conn.execute(table.insert(), batch)
                        batch = []
                if batch:
                    conn.execute(table.insert(), batch)
                counts[name] = n
            if eng.dialect.name == "postgresql":
                # identity and serial columns: the next value after the largest restored one
                for table in md.sorted_tables:
                    for col in table.primary_key.columns:
                        seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                           {"t": table.name, "c": col.name}).scalar()
                        if seq:
                            conn.execute(text(f'SELECT setval(:s, COALESCE((SELECT MAX("{col.name}") FROM "{table.name}"), 0) + 1, false)'),
                                         {"s": seq})
        _upgrade_to_head(kind, eng)
        return counts
    finally:
        eng.dispose()


# ---- snapshots ----------------------------------------------------------------------------------

def _new_id(after: str | None = None) -> str:
    """A snapshot id (UTC to the millisecond) that sorts after `after`, the newest so far, even
    within the same millisecond or with a clock that stepped back."""
    from datetime import timedelta

    now = datetime.now(timezone.utc)
    at = now.replace(microsecond=now.microsecond // 1000 * 1000)
    if after:
        last = datetime.strptime(after.split("-", 1)[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)
        at = max(at, last + timedelta(milliseconds=1))
    return at.strftime("%Y%m%dT%H%M%S") + f"{at.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def _snapshot_ids(repo: Repository) -> tuple[list[str], list[str]]:
    """The ids of the snapshots with a manifest, and of those without one (a backup that is
    running, or one that stopped half-way), oldest first."""
    whole, partial = [], []
    for name in repo.children(SNAPSHOTS):
        if _SNAPSHOT_ID.fullmatch(name):  # anything else is not indai's
            (whole if repo.exists(f"{SNAPSHOTS}/{name}/{MANIFEST}") else partial).append(name)
    return sorted(whole), sorted(partial)


def list_snapshots(repo: Repository, damaged: list[tuple[str, str]] | None = None) -> list[dict]:
    """The complete, readable snapshots in a backup store, oldest first (each one's manifest).
    Snapshots whose manifest cannot be read are left out, and added to `damaged` as (id, why)."""
    found = []
    for name in _snapshot_ids(repo)[0]:
        try:
            found.append(read_manifest(repo, name))
        except BackupError as e:
            if damaged is not None:
                damaged.append((name, str(e)))
    return found


def read_manifest(repo: Repository, snapshot: str) -> dict:
    if not _SNAPSHOT_ID.fullmatch(snapshot or ""):
        raise BackupError(f"{str(snapshot)[:80]!r} is not a snapshot id (like 20261129T203000123Z-1a2b3c): "
                          f"`indai admin backups --at {repo.uri}` lists them")
    key = f"{SNAPSHOTS}/{snapshot}/{MANIFEST}"
    try:
        raw = repo.get_bytes(key)
    except StoreError:
        if repo.exists(key):
            raise
        raise BackupError(f"no complete snapshot {snapshot} in {repo.uri}: `indai admin backups --at {repo.uri}` "
                          "lists them") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BackupError(f"the manifest of snapshot {snapshot} is not JSON; the snapshot is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or manifest.get("id") != snapshot:
        raise BackupError(f"the manifest of snapshot {snapshot} is not one this indai writes (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else '?'}, indai reads {MANIFEST_FORMAT})")
    return manifest


def pick_snapshot(repo: Repository, snapshot: str | None, say: Callable[[str], None] = lambda s: None) -> dict:
    """The snapshot with this id, or the newest readable one ("latest" or None)."""
    if snapshot and snapshot != "latest":
        return read_manifest(repo, snapshot)
    damaged: list[tuple[str, str]] = []
    found = list_snapshots(repo, damaged)
    if not found:
        if damaged:
            raise BackupError(f"{repo.uri} holds no readable snapshot: " + "; ".join(why for _i, why in damaged[-3:]))
        raise BackupError(f"{repo.uri} holds no complete snapshot: make one with `indai admin backup --to {repo.uri}`")
    newer = [i for i, _why in damaged if i > found[-1]["id"]]
    if newer:
        say(f"the newest snapshot{'s' if len(newer) > 1 else ''} ({', '.join(newer)}) cannot be read; using "
            f"{found[-1]['id']} (`indai admin backups --at {repo.uri}` says why)")
    return found[-1]


def _fetch_checked(repo: Repository, key: str, sha: str, into: Path) -> Path:
    repo.get_file(key, into)
    got = sha256_file(into)
    if got != sha:
        raise BackupError(f"{key} in {repo.uri} does not match its checksum (sha256 {got[:12]}..., the manifest says "
                          f"{sha[:12]}...): this copy is damaged; restore another snapshot")
    return into


def _object_records(repo: Repository, manifest: dict, work: Path) -> list[tuple[str, int, str, str]]:
    meta = manifest.get("objects") or {}
    if not _SHA256.fullmatch(str(meta.get("sha256", ""))):
        raise BackupError(f"snapshot {manifest['id']}: its manifest has no checksum for the object list; it is damaged")
    path = _fetch_checked(repo, f"{SNAPSHOTS}/{manifest['id']}/objects.jsonl.gz", meta["sha256"],
                          work / f"objects-{manifest['id']}.jsonl.gz")
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                key, size, tag, sha = json.loads(line)
                validate_key(key)
            except (ValueError, TypeError, StoreError) as e:
                raise BackupError(f"snapshot {manifest['id']}: object record {n} is not valid ({str(e)[:120]})") from None
            if not isinstance(size, int) or not isinstance(tag, str) or not _SHA256.fullmatch(str(sha)):
                raise BackupError(f"snapshot {manifest['id']}: object record {n} is not valid")
            records.append((key, size, tag, sha))
    return records


def backup(sources: Sources, backups_uri: str, keep: int | None = None, *, stages: progress.Stages | None = None,
           say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """One snapshot of the platform's databases and object store in the backup store; returns its
    manifest. `keep`: afterwards, keep only the newest `keep` snapshots and the contents they name."""
    import importlib.metadata as md

    if keep is not None and keep < 1:
        raise BackupError(f"--keep {keep}: keep at least the snapshot just made (1 or more)")
    stages = stages or progress.Stages()
    store = open_store(sources.store_uri)
    _check_apart(store, open_backup_store(backups_uri))
    repo = open_repository(backups_uri, create=True)
    with repo.running("backup", say, writes=True) as lock:
        previous = list_snapshots(repo)
        # after every folder there, readable, damaged or unfinished, so a clock that stepped back
        # cannot sort the new snapshot before one of them
        snap = _new_id(max((i for ids in _snapshot_ids(repo) for i in ids), default=None))
        prefix = f"{SNAPSHOTS}/{snap}"
        manifest: dict = {"format": MANIFEST_FORMAT, "id": snap, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "versions": {p: md.version(p) for p in ("indai", "mlflow", "sqlalchemy")},
                          "sources": {"platform_db": _redact(sources.platform_db), "mlflow_db": _redact(sources.mlflow_db),
                                      "store": store.uri},
                          "sealed": repo.key is not None, "databases": {}}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="indai-backup-") as tmp:
            work = Path(tmp)
            for kind, url in (("platform", sources.platform_db), ("mlflow", sources.mlflow_db)):
                if not url:
                    continue
                with stages.stage(f"dump the {kind} database"):
                    out = work / f"{kind}.jsonl.gz"
                    info = dump_database(url, out, work)
                    repo.put_file(f"{prefix}/{kind}.jsonl.gz", out)
                    info.update(sha256=sha256_file(out), bytes=out.stat().st_size)
                    manifest["databases"][kind] = info
                    say(f"{kind} database: {sum(info['tables'].values())} rows in {len(info['tables'])} tables")
            with stages.stage("copy the object store"):
                known: dict[str, tuple[int, str, str]] = {}
                if previous:
                    try:
                        for key, size, tag, sha in _object_records(repo, previous[-1], work):
                            known[key] = (size, tag, sha)
                    except BackupError as e:  # then every object is read again; this snapshot is whole all the same
                        say(f"the previous snapshot's object list cannot be used ({e}); reading every object")
                have = repo.blob_names()
                stats = store.stat_all("")
                records, new_bytes, new_blobs, reread, vanished = [], 0, 0, 0, 0
                for key, (size, tag) in progress.bar(sorted(stats.items()), desc="objects", total=len(stats)):
                    was = known.get(key)
                    if was and was[0] == size and was[1] == tag and tag and repo.blob_name(was[2]) in have:
                        records.append([key, size, tag, was[2]])
                        continue
                    reread += 1
                    local = work / "object"
                    try:
                        store.get_file(key, local)
                    except StoreError:
                        if store.exists(key):
                            raise
                        vanished += 1  # deleted since the listing (an old checkpoint pruned): not in this snapshot
                        continue
                    sha = sha256_file(local)
                    if repo.blob_name(sha) not in have:
                        repo.put_file(repo.blob_key(sha), local)
                        have.add(repo.blob_name(sha))
                        new_blobs += 1
                        new_bytes += local.stat().st_size
                    records.append([key, local.stat().st_size, tag, sha])
                    local.unlink()
                listing = work / "objects.jsonl.gz"
                with gzip.open(listing, "wt", encoding="utf-8") as fh:
                    for r in records:
                        fh.write(json.dumps(r) + "\n")
                repo.put_file(f"{prefix}/objects.jsonl.gz", listing)
                manifest["objects"] = {"count": len(records), "bytes": sum(r[1] for r in records), "read": reread,
                                       "new_blobs": new_blobs, "new_bytes": new_bytes, "vanished": vanished,
                                       "sha256": sha256_file(listing)}
                say(f"objects: {len(records)} ({manifest['objects']['bytes'] / 1e6:.1f} MB); read {reread}, "
                    f"{new_blobs} new contents ({new_bytes / 1e6:.1f} MB) stored"
                    + (f"; {vanished} deleted while the backup ran" if vanished else ""))
            manifest["seconds"] = round(time.perf_counter() - started, 2)
            repo.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            try:
                repo.check_store_key()
            except BackupError:
                repo.delete_prefix(prefix)  # unreadable; its contents go with the next prune
                raise
            if keep is not None:
                with stages.stage("prune old snapshots"), repo.alone(lock, "prune") as stale_locks:
                    if isinstance(stale_locks, str):
                        say(f"{repo.uri} is also used by {stale_locks}: old snapshots are pruned by the next backup")
                    else:
                        manifest["pruned"] = prune(repo, keep, work, say, stale_locks)
    return manifest


def prune(repo: Repository, keep: int, work: Path, say: Callable[[str], None], stale_locks: list[str] = ()) -> dict:
    """Delete all but the newest `keep` snapshots, the folders of snapshots that never finished,
    the locks of runs that stopped, then every content no kept snapshot names. The caller holds
    the store alone (`Repository.alone`). Snapshots whose manifest cannot be read are neither
    kept nor deleted: their contents go, their folders stay for someone to look at."""
    damaged: list[tuple[str, str]] = []
    snaps = list_snapshots(repo, damaged)
    gone = snaps[:-keep] if len(snaps) > keep else []
    for m in gone:
        repo.delete(f"{SNAPSHOTS}/{m['id']}/{MANIFEST}")  # first: the snapshot stops existing at once
        repo.delete_prefix(f"{SNAPSHOTS}/{m['id']}")
    unfinished = _snapshot_ids(repo)[1]
    for snap in unfinished:
        repo.delete_prefix(f"{SNAPSHOTS}/{snap}")
    for key in stale_locks:
        repo.delete(key)
    named = set()
    for m in snaps[len(gone):]:
        named.update(repo.blob_name(sha) for _k, _s, _t, sha in _object_records(repo, m, work))
    blobs = [k for k in repo.list(BLOBS) if k.rsplit("/", 1)[-1] not in named]
    for key in blobs:
        repo.delete(key)
    if gone or blobs or unfinished:
        say(f"pruned {len(gone)} snapshots, {len(unfinished)} unfinished ones and {len(blobs)} contents no kept "
            "snapshot names")
    if damaged:
        say(f"{len(damaged)} snapshots cannot be read and were left as they are ({', '.join(i for i, _w in damaged)}): "
            "`indai admin backups` says why; delete their folders once nobody needs to look at them")
    return {"snapshots": [m["id"] for m in gone], "unfinished": unfinished, "blobs": len(blobs),
            "locks": len(stale_locks), "damaged": [i for i, _w in damaged]}


def _fetch_dumps(repo: Repository, manifest: dict, work: Path) -> dict[str, tuple[dict, Path]]:
    dumps = {}
    for kind, info in (manifest.get("databases") or {}).items():
        if kind not in DATABASES or not isinstance(info, dict) or not _SHA256.fullmatch(str(info.get("sha256", ""))):
            raise BackupError(f"snapshot {manifest['id']}: its manifest names a database {str(kind)[:40]!r} indai does not "
                              "keep, or one without a checksum; it is damaged")
        path = _fetch_checked(repo, f"{SNAPSHOTS}/{manifest['id']}/{kind}.jsonl.gz", info["sha256"],
                              work / f"{kind}.jsonl.gz")
        dumps[kind] = (info, path)
    return dumps


def verify(backups_uri: str, snapshot: str | None = None, restore_test: bool = False,
           say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Read a snapshot back in full: its dumps and every content it names, each checked against
    its sha256. `restore_test`: then also restore both databases into scratch SQLite files, with
    this installation's migrations up to its newest revision, and count their rows (a drill: the
    snapshot restores with the code installed now). Returns what was checked; BackupError names
    the first thing damaged, missing or not restorable."""
    repo = open_repository(backups_uri)
    with repo.running("verify", say), tempfile.TemporaryDirectory(prefix="indai-verify-") as tmp:
        manifest = pick_snapshot(repo, snapshot, say)
        work = Path(tmp)
        dumps = _fetch_dumps(repo, manifest, work)
        rows = {}
        for kind, (_info, path) in dumps.items():
            rows[kind] = sum(sum(1 for _ in r) for _t, _c, r in _read_dump(path))
        records = _object_records(repo, manifest, work)
        shas = sorted({sha for *_x, sha in records})
        for sha in progress.bar(shas, desc="contents", total=len(shas)):
            _fetch_checked(repo, repo.blob_key(sha), sha, work / "blob").unlink()
        restored = {}
        if restore_test:
            for kind, (info, path) in dumps.items():
                counts = restore_database(kind, f"sqlite:///{work / (kind + '-drill.db')}", path, info.get("revisions") or {},
                                          False, say)
                if counts != (info.get("tables") or {}):
                    raise BackupError(f"snapshot {manifest['id']}: the {kind} dump restored {sum(counts.values())} rows, its "
                                      f"manifest counts {sum((info.get('tables') or {}).values())}; it is damaged")
                restored[kind] = sum(counts.values())
    return {"snapshot": manifest["id"], "rows": rows, "objects": len(records), "contents": len(shas),
            "sealed": repo.key is not None, "restored": restored}


def _embedded_services_running() -> bool:
    from indai.platform.settings import read_services

    state = read_services()
    pid = state.get("mlflow_pid")
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def restore(targets: Sources, backups_uri: str, snapshot: str | None = None, replace: bool = False, *,
            stages: progress.Stages | None = None, say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Write a snapshot back: both databases (new and empty, or `replace`) and the object store
    (empty, or `replace`: then its objects that are not in the snapshot are deleted at the end)."""
    stages = stages or progress.Stages()
    store = open_store(targets.store_uri)
    _check_apart(store, open_backup_store(backups_uri))
    if not os.environ.get("INDAI_DB_URL") and not os.environ.get("INDAI_MLFLOW_DB_URL") and _embedded_services_running():
        raise BackupError("the embedded services are running on the databases a restore would write: run `indai down` "
                          "first, and `indai up` after the restore")
    repo = open_repository(backups_uri)
    present = store.stat_all("")
    if present and not replace:
        raise BackupError(f"the store {store.uri} already holds {len(present)} objects: restore into an empty store, or "
                          "pass --replace to make it hold exactly the snapshot's objects")
    with repo.running("restore", say), tempfile.TemporaryDirectory(prefix="indai-restore-") as tmp:
        manifest = pick_snapshot(repo, snapshot, say)
        result: dict = {"snapshot": manifest["id"], "databases": {}}
        work = Path(tmp)
        with stages.stage("check the snapshot"):
            dumps = _fetch_dumps(repo, manifest, work)
            records = _object_records(repo, manifest, work)
        if "mlflow" in dumps and not targets.mlflow_db:
            raise BackupError("the snapshot holds MLflow's database but no target is set: set INDAI_MLFLOW_DB_URL")
        urls = {kind: targets.platform_db if kind == "platform" else targets.mlflow_db for kind in dumps}
        for kind, url in urls.items():  # every target is checked before anything is written
            if not replace and (tables := _tables_in(url)):
                raise _occupied(kind, url, tables)
            if replace and (others := _other_sessions(url)):
                raise BackupError(f"the {kind} database {_redact(url)} is in use by {len(others)} other session"
                                  f"{'s' if len(others) > 1 else ''} ({', '.join(sorted(set(others))[:5])}): stop what "
                                  "uses it before a restore replaces it (on the cluster: the gateway, MLflow and the "
                                  "serving RayService, README \"Backups and restores\"), then run the restore again")
        for kind, (info, path) in dumps.items():
            url = urls[kind]
            with stages.stage(f"restore the {kind} database"):
                counts = restore_database(kind, url, path, info.get("revisions") or {}, replace, say)
                expected = info.get("tables") or {}
                if counts != expected:
                    raise BackupError(f"the {kind} dump's rows ({counts}) are not what its manifest counts ({expected})")
                result["databases"][kind] = sum(counts.values())
                say(f"{kind} database: {sum(counts.values())} rows in {len(counts)} tables restored")
        with stages.stage("restore the object store"):
            wanted = set()
            for key, size, _tag, sha in progress.bar(records, desc="objects", total=len(records)):
                wanted.add(key)
                local = _fetch_checked(repo, repo.blob_key(sha), sha, work / "object")
                store.put_file(key, local)
                local.unlink()
            extra = sorted(set(present) - wanted)
            for key in extra:
                store.delete(key)
            result.update(objects=len(records), deleted=len(extra))
            say(f"objects: {len(records)} restored" + (f", {len(extra)} not in the snapshot deleted (--replace)" if extra else ""))
    return result
