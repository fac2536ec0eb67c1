"""The shared inference service over HTTP with real members: served accuracy, OpenAPI,
private/shared/consortium models (403, never 500), alias moves without restart while a
pinned version stays, metering that adds up to the calls made, feedback, and 4xx for bad
input without harm to the replicas."""
import json

import pytest
import requests
from waiting import wait

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def members(services):
    from indai.platform import db, tenancy

    eng = db.engine()
    db.upgrade(eng)
    for m, industry in (("steel-a", "steel"), ("auto-b", "automotive"), ("ship-c", "shipbuilding")):
        tenancy.add_member(eng, m, m.upper(), industry, "demand")
        tenancy.add_user(eng, f"u-{m}", m, "researcher")
    tenancy.add_user(eng, "root", "steel-a", "admin")
    tokens = {u: tenancy.create_token(eng, u) for u in ("u-steel-a", "u-auto-b", "u-ship-c", "root")}
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="private", process="bearing-line-2")
    return eng, {u: t for u, (_, t) in tokens.items()}, {u: i for u, (i, _) in tokens.items()}


@pytest.fixture(scope="module")
def served(services, trained_model, members):
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


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def call(url, token, instances, model=None):
    body = {"instances": instances, **({"model": model} if model else {})}
    return requests.post(f"{url}/v1/predict", json=body, headers=bearer(token) if token else {}, timeout=60)


def answers(url, token, inst, status: int, model=None) -> bool:
    """For `wait`: the request now gets `status` (access rules and tokens are re-read every 2 s)."""
    return call(url, token, inst, model).status_code == status


def test_served_answers_match_training_quality(served, test_windows, trained_model, members):
    from indai.serving.client import evaluate_split

    instances, labels = test_windows
    ev = evaluate_split(served, instances, labels, concurrency=4, progress=False, token=members[1]["u-steel-a"])
    assert ev.n == len(labels) > 200
    assert ev.accuracy >= 0.9
    assert ev.accuracy == pytest.approx(trained_model[1].test_accuracy, abs=0.02)
    assert ev.percentile(50) > 0 and ev.percentile(99) >= ev.percentile(50)
    assert ev.model_version == 1


def test_openapi_is_published(served, members):
    doc = requests.get(f"{served}/openapi.json", timeout=10).json()
    assert {"/v1/predict", "/v1/feedback", "/v1/models"} <= set(doc["paths"]) and "FeedbackRequest" in json.dumps(doc)
    info = requests.get(f"{served}/v1/model", headers=bearer(members[1]["u-steel-a"]), timeout=30).json()
    assert info["model_version"] == 1 and info["inputs"]["sensor"]["channels"] == ["DE", "FE"]


def test_members_see_only_what_is_shared_with_them(served, test_windows, members):
    from indai.platform import tenancy

    eng, tokens, ids = members
    inst = [test_windows[0][0]]
    assert call(served, tokens["u-steel-a"], inst).status_code == 200
    r = call(served, tokens["u-auto-b"], inst)
    assert r.status_code == 403 and "belongs to another member" in r.json()["detail"] and r.json()["request_id"]
    listed = requests.get(f"{served}/v1/models", headers=bearer(tokens["u-auto-b"]), timeout=30).json()["models"]
    assert "it-cwru" not in [m["model"] for m in listed]
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="shared", shared_with=["auto-b"], process="bearing-line-2")
    wait("u-auto-b gets 200", lambda: answers(served, tokens["u-auto-b"], inst, 200), timeout=15, interval=0.3)
    assert call(served, tokens["u-ship-c"], inst).status_code == 403
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="consortium", process="bearing-line-2")
    wait("u-ship-c gets 200", lambda: answers(served, tokens["u-ship-c"], inst, 200), timeout=15, interval=0.3)
    assert call(served, tokens["root"], inst).status_code == 200
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="private", process="bearing-line-2")
    wait("u-ship-c gets 403", lambda: answers(served, tokens["u-ship-c"], inst, 403), timeout=15, interval=0.3)
    r = call(served, tokens["u-steel-a"], inst, model="no-such-model@champion")
    assert r.status_code == 404 and "not registered" in r.json()["detail"]
    assert call(served, None, inst).status_code == 401
    assert call(served, "indai_xxxxxxxxxxxx_" + "y" * 43, inst).status_code == 401
    tenancy.revoke_token(eng, ids["u-ship-c"])
    wait("u-ship-c gets 401", lambda: answers(served, tokens["u-ship-c"], inst, 401), timeout=15, interval=0.3)


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
def test_bad_input_gets_4xx_and_the_replica_survives(served, test_windows, members, mutate, status, needle):
    token = members[1]["u-steel-a"]
    r = call(served, token, [mutate(good(test_windows))])
    assert r.status_code == status, r.text
    assert needle in r.text
    ok = call(served, token, [good(test_windows)])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"]


