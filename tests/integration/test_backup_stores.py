"""Backups between the embedded default and the cluster's stores: a real PostgreSQL server
(both databases) and a real MinIO server (the store and the backup bucket)."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from backup_state import all_rows, make_mlflow, make_platform, make_store, store_contents
from indai.platform import backup


def _comparable(rows: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """SQLite keeps no zone and indai writes UTC there: a naive time is that UTC instant."""
    def utc(v):
        if isinstance(v, datetime):
            return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)
        return v

    return {t: [tuple(utc(v) for v in r) for r in rs] for t, rs in rows.items()}


def test_the_embedded_homes_snapshot_restores_into_postgres_and_minio_and_back(tmp_path, monkeypatch, postgres, minio):
    home = tmp_path / "home"
    (home / "mlflow").mkdir(parents=True)
    (home / "store" / "mlflow-artifacts").mkdir(parents=True)
    token = make_platform(f"sqlite:///{home}/platform.db")
    make_mlflow(f"sqlite:///{home}/mlflow/mlflow.db", home / "store" / "mlflow-artifacts")
    objects = make_store(home / "store")
    for var in ("INDAI_DB_URL", "INDAI_MLFLOW_DB_URL", "INDAI_STORE_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("INDAI_HOME", str(home))
    monkeypatch.setenv("INDAI_S3_ENDPOINT", minio.endpoint)
    monkeypatch.setenv("INDAI_S3_ACCESS_KEY", minio.access_key)
    monkeypatch.setenv("INDAI_S3_SECRET_KEY", minio.secret_key)
    monkeypatch.setenv("INDAI_S3_SECURE", "false")

    # 1. the embedded home into a MinIO bucket, encrypted
    from indai.platform.encryption import MAGIC, new_key_text
    from indai.platform.storage import open_store

    monkeypatch.setenv("INDAI_BACKUP_KEY", new_key_text())
    first = backup.backup(backup.current_sources(), "s3://indai-backups/nightly")
    assert first["objects"]["count"] == len(objects) + 1  # and MLflow's artefact
    raw = open_store("s3://indai-backups/nightly")
    keys = raw.list("")
    assert "config.json" in keys and not any(k.startswith("locks/") for k in keys)
    assert all(raw.get_bytes(k).startswith(MAGIC) for k in keys if k != "config.json")

    # 2. restored onto the cluster's stores: new PostgreSQL databases, another bucket
    platform_url, mlflow_url = postgres.new_database("platform"), postgres.new_database("mlflow")
    # a server in Korea: a naive time from SQLite must not be read as Seoul's
    from sqlalchemy import create_engine, text

    admin = create_engine(postgres.url)
    with admin.connect() as c:
        c.execute(text(f'ALTER DATABASE "{platform_url.rsplit("/", 1)[1]}" SET timezone TO \'Asia/Seoul\''))
        c.commit()
    admin.dispose()
    monkeypatch.setenv("INDAI_DB_URL", platform_url)
    monkeypatch.setenv("INDAI_MLFLOW_DB_URL", mlflow_url)
    monkeypatch.setenv("INDAI_STORE_URI", "s3://indai-restored")
    restored = backup.restore(backup.current_sources(), "s3://indai-backups/nightly")
    assert restored["objects"] == len(objects) + 1
    assert _comparable(all_rows(platform_url)) == _comparable(all_rows(f"sqlite:///{home}/platform.db"))
    assert _comparable(all_rows(mlflow_url)) == _comparable(all_rows(f"sqlite:///{home}/mlflow/mlflow.db"))

    # a restore does not replace a database something is still using (MLflow, the gateway, Serve)
    rows_now = all_rows(platform_url)
    user = create_engine(platform_url, connect_args={"application_name": "indai-gateway"})
    with user.connect() as c:
        c.execute(text("SELECT 1"))
        try:
            backup.restore(backup.current_sources(), "s3://indai-backups/nightly", replace=True)
            raise AssertionError("the restore replaced a database in use")
        except backup.BackupError as e:
            said = str(e)
    user.dispose()
    assert "platform database" in said and "is in use by 1 other session" in said and "(indai-gateway)" in said, said
    assert postgres.password not in said
    assert all_rows(platform_url) == rows_now
    monkeypatch.delenv("INDAI_BACKUP_KEY")

    store = open_store("s3://indai-restored")
    for key, data in objects.items():
        assert store.get_bytes(key) == data

    # new rows after the restored ones: PostgreSQL's identity and serial sequences were moved on
    from mlflow import MlflowClient

    from indai.platform import db, tenancy

    eng = db.engine(platform_url)
    assert tenancy.verify(eng, token).member == "steel-a"
    tenancy.add_member(eng, "ship-c", "Ship C", "shipbuilding", "demand")
    tenancy.add_user(eng, "lee", "ship-c", "researcher")
    tenancy.create_token(eng, "lee")
    eng.dispose()
    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    assert client.create_experiment("after", artifact_location=(tmp_path / "a").as_uri()) == "2"
    run = client.create_run("2")
    client.log_metric(run.info.run_id, "loss", 0.1)
    assert str(client.get_model_version_by_alias("cwru-bearing", "champion").version) == "1"

    # 3. the cluster's stores backed up (a REPEATABLE READ snapshot of PostgreSQL) into a folder:
    # only the new rows are new, and no object is stored again under the same content
    second = backup.backup(backup.current_sources(), str(tmp_path / "backups"))
    # the manifest names the databases it read, never their password
    assert second["sources"]["platform_db"] == platform_url.replace(postgres.password, "***")
    assert postgres.password not in (tmp_path / "backups" / "snapshots" / second["id"] / "manifest.json").read_text()
    grown = {k: v["tables"] for k, v in second["databases"].items()}
    was = {k: v["tables"] for k, v in first["databases"].items()}
    assert grown["platform"]["members"] == was["platform"]["members"] + 1
    assert grown["platform"]["tokens"] == was["platform"]["tokens"] + 1
    assert grown["mlflow"]["experiments"] == was["mlflow"]["experiments"] + 1
    assert grown["mlflow"]["metrics"] == was["mlflow"]["metrics"] + 1
    assert second["objects"]["count"] == first["objects"]["count"]
    # the drill: PostgreSQL's rows restore into scratch SQLite with this release's migrations
    drill = backup.verify(str(tmp_path / "backups"), restore_test=True)
    assert drill["restored"] == {k: sum(v["tables"].values()) for k, v in second["databases"].items()}

    # 4. and back into a new embedded home, row for row
    monkeypatch.delenv("INDAI_DB_URL")
    monkeypatch.delenv("INDAI_MLFLOW_DB_URL")
    monkeypatch.delenv("INDAI_STORE_URI")
    back = tmp_path / "back"
    monkeypatch.setenv("INDAI_HOME", str(back))
    backup.restore(backup.current_sources(), str(tmp_path / "backups"))
    assert _comparable(all_rows(f"sqlite:///{back}/platform.db")) == _comparable(all_rows(platform_url))
    assert _comparable(all_rows(f"sqlite:///{back}/mlflow/mlflow.db")) == _comparable(all_rows(mlflow_url))
    assert store_contents(back / "store") == store_contents(home / "store")
    assert Path(back / "store" / "mlflow-artifacts").is_dir()


def test_a_dump_that_waits_on_a_locked_table_ends_with_a_clear_error(tmp_path, monkeypatch, postgres):
    """A table held by another session (an ACCESS EXCLUSIVE lock: a migration, a stuck admin
    statement): each statement of the dump has a deadline, so the backup fails, saying so and
    naming the database without its password, instead of waiting as long as the lock is held."""
    import time

    from sqlalchemy import create_engine, text

    url = postgres.new_database("locked")
    make_platform(url)
    monkeypatch.setattr(backup, "DB_TIMEOUT_S", 2.0)
    holder = create_engine(url)
    with holder.connect() as c:
        c.execute(text("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE"))  # held until this block ends
        started = time.monotonic()
        try:
            backup.dump_database(url, tmp_path / "p.jsonl.gz", tmp_path)
            raise AssertionError("the dump did not fail")
        except backup.BackupError as e:
            said, took = str(e), time.monotonic() - started
        c.rollback()
    holder.dispose()
    assert "did not answer within 2 s" in said and "this snapshot was not made" in said, said
    assert postgres.password not in said and ":***@" in said
    assert took < 30, took  # given up on (a wait for the lock would last until the rollback)
