"""The embedded default's code paths with other settings: ingest, train (checkpoints, final
weights) and resume against the S3 backend on a real MinIO server, chosen only by URI."""
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_ingest_train_resume_on_minio(minio, monkeypatch):
    from indai.platform import datasets
    from indai.platform.config import load_config
    from indai.platform.ingest import ingest
    from indai.platform.storage import S3Store, open_store
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import complete_from_manifest
    from indai.trainers.loop import train_loop

    monkeypatch.setenv("INDAI_S3_ENDPOINT", minio.endpoint)
    monkeypatch.setenv("INDAI_S3_ACCESS_KEY", minio.access_key)
    monkeypatch.setenv("INDAI_S3_SECRET_KEY", minio.secret_key)
    monkeypatch.setenv("INDAI_S3_SECURE", "0")
    store = open_store("s3://indai-pipeline/consortium")
    assert isinstance(store, S3Store)
    name, version, manifest = ingest(REPO / "examples/cwru-0hp/dataset.yaml", store, progress=False)
    assert datasets.resolve(store, datasets.parse_ref(name)).version == version

    def config(epochs: int) -> dict:
        cfg = load_config(TrainConfig, REPO / "trainers/recipes/cwru_sensor.yaml",
                          [f"data.dataset={name}@{version}", f"optim.epochs={epochs}", "run.name=s3-run",
                           "run.launcher=local", "run.progress=false"])
        return complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri}).model_dump(mode="json")

    first = train_loop(config(1))
    assert store.committed_children("checkpoints/s3-run") == ["epoch-00000", "final"]
    second = train_loop(config(2))  # the same run, longer: resumes from epoch-00000 in the bucket
    assert second["step"] == 2 * first["step"]
    assert second["test"]["accuracy"] >= 0.9
    assert "epoch-00001" in store.committed_children("checkpoints/s3-run")
