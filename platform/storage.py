"""The object store: where raw data, dataset versions, checkpoints and models live.

Why this module exists
----------------------
Everything the platform keeps goes through one small interface, ``ObjectStore``, with two
backends chosen by URI: ``file://`` (or a plain path) gives ``LocalStore``, a folder on
disk, and ``s3://bucket[/prefix]`` gives ``S3Store`` (MinIO on the cluster). Callers never
see which one they hold, so the same code runs on a laptop and on Kubernetes.

Keys are relative POSIX paths (``datasets/cwru/abc123/manifest.json``). Many of them come
from users or requests, so every key is checked by ``validate_key`` before it touches a
disk or a bucket: no ``..``, no absolute paths, no URL tricks, no scheme switching.

Writers of things that must appear all at once (a dataset version, a checkpoint) write
their files first and then ``commit()`` the prefix, which writes ``<prefix>/_COMMITTED``
last. Readers list versions with ``committed_children()`` and so never see a version
that is half written or whose writer crashed.

An S3 server that restarts, drops a connection or answers 5xx for a while must not fail a
training run that is writing checkpoints: ``S3Store`` retries such transient failures with
exponential backoff until a deadline (``INDAI_S3_RETRY_DEADLINE_S``, 60 s by default), in one
place (``S3Store._call``), logging each retry. A 403, a 404 or a bad key fails at once.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

from indai.platform.errors import UserError

COMMIT_MARKER = "_COMMITTED"

MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255

# Punctuation allowed in a key besides letters, digits and the "/" separator.
_SAFE_PUNCTUATION = frozenset("-_.@=+,")
_ASCII_DIGITS = frozenset("0123456789")

# Local temp files start with a character no valid key may contain, so a temp file left
# behind by a crash can never be mistaken for (or collide with) a real object.
_TMP_PREFIX = "~indai-tmp-"

_KEY_EXAMPLE = "datasets/cwru/abc123/manifest.json"
_KEY_RULES = (
    f"use a relative path like '{_KEY_EXAMPLE}' made of letters, digits and "
    "'- _ . @ = + ,' separated by single '/'"
)

# Something that starts like "file:", "s3:", "C:" or "http:" (a scheme or a drive).
_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")

# S3 bucket naming rules (the strict, DNS-compatible subset).
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class StoreError(UserError):
    """An object store operation failed for a reason the user can act on."""


class StoreUnavailable(StoreError):
    """The S3 endpoint stayed unreachable (or kept failing) for the whole retry deadline."""


# ---------------------------------------------------------------------------------------
# Key validation
# ---------------------------------------------------------------------------------------


def _show(key: str) -> str:
    """The key as it appears in messages: quoted, escaped and not too long."""
    return repr(key if len(key) <= 80 else key[:77] + "...")


def _bad_key(key: str, problem: str) -> StoreError:
    return StoreError(f"invalid object key {_show(key)}: {problem}; {_KEY_RULES}")


def _is_invisible(ch: str) -> bool:
    """Control characters (NUL, newline, ...) and format characters (zero width, bidi)."""
    return unicodedata.category(ch) in ("Cc", "Cf")


def _key_char_ok(ch: str) -> bool:
    return ch.isalpha() or ch in _ASCII_DIGITS or ch in _SAFE_PUNCTUATION


def _check_whole_key(key: str) -> None:
    """Checks on the key as one string, before it is split into segments."""
    if len(key) > MAX_KEY_LENGTH:
        raise _bad_key(key, f"it is {len(key)} characters long, the limit is {MAX_KEY_LENGTH}")
    if any(_is_invisible(ch) for ch in key):
        raise _bad_key(key, "it contains a control or invisible character (such as NUL)")
    if _SCHEME_LIKE.match(key) or ":" in key.split("/", 1)[0]:
        raise _bad_key(key, "it looks like a URL or a drive letter ('file:', 's3:', 'C:'); "
                            "pass a key relative to the store, not a URI")
    if key.startswith("/"):
        raise _bad_key(key, "it is an absolute path")
    if "\\" in key:
        raise _bad_key(key, "it contains a backslash")
    if "%" in key:
        raise _bad_key(key, "it contains '%' (percent-encoding is not decoded, write the "
                            "characters themselves)")
    if "#" in key or "?" in key:
        raise _bad_key(key, "it contains '#' or '?' (URL fragment or query)")
    if key.startswith("~"):
        raise _bad_key(key, "it starts with '~' (home folder)")


def _check_segment(key: str, segment: str) -> None:
    if segment == "":
        raise _bad_key(key, "it has an empty segment (a doubled, leading or trailing '/')")
    if segment in (".", ".."):
        raise _bad_key(key, f"it has a '{segment}' segment")
    if segment.isspace():
        raise _bad_key(key, "it has a segment made only of whitespace")
    if len(segment) > MAX_SEGMENT_LENGTH:
        raise _bad_key(key, f"a segment is {len(segment)} characters long, the limit is "
                            f"{MAX_SEGMENT_LENGTH}")
    for ch in segment:
        if not _key_char_ok(ch):
            raise _bad_key(key, f"character {ch!r} is not allowed")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative object key, else raise StoreError."""
    if not isinstance(key, str):
        raise StoreError(f"an object key must be a string, got {type(key).__name__}; "
                         f"{_KEY_RULES}")
    if key == "":
        raise StoreError(f"the object key is empty; {_KEY_RULES}")
    _check_whole_key(key)
    for segment in key.split("/"):
        _check_segment(key, segment)
    return key


