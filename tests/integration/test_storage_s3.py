"""S3Store against a real MinIO server (the session fixture ``minio``). The behaviour
shared with LocalStore lives in tests/store_checks.py and runs here unchanged."""

from __future__ import annotations

import uuid

import pytest
from minio import Minio

from indai.platform.storage import S3Store, StoreError, StoreUnavailable, open_store
from minio_server import free_port
from store_checks import CHECKS

pytestmark = pytest.mark.integration


def _fresh_bucket() -> str:
    return f"indai-test-{uuid.uuid4().hex[:12]}"


def _store(minio, uri: str, **overrides) -> S3Store:
    settings = dict(endpoint=minio.endpoint, access_key=minio.access_key,
                    secret_key=minio.secret_key, secure=False)
    return S3Store(uri, **{**settings, **overrides})


def _admin(minio) -> Minio:
    return Minio(endpoint=minio.endpoint, access_key=minio.access_key,
                 secret_key=minio.secret_key, secure=False)


@pytest.fixture
def store(minio) -> S3Store:
    """A store on a bucket of its own that does not exist yet."""
    return _store(minio, f"s3://{_fresh_bucket()}")


@pytest.fixture
def scratch(tmp_path):
    folder = tmp_path / "scratch"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_s3_behaviour(check, store, scratch):
    check(store, scratch)


def test_bucket_is_created_on_first_write(minio, store):
    admin = _admin(minio)
    assert not admin.bucket_exists(store.bucket)
    # Reads of a bucket that does not exist yet behave like an empty store.
    assert store.list() == [] and not store.exists("k") and store.committed_children() == []
    with pytest.raises(StoreError, match="not in"):
        store.get_bytes("k")
    assert not admin.bucket_exists(store.bucket)
    store.put_bytes("k", b"v")
    assert admin.bucket_exists(store.bucket)
    # A second store on the same bucket finds it there.
    other = _store(minio, store.uri)
    other.put_bytes("k2", b"v2")
    assert store.list() == ["k", "k2"]


def test_base_prefix_keeps_keys_relative(minio):
    bucket = _fresh_bucket()
    based = _store(minio, f"s3://{bucket}/tenant/a")
    whole = _store(minio, f"s3://{bucket}")
    based.put_bytes("datasets/x/v1/data", b"d")
    based.commit("datasets/x/v1", {})
    whole.put_bytes("tenant/ab/elsewhere", b"e")
    assert based.uri == f"s3://{bucket}/tenant/a"
    assert based.list() == ["datasets/x/v1/_COMMITTED", "datasets/x/v1/data"]
    assert whole.list("tenant/a") == ["tenant/a/datasets/x/v1/_COMMITTED",
                                      "tenant/a/datasets/x/v1/data"]
    assert based.committed_children("datasets/x") == ["v1"]
    assert whole.committed_children("tenant/a/datasets/x") == ["v1"]


def test_open_store_reads_the_environment(minio, monkeypatch):
    monkeypatch.setenv("INDAI_S3_ENDPOINT", minio.endpoint)
    monkeypatch.setenv("INDAI_S3_ACCESS_KEY", minio.access_key)
    monkeypatch.setenv("INDAI_S3_SECRET_KEY", minio.secret_key)
    monkeypatch.setenv("INDAI_S3_SECURE", "0")
    store = open_store(f"s3://{_fresh_bucket()}/p")
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_wrong_credentials_give_a_store_error(minio):
    store = _store(minio, f"s3://{_fresh_bucket()}", secret_key="not-the-secret-key")
    with pytest.raises(StoreError, match="INDAI_S3_SECRET_KEY"):
        store.put_bytes("k", b"v")


def test_unreachable_endpoint_gives_a_store_error():
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("s3://bucket", endpoint=endpoint, access_key="ak", secret_key="secretkey",
                    secure=False, retry_deadline_s=0.5)  # retried for half a second, then given up
    for call in (lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k"),
                 lambda: store.list(), lambda: store.exists("k")):
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert "unreachable" in str(err.value) and endpoint in str(err.value)
        assert "gave up after" in str(err.value) and "INDAI_S3_RETRY_DEADLINE_S=0.5" in str(err.value)


def test_store_survives_a_server_restart(minio, store):
    store.put_bytes("before", b"1")
    store.commit("v", {})
    impatient = _store(minio, store.uri, retry_deadline_s=0)  # tries once
    minio.stop()
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            impatient.get_bytes("before")
    finally:
        minio.start()
    assert store.get_bytes("before") == b"1"
    assert store.committed_children() == ["v"]


def test_folder_placeholders_from_other_tools_are_not_keys(minio, store):
    import io

    store.put_bytes("ds/v1/data", b"d")
    _admin(minio).put_object(store.bucket, "ds/v1/", io.BytesIO(b""), 0)
    assert store.list() == ["ds/v1/data"]
    assert store.list("ds") == ["ds/v1/data"]
