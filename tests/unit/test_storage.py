"""LocalStore, key validation and open_store. The behaviour shared with S3Store lives in
tests/store_checks.py and runs here against a local folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indai.platform import storage
from indai.platform.errors import UserError
from indai.platform.storage import (LocalStore, S3Store, StoreError, open_store,
                                    validate_key)
from store_checks import CHECKS


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(f"file://{tmp_path / 'store'}")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    folder = tmp_path / "scratch"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_local_behaviour(check, store, scratch):
    check(store, scratch)


# -- LocalStore specifics ------------------------------------------------------------------


def test_root_is_created_on_first_write(tmp_path):
    root = tmp_path / "not" / "yet"
    store = LocalStore(root)
    assert store.list() == [] and not root.exists()
    store.put_bytes("k", b"v")
    assert (root / "k").read_bytes() == b"v"
    assert store.uri == f"file://{root}"


def test_failed_write_keeps_old_content_and_leaves_no_temp_file(store, monkeypatch):
    store.put_bytes("ckpt/model.pt", b"old")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(StoreError, match="No space left"):
        store.put_bytes("ckpt/model.pt", b"new")
    monkeypatch.undo()
    assert store.get_bytes("ckpt/model.pt") == b"old"
    assert os.listdir(store.root / "ckpt") == ["model.pt"]


def test_temp_files_of_a_crashed_writer_are_not_listed(store):
    store.put_bytes("v1/a", b"a")
    # What a writer killed between creating and renaming its temp file leaves behind.
    (store.root / "v1" / (storage._TMP_PREFIX + "abc123")).write_bytes(b"partial")
    assert store.list() == ["v1/a"]
    assert store.list("v1") == ["v1/a"]


def test_files_get_normal_permissions(store):
    store.put_bytes("k", b"v")
    umask = os.umask(0)
    os.umask(umask)
    assert (store.root / "k").stat().st_mode & 0o777 == 0o666 & ~umask


def test_symlink_out_of_the_root_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store.put_bytes("inside", b"x")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(StoreError, match="outside"):
        store.get_bytes("link/secret")
    with pytest.raises(StoreError, match="outside"):
        store.put_bytes("link/planted", b"x")
    with pytest.raises(StoreError, match="outside"):
        store.exists("link/secret")
    with pytest.raises(StoreError, match="outside"):
        store.list("link")
    with pytest.raises(StoreError, match="outside"):
        store.delete_prefix("link")
    assert not (outside / "planted").exists()
    assert (outside / "secret").read_bytes() == b"secret"
    # A file symlink pointing outside is refused too.
    (store.root / "file-link").symlink_to(outside / "secret")
    with pytest.raises(StoreError, match="outside"):
        store.get_bytes("file-link")


def test_symlink_inside_the_root_is_followed(store):
    store.put_bytes("real/a", b"a")
    (store.root / "alias").symlink_to(store.root / "real")
    assert store.get_bytes("alias/a") == b"a"


def test_download_dir_refuses_to_write_outside_the_target(store, tmp_path):
    store.put_bytes("ds/v1/sub/file", b"x")
    target = tmp_path / "target"
    outside = tmp_path / "elsewhere"
    target.mkdir()
    outside.mkdir()
    (target / "sub").symlink_to(outside)
    with pytest.raises(StoreError, match="outside"):
        store.download_dir("ds/v1", target)
    assert list(outside.iterdir()) == []


def test_file_and_folder_with_one_name_give_a_store_error(store):
    store.put_bytes("a", b"file")
    with pytest.raises(StoreError, match="cannot write"):
        store.put_bytes("a/b", b"x")
    store.put_bytes("d/e", b"x")
    with pytest.raises(StoreError):
        store.put_bytes("d", b"x")
    with pytest.raises(StoreError, match="not in"):
        store.get_bytes("d")


def test_upload_dir_writes_commit_markers_last(tmp_path):
    class RecordingStore(LocalStore):
        def put_file(self, key, local_path):
            self.written.append(key)
            super().put_file(key, local_path)

    store = RecordingStore(tmp_path / "store")
    store.written = []
    source = tmp_path / "copy-of-a-version"
    (source / "z").mkdir(parents=True)
    for rel in ["_COMMITTED", "a.bin", "z/_COMMITTED", "z/z.bin", "zz.bin"]:
        (source / rel).write_text("{}")
    store.upload_dir("v", source)
    assert store.written[-2:] == ["v/_COMMITTED", "v/z/_COMMITTED"]
    assert sorted(store.written[:-2]) == ["v/a.bin", "v/z/z.bin", "v/zz.bin"]


def test_uncommitted_child_folder_without_marker_is_ignored(store):
    store.put_bytes("ckpt/step-1/w", b"1")
    store.commit("ckpt/step-1", {"step": 1})
    store.put_bytes("ckpt/step-2/w", b"half")  # the writer died before commit
    (store.root / "ckpt" / "step-3").mkdir()   # an empty folder
    assert store.committed_children("ckpt") == ["step-1"]


def test_store_error_is_a_user_error():
    assert issubclass(StoreError, UserError)


# -- open_store ----------------------------------------------------------------------------


def test_open_store_local_forms(tmp_path):
    by_uri = open_store(f"file://{tmp_path}")
    by_path = open_store(str(tmp_path))
    by_pathlike = open_store(tmp_path)
    for store in (by_uri, by_path, by_pathlike):
        assert isinstance(store, LocalStore) and store.root == tmp_path
    relative = open_store("some/relative/dir")
    assert isinstance(relative, LocalStore)
    assert relative.root == Path.cwd() / "some/relative/dir"


def test_open_store_s3(monkeypatch):
    monkeypatch.setenv("INDAI_S3_ENDPOINT", "127.0.0.1:9")
    monkeypatch.setenv("INDAI_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("INDAI_S3_SECRET_KEY", "secretkey")
    monkeypatch.setenv("INDAI_S3_SECURE", "0")
    store = open_store("s3://my-bucket/team/a/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.base, store.uri) == ("my-bucket", "team/a", "s3://my-bucket/team/a")
    assert store.endpoint == "127.0.0.1:9" and store.secure is False
    assert open_store("s3://my-bucket").base == ""


@pytest.mark.parametrize("uri", ["", "   ", "http://host/x", "https://host/x", "ftp://host/x",
                                 "gs://bucket", "s3:bucket", None, 42])
def test_open_store_rejects_other_schemes(uri):
    with pytest.raises(StoreError) as err:
        open_store(uri)
    assert "s3://bucket" in str(err.value) and "file://" in str(err.value)


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://Bad_Bucket", "s3://ab",
                                 "s3://bucket/../x", "s3://bucket/a//b", "s3://bucket?x=1"])
def test_open_store_rejects_bad_s3_uris(uri, monkeypatch):
    monkeypatch.setenv("INDAI_S3_ENDPOINT", "127.0.0.1:9")
    with pytest.raises(StoreError):
        open_store(uri)


def test_s3_without_endpoint_says_which_variables_to_set(monkeypatch):
    monkeypatch.delenv("INDAI_S3_ENDPOINT", raising=False)
    with pytest.raises(StoreError) as err:
        open_store("s3://bucket")
    for name in ("INDAI_S3_ENDPOINT", "INDAI_S3_ACCESS_KEY", "INDAI_S3_SECRET_KEY",
                 "INDAI_S3_SECURE"):
        assert name in str(err.value)


def test_s3_settings_are_checked(monkeypatch):
    monkeypatch.setenv("INDAI_S3_ENDPOINT", "127.0.0.1:9")
    monkeypatch.delenv("INDAI_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("INDAI_S3_SECRET_KEY", raising=False)
    monkeypatch.setenv("INDAI_S3_SECURE", "maybe")
    with pytest.raises(StoreError, match="INDAI_S3_SECURE"):
        open_store("s3://bucket")
    monkeypatch.setenv("INDAI_S3_SECURE", "1")
    assert open_store("s3://bucket").secure is True
    with pytest.raises(StoreError, match="only one"):
        S3Store("s3://bucket", access_key="ak")
    assert S3Store("s3://bucket", endpoint="http://10.0.0.1:9000").secure is False


# -- validate_key --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [
    "datasets/cwru/abc123/manifest.json", "raw/member-1/2024=06/a+b,c@d_e.csv",
    "models/pretrained/bert-base/config.json", "데이터/파일.bin", "a..b/.hidden/...",
    "x" * 255, "/".join(["y" * 200] * 5),
])
def test_valid_keys_are_returned_unchanged(key):
    assert validate_key(key) is key


@pytest.mark.parametrize("key, reason", [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("//proc/self/root", "absolute"),
    ("C:\\Windows", "drive"),
    ("C:/Windows", "drive"),
    ("file:///etc/passwd", "URL"),
    ("s3://other-bucket/x", "URL"),
    ("s3:x", "URL"),
    ("a/../b", "'..'"),
    ("..", "'..'"),
    ("./a", "'.'"),
    ("a/.", "'.'"),
    ("a//b", "empty segment"),
    ("a/b/", "empty segment"),
    ("a\\b", "backslash"),
    ("%2e%2e/x", "percent-encoding"),
    ("a%2fb", "percent-encoding"),
    ("a#frag", "fragment"),
    ("a?x=1", "query"),
    ("~/x", "home"),
    ("~root", "home"),
    ("a\x00b", "control"),
    ("a\nb", "control"),
    ("a\u200bb", "invisible"),
    ("a/ /b", "whitespace"),
    ("a b", "not allowed"),
    ("a:b", "URL"),
    ("a/b:c", "not allowed"),
    ("a/" + "z" * 256, "255"),
    ("z/" * 512 + "z", "1024"),
    ("a\uff0e\uff0e/b", "not allowed"),  # fullwidth dots
])
def test_invalid_keys_are_rejected_with_a_reason(key, reason):
    with pytest.raises(StoreError) as err:
        validate_key(key)
    assert reason in str(err.value)
    assert "datasets/cwru/abc123/manifest.json" in str(err.value)  # says what to do


@pytest.mark.parametrize("key", [None, 3, b"bytes", Path("a/b")])
def test_non_string_keys_are_rejected(key):
    with pytest.raises(StoreError, match="must be a string"):
        validate_key(key)


# Property tests. Safe segments use letters of any script, digits and the allowed
# punctuation; "." and ".." are the only all-dot segments excluded.
_SAFE_CHARS = st.one_of(
    st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo"]),
    st.sampled_from("0123456789-_.@=+,"),
)
_SEGMENT = st.text(_SAFE_CHARS, min_size=1, max_size=30).filter(lambda s: s not in (".", ".."))
_SAFE_KEY = st.lists(_SEGMENT, min_size=1, max_size=8).map("/".join)

# Tricks that are unsafe wherever they land inside a key.
_ANYWHERE = ["%2e%2e", "%2f", "%", "#", "?", "//proc/self/root", "file://", "s3://", "\\",
             "C:\\", "\x00", "\n", "//", ":"]
# Tricks that are unsafe as a whole segment.
_AS_SEGMENT = ["..", ".", "", " ", "\t", "%2e%2e", "C:", "x" * 256]
# Tricks that are unsafe at the start.
_AT_START = ["/", "/etc/passwd/", "//", "~", "~/", "C:\\", "C:/", "file:///", "s3://bucket/",
             "http://host/", "\\\\server\\share\\"]


@given(key=_SAFE_KEY)
@settings(max_examples=300, deadline=None)
def test_keys_of_safe_segments_are_accepted(key):
    assert validate_key(key) == key


@given(key=_SAFE_KEY, trick=st.sampled_from(_ANYWHERE), data=st.data())
@settings(max_examples=300, deadline=None)
def test_tricks_anywhere_are_rejected(key, trick, data):
    at = data.draw(st.integers(0, len(key)))
    with pytest.raises(StoreError):
        validate_key(key[:at] + trick + key[at:])


@given(segments=st.lists(_SEGMENT, min_size=1, max_size=8), trick=st.sampled_from(_AS_SEGMENT),
       data=st.data())
@settings(max_examples=300, deadline=None)
def test_tricky_segments_are_rejected(segments, trick, data):
    at = data.draw(st.integers(0, len(segments)))
    with pytest.raises(StoreError):
        validate_key("/".join(segments[:at] + [trick] + segments[at:]))


@given(key=_SAFE_KEY, trick=st.sampled_from(_AT_START))
@settings(max_examples=200, deadline=None)
def test_tricky_starts_are_rejected(key, trick):
    with pytest.raises(StoreError):
        validate_key(trick + key)
