"""`indai admin backup / backups / verify-backup / restore` on the embedded default: SQLite
databases and a folder store, backed up into a folder (tests/integration/test_backup_stores.py
does PostgreSQL and MinIO)."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from backup_state import all_rows, make_mlflow, make_platform, make_store, store_contents
from indai.platform import backup, cli


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A used embedded home: both databases and a store with MLflow's artefacts in it."""
    home = tmp_path_factory.mktemp("home")
    (home / "mlflow").mkdir()
    (home / "store" / "mlflow-artifacts").mkdir(parents=True)
    token = make_platform(f"sqlite:///{home}/platform.db")
    make_mlflow(f"sqlite:///{home}/mlflow/mlflow.db", home / "store" / "mlflow-artifacts")
    make_store(home / "store")
    return home, token


def _home(monkeypatch, home: Path) -> None:
    for var in ("INDAI_DB_URL", "INDAI_MLFLOW_DB_URL", "INDAI_STORE_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("INDAI_HOME", str(home))


def _copy_home(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _same_state(a: Path, b: Path) -> None:
    assert all_rows(f"sqlite:///{b}/platform.db") == all_rows(f"sqlite:///{a}/platform.db")
    assert all_rows(f"sqlite:///{b}/mlflow/mlflow.db") == all_rows(f"sqlite:///{a}/mlflow/mlflow.db")
    assert store_contents(b / "store") == store_contents(a / "store")


def test_a_snapshot_restores_row_for_row_into_a_new_home(state, tmp_path, monkeypatch, capsys):
    home, token = state
    dest = tmp_path / "backups"
    _home(monkeypatch, home)
    assert cli.main(["admin", "backup", "--to", str(dest)]) == 0
    said = capsys.readouterr()
    assert "platform database 5 rows" in said.out and "6 objects" in said.out
    assert "==> dump the mlflow database" in said.err and "stage timings" in said.err
    assert cli.main(["admin", "backups", "--at", str(dest), "--json"]) == 0
    (snap,) = json.loads(capsys.readouterr().out)
    assert snap["databases"]["platform"]["tables"]["tokens"] == 1
    assert snap["databases"]["mlflow"]["tables"]["metrics"] == 4
    assert snap["databases"]["mlflow"]["tables"]["users"] == 1  # MLflow's own accounts
    assert set(snap["databases"]["mlflow"]["revisions"]) == {"alembic_version", "alembic_version_auth"}
    assert snap["objects"]["count"] == 6 and snap["objects"]["new_blobs"] == 6
    assert snap["sources"] == {"platform_db": f"sqlite:///{home}/platform.db", "mlflow_db": f"sqlite:///{home}/mlflow/mlflow.db",
                               "store": (home / "store").as_uri()}
    assert cli.main(["admin", "verify-backup", "--at", str(dest)]) == 0
    assert "every checksum matches" in capsys.readouterr().out

    new = tmp_path / "new-home"
    _home(monkeypatch, new)
    assert cli.main(["admin", "restore", "--from", dest.as_uri()]) == 0
    assert f"restored snapshot {snap['id']}: platform database 5 rows, mlflow database" in capsys.readouterr().out
    _same_state(home, new)

    # and the restored home works: the token, the registry's alias, the NaN, MLflow's users,
    # and new rows after the restored ones
    from mlflow import MlflowClient
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore

    from indai.platform import db, tenancy

    eng = db.engine(f"sqlite:///{new}/platform.db")
    assert tenancy.verify(eng, token).user == "kim"
    eng.dispose()
    url = f"sqlite:///{new}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    mv = client.get_model_version_by_alias("cwru-bearing", "champion")
    assert str(mv.version) == "1" and "한국어" in client.get_registered_model("cwru-bearing").description
    losses = [m.value for m in client.get_metric_history(mv.run_id, "loss")]
    assert losses[:2] == [0.9, 0.5] and losses[2] != losses[2] and losses[3] == 0.2
    assert client.create_experiment("after", artifact_location=(tmp_path / "a").as_uri()) == "2"
    auth = AuthStore()
    auth.init_db(url)
    assert auth.authenticate_user("indai-serve", "a-password-of-16+")
    auth.engine.dispose()


def test_the_next_snapshot_copies_only_what_changed_and_keep_prunes(state, tmp_path, monkeypatch):
    home = _copy_home(state[0], tmp_path / "home")
    _home(monkeypatch, home)
    dest = tmp_path / "backups"
    first = backup.backup(backup.current_sources(), str(dest))
    store = home / "store"
    old = (store / "raw/steel-a/logs/2026-11-01.csv").read_bytes()
    (store / "raw/steel-a/logs/2026-11-01.csv").write_bytes(old + b"2,21.0\n")  # changed
    (store / "raw/steel-a/logs/2026-11-02.csv").write_bytes(b"new day\n")  # new
    (store / "empty/file.txt").unlink()  # gone
    second = backup.backup(backup.current_sources(), str(dest))
    assert second["objects"]["count"] == 6
    assert second["objects"]["read"] == 2, "unchanged objects (same size and mtime) must not be read again"
    assert second["objects"]["new_blobs"] == 2
    assert second["objects"]["new_bytes"] == len(old) + 7 + 8
    assert len(list((dest / "blobs").rglob("*"))) - len(list((dest / "blobs").iterdir())) == 8

    # the first snapshot is still whole: it restores the content as it was
    _home(monkeypatch, tmp_path / "restored-first")
    backup.restore(backup.current_sources(), str(dest), first["id"])
    restored = store_contents(tmp_path / "restored-first" / "store")
    assert restored["raw/steel-a/logs/2026-11-01.csv"] == old and restored["empty/file.txt"] == b""

    _home(monkeypatch, home)
    third = backup.backup(backup.current_sources(), str(dest), keep=1)
    assert third["objects"]["read"] == 0 and third["objects"]["new_blobs"] == 0
    assert third["pruned"] == {"snapshots": [first["id"], second["id"]], "blobs": 2}
    assert [m["id"] for m in backup.list_snapshots(backup.open_backup_store(str(dest)))] == [third["id"]]
    assert not (dest / "snapshots" / first["id"]).exists()
    assert backup.verify(str(dest))["contents"] == 6


def test_damage_is_found_and_named(state, tmp_path, monkeypatch):
    _home(monkeypatch, state[0])
    dest = tmp_path / "backups"
    snap = backup.backup(backup.current_sources(), str(dest))
    blob = max((p for p in (dest / "blobs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[1000] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(backup.BackupError, match=rf"blobs/../{blob.name} in .* does not match its checksum"):
        backup.verify(str(dest))
    _home(monkeypatch, tmp_path / "new")
    with pytest.raises(backup.BackupError, match="does not match its checksum"):
        backup.restore(backup.current_sources(), str(dest))

    with pytest.raises(backup.BackupError, match="is not a snapshot id"):
        backup.verify(str(dest), "../../etc")
    with pytest.raises(backup.BackupError, match="no complete snapshot 20200101T000000000Z-abcdef"):
        backup.verify(str(dest), "20200101T000000000Z-abcdef")
    manifest = dest / "snapshots" / snap["id"] / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 99}))
    with pytest.raises(backup.BackupError, match="format 99, indai reads 1"):
        backup.verify(str(dest))


def test_restore_refuses_to_overwrite_and_replace_makes_it_exact(state, tmp_path, monkeypatch, capsys):
    dest = tmp_path / "backups"
    _home(monkeypatch, state[0])
    backup.backup(backup.current_sources(), str(dest))

    home = _copy_home(state[0], tmp_path / "home")
    from indai.platform import db, tenancy

    eng = db.engine(f"sqlite:///{home}/platform.db")
    tenancy.add_member(eng, "ship-c", "Ship C", "shipbuilding", "demand")
    eng.dispose()
    (home / "store" / "raw" / "later.bin").write_bytes(b"made after the backup")
    before_rows, before_objects = all_rows(f"sqlite:///{home}/platform.db"), store_contents(home / "store")
    _home(monkeypatch, home)
    assert cli.main(["admin", "restore", "--from", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "already holds 7 objects" in err and "--replace" in err
    assert store_contents(home / "store") == before_objects

    (home / "store").rename(tmp_path / "store-aside")  # the store empty, the databases not
    with pytest.raises(backup.BackupError, match=r"platform database .* already holds \d+ tables \(alembic_version, audit"):
        backup.restore(backup.current_sources(), str(dest))
    assert all_rows(f"sqlite:///{home}/platform.db") == before_rows
    (home / "platform.db").rename(tmp_path / "platform-aside.db")  # only MLflow's holds tables: nothing is written
    with pytest.raises(backup.BackupError, match=r"mlflow database .* already holds \d+ tables"):
        backup.restore(backup.current_sources(), str(dest))
    assert not (home / "platform.db").exists() and not (home / "store").exists()
    (tmp_path / "platform-aside.db").rename(home / "platform.db")
    (tmp_path / "store-aside").rename(home / "store")

    assert cli.main(["admin", "restore", "--from", str(dest), "--replace"]) == 0
    out = capsys.readouterr()
    assert "1 objects not in it deleted" in out.out and "dropping" in out.err
    _same_state(state[0], home)


def test_a_backup_must_live_apart_from_what_it_protects(state, tmp_path, monkeypatch):
    home = _copy_home(state[0], tmp_path / "home")
    _home(monkeypatch, home)
    for inside in (home / "store" / "backups", home / "store"):
        with pytest.raises(backup.BackupError, match="overlap: a backup must live apart"):
            backup.backup(backup.current_sources(), str(inside))
    assert not (home / "store" / "backups").exists()
    with pytest.raises(backup.BackupError, match="--keep 0: keep at least"):
        backup.backup(backup.current_sources(), str(tmp_path / "b"), keep=0)


def _dump(path: Path, lines: list) -> Path:
    with gzip.open(path, "wt") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    return path


def test_a_dump_with_tables_columns_or_values_the_schema_lacks_is_refused(tmp_path):
    revisions = {"alembic_version": ["0004"]}
    url = f"sqlite:///{tmp_path}/p.db"
    cases = {
        "a table": ([{"table": "members; DROP TABLE tokens", "columns": []}], "has a table 'members; DROP TABLE tokens'"),
        "a column": ([{"table": "members", "columns": ["id", "evil"]}], r"has columns the schema does not have \(evil\)"),
        "a value": ([{"table": "members", "columns": ["id", "company", "industry", "role", "disabled", "created_at"]},
                     ["m1", "C", "steel", "demand", False, {"$pickle": "gASV"}]], "is not one a backup writes"),
        "a row": ([{"table": "members", "columns": ["id"]}, ["m1", "extra"]], "does not match its columns"),
    }
    for name, (lines, message) in cases.items():
        with pytest.raises(backup.BackupError, match=message):
            backup.restore_database("platform", url, _dump(tmp_path / f"{name}.gz", lines), revisions, True, print)
    with pytest.raises(backup.BackupError, match="does not know"):
        backup.restore_database("platform", url, _dump(tmp_path / "x.gz", []), {"alembic_version": ["9999"]}, True, print)


def test_an_object_deleted_during_a_backup_and_a_damaged_previous_list_do_not_stop_it(state, tmp_path, monkeypatch):
    from indai.platform.storage import LocalStore

    home = _copy_home(state[0], tmp_path / "home")
    _home(monkeypatch, home)
    dest = tmp_path / "backups"
    first = backup.backup(backup.current_sources(), str(dest))
    listing = dest / "snapshots" / first["id"] / "objects.jsonl.gz"
    listing.write_bytes(listing.read_bytes()[:-8] + b"damaged!")
    (home / "store" / "raw/steel-a/logs/2026-11-01.csv").write_bytes(b"changed, so it is read\n")
    gone = "raw/steel-a/logs/2026-11-01.csv"

    class PrunedMeanwhile(LocalStore):  # the object is deleted after the listing, before it is read
        def get_file(self, key, local_path):
            if key == gone:
                self.delete(key)
            return super().get_file(key, local_path)

    monkeypatch.setattr(backup, "open_store", PrunedMeanwhile)
    said = []
    second = backup.backup(backup.current_sources(), str(dest), say=said.append)
    assert any("previous snapshot's object list cannot be used" in s and "checksum" in s for s in said), said
    assert (second["objects"]["read"], second["objects"]["vanished"], second["objects"]["count"]) == (6, 1, 5)
    assert any("1 deleted while the backup ran" in s for s in said)
    assert backup.verify(str(dest))["objects"] == 5
