"""A backup store as backups use it: where it is, its settings and keys, the runs beside each other.

A backup store (a folder or an S3 bucket) holds snapshots (platform/backup.py) and, at its top:

    config.json          the store's format, whether it is sealed, and its key slots
    locks/<random>.json  one per run in progress (see LOCK_* below)

**Sealed stores and their keys.** A store made with a backup key set (INDAI_BACKUP_KEY_FILE or
INDAI_BACKUP_KEY, from `indai admin backup-key`) is sealed with a key of its own: 256 random
bits, never written anywhere in the clear. config.json keeps that store key once per backup key
that may open the store, sealed with it (a key slot, named by the backup key's id), so

- a run opens the slot of the key it was given, and seals and opens every file with the store key;
- `indai admin backup-keys --add` seals the store key with one more backup key, `--remove` drops a
  slot (never the last one, and never the one the command runs with: that key must be another of
  the store's), and nothing else in the store is written again. A key that was removed no longer
  opens the store; whoever held it while it did could have kept the store key itself, so after a
  key was exposed, start a new store as well.

Stores made by indai before key slots (format 1) are sealed with the backup key itself: they are
read and written as before, and their key cannot be changed (a new key means a new store).

**Runs beside each other.** Each run writes a lock file, rewritten every LOCK_REFRESH_S. A run
that prunes (or changes keys) takes an exclusive lock and goes on only when no other run holds
one; every other run waits while an exclusive lock is held. A lock not rewritten for LOCK_STALE_S
is a crashed run's and is ignored (and deleted by the next prune).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from indai.platform.encryption import (Key, SealError, new_secret, open_bytes, open_file, seal_bytes, seal_file,
                                       unwrap_secret, wrap_secret)
from indai.platform.errors import UserError
from indai.platform.storage import ObjectStore, S3Store, StoreError, open_store

SNAPSHOTS = "snapshots"
BLOBS = "blobs"
CONFIG = "config.json"
LOCKS = "locks"
SEALED = "aes-256-gcm"
# config.json's formats: 1, a plain store, or one sealed with the backup key itself (before key
# slots: still read and written); 2, a store sealed with a store key in key slots. A new plain
# store is still written as format 1, so that an earlier release reads it.
FORMAT_PLAIN, FORMAT_SLOTS = 1, 2
FORMATS = (FORMAT_PLAIN, FORMAT_SLOTS)
LOCK_REFRESH_S = 300.0
LOCK_STALE_S = 1800.0
LOCK_WAIT_S = 900.0
_LOCK_KEY = re.compile(LOCKS + r"/[0-9a-f]{16}\.json")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
MAX_KEYS = 32


class BackupError(UserError):
    """A backup or restore that cannot go on; the message says what to do."""


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
        return read_key_file(path, f"the file INDAI_BACKUP_KEY_FILE names ({path})")
    if text.strip():
        return _parsed(text, "INDAI_BACKUP_KEY")
    return None


def read_key_file(path: str, where: str) -> Key:
    """The backup key in a file (`-`: standard input), read no further than a key could be long."""
    try:
        if path == "-":
            text = sys.stdin.read(4096)
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read(4096)
    except OSError as e:
        raise BackupError(f"{where} cannot be read ({e.strerror})") from None
    return _parsed(text, where)


def _parsed(text: str, where: str) -> Key:
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
    return f"a {info['what']} on {info['host']} (pid {info['pid']}, since {at})"


class Repository:
    """A backup store as backups use it. Where its config.json records a key, every file but the
    config and the locks is sealed with that key, and contents are named by a keyed hash of their
    sha256 instead of the sha256 itself."""

    def __init__(self, store: ObjectStore, key: Key | None, opener: Key | None = None, key_ids: list[str] = ()):
        self.store, self.key, self.uri = store, key, store.uri
        self._opener = opener  # the backup key that opened it: its id is shown, never the store key's
        self.opened_with, self.key_ids = (opener.id if opener else None), list(key_ids)

    def check_store_key(self) -> None:
        """Fail if config.json no longer holds the store key this run seals with: two first backups
        into one new store at the same moment each made a store key, and only one config.json stays."""
        if self._opener is None:
            return
        config = _read_config(self.store)
        if config is None or not config.get("encryption") or _store_key(self.uri, config, self._opener).id != self.key.id:
            raise BackupError(f"another run made {self.uri} at the same moment as this one, with a store key of its own: "
                              "what this run wrote cannot be read; run the backup again (it goes into the same store)")

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
        return BackupError(f"{key} in {self.uri} does not open with the store's key: it was changed, "
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
    def running(self, what: str, say: Callable[[str], None], writes: bool = False) -> Iterator[_Lock | None]:
        """Announce a run (a backup, verify, restore or key change); first wait while another run
        holds an exclusive lock. A run that only reads (`writes` false), with keys that may only read
        the backup store, goes on without a lock."""
        try:
            lock = _Lock(self.store, "shared", what)
        except StoreError as e:
            if writes:
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
    def alone(self, mine: _Lock, what: str) -> Iterator[list[str] | str]:
        """An exclusive lock for `what` (a prune, a key change), if no other run holds one: yields
        the stale locks' keys; or, while another run is going, what that run is (holding nothing)."""
        lock = _Lock(self.store, "exclusive", what)
        try:
            fresh, stale = self.locks(lock.key, mine.key)
            yield _describe(next(iter(fresh.values()))) if fresh else stale
        finally:
            lock.release()


