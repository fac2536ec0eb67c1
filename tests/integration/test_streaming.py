"""Training reads the train split through Ray Data from the object store: windowed sensor
recordings (CWRU) and text records (NIST excavator work orders), each ingested from real
files, trained with 2 Ray Train workers, evaluated and registered."""
import pytest

pytestmark = pytest.mark.integration


def _train(services, overrides, repo):
    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    cfg = load_config(TrainConfig, repo / "trainers" / "recipes" / "cwru_sensor.yaml", overrides)
    return train(cfg, services)


def test_sensor_windows_stream_through_ray_data(services, cwru_dataset, repo, capfd):
    name, version, manifest = cwru_dataset
    result = _train(services, [f"data.dataset={name}@{version}", "data.loader=stream", "data.shuffle_buffer=2048",
                               "optim.epochs=2", "run.name=it-stream", "run.register_as=null", "run.progress=false"], repo)
    assert "streaming the train split" in capfd.readouterr().err
    assert result.test_accuracy >= 0.85, result.test_accuracy  # same split, same model as the in-memory run


def test_text_records_stream_and_train(services, repo, capfd):
    from mlflow.tracking import MlflowClient

    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store

    name, version, manifest = ingest(repo / "examples" / "nestor-excavators" / "dataset.yaml", open_store(services.store_uri), progress=False)
    assert manifest["layout"] == "records" and manifest["split"]["records"]["train"] > 1000
    result = _train(services, [f"data.dataset={name}@{version}", "data.loader=stream", "model.modalities=[text]",
                               "model.text.max_len=96",
                               "optim.epochs=2", "run.name=it-nestor", "run.register_as=it-nestor", "run.progress=false"], repo)
    assert "streaming the train split" in capfd.readouterr().err
    history = MlflowClient(services.mlflow_uri).get_metric_history(result.run_id, "epoch_train_loss")
    assert len(history) == 2 and history[1].value < history[0].value  # it learns
    majority = max(manifest["split"]["per_class"]["test"]) / manifest["split"]["records"]["test"]
    assert result.test_accuracy is not None and result.test_accuracy > 0.5 * majority and result.model_version == 1
