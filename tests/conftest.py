"""Shared fixtures. Helpers that are not tests (minio_server, store_checks) live next to
this file, so the tests folder goes on sys.path."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from minio_server import MinioServer  # noqa: E402


MINIO_FIXTURES = {"minio", "minio_server"}  # the fixtures that start a MinioServer (here and in test_storage_faults)


def pytest_collection_finish(session):
    """Build the pinned MinIO (minutes, the first time on a machine) before the first test runs
    when a selected test needs it: built inside a test's setup, the build counted against that
    test's timeout, so running test_storage_faults.py alone on a fresh machine failed."""
    if session.config.option.collectonly:
        return
    if any(MINIO_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        import subprocess

        from minio_server import minio_binary

        try:
            minio_binary()
        except (RuntimeError, OSError, subprocess.CalledProcessError):
            pass  # no Go, or the build failed: the fixture says so again, in the tests that need MinIO only


@pytest.fixture(scope="session")
def minio():
    """A real MinIO server for the whole session (tests may stop() and start() it)."""
    with MinioServer() as server:
        yield server


REPO = Path(__file__).resolve().parents[1]

MLFLOW_FALLBACKS = ("mlflow.db", "mlruns", "mlartifacts")  # what MLflow writes into the working folder unless told where


@pytest.fixture(autouse=True)
def _nothing_of_mlflow_left_in_the_working_folder():
    """A test that names no tracking URI, or an experiment without an artifact location, makes
    MLflow fall back to ./mlflow.db and ./mlruns: into the checkout, where they were once committed.
    The test that leaves them fails here (its teardown), and they are removed."""
    import shutil

    here = Path.cwd()
    before = {name for name in MLFLOW_FALLBACKS if (here / name).exists()}
    yield
    left = sorted(name for name in MLFLOW_FALLBACKS if (here / name).exists() and name not in before)
    for name in left:
        shutil.rmtree(here / name) if (here / name).is_dir() else (here / name).unlink()
    assert not left, (f"the test left MLflow's fallback {', '.join(left)} in {here}: give it a tracking URI and its "
                      "experiments an artifact_location under tmp_path")


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
