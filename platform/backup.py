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
    config.json                         the store's format, and the key id when it is sealed
    locks/<random>.json                 one per run in progress (see LOCK_* below)

With a backup key (INDAI_BACKUP_KEY_FILE or INDAI_BACKUP_KEY, from `indai admin backup-key`) a
new backup store is sealed: every dump, list, manifest and content is encrypted and authenticated
(platform/encryption.py), and contents are stored under keyed names instead of their sha256, so
whoever reads the store without the key learns neither what is in it nor which files it holds.
A store is sealed or not from its first snapshot on, and `config.json` records which.

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
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator

from indai.platform import progress
from indai.platform.encryption import Key, SealError, open_bytes, open_file, seal_bytes, seal_file
from indai.platform.errors import UserError
from indai.platform.storage import LocalStore, ObjectStore, S3Store, StoreError, open_store, sha256_file, validate_key

FORMAT = 1
SNAPSHOTS = "snapshots"
BLOBS = "blobs"
MANIFEST = "manifest.json"
CONFIG = "config.json"  # the backup store's own settings: its format and whether (and with which key) it is sealed
LOCKS = "locks"
SEALED = "aes-256-gcm"
# Runs on one backup store announce themselves with a lock file each (`locks/<random>.json`,
# rewritten every LOCK_REFRESH_S). A run that prunes takes an exclusive lock and prunes only when
# no other run holds one; every other run waits while an exclusive lock is held. A lock not
# rewritten for LOCK_STALE_S is a crashed run's and is ignored (and deleted by the next prune).
LOCK_REFRESH_S = 300.0
LOCK_STALE_S = 1800.0
LOCK_WAIT_S = 900.0
_LOCK_KEY = re.compile(LOCKS + r"/[0-9a-f]{16}\.json")
DATABASES = ("platform", "mlflow")
_SNAPSHOT_ID = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{6}")  # UTC to the millisecond: ids sort as snapshots were made
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BATCH = 1000
# each statement of a dump or a load (a fetch or an insert of _BATCH rows) may take this long, far
# more than it needs, and no longer: a database that stops answering fails the command instead of
# hanging the nightly job. Migrations and drops run without a limit, as `db.upgrade` does.
DB_TIMEOUT_S = 900.0


class BackupError(UserError):
    """A backup or restore that cannot go on; the message says what to do."""


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


def open_backup_store(uri: str) -> ObjectStore:
    """The backup store a URI names: a folder, or an s3:// bucket. For a bucket, each of
    INDAI_BACKUP_S3_ENDPOINT, _ACCESS_KEY, _SECRET_KEY and _SECURE that is set is used (a backup
    store on another server than the store it protects), and the platform's INDAI_S3_* setting
    otherwise."""
    if isinstance(uri, str) and uri.startswith("s3://"):
        env = os.environ.get
        return S3Store(uri, endpoint=env("INDAI_BACKUP_S3_ENDPOINT") or None,
                       access_key=env("INDAI_BACKUP_S3_ACCESS_KEY") or None,
                       secret_key=env("INDAI_BACKUP_S3_SECRET_KEY") or None,
                       secure=env("INDAI_BACKUP_S3_SECURE") or None)
    return open_store(uri)


def backup_key_from_env() -> Key | None:
    """The backup key: the file INDAI_BACKUP_KEY_FILE names (the chart mounts it from a Secret),
    or INDAI_BACKUP_KEY itself; None when neither is set."""
    path = os.environ.get("INDAI_BACKUP_KEY_FILE", "").strip()
    text = os.environ.get("INDAI_BACKUP_KEY", "")
    if path and text.strip():
        raise BackupError("both INDAI_BACKUP_KEY_FILE and INDAI_BACKUP_KEY are set: set only one")
    if path:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read(4096)
        except OSError as e:
            raise BackupError(f"INDAI_BACKUP_KEY_FILE names {path}, which cannot be read ({e.strerror})") from None
        where = f"the file INDAI_BACKUP_KEY_FILE names ({path})"
    elif text.strip():
        where = "INDAI_BACKUP_KEY"
    else:
        return None
    try:
        return Key.parse(text, where)
    except SealError as e:
        raise BackupError(str(e)) from None


