"""Ray Serve app over HTTP: served accuracy, OpenAPI, and 4xx for bad input without harm."""
import json

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(services, trained_model):
    from indai.platform.cli import serve_model

    url = serve_model("it-cwru@champion")
    yield url
    from ray import serve

    serve.delete("indai")


@pytest.fixture(scope="module")
def test_windows(services, cwru_dataset):
    from indai.platform import datasets
    from indai.platform.storage import open_store
    from indai.serving.client import split_instances

    name, version, _ = cwru_dataset
    return split_instances(open_store(services.store_uri), datasets.DatasetRef(name, version), "test")


def test_served_answers_match_training_quality(served, test_windows, trained_model):
    from indai.serving.client import evaluate_split

    instances, labels = test_windows
    ev = evaluate_split(served, instances, labels, concurrency=4, progress=False)
    assert ev.n == len(labels) > 200
    assert ev.accuracy >= 0.9
    assert ev.accuracy == pytest.approx(trained_model[1].test_accuracy, abs=0.02)
    assert ev.percentile(50) > 0 and ev.percentile(99) >= ev.percentile(50)
    assert ev.model_version == 1


def test_openapi_is_published(served):
    doc = requests.get(f"{served}/openapi.json", timeout=10).json()
    assert "/v1/predict" in doc["paths"] and "PredictRequest" in json.dumps(doc)
    info = requests.get(f"{served}/v1/model", timeout=10).json()
    assert info["model_version"] == 1 and info["inputs"]["sensor"]["channels"] == ["DE", "FE"]


def good(test_windows) -> dict:
    return test_windows[0][0]


@pytest.mark.parametrize("mutate,status,needle", [
    (lambda i: {**i, "sensor": [row[:100] for row in i["sensor"]]}, 400, "expects [2, 1024]"),
    (lambda i: {**i, "channels": ["FE", "DE"]}, 400, "do not match"),
    (lambda i: {**i, "sampling_rate_hz": 48000}, 400, "resample"),
    (lambda i: {**i, "image": "aGVsbG8="}, 400, "takes ['sensor']"),
    (lambda i: {**i, "colour": "red"}, 422, "colour"),
    (lambda i: {**i, "sensor": "lots"}, 422, "sensor"),
])
def test_bad_input_gets_4xx_and_the_replica_survives(served, test_windows, mutate, status, needle):
    r = requests.post(f"{served}/v1/predict", json={"instances": [mutate(good(test_windows))]}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.text
    ok = requests.post(f"{served}/v1/predict", json={"instances": [good(test_windows)]}, timeout=30)
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"]


def test_malformed_and_oversized_bodies(served, test_windows):
    r = requests.post(f"{served}/v1/predict", data=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422
    r = requests.post(f"{served}/v1/predict", json={"instances": []}, timeout=30)
    assert r.status_code == 422
    big = b'{"instances": [' + b"0," * (9 * 1024 * 1024) + b"0]}"
    r = requests.post(f"{served}/v1/predict", data=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert requests.get(f"{served}/healthz", timeout=10).json()["status"] == "ok"


def test_unknown_model_is_refused_before_deploying(services):
    from indai.platform.errors import UserError
    from indai.serving.app import ServeArgs, build_app

    with pytest.raises(UserError, match="not in the registry"):
        build_app(ServeArgs(model="no-such-model@champion", mlflow_uri=services.mlflow_uri))


def test_cli_predict_with_a_request_file(served, test_windows, services, tmp_path):
    import os
    import subprocess
    import sys

    def run(body: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "req.json"
        path.write_text(json.dumps(body))
        return subprocess.run([sys.executable, "-m", "indai.platform.cli", "predict", "--input", str(path), "--url", served],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, INDAI_HOME=str(services.home)))

    inst, labels = test_windows
    ok = run({"instances": [inst[0]]})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["predictions"][0]["label"] == labels[0]
    bad = run({"instances": [{**inst[0], "sensor": [[1.0, 2.0]]}]})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("indai: error: the model server refused the request (400): sensor window has "
                                                   "shape [1, 2], the model expects [2, 1024] (channels x samples)")
