"""The background metric sender (trainers.tracking) against a real MLflow store (SQLite, in
process) and an address where no tracking server answers: what MLflow has not confirmed is
handed to the checkpoint and sent once after a restart; a refusal (not an outage) reaches the loop."""
import json
import socket
from types import SimpleNamespace

import pytest


@pytest.fixture
def mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("sender")).info.run_id
    return client, uri, run_id


def nobody_listening() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def buffer(uri: str, run_id: str):
    from indai.trainers.tracking import MetricBuffer

    return MetricBuffer(SimpleNamespace(mlflow_uri=uri, mlflow_run_id=run_id), enabled=True)


def losses(client, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def test_metrics_mlflow_never_took_travel_in_the_checkpoint_and_are_sent_once(mlflow_run, monkeypatch, capfd):
    client, uri, run_id = mlflow_run
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the away server fails fast
    away = buffer(nobody_listening(), run_id)
    for step in range(1, 6):
        away.add("loss", 1 / step, step)
    away.flush()  # hands over and returns; the sender fails in the background
    away.add("loss", 1 / 6, 6)  # added after the flush: not handed over yet, still unsent
    # the checkpoint's copy, through JSON as the commit record stores it
    rows = json.loads(json.dumps(away.unsent()))
    assert [r[3] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r[0] == "loss" for r in rows)
    away.close()  # the job ends with the server still away: what it holds is lost, said so
    assert "MLflow did not take the run's last 6 metrics: lost (the server is still away)" in capfd.readouterr().err

    resumed = buffer(uri, run_id)  # the restarted job, with the server back
    resumed.restore(rows)
    resumed.add("loss", 0.1, 7)
    resumed.close()
    assert losses(client, run_id) == [(s, 1 / s) for s in range(1, 7)] + [(7, 0.1)]

    again = buffer(uri, run_id)  # an older checkpoint restored after these were sent: not doubled
    again.restore(rows)
    again.close()
    assert len(client.get_metric_history(run_id, "loss")) == 7


def test_the_sender_keeps_metrics_while_away_and_says_so(mlflow_run, monkeypatch, capfd):
    import time

    from indai.trainers import tracking

    client, uri, run_id = mlflow_run
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_WAITS", (0.05,))
    away = buffer(nobody_listening(), run_id)
    away.add("loss", 0.5, 1)
    away.flush()
    deadline = time.monotonic() + 60
    while "kept, training goes on" not in (said := capfd.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "MLflow did not take 1 metrics (" in said and "sending again in 0.05 s" in said, said
    assert away.unsent()[0][:2] == ["loss", 0.5] and away.unsent()[0][3] == 1  # still kept after the failure
    away.close()


def test_a_refusal_is_raised_in_the_loop_not_retried(mlflow_run):
    from mlflow.exceptions import MlflowException

    client, uri, run_id = mlflow_run
    client.delete_run(run_id)  # logging to a deleted run is refused (400), whatever the retries
    refused = buffer(uri, run_id)
    refused.add("loss", 0.5, 1)
    refused.flush()
    with pytest.raises(MlflowException, match="active"):
        refused.close()


def test_without_a_tracking_uri_nothing_is_kept_or_started():
    from indai.trainers.tracking import MetricBuffer

    off = MetricBuffer(SimpleNamespace(mlflow_uri=None, mlflow_run_id=None), enabled=True)
    off.add("loss", 0.5, 1)
    off.flush()
    off.close()
    assert off.unsent() == [] and off._thread is None
