"""Where the platform database is: INDAI_DB_URL, else the embedded default's SQLite file, and
never a silent pod-local SQLite file inside Kubernetes."""
import pytest

from indai.platform import db
from indai.platform.errors import UserError


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