def _slot(key_id: str) -> str:
    return f"{CONFIG}/keys/{key_id}"  # what a slot's sealed store key is bound to


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
    if not _config_ok(config):
        raise BackupError(f"{CONFIG} in {store.uri} is not one this indai writes (it reads formats "
                          f"{', '.join(map(str, FORMATS))}): the backup store is damaged or belongs to something else")
    return config


def _config_ok(config) -> bool:
    if (not isinstance(config, dict) or type(config.get("format")) is not int or config["format"] not in FORMATS
            or config.get("encryption") not in (None, SEALED)):
        return False
    if not config.get("encryption"):
        return True
    if config["format"] == FORMAT_PLAIN:
        return bool(_KEY_ID.fullmatch(str(config.get("key_id"))))
    keys = config.get("keys")
    return (isinstance(keys, dict) and 0 < len(keys) <= MAX_KEYS
            and all(_KEY_ID.fullmatch(k) and isinstance(v, dict) and isinstance(v.get("sealed"), str)
                    and len(v["sealed"]) < 512 for k, v in keys.items()))


def _write_config(store: ObjectStore, config: dict) -> None:
    store.put_bytes(CONFIG, json.dumps(config, indent=1).encode())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def key_ids(config: dict) -> list[str]:
    """The ids of the backup keys that open a sealed store."""
    return [config["key_id"]] if config["format"] == FORMAT_PLAIN else sorted(config["keys"])


def _store_key(uri: str, config: dict, key: Key) -> Key:
    """The key a sealed store's files are sealed with, opened with the backup key `key`."""
    ids = key_ids(config)
    if key.id not in ids:
        raise BackupError(f"the backup key set here (key id {key.id}) is not a key of {uri} (key id"
                          f"{'s' if len(ids) > 1 else ''} {', '.join(ids)}): use a key its snapshots were made or "
                          "opened with; without one they cannot be read")
    return key if config["format"] == FORMAT_PLAIN else Key.from_secret(_open_slot(uri, config, key))


def _open_slot(uri: str, config: dict, key: Key) -> bytes:
    try:
        return unwrap_secret(key, config["keys"][key.id]["sealed"], _slot(key.id))
    except SealError:
        raise BackupError(f"the key slot {key.id} in {uri}/{CONFIG} does not open with that key: it was changed; open "
                          "the store with another of its keys and remove this slot") from None