def _validate_prefix(prefix: str, allow_root: bool = False) -> str:
    """A prefix is a key naming a "folder"; one trailing '/' is tolerated.

    ``allow_root`` lets "" mean the whole store (only for operations that read).
    """
    if allow_root and prefix == "":
        return ""
    if isinstance(prefix, str) and len(prefix) > 1 and prefix.endswith("/"):
        prefix = prefix[:-1]
    return validate_key(prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _under(prefix: str, key: str) -> str:
    """The part of ``key`` below ``prefix`` (the key itself when prefix is the root)."""
    return key[len(prefix) + 1:] if prefix else key


# ---------------------------------------------------------------------------------------
# Local file helpers shared by both backends
# ---------------------------------------------------------------------------------------


@functools.cache
def _file_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp would give 0600).

    The umask is read from /proc where possible: setting it to read it back would race
    with other threads creating files.
    """
    try:
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("Umask:"))
        umask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every filesystem allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(dest: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through a temp file in the same folder and rename it into place.

    Readers see either the old file or the complete new one, never a partial one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def _copy_from(source: BinaryIO) -> Callable[[BinaryIO], None]:
    return lambda fh: shutil.copyfileobj(source, fh, 1024 * 1024)


def _open_local_source(local_path: str | os.PathLike) -> BinaryIO:
    try:
        return open(local_path, "rb")
    except FileNotFoundError:
        raise StoreError(f"local file {str(local_path)!r} does not exist") from None
    except IsADirectoryError:
        raise StoreError(f"{str(local_path)!r} is a folder; use upload_dir for folders") from None
    except OSError as exc:
        raise StoreError(f"cannot read local file {str(local_path)!r}: {exc.strerror}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a local file's content (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------


class ObjectStore(abc.ABC):
    """Objects addressed by relative keys; see the module docstring."""

    COMMIT_MARKER = COMMIT_MARKER

    uri: str

    # -- primitives each backend implements ------------------------------------------

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The content of ``key``; StoreError if it is not in the store."""

    @abc.abstractmethod
    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Store the local file ``local_path`` under ``key``."""

    @abc.abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Write the content of ``key`` to ``local_path`` (atomically, parents created)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object (a "folder" is not)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under the folder ``prefix`` (recursive, sorted, relative to the root)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under the folder ``prefix``; commit markers go first."""

    @abc.abstractmethod
    def stat_all(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """``{key: (size, change tag)}`` for every key under the folder ``prefix``, from one
        listing. The tag changes when the object is written again (S3: its ETag; a folder: the
        file's modification time in ns), so a copy made earlier can be recognised unread."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object ``key``; one that is not there is no error."""

    @abc.abstractmethod
    def _child_folders(self, prefix: str) -> list[str]:
        """Names of the direct child folders of ``prefix`` ("" is the root)."""

    # -- folders -----------------------------------------------------------------------

    def upload_dir(self, prefix: str, local_dir: str | os.PathLike) -> None:
        """Upload every file below ``local_dir`` to ``<prefix>/<relative path>``.

        All keys are validated before anything is written. Commit markers found in the
        folder are uploaded last, so a copied version never looks committed too early.
        """
        prefix = _validate_prefix(prefix)
        root = Path(local_dir)
        if not root.is_dir():
            raise StoreError(f"local folder {str(local_dir)!r} does not exist")
        pairs = [(validate_key(_join(prefix, rel)), path) for rel, path in _walk_files(root)]
        pairs.sort(key=lambda pair: (pair[0].rsplit("/", 1)[-1] == COMMIT_MARKER, pair[0]))
        for key, path in pairs:
            self.put_file(key, path)

    def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Download every key under ``prefix`` into ``local_dir``; return that folder.

        Refuses (StoreError) to write anything that would land outside ``local_dir``,
        e.g. through a symlink already in it.
        """
        prefix = _validate_prefix(prefix, allow_root=True)
        keys = self.list(prefix)
        if not keys:
            raise StoreError(f"nothing under {prefix!r} in {self.uri}; check the prefix")
        root = Path(local_dir)
        root.mkdir(parents=True, exist_ok=True)
        real_root = root.resolve()
        for key in keys:
            dest = (root / _under(prefix, key)).resolve()
            if not _inside(dest, real_root) or dest == real_root:
                raise StoreError(f"refusing to write {key!r} outside {str(local_dir)!r} "
                                 "(a symlink in that folder points elsewhere)")
            self.get_file(key, dest)
        return root

    # -- commit markers ----------------------------------------------------------------

    def commit(self, prefix: str, meta: dict) -> None:
        """Mark ``prefix`` complete: write ``<prefix>/_COMMITTED`` after all its files.

        The marker holds ``meta`` plus ``committed_at`` (UTC, ISO 8601).
        """
        prefix = _validate_prefix(prefix)
        if not isinstance(meta, dict):
            raise StoreError(f"commit metadata must be a dict, got {type(meta).__name__}")
        record = {**meta, "committed_at": _now_iso()}
        try:
            data = json.dumps(record, sort_keys=True, indent=2).encode()
        except (TypeError, ValueError) as exc:
            raise StoreError(f"commit metadata for {prefix!r} is not JSON: {exc}") from None
        self.put_bytes(_join(prefix, COMMIT_MARKER), data)

    def is_committed(self, prefix: str) -> bool:
        return self.exists(_join(_validate_prefix(prefix), COMMIT_MARKER))

    def read_commit(self, prefix: str) -> dict:
        """The marker's content; StoreError if ``prefix`` is not committed."""
        prefix = _validate_prefix(prefix)
        record = self._read_marker(prefix)
        if record is None:
            raise StoreError(f"{prefix!r} in {self.uri} is not committed (it may still be "
                             "being written, or its writer failed)")
        return record

    def children(self, prefix: str = "") -> list[str]:
        """Names of the direct child folders of ``prefix``, committed or not (one listing
        level: on S3 a delimiter listing, not every key below)."""
        return [n for n in self._child_folders(_validate_prefix(prefix, allow_root=True)) if _is_valid_key(n)]

    def committed_children(self, prefix: str = "") -> list[str]:
        """Names of the direct child folders of ``prefix`` that are committed.

        Sorted by commit time, oldest first; folders without a marker are left out.
        """
        prefix = _validate_prefix(prefix, allow_root=True)
        found = []
        for name in self._child_folders(prefix):
            try:
                validate_key(name)
            except StoreError:
                continue  # written by something else; not one of ours
            record = self._read_marker(_join(prefix, name))
            if record is not None:
                found.append((self._commit_time(_join(prefix, name), record), name))
        return [name for _, name in sorted(found)]

    def _read_marker(self, prefix: str) -> dict | None:
        key = _join(prefix, COMMIT_MARKER)
        try:
            data = self.get_bytes(key)
        except StoreUnavailable:
            raise  # the server is away: asking again whether the marker exists would wait as long
        except StoreError:
            if self.exists(key):
                raise
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise StoreError(f"commit marker {key!r} in {self.uri} is not a JSON object; "
                             "delete it and commit again")
        return record

    def _commit_time(self, prefix: str, record: dict) -> datetime:
        try:
            when = datetime.fromisoformat(record["committed_at"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"commit marker of {prefix!r} in {self.uri} has no valid "
                             "'committed_at'; delete it and commit again") from None
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of each file below ``root``; folder links not followed."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            yield path.relative_to(root).as_posix(), path


# ---------------------------------------------------------------------------------------
# Local folder
# ---------------------------------------------------------------------------------------


class LocalStore(ObjectStore):
    """Objects as files below a root folder; created on the first write."""

    def __init__(self, uri_or_path: str | os.PathLike):
        text = os.fspath(uri_or_path)
        path = text[len("file://"):] if text.startswith("file://") else text
        if not path:
            raise StoreError(f"{text!r} names no folder; use file:///absolute/path")
        self.root = Path(path).expanduser().absolute()
        self.uri = f"file://{self.root.as_posix()}"

    def _real_root(self) -> Path:
        return self.root.resolve()

    def _path(self, key: str) -> Path:
        """The real path of a validated key; refuses paths that escape the root."""
        validate_key(key)
        root = self._real_root()
        real = (root / key).resolve()
        if not _inside(real, root) or real == root:
            raise StoreError(f"{key!r} resolves outside {self.uri} (through a symlink); "
                             "remove the link or pick another key")
        return real

    @contextlib.contextmanager
    def _os_errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            if action == "read":
                raise StoreError(f"{key!r} is not in {self.uri}") from None
            if action == "write":
                raise StoreError(f"cannot write {key!r} in {self.uri}: {exc.strerror} (a "
                                 "file and a folder would share one name)") from None
            raise StoreError(f"cannot {action} {key!r} in {self.uri}: {exc.strerror}") from None
        except FileExistsError as exc:
            raise StoreError(f"cannot {action} {key!r} in {self.uri}: {exc.strerror} "
                             "(a file stands where a folder is needed)") from None
        except OSError as exc:
            raise StoreError(f"cannot {action} {key!r} in {self.uri}: {exc.strerror}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._os_errors("write", key):
            _write_atomically(path, lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._os_errors("read", key):
            return path.read_bytes()

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        path = self._path(key)
        with _open_local_source(local_path) as source, self._os_errors("write", key):
            _write_atomically(path, _copy_from(source))

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        path = self._path(key)
        with self._os_errors("read", key):
            source = open(path, "rb")
        with source:
            try:
                _write_atomically(Path(local_path), _copy_from(source))
            except OSError as exc:
                raise StoreError(f"cannot write local file {str(local_path)!r}: "
                                 f"{exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = _validate_prefix(prefix, allow_root=True)
        root = self._real_root()
        folder = self._path(prefix) if prefix else root
        if not folder.is_dir():
            return []
        keys = []
        for rel, _path in _walk_files(folder):
            if not rel.rsplit("/", 1)[-1].startswith(_TMP_PREFIX):
                keys.append(_join(prefix, rel))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        prefix = _validate_prefix(prefix)
        folder = self._path(prefix)
        if not folder.is_dir():
            return
        with self._os_errors("delete", prefix):
            # Markers first: a reader must never see a committed version losing files.
            for rel, path in _walk_files(folder):
                if rel.rsplit("/", 1)[-1] == COMMIT_MARKER:
                    path.unlink()
            shutil.rmtree(folder)

    def stat_all(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        stats = {}
        for key in self.list(prefix):
            with self._os_errors("read", key):
                st = self._path(key).stat()
            stats[key] = (st.st_size, str(st.st_mtime_ns))
        return stats

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._os_errors("delete", key):
            path.unlink(missing_ok=True)

    def _child_folders(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix else self._real_root()
        if not folder.is_dir():
            return []
        return sorted(entry.name for entry in folder.iterdir()
                      if entry.is_dir() and not entry.is_symlink())


def _is_valid_key(name: str) -> bool:
    try:
        validate_key(name)
        return True
    except StoreError:
        return False


# ---------------------------------------------------------------------------------------
# S3 (MinIO)
# ---------------------------------------------------------------------------------------

_S3_ENV_HELP = ("set INDAI_S3_ENDPOINT (host:port), INDAI_S3_ACCESS_KEY, INDAI_S3_SECRET_KEY "
                "and INDAI_S3_SECURE (1 for https, 0 for http)")
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
               "ExpiredToken", "InvalidToken"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}
# S3 error codes that mean "try again later" (answered with a 5xx, or by MinIO while it starts
# or lacks a quorum of its drives); any other 5xx is retried too.
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "XMinioServerNotInitialized", "XMinioReadQuorum", "XMinioWriteQuorum"}

RETRY_DEADLINE_ENV = "INDAI_S3_RETRY_DEADLINE_S"
DEFAULT_RETRY_DEADLINE_S = 60.0
_FIRST_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, base prefix) of ``s3://bucket[/prefix]``."""
    rest = uri[len("s3://"):]
    bucket, _, base = rest.partition("/")
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise StoreError(f"{uri!r} has no valid bucket name; use s3://bucket[/prefix] with a "
                         "bucket of 3-63 lowercase letters, digits, '.' or '-'")
    if base:
        try:
            base = _validate_prefix(base)
        except StoreError as exc:
            raise StoreError(f"the prefix in {uri!r} is not valid: {exc}") from None
    return bucket, base


def parse_secure(value: str | bool | None) -> bool:
    if value is None:
        value = os.environ.get("INDAI_S3_SECURE", "1")
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise StoreError(f"INDAI_S3_SECURE is {value!r}; set it to 1 (https) or 0 (http)")


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept host:port, or http(s)://host:port whose scheme then decides ``secure``."""
    for scheme, is_secure in (("http://", False), ("https://", True)):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme):].rstrip("/"), is_secure
    return endpoint, secure


def _http_client(secure: bool):
    """The HTTP pool under the minio client. It retries nothing (minio's default pool retries
    5xx and connection errors five times): S3Store._call is the one place that retries, so
    retries never multiply and each one is logged. Redirects come back to minio, which handles
    them itself."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=120),
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=0, raise_on_redirect=False),
    )


def _retry_deadline(value: float | str | None) -> float:
    """Seconds a store call keeps retrying transient failures (0: it tries once)."""
    source = "retry_deadline_s"
    if value is None:
        source = RETRY_DEADLINE_ENV
        value = os.environ.get(RETRY_DEADLINE_ENV, "").strip() or DEFAULT_RETRY_DEADLINE_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 <= seconds < float("inf"):  # also refuses nan
        raise StoreError(f"{source} is {value!r}; set it to the seconds an S3 call may keep retrying "
                         f"while the server is away (0 or more; default {DEFAULT_RETRY_DEADLINE_S:g})")
    return seconds


def _backoff(attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt``: doubling from 0.25 s up to 5 s,
    jittered down by up to half so that many writers do not come back in step."""
    return min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def _transient_failure(exc: BaseException) -> str | None:
    """What failed, when ``exc`` is worth retrying (the server away, restarting or overloaded:
    connection refused or reset, a timeout, a 5xx); None for everything else."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # the pool tries once; what it gave up on is the reason
    if isinstance(exc, (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError,
                        ConnectionError, TimeoutError)):
        return _short(exc)  # NewConnectionError (refused) is a TimeoutError subclass in urllib3
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        if exc.code in _TRANSIENT_CODES or status >= 500:
            return f"HTTP {status} {exc.code}"
        return None
    if isinstance(exc, ServerError):
        return f"HTTP {exc.status_code}" if exc.status_code >= 500 else None
    if isinstance(exc, InvalidResponseError):
        status = getattr(exc, "_code", None)  # minio keeps the status only there
        return f"HTTP {status} (not an S3 answer)" if isinstance(status, int) and status >= 500 else None
    return None


class S3Store(ObjectStore):
    """Objects in an S3 bucket (MinIO), optionally below a base prefix."""

    def __init__(self, uri: str, *, endpoint: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 secure: bool | str | None = None, region: str | None = None,
                 retry_deadline_s: float | None = None):
        """``retry_deadline_s``: how long one call retries transient failures (default:
        INDAI_S3_RETRY_DEADLINE_S, else 60 s); the other settings default to INDAI_S3_*."""
        from minio import Minio

        if not uri.startswith("s3://"):
            raise StoreError(f"{uri!r} is not an s3:// URI")
        self.bucket, self.base = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.base}" if self.base else "")
        endpoint = endpoint or os.environ.get("INDAI_S3_ENDPOINT", "").strip()
        if not endpoint:
            raise StoreError(f"no S3 endpoint for {self.uri}; {_S3_ENV_HELP}")
        access_key = access_key if access_key is not None else os.environ.get("INDAI_S3_ACCESS_KEY")
        secret_key = secret_key if secret_key is not None else os.environ.get("INDAI_S3_SECRET_KEY")
        if bool(access_key) != bool(secret_key):
            raise StoreError(f"only one of the S3 access key and secret key is set; "
                             f"{_S3_ENV_HELP}")
        self.endpoint, self.secure = _split_endpoint(endpoint, parse_secure(secure))
        self.retry_deadline_s = _retry_deadline(retry_deadline_s)
        try:
            self._client = Minio(endpoint=self.endpoint, access_key=access_key or None,
                                 secret_key=secret_key or None, secure=self.secure,
                                 region=region or os.environ.get("INDAI_S3_REGION") or None,
                                 http_client=_http_client(self.secure))
        except ValueError as exc:
            raise StoreError(f"S3 endpoint {endpoint!r} is not usable ({exc}); "
                             f"{_S3_ENV_HELP}") from None
        self._bucket_ready = False

    # -- helpers -------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        """The S3 object name of a key (validated)."""
        return _join(self.base, validate_key(key))

    def _key(self, name: str) -> str:
        return _under(self.base, name)

    def _folder(self, prefix: str) -> str:
        """The S3 listing prefix for a folder ("" is the store root)."""
        path = "/".join(part for part in (self.base, prefix) if part)
        return path + "/" if path else ""

    def _s3_error(self, exc: Exception, action: str, key: str) -> StoreError:
        from minio.error import S3Error

        where = f"{self.uri} at {self.endpoint}"
        if isinstance(exc, S3Error):
            if exc.code in _MISSING_CODES and action == "read":
                return StoreError(f"{key!r} is not in {self.uri}")
            if exc.code in _AUTH_CODES:
                return StoreError(f"{where} refused the credentials ({exc.code}) to {action} "
                                  f"{key!r}; check INDAI_S3_ACCESS_KEY and INDAI_S3_SECRET_KEY")
            return StoreError(f"cannot {action} {key!r} in {where}: {exc.code}: {exc.message}")
        return StoreError(f"cannot {action} {key!r}: S3 endpoint {self.endpoint} gave an "
                          f"unexpected answer ({exc}); is it an S3 server?")

    def _url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def _call(self, action: str, key: str, operation: Callable[[], _T]) -> _T:
        """``operation()`` (one or a few S3 requests), retried while it fails transiently.

        The store's only retry (the HTTP pool under it retries nothing). Connection refused or
        reset, timeouts and 5xx answers are retried with exponential backoff until
        ``retry_deadline_s`` has passed since the first try, each retry logged once with what
        failed; then StoreUnavailable. Anything else (403, 404, a bad key, a local file) fails at
        once. An operation starts again from its beginning, so it must be safe to repeat: every
        write here replaces a whole object, and a commit marker is only written after its files.
        """
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                return operation()
            except StoreError:
                raise
            except Exception as exc:
                failure = _transient_failure(exc)
                if failure is None:
                    if isinstance(exc, (S3Error, ServerError, InvalidResponseError)):
                        raise self._s3_error(exc, action, key) from exc
                    if isinstance(exc, urllib3.exceptions.HTTPError):  # TLS, a bad URL: not transient
                        raise StoreError(f"S3 endpoint {self._url()} is unreachable ({_short(exc)}) "
                                         f"while trying to {action} {key!r}; {_S3_ENV_HELP}") from exc
                    raise
                elapsed = time.monotonic() - started
                remaining = self.retry_deadline_s - elapsed
                if remaining <= 0:
                    raise StoreUnavailable(
                        f"S3 endpoint {self._url()} is unreachable or failing ({failure}) while trying to "
                        f"{action} {key!r} in {self.uri}: gave up after {attempt} tries in {elapsed:.1f} s "
                        f"({RETRY_DEADLINE_ENV}={self.retry_deadline_s:g}); is the server running? "
                        f"{_S3_ENV_HELP}") from exc
                delay = min(remaining, _backoff(attempt))
                _log.warning("S3 %s of %r in %s at %s failed (%s); try %d in %.2f s (giving up %g s "
                             "after the first)", action, key, self.uri, self._url(), failure,
                             attempt + 1, delay, self.retry_deadline_s)
                time.sleep(delay)

    def _ensure_bucket(self) -> None:
        """Create the bucket on the first write if it does not exist yet."""
        if self._bucket_ready:
            return
        from minio.error import S3Error

        def create() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    # Someone else (or our own try whose answer was lost) created it: fine.
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._call("create bucket", self.bucket, create)
        self._bucket_ready = True

    def _is_missing(self, exc: Exception) -> bool:
        from minio.error import S3Error

        return isinstance(exc, S3Error) and exc.code in _MISSING_CODES

    # -- primitives ----------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._ensure_bucket()
        self._call("write", key,
                   lambda: self._client.put_object(self.bucket, name, io.BytesIO(data), len(data)))

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("read", key, read)

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        name = self._name(key)
        with _open_local_source(local_path) as source:
            size = os.fstat(source.fileno()).st_size
            self._ensure_bucket()

            def upload() -> None:
                source.seek(0)  # a retry sends the file from its start
                self._client.put_object(self.bucket, name, source, size)

            self._call("write", key, upload)

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        name = self._name(key)

        def download() -> None:
            response = self._client.get_object(self.bucket, name)
            try:
                _write_atomically(Path(local_path), _copy_from(response))
            except OSError as exc:  # the local side (a dropped connection is urllib3's ProtocolError)
                raise StoreError(f"cannot write local file {str(local_path)!r}: "
                                 f"{exc.strerror}") from None
            finally:
                response.close()
                response.release_conn()

        self._call("read", key, download)

    def exists(self, key: str) -> bool:
        name = self._name(key)

        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, name)
            except Exception as exc:
                if self._is_missing(exc):
                    return False
                raise
            return True

        return self._call("check", key, stat)

    def _names_under(self, folder: str, recursive: bool) -> list:
        """Listing of ``folder``; an absent bucket lists as empty."""

        def listing() -> list:
            try:
                return list(self._client.list_objects(self.bucket, prefix=folder or None,
                                                      recursive=recursive))
            except Exception as exc:
                if self._is_missing(exc):
                    return []
                raise

        return self._call("list", folder or "/", listing)

    def list(self, prefix: str = "") -> list[str]:
        prefix = _validate_prefix(prefix, allow_root=True)
        objects = self._names_under(self._folder(prefix), recursive=True)
        # Names ending in "/" are folder placeholders some S3 consoles create, not objects.
        return sorted(self._key(obj.object_name) for obj in objects
                      if not obj.is_dir and not obj.object_name.endswith("/"))

    def stat_all(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        prefix = _validate_prefix(prefix, allow_root=True)
        objects = self._names_under(self._folder(prefix), recursive=True)
        return {self._key(obj.object_name): (int(obj.size or 0), (obj.etag or "").strip('"'))
                for obj in sorted(objects, key=lambda o: o.object_name)
                if not obj.is_dir and not obj.object_name.endswith("/")}

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))

    def delete_prefix(self, prefix: str) -> None:
        from minio.deleteobjects import DeleteObject

        prefix = _validate_prefix(prefix)
        names = [_join(self.base, key) for key in self.list(prefix)]
        markers = [n for n in names if n.rsplit("/", 1)[-1] == COMMIT_MARKER]
        others = [n for n in names if n.rsplit("/", 1)[-1] != COMMIT_MARKER]
        # Markers first: a reader must never see a committed version losing files.
        for batch in (markers, others):
            if not batch:
                continue
            # deleting what is already gone is no error, so a retried batch is harmless
            errors = self._call("delete", prefix, lambda: list(self._client.remove_objects(
                self.bucket, [DeleteObject(n) for n in batch])))
            if errors:
                raise StoreError(f"could not delete {len(errors)} objects under {prefix!r} "
                                 f"in {self.uri}, e.g. {errors[0].name}: {errors[0].message}")

    def _child_folders(self, prefix: str) -> list[str]:
        folder = self._folder(prefix)
        objects = self._names_under(folder, recursive=False)
        return sorted(obj.object_name[len(folder):].rstrip("/")
                      for obj in objects if obj.is_dir)


# ---------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------

_ACCEPTED = "file:///absolute/folder, a plain local path, or s3://bucket[/prefix]"


def open_store(uri: str | os.PathLike) -> ObjectStore:
    """The store a URI names: ``file://`` or a local path, or ``s3://bucket[/prefix]``."""
    if isinstance(uri, os.PathLike):
        return LocalStore(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError(f"no store URI given; use {_ACCEPTED}")
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        return LocalStore(uri)
    if "://" in uri or _SCHEME_LIKE.match(uri):
        raise StoreError(f"store URI {uri!r} is not supported; use {_ACCEPTED}")
    return LocalStore(uri)
