"""Behaviour every ObjectStore backend must show; run against LocalStore (unit tests) and
S3Store on a real MinIO (integration tests). Not a test module itself.

Each check takes an empty store and a scratch folder and asserts.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from indai.platform.storage import COMMIT_MARKER, ObjectStore, StoreError


def check_bytes_round_trip(store: ObjectStore, tmp: Path) -> None:
    assert not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"\x00\x01payload")
    assert store.exists("a/b.bin")
    assert store.get_bytes("a/b.bin") == b"\x00\x01payload"
    store.put_bytes("a/b.bin", b"replaced")
    assert store.get_bytes("a/b.bin") == b"replaced"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    # A "folder" is not an object.
    assert not store.exists("a")


def check_unicode_keys(store: ObjectStore, tmp: Path) -> None:
    key = "데이터/설비-01/측정값=3,a+b@c.bin"
    store.put_bytes(key, "센서".encode())
    assert store.get_bytes(key).decode() == "센서"
    assert store.list("데이터") == [key]


def check_missing_key(store: ObjectStore, tmp: Path) -> None:
    with pytest.raises(StoreError) as err:
        store.get_bytes("no/such/key.json")
    message = str(err.value)
    assert "'no/such/key.json'" in message and store.uri in message and "not in" in message
    with pytest.raises(StoreError, match="not in"):
        store.get_file("no/such/key.json", tmp / "out.json")
    assert not (tmp / "out.json").exists()


def check_file_round_trip(store: ObjectStore, tmp: Path) -> None:
    source = tmp / "source.bin"
    source.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    store.put_file("files/one.bin", source)
    assert store.get_bytes("files/one.bin") == source.read_bytes()
    dest = tmp / "deep" / "er" / "copy.bin"
    store.get_file("files/one.bin", dest)
    assert dest.read_bytes() == source.read_bytes()
    # No temp files are left next to the destination.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]
    with pytest.raises(StoreError, match="does not exist"):
        store.put_file("files/two.bin", tmp / "missing.bin")
    assert not store.exists("files/two.bin")


def check_list(store: ObjectStore, tmp: Path) -> None:
    assert store.list() == []
    keys = ["b/2", "a/1", "a/sub/3", "ab/4", "top"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys)
    assert store.list("") == sorted(keys)
    # Folder semantics: "a" does not include "ab/4"; one trailing "/" is fine.
    assert store.list("a") == ["a/1", "a/sub/3"]
    assert store.list("a/") == ["a/1", "a/sub/3"]
    assert store.list("a/sub") == ["a/sub/3"]
    assert store.list("nothing") == []
    assert store.list("top") == []  # an object is not a folder


def check_delete_prefix(store: ObjectStore, tmp: Path) -> None:
    for key in ["run/1/a", "run/1/b/c", "run/10/a", "run/2/a"]:
        store.put_bytes(key, b"x")
    store.commit("run/1", {})
    store.delete_prefix("run/1")
    assert store.list() == ["run/10/a", "run/2/a"]
    assert not store.is_committed("run/1")
    store.delete_prefix("run/does-not-exist")  # no error
    store.delete_prefix("run/")
    assert store.list() == []
    with pytest.raises(StoreError):
        store.delete_prefix("")  # never "delete everything" by accident


def check_dirs(store: ObjectStore, tmp: Path) -> None:
    source = tmp / "src"
    (source / "nested" / "deeper").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "nested" / "b.txt").write_text("b")
    (source / "nested" / "deeper" / "c.bin").write_bytes(b"\xffc")
    (source / COMMIT_MARKER).write_text(json.dumps({"committed_at": "2020-01-01T00:00:00+00:00"}))
    store.upload_dir("ds/v1", source)
    assert store.list("ds") == ["ds/v1/_COMMITTED", "ds/v1/a.txt", "ds/v1/nested/b.txt",
                                "ds/v1/nested/deeper/c.bin"]
    out = store.download_dir("ds/v1", tmp / "out")
    assert out == tmp / "out"
    assert (out / "a.txt").read_text() == "a"
    assert (out / "nested" / "b.txt").read_text() == "b"
    assert (out / "nested" / "deeper" / "c.bin").read_bytes() == b"\xffc"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["_COMMITTED", "a.txt", "nested/b.txt", "nested/deeper/c.bin"]
    with pytest.raises(StoreError, match="nothing under"):
        store.download_dir("ds/v2", tmp / "out2")
    # A local file whose name is not a valid key stops the upload before anything is written.
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "fine.txt").write_text("x")
    (bad / "has space.txt").write_text("x")
    with pytest.raises(StoreError, match="not allowed"):
        store.upload_dir("bad", bad)
    assert store.list("bad") == []


def check_commit_protocol(store: ObjectStore, tmp: Path) -> None:
    assert store.committed_children("datasets/cwru") == []
    for version in ["v1", "v2", "v3"]:
        store.put_bytes(f"datasets/cwru/{version}/data.bin", version.encode())
    assert store.committed_children("datasets/cwru") == []
    before = datetime.now(timezone.utc)
    # Commit v2 before v1: the order is by commit time, not by name. v3 stays half written.
    store.commit("datasets/cwru/v2", {"rows": 2})
    time.sleep(0.01)
    store.commit("datasets/cwru/v1", {"rows": 1, "spec": {"name": "cwru"}})
    assert store.committed_children("datasets/cwru") == ["v2", "v1"]
    assert store.committed_children("datasets/cwru/") == ["v2", "v1"]
    assert store.is_committed("datasets/cwru/v1")
    assert not store.is_committed("datasets/cwru/v3")
    record = store.read_commit("datasets/cwru/v1")
    assert record["rows"] == 1 and record["spec"] == {"name": "cwru"}
    when = datetime.fromisoformat(record["committed_at"])
    assert when.utcoffset().total_seconds() == 0 and before <= when <= datetime.now(timezone.utc)
    with pytest.raises(StoreError, match="not committed"):
        store.read_commit("datasets/cwru/v3")
    # The marker is an ordinary key at <prefix>/_COMMITTED.
    assert "datasets/cwru/v1/_COMMITTED" in store.list("datasets/cwru/v1")
    assert store.committed_children("datasets") == []  # only direct children count
    assert store.children("datasets") == ["cwru"] and store.children("datasets/cwru") == ["v1", "v2", "v3"]
    assert store.children("no/such/folder") == []
    assert store.committed_children() == []
    store.commit("toplevel", {})
    assert store.committed_children() == ["toplevel"]
    with pytest.raises(StoreError, match="not JSON"):
        store.commit("datasets/cwru/v3", {"bad": object()})
    assert not store.is_committed("datasets/cwru/v3")


def check_corrupt_marker(store: ObjectStore, tmp: Path) -> None:
    store.put_bytes("ckpt/step-1/_COMMITTED", b"not json")
    with pytest.raises(StoreError, match="not a JSON object"):
        store.committed_children("ckpt")


def check_keys_validated_everywhere(store: ObjectStore, tmp: Path) -> None:
    (tmp / "f").write_bytes(b"x")
    calls = [
        lambda k: store.put_bytes(k, b"x"),
        lambda k: store.get_bytes(k),
        lambda k: store.put_file(k, tmp / "f"),
        lambda k: store.get_file(k, tmp / "g"),
        lambda k: store.exists(k),
        lambda k: store.list(k),
        lambda k: store.delete_prefix(k),
        lambda k: store.upload_dir(k, tmp),
        lambda k: store.download_dir(k, tmp / "h"),
        lambda k: store.commit(k, {}),
        lambda k: store.is_committed(k),
        lambda k: store.read_commit(k),
        lambda k: store.committed_children(k),
    ]
    for bad in ["../escape", "/etc/passwd", "a/../../b", "file:///etc/passwd", "%2e%2e/x"]:
        for call in calls:
            with pytest.raises(StoreError, match="invalid object key"):
                call(bad)
    assert store.list() == []


CHECKS = [check_bytes_round_trip, check_unicode_keys, check_missing_key, check_file_round_trip,
          check_list, check_delete_prefix, check_dirs, check_commit_protocol,
          check_corrupt_marker, check_keys_validated_everywhere]
