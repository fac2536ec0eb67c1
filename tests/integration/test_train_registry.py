"""Ray Train + DeepSpeed on the real CWRU subset, logged to the MLflow server and registered."""
import pytest

pytestmark = pytest.mark.integration


def test_ray_train_run_is_logged_registered_and_aliased(services, cwru_dataset, trained_model):
    import mlflow
    from mlflow.tracking import MlflowClient

    from indai.platform.storage import open_store

    cfg, result = trained_model
    name, version, _ = cwru_dataset
    assert result.test_accuracy >= 0.9, result.test_accuracy
    assert result.model_name == "it-cwru" and result.model_version == 1 and result.alias == "champion"

    client = MlflowClient(services.mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["run.workers"] == "2" and run.data.params["deepspeed.zero_stage"] == "0"
    assert run.data.tags["indai.dataset"] == f"{name}@{version}"
    history = client.get_metric_history(result.run_id, "val_accuracy")
    assert len(history) == 2  # one per epoch, sent in batches
    assert len(client.get_metric_history(result.run_id, "train_loss")) >= 2
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == name and inputs[0].dataset.digest == version
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "confusion_matrix_test.png" in artifacts and "dataset" in artifacts
    # run.profile_steps=2: each Ray Train worker's trace beside the plots, the summary as metrics
    traces = {a.path for a in client.list_artifacts(result.run_id, "profile")}
    assert traces == {"profile/rank-0.trace.json.gz", "profile/rank-1.trace.json.gz"}
    assert run.data.metrics["profile_ms_per_step"] > 0 and "profile_device_busy" not in run.data.metrics  # no GPU

    mv = client.get_model_version_by_alias("it-cwru", "champion")
    assert int(mv.version) == 1 and mv.run_id == result.run_id
    assert mv.tags["indai.dataset"] == f"{name}@{version}" and mv.tags["indai.recipe"] == "cwru_sensor"

    store = open_store(services.store_uri)
    tags = store.committed_children("checkpoints/it-cwru")
    assert "final" in tags and "epoch-00001" in tags

    # the registered model is a normal MLflow pyfunc whose signature covers all modalities
    model = mlflow.pyfunc.load_model("models:/it-cwru@champion")
    sig = model.metadata.get_input_schema()
    assert set(sig.input_names()) == {"sensor", "image", "text"}
    assert not any(spec.required for spec in sig.inputs)  # any modality may be absent
    import pandas as pd

    from indai.platform import datasets
    from indai.serving.client import split_instances

    instances, labels = split_instances(store, datasets.DatasetRef(name, version), "test", limit=20)
    out = model.predict(pd.DataFrame({"sensor": [i["sensor"] for i in instances]}))
    assert (out["label"] == pd.Series(labels)).mean() >= 0.9
    assert len(out["probabilities"][0]) == 10


def test_rerun_resumes_from_checkpoint_and_registers_once(services, trained_model):
    from mlflow.tracking import MlflowClient

    from indai.trainers.launch import train

    cfg, first = trained_model
    again = train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"alias": None})}), services)
    assert again.resumed_from == "epoch-00001" and again.run_id == first.run_id
    assert again.model_version == first.model_version  # nothing new was trained: registered once
    longer = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 3}),
                                    "run": cfg.run.model_copy(update={"alias": None})})
    versions = {int(v.version) for v in MlflowClient(services.mlflow_uri).search_model_versions(f"name='{cfg.run.register_as}'")}
    third = train(longer, services)
    assert third.resumed_from == "epoch-00001" and third.run_id == first.run_id and third.model_version == max(versions) + 1
    history = MlflowClient(services.mlflow_uri).get_metric_history(first.run_id, "val_accuracy")
    assert len(history) == 3  # epochs 1 and 2 from the first run, 3 from the resumed one


def test_another_members_job_cannot_take_over_a_run_by_its_name(services, trained_model, monkeypatch):
    """A researcher's job (the identity the gateway gives it) that names a run started outside its
    member's jobs, on data it may read, is refused before the run's MLflow run is reopened or a
    checkpoint is read: nothing is logged into that run and no model version is registered."""
    from mlflow.tracking import MlflowClient

    from indai.platform.errors import UserError
    from indai.platform.storage import open_store
    from indai.trainers.launch import train

    cfg, first = trained_model
    client = MlflowClient(services.mlflow_uri)
    metrics = {k: len(client.get_metric_history(first.run_id, k)) for k in ("val_accuracy", "train_loss")}
    versions = {v.version for v in client.search_model_versions(f"name='{cfg.run.register_as}'")}
    store = open_store(services.store_uri)
    checkpoints = {k: store.get_bytes(k) for k in store.list("checkpoints/it-cwru")}
    monkeypatch.setenv("INDAI_JOB_MEMBER", "cwru-demo")  # the dataset's own member: its read is allowed
    monkeypatch.setenv("INDAI_JOB_ROLE", "researcher")
    with pytest.raises(UserError, match="^run it-cwru belongs to no member .*: choose another run.name$"):
        train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"alias": None})}), services)
    assert {k: len(client.get_metric_history(first.run_id, k)) for k in ("val_accuracy", "train_loss")} == metrics
    assert {v.version for v in client.search_model_versions(f"name='{cfg.run.register_as}'")} == versions
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert {k: store.get_bytes(k) for k in store.list("checkpoints/it-cwru")} == checkpoints
