"""Shared fixtures. Helpers that are not tests (minio_server, store_checks) live next to
this file, so the tests folder goes on sys.path."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from minio_server import MinioServer  # noqa: E402


@pytest.fixture(scope="session")
def minio():
    """A real MinIO server for the whole session (tests may stop() and start() it)."""
    with MinioServer() as server:
        yield server


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """The embedded default for real: `indai up` (local Ray head + MLflow server on SQLite)
    under a private INDAI_HOME, on free loopback ports; `indai down` at the end."""
    import os

    from indai.platform import services as svc
    from indai.platform.settings import load_settings

    home = tmp_path_factory.mktemp("indai-home")
    old = os.environ.get("INDAI_HOME")
    os.environ["INDAI_HOME"] = str(home)
    try:
        svc.up(num_cpus=4, ports={"mlflow": 0, "ray_gcs": 0, "dashboard": 0, "serve": 0})
        yield load_settings()
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        svc.down()
        if old is None:
            os.environ.pop("INDAI_HOME", None)
        else:
            os.environ["INDAI_HOME"] = old


@pytest.fixture(scope="session")
def cwru_dataset(services):
    """The shipped CWRU subset ingested into the embedded store: (name, version, manifest)."""
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store

    return ingest(REPO / "examples" / "cwru-0hp" / "dataset.yaml", open_store(services.store_uri), progress=False)


@pytest.fixture(scope="session")
def trained_model(services, cwru_dataset):
    """The shipped recipe, shortened, trained with Ray Train (2 workers) and registered."""
    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    name, version, _ = cwru_dataset
    cfg = load_config(TrainConfig, REPO / "trainers" / "recipes" / "cwru_sensor.yaml",
                      [f"data.dataset={name}@{version}", "optim.epochs=2", "run.name=it-cwru",
                       "run.register_as=it-cwru", "run.alias=champion", "run.progress=false",
                       "run.timing_skip=2", "run.profile_steps=2"])
    return cfg, train(cfg, services)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's package) for the whole session."""
    from postgres_server import PostgresServer

    with PostgresServer() as server:
        yield server
