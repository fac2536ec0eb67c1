"""What the embedded default makes for itself and a Kubernetes pod must be given: the platform
database (INDAI_DB_URL, never a silent pod-local SQLite file) and the members' de-identification
keys (INDAI_SECRETS_DIR, a mounted Secret, never a key made in one container)."""
import pytest

from indai.platform import db
from indai.platform.errors import UserError
from indai.platform.settings import member_secret


def test_embedded_default_is_sqlite_under_indai_home(monkeypatch, tmp_path):
    monkeypatch.delenv("INDAI_DB_URL", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("INDAI_HOME", str(tmp_path))
    assert db.database_url() == f"sqlite:///{tmp_path.resolve() / 'platform.db'}"


def test_inside_a_pod_the_url_must_be_given(monkeypatch, tmp_path):
    """A Serve replica on a Ray pod without INDAI_DB_URL had opened an empty ~/.indai/platform.db
    and refused every member's token; now it says what is missing."""
    monkeypatch.setenv("INDAI_HOME", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.delenv("INDAI_DB_URL", raising=False)
    with pytest.raises(UserError, match="INDAI_DB_URL is not set in this pod"):
        db.database_url()
    assert not (tmp_path / "platform.db").exists()
    monkeypatch.setenv("INDAI_DB_URL", "postgresql+psycopg://indai:pw@db:5432/indai")
    assert db.database_url() == "postgresql+psycopg://indai:pw@db:5432/indai"


def test_embedded_default_makes_a_member_key_once(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("INDAI_SECRETS_DIR", raising=False)
    monkeypatch.setenv("INDAI_HOME", str(tmp_path))
    key = member_secret("steel-a")
    assert len(key) == 32 and member_secret("steel-a") == key
    assert (tmp_path / "secrets" / "steel-a.key").stat().st_mode & 0o777 == 0o600


def test_inside_a_pod_member_keys_come_from_the_mounted_secret(monkeypatch, tmp_path):
    """A release on the cluster had made the member's key in the container's own layer: after a pod
    restart the next release made another, so the same asset got other pseudonyms."""
    monkeypatch.setenv("INDAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.delenv("INDAI_SECRETS_DIR", raising=False)
    with pytest.raises(UserError, match="set the chart value ray.memberKeys.existingSecret to a Secret with steel-a.key"):
        member_secret("steel-a")
    assert not (tmp_path / "home" / "secrets").exists()
    mounted = tmp_path / "member-keys"  # as the chart mounts the Secret
    mounted.mkdir()
    (mounted / "steel-a.key").write_text("ab" * 32 + "\n")
    (mounted / "auto-b.key").write_text("not a key")
    monkeypatch.setenv("INDAI_SECRETS_DIR", str(mounted))
    assert member_secret("steel-a") == bytes.fromhex("ab" * 32)
    with pytest.raises(UserError, match="add ship-c.key, 64 hex characters"):
        member_secret("ship-c")
    assert not (mounted / "ship-c.key").exists()
    with pytest.raises(UserError, match="does not hold a de-identification key"):
        member_secret("auto-b")


@pytest.mark.timeout(120, func_only=True)  # (without the connect timeout this would wait for minutes)
def test_a_database_that_takes_the_connection_and_never_answers_is_given_up_on():
    """A PostgreSQL URL whose host accepts TCP and then says nothing (a hung server; a partition
    whose SYNs are dropped waits as long): the engine's connect fails with libpq's connect timeout,
    instead of holding the caller (a member's call in the ingress) for the kernel's minutes."""
    import socket
    import threading
    import time

    from sqlalchemy.exc import OperationalError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    eng = db.engine(f"postgresql+psycopg://indai:secret@127.0.0.1:{silent.getsockname()[1]}/indai")
    t0 = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="timeout expired"):
            with eng.connect():
                pass
        assert held, "the connection never reached the silent server"
        assert time.monotonic() - t0 >= db.CONNECT_TIMEOUT_S - 1  # (it waited for the server, as it should, then gave up)
    finally:
        eng.dispose()
        silent.close()


def test_the_database_query_timeout_setting_is_checked(monkeypatch, tmp_path):
    """INDAI_DB_QUERY_TIMEOUT_S bounds every database operation; a value that is not a number of
    seconds from 1 to 3600 is refused with the variable's name, not taken as no bound."""
    monkeypatch.delenv("INDAI_DB_QUERY_TIMEOUT_S", raising=False)
    assert db.default_query_timeout_s() == db.QUERY_TIMEOUT_S == 30
    monkeypatch.setenv("INDAI_DB_QUERY_TIMEOUT_S", "7.5")
    assert db.default_query_timeout_s() == 7.5
    for bad in ("0", "-3", "nan", "inf", "9999", "30s", "1e400"):
        monkeypatch.setenv("INDAI_DB_QUERY_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="INDAI_DB_QUERY_TIMEOUT_S=.* is not a number of seconds from 1 to 3600"):
            db.default_query_timeout_s()
    # a bad value stops the engine from being made (a gateway's or replica's start), not a later call
    with pytest.raises(UserError, match="INDAI_DB_QUERY_TIMEOUT_S"):
        db.engine("postgresql+psycopg://indai:secret@127.0.0.1:9/indai")
    db.engine(f"sqlite:///{tmp_path / 'p.db'}").dispose()  # SQLite has no server to wait for: not read