def open_repository(uri: str, *, create: bool = False) -> "Repository":
    """The backup store at `uri`, opened with the backup key where it is sealed. `create`: a
    backup is about to write; an empty store is then made sealed when a key is set."""
    store = open_backup_store(uri)
    key = backup_key_from_env()
    config = _read_config(store)
    if config is None:
        used = bool(store.children(SNAPSHOTS) or store.children(BLOBS))
        if used:  # made before config.json: never sealed
            config = {"format": FORMAT_PLAIN, "encryption": None}
        elif create:
            config = {"format": FORMAT_SLOTS if key else FORMAT_PLAIN, "encryption": SEALED if key else None,
                      "created": _now()}
            if key:
                config["keys"] = {key.id: {"sealed": wrap_secret(key, new_secret(), _slot(key.id)), "added": _now()}}
            _write_config(store, config)
        else:
            return Repository(store, None)  # nothing in it to read
    if config["encryption"] is None:
        if key and create:
            raise BackupError(f"{uri} holds backups that are not encrypted, and a backup key is set: encrypted backups "
                              "go to a new backup store (another folder, bucket or prefix); the old snapshots stay "
                              "readable without the key")
        return Repository(store, None)
    if key is None:
        ids = key_ids(config)
        raise BackupError(f"{uri} is encrypted (key id{'s' if len(ids) > 1 else ''} {', '.join(ids)}): set "
                          "INDAI_BACKUP_KEY_FILE to a file holding one of its keys, or INDAI_BACKUP_KEY to the key")
    return Repository(store, _store_key(uri, config, key), opener=key, key_ids=key_ids(config))


# ---- keys -----------------------------------------------------------------------------------------

def _sealed_config(uri: str) -> tuple[ObjectStore, dict]:
    store = open_backup_store(uri)
    config = _read_config(store)
    if config is None or not config.get("encryption"):
        raise BackupError(f"{uri} is not an encrypted backup store: it has no keys (encrypted backups go to a new store, "
                          "made by `indai admin backup` with INDAI_BACKUP_KEY_FILE set)")
    if config["format"] == FORMAT_PLAIN:
        raise BackupError(f"{uri} was made before backup stores had key slots: it opens with its one key (key id "
                          f"{config['key_id']}) and that cannot change. To use a new key, back up into a new store with "
                          "it, and keep this one and its key until its snapshots are no longer needed")
    return store, config


def change_keys(uri: str, add: Key | None = None, remove: str | None = None,
                say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[str]:
    """Add a key slot for `add`, or remove the slot of key id `remove`, in the sealed store at
    `uri`, opened with the backup key set here; returns the key ids afterwards. Nothing but
    config.json is written."""
    if remove is not None and not _KEY_ID.fullmatch(remove):
        raise BackupError(f"{remove[:40]!r} is not a key id (16 hex digits): `indai admin backup-keys --at URI` lists "
                          "the store's")
    key = backup_key_from_env()
    store, config = _sealed_config(uri)
    if key is None:
        raise BackupError(f"set INDAI_BACKUP_KEY_FILE (or INDAI_BACKUP_KEY) to one of the keys of {uri} (key ids "
                          f"{', '.join(key_ids(config))}): changing its keys needs one that opens it")
    secret = _open_slot(uri, config, key) if key.id in config["keys"] else None
    repo = Repository(store, _store_key(uri, config, key), opener=key, key_ids=key_ids(config))
    with repo.running("key change", say, writes=True) as mine, repo.alone(mine, "key change") as free:
        if isinstance(free, str):
            raise BackupError(f"{uri} is in use by {free}: change its keys when it has finished")
        config = _read_config(store)  # as it is now, under the lock
        if add is not None:
            if add.id in config["keys"]:
                raise BackupError(f"key id {add.id} already opens {uri}: nothing to add")
            if len(config["keys"]) >= MAX_KEYS:
                raise BackupError(f"{uri} has {MAX_KEYS} keys, the most it may have: remove one first")
            config["keys"][add.id] = {"sealed": wrap_secret(add, secret, _slot(add.id)), "added": _now()}
            say(f"key id {add.id} now opens {uri}")
        if remove is not None:
            if remove not in config["keys"]:
                raise BackupError(f"{remove!r} is not a key id of {uri} (its keys: {', '.join(key_ids(config))}): "
                                  "`indai admin backup-keys --at URI` lists them")
            if remove == key.id:
                raise BackupError(f"key id {remove} is the key this command runs with: set another of the store's keys "
                                  "(INDAI_BACKUP_KEY_FILE) to remove it, so that one that opens the store is known to be at hand")
            del config["keys"][remove]
            say(f"key id {remove} no longer opens {uri}")
        _write_config(store, config)
    return key_ids(config)