def test_malformed_and_oversized_bodies(served, members):
    h = {"content-type": "application/json", **bearer(members[1]["u-steel-a"])}
    r = requests.post(f"{served}/v1/predict", data=b"{not json", headers=h, timeout=30)
    assert r.status_code == 422
    r = requests.post(f"{served}/v1/predict", json={"instances": []}, headers=h, timeout=30)
    assert r.status_code == 422
    big = b'{"instances": [' + b"0," * (9 * 1024 * 1024) + b"0]}"
    r = requests.post(f"{served}/v1/predict", data=big, headers=h, timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert requests.get(f"{served}/healthz", timeout=10).json()["status"] == "ok"


def test_metering_adds_up_and_feedback_is_stored(served, test_windows, members):
    """Known calls by one member (successes and 400s) are all in the calls table, once, with
    their status; feedback is accepted only for the member's own predictions."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from indai.platform import tenancy
    from indai.platform.db import Call, Feedback

    eng, tokens, _ = members
    tenancy.add_member(eng, "elec-d", "ELEC D", "electronics", "demand")
    tenancy.add_user(eng, "u-elec-d", "elec-d", "researcher")
    _, token = tenancy.create_token(eng, "u-elec-d")
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="shared", shared_with=["elec-d"], process="bearing-line-2")
    inst = good(test_windows)

    def listed():  # the listing is not metered: wait on it until the share is seen
        models = requests.get(f"{served}/v1/models", headers=bearer(token), timeout=30).json()["models"]
        return "it-cwru" in [m["model"] for m in models]
    wait("the share with elec-d", listed, timeout=15, interval=0.3)
    ids = [call(served, token, [inst]).json()["request_id"]] + [call(served, token, [inst, inst]).json()["request_id"] for _ in range(9)]
    bad = [call(served, token, [{**inst, "channels": ["X", "Y"]}]) for _ in range(3)]
    assert all(r.status_code == 400 for r in bad)

    def counted():
        with Session(eng) as s:
            rows = dict(s.execute(select(Call.status, func.count()).where(Call.member_id == "elec-d").group_by(Call.status)).all())
            n2 = s.scalar(select(func.sum(Call.instances)).where(Call.member_id == "elec-d", Call.status == 200))
        return rows == {200: 10, 400: 3} and n2 == 19
    wait("the 13 calls of elec-d in the calls table", counted, timeout=15, interval=0.3)
    from datetime import datetime, timedelta, timezone

    from indai.platform import kpi

    today = datetime.now(timezone.utc).date()
    hourly = kpi.usage(eng, kpi.parse_period(f"{today - timedelta(days=1)}..{today}"), "elec-d")
    assert sum(r["calls"] for r in hourly) == 13 and sum(r["errors"] for r in hourly) == 3
    assert sum(r["instances"] for r in hourly) == 22 and all(r["p99_ms"] >= r["p50_ms"] > 0 for r in hourly)
    with Session(eng) as s:
        row = s.scalar(select(Call).where(Call.request_id == ids[0]))
        assert row.model == "it-cwru" and row.model_version == 1 and row.process == "bearing-line-2" and row.latency_ms > 0
    fb = requests.post(f"{served}/v1/feedback", json={"request_id": ids[0], "rating": 90, "true_label": "normal"},
                       headers=bearer(token), timeout=30)
    assert fb.status_code == 200 and fb.json() == {"request_id": ids[0], "stored": True}
    other = requests.post(f"{served}/v1/feedback", json={"request_id": ids[1], "rating": 10}, headers=bearer(tokens["u-steel-a"]), timeout=30)
    assert other.status_code == 404
    assert requests.post(f"{served}/v1/feedback", json={"request_id": ids[1], "rating": 101}, headers=bearer(token), timeout=30).status_code == 422
    with Session(eng) as s:
        assert [(f.member_id, f.rating, f.true_label) for f in s.scalars(select(Feedback).where(Feedback.request_id.in_(ids)))] == \
            [("elec-d", 90, "normal")]


def test_alias_move_is_seen_without_restart_and_pins_stay(served, test_windows, members, services, trained_model):
    from indai.platform import registry

    token = members[1]["u-steel-a"]
    inst = [good(test_windows)]
    import mlflow

    c = registry.client(services.mlflow_uri)
    mlflow.set_tracking_uri(services.mlflow_uri)
    v1 = c.get_model_version("it-cwru", "1")
    mv = mlflow.register_model(v1.source, "it-cwru")  # a second version of the same logged model
    assert int(mv.version) == 2
    wait("version 2 ready", lambda: c.get_model_version("it-cwru", "2").status == "READY", timeout=15, interval=0.3)
    registry.promote(services.mlflow_uri, "it-cwru", 2, "champion")
    try:
        wait("the alias move", lambda: call(served, token, inst).json().get("model_version") == 2, timeout=15, interval=0.3)
        pinned = call(served, token, inst, model="it-cwru/1").json()
        assert pinned["model_version"] == 1 and pinned["model"] == "it-cwru/1"
        assert call(served, token, inst, model="it-cwru@champion").json()["model_version"] == 2
    finally:
        registry.promote(services.mlflow_uri, "it-cwru", 1, "champion")


def test_unknown_model_is_refused_before_deploying(services):
    from indai.platform import db
    from indai.platform.errors import UserError
    from indai.serving.app import ServeArgs, build_app

    with pytest.raises(UserError, match="not in the registry"):
        build_app(ServeArgs(model="no-such-model@champion", mlflow_uri=services.mlflow_uri, db_url=db.database_url()))


def test_cli_predict_with_a_request_file(served, test_windows, services, members, tmp_path):
    import os
    import subprocess
    import sys

    def run(body: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "req.json"
        path.write_text(json.dumps(body))
        return subprocess.run([sys.executable, "-m", "indai.platform.cli", "predict", "--input", str(path), "--url", served],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, INDAI_HOME=str(services.home), INDAI_TOKEN=members[1]["u-steel-a"]))

    inst, labels = test_windows
    ok = run({"instances": [inst[0]]})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["predictions"][0]["label"] == labels[0]
    bad = run({"instances": [{**inst[0], "sensor": [[1.0, 2.0]]}]})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("indai: error: the model server refused the request (400): sensor window has "
                                                   "shape [1, 2], the model expects [2, 1024] (channels x samples)")
