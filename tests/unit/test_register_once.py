"""Registering a run's final weights once (trainers.launch.log_model_once) against a real MLflow
store (SQLite, in process): the version is created with the tags a re-run looks for, in the same
request, so no interruption can leave a version the re-run would register again."""
from types import SimpleNamespace

import pytest


@pytest.fixture
def mlflow_home(tmp_path):
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("register-once", artifact_location=(tmp_path / "art").as_uri()))
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def test_the_version_is_created_with_its_run_and_step_and_registered_once(mlflow_home, tmp_path, recwarn):
    import mlflow
    from mlflow.tracking import MlflowClient

    from indai.platform.model_format import mlflow_signature
    from indai.trainers.launch import log_model_once

    pkg = tmp_path / "indai_model"
    pkg.mkdir()
    (pkg / "card.json").write_text("{}")
    cfg = SimpleNamespace(run=SimpleNamespace(register_as="bearing-once", name="run-a"))
    client = MlflowClient(tracking_uri=mlflow_home, registry_uri=mlflow_home)
    with mlflow.start_run() as run:
        first = log_model_once(cfg, run.info.run_id, 40, pkg, None)
        version = client.get_model_version("bearing-once", str(first))
        # nothing but log_model_once ran: the tags came with the version's creation
        assert (version.run_id, version.tags.get("indai.run"), version.tags.get("indai.step")) == (run.info.run_id, "run-a", "40")
        assert log_model_once(cfg, run.info.run_id, 40, pkg, None) == first  # the re-run of the same weights
        # weights of a later step: a new version (with the signature every real run gives)
        later = log_model_once(cfg, run.info.run_id, 80, pkg, mlflow_signature({"task": "classification"}))
    assert later == first + 1
    assert sorted(int(v.version) for v in client.search_model_versions("name='bearing-once'")) == [first, later]
    unregistered = SimpleNamespace(run=SimpleNamespace(register_as=None, name="run-b"))
    with mlflow.start_run() as run:
        assert log_model_once(unregistered, run.info.run_id, 40, pkg, None) is None
    assert len(client.search_model_versions("name='bearing-once'")) == 2
    # no warning about what indai chooses not to do: type hints (the signature says it) and an
    # input example (it would copy a member's data into the model)
    said = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    assert not [m for m in said if "type hints" in m or "input example" in m], said