class _Lock:
    """This run's lock file in a backup store, rewritten by a thread every LOCK_REFRESH_S."""

    def __init__(self, store: ObjectStore, kind: str, what: str):
        self.store, self.kind, self.what = store, kind, what
        self.key = f"{LOCKS}/{secrets.token_hex(8)}.json"
        self._write()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="indai-backup-lock", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.store.put_bytes(self.key, json.dumps({"kind": self.kind, "what": self.what, "host": socket.gethostname(),
                                                   "pid": os.getpid(), "at": time.time()}).encode())

    def _keep(self) -> None:
        while not self._done.wait(LOCK_REFRESH_S):
            try:
                self._write()
            except Exception as e:  # the run goes on; a lock left unrefreshed only turns stale
                print(f"could not refresh the lock {self.key} ({type(e).__name__}); going on", file=sys.stderr)

    def release(self) -> None:
        self._done.set()
        self._thread.join()
        try:
            self.store.delete(self.key)
        except Exception as e:  # it turns stale, and the next prune deletes it
            print(f"could not delete the lock {self.key} ({type(e).__name__}): it expires by itself", file=sys.stderr)


def _describe(info: dict) -> str:
    at = datetime.fromtimestamp(info["at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{'a prune' if info['kind'] == 'exclusive' else 'a ' + info['what']} on {info['host']} (pid {info['pid']}, since {at})"


class Repository:
    """A backup store as backups use it. Where its config.json records a key, every file but the
    config and the locks is sealed with that key, and contents are named by a keyed hash of their
    sha256 instead of the sha256 itself."""

    def __init__(self, store: ObjectStore, key: Key | None):
        self.store, self.key, self.uri = store, key, store.uri

    # names
    def blob_name(self, sha: str) -> str:
        return self.key.name(sha) if self.key else sha

    def blob_key(self, sha: str) -> str:
        name = self.blob_name(sha)
        return f"{BLOBS}/{name[:2]}/{name}"

    def blob_names(self) -> set[str]:
        return {k.rsplit("/", 1)[-1] for k in self.store.list(BLOBS)}

    # contents, sealed where the store is
    def _damaged(self, key: str) -> BackupError:
        return BackupError(f"{key} in {self.uri} does not open with the backup key (key id {self.key.id}): it was changed, "
                           "cut short or moved from another name; this copy is damaged, restore another snapshot")

    def put_file(self, key: str, local: Path) -> None:
        if self.key is None:
            return self.store.put_file(key, local)
        sealed = local.with_name(local.name + ".sealed")
        try:
            seal_file(self.key, local, sealed, key)
            self.store.put_file(key, sealed)
        finally:
            sealed.unlink(missing_ok=True)

    def get_file(self, key: str, local: Path) -> None:
        if self.key is None:
            return self.store.get_file(key, local)
        sealed = local.with_name(local.name + ".sealed")
        try:
            self.store.get_file(key, sealed)
            open_file(self.key, sealed, local, key)
        except SealError:
            raise self._damaged(key) from None
        finally:
            sealed.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.store.put_bytes(key, seal_bytes(self.key, data, key) if self.key else data)

    def get_bytes(self, key: str) -> bytes:
        data = self.store.get_bytes(key)
        if self.key is None:
            return data
        try:
            return open_bytes(self.key, data, key)
        except SealError:
            raise self._damaged(key) from None

    # names only
    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def children(self, prefix: str) -> list[str]:
        return self.store.children(prefix)

    def list(self, prefix: str) -> list[str]:
        return self.store.list(prefix)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.store.delete_prefix(prefix)

    # runs beside each other
    def locks(self, *mine: str) -> tuple[dict[str, dict], list[str]]:
        """The other runs' fresh locks (key: what it says) and the keys of stale or unreadable ones."""
        fresh, stale = {}, []
        for key in self.store.list(LOCKS):
            if key in mine:
                continue
            try:
                info = json.loads(self.store.get_bytes(key))
                fields_ok = (isinstance(info, dict) and info.get("kind") in ("shared", "exclusive")
                             and isinstance(info.get("at"), (int, float)) and isinstance(info.get("host"), str)
                             and isinstance(info.get("pid"), int) and isinstance(info.get("what"), str))
            except StoreError:
                if self.store.exists(key):
                    raise
                continue  # released meanwhile
            except ValueError:
                fields_ok = False
            # a lock dated more than an hour ahead (a wrong clock, or not a lock at all) would hold every
            # prune off for as long as it stays: stale too, as NaN
            if not fields_ok or not _LOCK_KEY.fullmatch(key) or not -3600 <= time.time() - info["at"] <= LOCK_STALE_S:
                stale.append(key)
            else:
                fresh[key] = {**info, "host": info["host"][:64], "what": info["what"][:40]}
        return fresh, stale

    @contextmanager
    def running(self, what: str, say: Callable[[str], None]) -> Iterator[_Lock | None]:
        """Announce a run (a backup, verify or restore); first wait while another run prunes. A
        verify or restore with keys that may only read the backup store goes on without a lock."""
        try:
            lock = _Lock(self.store, "shared", what)
        except StoreError as e:
            if what == "backup":
                raise
            say(f"could not write a lock into {self.uri} ({str(e)[:200]}); going on without one: a prune that runs "
                f"meanwhile could delete what this {what} reads")
            yield None
            return
        try:
            deadline, told = time.monotonic() + LOCK_WAIT_S, False
            while True:
                pruning = [(k, i) for k, i in self.locks(lock.key)[0].items() if i["kind"] == "exclusive"]
                if not pruning:
                    break
                key, info = pruning[0]
                if time.monotonic() > deadline:
                    raise BackupError(f"{self.uri} is held by {_describe(info)}, which did not finish within "
                                      f"{LOCK_WAIT_S:.0f} s: if no indai backup is running there (a run that stopped "
                                      f"leaves its lock for {LOCK_STALE_S / 60:.0f} minutes), delete {key} from the "
                                      "backup store and run again")
                if not told:
                    say(f"waiting for {_describe(info)} to finish")
                    told = True
                time.sleep(1.0)
            yield lock
        finally:
            lock.release()

    @contextmanager
    def alone(self, mine: _Lock, say: Callable[[str], None]) -> Iterator[list[str] | None]:
        """An exclusive lock, if no other run holds one: yields the stale locks' keys, or None
        (and holds nothing) while another run is going."""
        lock = _Lock(self.store, "exclusive", "prune")
        try:
            fresh, stale = self.locks(lock.key, mine.key)
            if fresh:
                say(f"{self.uri} is also used by {_describe(next(iter(fresh.values())))}: old snapshots are pruned "
                    "by the next backup")
                yield None
            else:
                yield stale
        finally:
            lock.release()


def _read_config(store: ObjectStore) -> dict | None:
    try:
        raw = store.get_bytes(CONFIG)
    except StoreError:
        if store.exists(CONFIG):
            raise
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if (not isinstance(config, dict) or config.get("format") != FORMAT or config.get("encryption") not in (None, SEALED)
            or (config.get("encryption") and not re.fullmatch(r"[0-9a-f]{16}", str(config.get("key_id"))))):
        raise BackupError(f"{CONFIG} in {store.uri} is not one this indai writes (it reads format {FORMAT}): the backup "
                          "store is damaged or belongs to something else")
    return config


def open_repository(uri: str, *, create: bool = False) -> Repository:
    """The backup store at `uri`, opened with the backup key where it is sealed. `create`: a
    backup is about to write; an empty store is then made sealed when a key is set."""
    store = open_backup_store(uri)
    key = backup_key_from_env()
    config = _read_config(store)
    if config is None:
        used = bool(store.children(SNAPSHOTS) or store.children(BLOBS))
        if used:  # made before config.json: never sealed
            config = {"format": FORMAT, "encryption": None}
        elif create:
            config = {"format": FORMAT, "encryption": SEALED if key else None, "key_id": key.id if key else None,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            store.put_bytes(CONFIG, json.dumps(config, indent=1).encode())
        else:
            return Repository(store, None)  # nothing in it to read
    if config["encryption"] is None:
        if key and create:
            raise BackupError(f"{uri} holds backups that are not encrypted, and a backup key is set: encrypted backups "
                              "go to a new backup store (another folder, bucket or prefix); the old snapshots stay "
                              "readable without the key")
        return Repository(store, None)
    if key is None:
        raise BackupError(f"{uri} is encrypted (key id {config['key_id']}): set INDAI_BACKUP_KEY_FILE to a file holding "
                          "its key, or INDAI_BACKUP_KEY to the key")
    if key.id != config["key_id"]:
        raise BackupError(f"the backup key set here (key id {key.id}) is not the key of {uri} (key id {config['key_id']}): "
                          "use the key its snapshots were made with; without it they cannot be read")
    return Repository(store, key)


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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("id") != snapshot:
        raise BackupError(f"the manifest of snapshot {snapshot} is not one this indai writes (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else '?'}, indai reads {FORMAT})")
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
    with repo.running("backup", say) as lock:
        previous = list_snapshots(repo)
        snap = _new_id(max([previous[-1]["id"] if previous else "", *_snapshot_ids(repo)[1]]) or None)
        prefix = f"{SNAPSHOTS}/{snap}"
        manifest: dict = {"format": FORMAT, "id": snap, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
            if keep is not None:
                with stages.stage("prune old snapshots"), repo.alone(lock, say) as stale_locks:
                    if stale_locks is not None:
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
