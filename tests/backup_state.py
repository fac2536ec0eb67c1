"""A platform state worth backing up, for the backup tests: members, users and a token in the
platform database; an experiment, a run (params, metrics with a NaN, tags), a registered model
with an alias, and MLflow's own users in MLflow's database; objects in the store, MLflow's
artefacts among them. And a way to read a database's every row, to compare two of them."""
from __future__ import annotations

import math
import os
from pathlib import Path


def make_platform(url: str) -> str:
    """Members, a user and a token; returns the token (its secret is only in this value)."""
    from indai.platform import db, tenancy

    eng = db.engine(url)
    try:
        db.upgrade(eng)
        tenancy.add_member(eng, "steel-a", "Steel A", "steel", "demand")
        tenancy.add_member(eng, "auto-b", "Auto B", "automotive", "demand")
        tenancy.add_user(eng, "kim", "steel-a", "researcher")
        _tid, token = tenancy.create_token(eng, "kim")
        tenancy.set_model_access(eng, "cwru-bearing", "steel-a", "shared", ["auto-b"])
    finally:
        eng.dispose()
    return token


def make_mlflow(url: str, artifacts: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.create_experiment("cwru", artifact_location=(artifacts / "1").as_uri())
    run = client.create_run(exp, tags={"indai.member": "steel-a"})
    client.log_param(run.info.run_id, "lr", "0.001")
    for step, loss in enumerate([0.9, 0.5, float("nan"), 0.2]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    client.log_text(run.info.run_id, "weights, pretend", "model/weights.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("cwru-bearing", description="bearing faults, 한국어 설명")
    client.create_model_version("cwru-bearing", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("cwru-bearing", "champion", "1")
    auth = AuthStore()
    auth.init_db(url)
    auth.create_user("indai-serve", "a-password-of-16+", is_admin=False)
    auth.engine.dispose()


def make_store(root: Path) -> dict[str, bytes]:
    files = {
        "datasets/cwru/v1/part-0.bin": os.urandom(300_000),
        "datasets/cwru/v1/manifest.json": b'{"rows": 3}',
        "datasets/cwru/v1/_COMMITTED": b'{"at": "2026-11-29"}',
        "raw/steel-a/logs/2026-11-01.csv": "시간,온도\n1,20.5\n".encode(),
        "empty/file.txt": b"",
    }
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


def store_contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def all_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every table (version tables aside), ordered, with NaN made comparable."""
    from sqlalchemy import MetaData, create_engine, select

    eng = create_engine(url)
    try:
        md = MetaData()
        md.reflect(bind=eng)
        out = {}
        with eng.connect() as conn:
            for t in md.sorted_tables:
                if t.name.startswith("alembic_version"):
                    continue
                rows = conn.execute(select(t).order_by(*(t.primary_key.columns or t.c))).all()
                out[t.name] = [tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in r) for r in rows]
        return out
    finally:
        eng.dispose()
