"""The shared inference service over HTTP with real members: served accuracy, OpenAPI,
private/shared/consortium models (403, never 500), alias moves without restart while a
pinned version stays, metering that adds up to the calls made, feedback, and 4xx for bad
input without harm to the replicas.

As on the cluster, the platform database is PostgreSQL (a real server) and the model pool has two
replicas; the last tests inject faults into this same app (issue 9): every route enumerated from
the running app refuses bad tokens, a model replica SIGKILLed under a steady load (and, made
certain on a small probe deployment, the ingress's own retry of a call a replica had accepted),
the database stopped under a steady load."""
import json

import pytest
import requests
from waiting import wait

pytestmark = pytest.mark.integration



def member_shared_it_cwru(eng, member: str, industry: str, role: str) -> str:
    """A new member with one user of `role`, and it-cwru shared with it: that user's token."""
    from indai.platform import tenancy

    tenancy.add_member(eng, member, member.upper().replace("-", " "), industry, "demand")
    tenancy.add_user(eng, f"u-{member}", member, role)
    _, token = tenancy.create_token(eng, f"u-{member}")
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="shared", shared_with=[member], process="bearing-line-2")
    return token

@pytest.fixture(scope="module")
def platform_db(services, postgres):
    """A fresh database on the session's PostgreSQL server; INDAI_DB_URL points at it for this
    module, so the ingress started by `serve_model` uses it too."""
    url = postgres.new_database("t_serve")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INDAI_DB_URL", url)
        yield url


@pytest.fixture(scope="module")
def members(services, platform_db, trained_model):
    """Three members, a researcher each and an admin of steel-a; it-cwru private to steel-a, its
    trained version promoted as champion (the admin's `indai model promote`)."""
    from indai.platform import db, promotion, tenancy

    eng = db.engine(platform_db)
    db.upgrade(eng)
    for m, industry in (("steel-a", "steel"), ("auto-b", "automotive"), ("ship-c", "shipbuilding")):
        tenancy.add_member(eng, m, m.upper(), industry, "demand")
        tenancy.add_user(eng, f"u-{m}", m, "researcher")
    tenancy.add_user(eng, "root", "steel-a", "admin")
    tokens = {u: tenancy.create_token(eng, u) for u in ("u-steel-a", "u-auto-b", "u-ship-c", "root")}
    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="private", process="bearing-line-2")
    promotion.promote(eng, services.mlflow_uri, "it-cwru", trained_model[1].model_version, "champion", by="test-admin")
    return eng, {u: t for u, (_, t) in tokens.items()}, {u: i for u, (i, _) in tokens.items()}


@pytest.fixture(scope="module")
def served(services, trained_model, members):
    from indai.platform.cli import serve_model

    url = serve_model("it-cwru@champion", replicas=2)
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
    # the routes read their bodies themselves (after the token check); the document still describes them
    for path, model in (("/v1/predict", "PredictRequest"), ("/v1/feedback", "FeedbackRequest")):
        assert doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    assert doc["components"]["schemas"]["PredictRequest"]["properties"]["instances"]["items"] == {"$ref": "#/components/schemas/Instance"}
    assert "sensor" in doc["components"]["schemas"]["Instance"]["properties"]
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
    # an admin's token narrowed to models:predict gets what its member gets: not another member's private model
    tenancy.add_user(eng, "root-c", "ship-c", "admin")
    _, admin_c = tenancy.create_token(eng, "root-c")
    _, narrowed = tenancy.create_token(eng, "root-c", name="predict-only", scopes=["models:predict"])
    assert call(served, admin_c, inst).status_code == 200 and call(served, narrowed, inst).status_code == 403
    # whether an alias of someone else's private model exists is not told (403 both, never 404)
    for ref in ("it-cwru@champion", "it-cwru@no-such-alias"):
        r = requests.get(f"{served}/v1/model", params={"model": ref}, headers=bearer(tokens["u-ship-c"]), timeout=30)
        assert r.status_code == 403 and "belongs to another member" in r.json()["detail"], (ref, r.text)
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

    def chunked(total: int, piece: int = 1024 * 1024):  # no Content-Length: requests sends a generator chunked
        yield b'{"instances": [{"text": "'
        for _ in range(total // piece):
            yield b"a" * piece
        yield b'"}]}'
    # without a token the body is never read (before: parsed, then a 422 that echoed all 18 MiB back)
    r = requests.post(f"{served}/v1/predict", data=chunked(18 * 1024 * 1024), headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 401 and len(r.content) < 500, (r.status_code, len(r.content))
    # with one, the bytes are counted as they arrive, whatever the headers say
    r = requests.post(f"{served}/v1/predict", data=chunked(20 * 1024 * 1024), headers=h, timeout=120)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 413 and "over the limit" in r.json()["detail"], (r.status_code, r.text[:300])
    # a 422 says where and what, without the input
    r = requests.post(f"{served}/v1/predict", json={"instances": [{"text": "q" * 150_000}]}, headers=h, timeout=30)
    assert r.status_code == 422 and "q" * 100 not in r.text and len(r.content) < 1000
    assert r.json()["detail"] == [{"loc": ["body", "instances", 0, "text"], "msg": "String should have at most 100000 characters",
                                   "type": "string_too_long"}]
    assert requests.get(f"{served}/healthz", timeout=10).json()["status"] == "ok"


def test_metering_adds_up_and_feedback_is_stored(served, test_windows, members):
    """Known calls by one member (successes and 400s) are all in the calls table, once, with
    their status; feedback is accepted only for the member's own predictions."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from indai.platform.db import Call, Feedback

    eng, tokens, _ = members
    token = member_shared_it_cwru(eng, "elec-d", "electronics", "researcher")
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
    """`indai model promote` moves traffic within seconds; the registry's alias, which any job may
    move, moves none; a version never promoted is not served to members."""
    import time

    from indai.platform import promotion, registry

    token = members[1]["u-steel-a"]
    inst = [good(test_windows)]
    import mlflow

    c = registry.client(services.mlflow_uri)
    mlflow.set_tracking_uri(services.mlflow_uri)
    v1 = c.get_model_version("it-cwru", "1")
    mv = mlflow.register_model(v1.source, "it-cwru")  # a second version of the same logged model
    assert int(mv.version) == 2
    wait("version 2 ready", lambda: c.get_model_version("it-cwru", "2").status == "READY", timeout=15, interval=0.3)
    # a job moving the registry's alias (run.alias, with the jobs' MLflow account) moves no traffic
    registry.label_alias(services.mlflow_uri, "it-cwru", 2, "champion")
    time.sleep(3)  # (longer than resolve_ttl_s)
    assert call(served, token, inst).json()["model_version"] == 1
    r = call(served, token, inst, model="it-cwru/2")
    assert r.status_code == 403 and "version 2 of model it-cwru is not promoted" in r.json()["detail"]
    eng = members[0]
    promotion.promote(eng, services.mlflow_uri, "it-cwru", 2, "champion", by="test-admin")
    try:
        wait("the alias move", lambda: call(served, token, inst).json().get("model_version") == 2, timeout=15, interval=0.3)
        pinned = call(served, token, inst, model="it-cwru/1").json()
        assert pinned["model_version"] == 1 and pinned["model"] == "it-cwru/1"
        assert call(served, token, inst, model="it-cwru@champion").json()["model_version"] == 2
    finally:
        promotion.promote(eng, services.mlflow_uri, "it-cwru", 1, "champion", by="test-admin")


def test_the_default_model_is_checked_by_its_promotion_before_deploying(services, members, platform_db):
    """An alias nobody promoted is refused before anything deploys; a promoted one builds even while
    a job has deleted the registry's label (which only labels); a promoted version the registry no
    longer holds is named."""
    from indai.platform import registry
    from indai.platform.errors import UserError
    from indai.serving.app import ServeArgs, build_app

    def build(model: str):
        return build_app(ServeArgs(model=model, mlflow_uri=services.mlflow_uri, db_url=platform_db))

    for model in ("no-such-model@champion", "it-cwru@ghost"):
        with pytest.raises(UserError, match=rf"^the default model {model} is not promoted: run `indai model promote "):
            build(model)
    with pytest.raises(UserError, match="not in the registry"):
        build("it-cwru/99")
    c = registry.client(services.mlflow_uri)
    c.delete_registered_model_alias("it-cwru", "champion")
    try:
        assert build("it-cwru@champion") is not None
    finally:
        registry.label_alias(services.mlflow_uri, "it-cwru", 1, "champion")


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


# ---- issue 9: every route of the running ingress refuses bad tokens ----------------------------

PUBLIC_ROUTES = {("GET", "/healthz"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}
MEMBER_ROUTES = {("GET", "/v1/models"), ("GET", "/v1/model"), ("POST", "/v1/predict"), ("POST", "/v1/feedback")}
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def app_routes(router, prefix: str = "") -> set[tuple[str, str]]:
    """(method, path) of every route of a FastAPI app, inside included routers too: Serve's ingress
    re-mounts the class's routes as an included router, which FastAPI >= 0.137 keeps nested, so the
    app's flat `routes` list holds no API route at all. A route without methods (a websocket) is
    listed as ("WEBSOCKET", path)."""
    out = set()
    for r in router.routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            out |= app_routes(inner, prefix + r.include_context.prefix)
        else:
            out |= {(m, prefix + r.path) for m in (getattr(r, "methods", None) or {"WEBSOCKET"}) - {"HEAD"}}
    return out


def published_routes(url: str) -> set[tuple[str, str]]:
    """(method, path) of every operation the running ingress publishes in its OpenAPI document."""
    doc = requests.get(f"{url}/openapi.json", timeout=30).json()
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops if m.upper() in HTTP_METHODS}


@pytest.mark.timeout(180, func_only=True)  # the bound is the test's own: the shared fixtures may train a model first
def test_every_route_of_the_running_ingress_refuses_bad_tokens(served, members, test_windows):
    """The routes come from the running app (its OpenAPI document) and from the app object the
    replicas were built from (which also has the routes left out of OpenAPI); only the public ones
    named here go without a token, so a route added later without the token check fails here."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from indai.platform import tenancy
    from indai.serving.app import api

    eng, tokens, _ = members
    published, declared = published_routes(served), app_routes(api)
    assert published and published <= declared, (published, declared)
    routes = published | declared
    assert routes >= MEMBER_ROUTES | PUBLIC_ROUTES, routes
    for method, path in sorted(PUBLIC_ROUTES):
        assert requests.request(method, served + path, timeout=30).status_code == 200, (method, path)

    tenancy.set_model_access(eng, "it-cwru", owner="steel-a", visibility="private", process="bearing-line-2")
    inst = good(test_windows)
    wait("it-cwru private again", lambda: answers(served, tokens["u-auto-b"], [inst], 403), timeout=15, interval=0.3)
    for user in ("u-old", "u-gone", "u-narrow"):
        tenancy.add_user(eng, user, "steel-a", "researcher")
    old_id, old = tenancy.create_token(eng, "u-old")
    gone_id, gone = tenancy.create_token(eng, "u-gone")
    _, narrow = tenancy.create_token(eng, "u-narrow", scopes=["jobs:read"])
    tenancy.revoke_token(eng, gone_id)
    with Session(eng) as s, s.begin():  # as if issued long ago
        s.get(tenancy.Token, old_id).expires_at = tenancy.utcnow() - timedelta(days=1)
    own = tokens["u-steel-a"]
    own_request = call(served, own, [inst]).json()["request_id"]
    samples = {("GET", "/v1/models"): {}, ("GET", "/v1/model"): {"params": {"model": "it-cwru@champion"}},
               ("POST", "/v1/predict"): {"json": {"model": "it-cwru@champion", "instances": [inst]}},
               ("POST", "/v1/feedback"): {"json": {"request_id": own_request, "rating": 50}}}
    # another member's token: refused where the route concerns the owner's model or prediction
    # (feedback says 404, so it does not tell whether someone else's request id exists)
    other_member = {("GET", "/v1/models"): 200, ("GET", "/v1/model"): 403, ("POST", "/v1/predict"): 403, ("POST", "/v1/feedback"): 404}
    refused = {"missing": ({}, 401), "not bearer": ({"Authorization": f"Basic {own}"}, 401),
               "malformed": (bearer("not-a-token"), 401), "unknown": (bearer("indai_0000000000000000_" + "x" * 43), 401),
               "expired": (bearer(old), 401), "revoked": (bearer(gone), 401), "lacks the scope": (bearer(narrow), 403),
               "another member's": (bearer(tokens["u-auto-b"]), None)}
    guarded = sorted(routes - PUBLIC_ROUTES)
    checked = 0
    for route in guarded:
        assert route in samples and route in other_member, f"give {route} a sample request and its other-member answer in this test"
        method, path = route
        for why, (headers, status) in refused.items():
            r = requests.request(method, served + path, headers=headers, timeout=60, **samples[route])
            assert r.status_code == (status or other_member[route]), (method, path, why, r.status_code, r.text)
            assert own not in r.text and old not in r.text and gone not in r.text
            checked += 1
        assert requests.request(method, served + path, headers=bearer(own), timeout=60, **samples[route]).status_code == 200, route
    assert checked == len(guarded) * len(refused) >= 4 * 8
    listed = requests.get(f"{served}/v1/models", headers=bearer(tokens["u-auto-b"]), timeout=30).json()["models"]
    assert "it-cwru" not in [m["model"] for m in listed]


# ---- issue 9: faults under a steady load -------------------------------------------------------

def alive_actors(class_name: str) -> dict[str, int]:
    """Alive actors of one class, from Ray's state API: actor id -> pid (the cluster is named,
    since other Ray instances may run on the same machine). Serve's replicas are of class
    `ServeReplica:<app>:<deployment>`; its own processes `ServeController` and `ProxyActor`."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=10_000,
                         raise_on_missing_output=False)
    return {a.actor_id: a.pid for a in actors if a.class_name == class_name}


def pool_replicas() -> dict[str, int]:
    """Alive replicas of the model pool of the `indai` app: actor id -> pid."""
    return alive_actors("ServeReplica:indai:ModelPool")


def running_pool_replicas() -> int:
    from ray import serve

    return serve.status().applications["indai"].deployments["ModelPool"].replica_states.get("RUNNING", 0)


def healthz(url: str) -> dict:
    return requests.get(f"{url}/healthz", timeout=30).json()


def cpu_ticks(pid: int) -> int:
    """CPU time (user + system, in clock ticks) a process has used so far, from /proc/<pid>/stat."""
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kill_while_computing(pid: int, requests_in_flight, timeout_s: float = 30) -> None:
    """SIGKILL the process the moment its CPU time grows while requests are in flight: an idle
    replica hardly uses any, so it is then most likely working on one of them (killed
    mid-request, not between two)."""
    import os
    import signal
    import time

    deadline, last = time.monotonic() + timeout_s, cpu_ticks(pid)
    while True:
        now = cpu_ticks(pid)
        if now > last and requests_in_flight():
            break
        assert time.monotonic() < deadline, f"replica {pid} did not compute while requests were in flight"
        last = now
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(240, func_only=True)
def test_a_model_replica_killed_under_load_fails_no_request(served, test_windows, members):
    """SIGKILL the pool replica that does the work (the one whose CPU time grows under the load)
    while a client sends 10 requests a second, at a moment when it computes and requests are in
    flight: calls the dead replica had in hand fail inside the ingress with ActorDiedError and are
    sent once more, to the other replica (which loads the model if it has not yet); calls not yet
    sent are routed elsewhere by Serve. No request fails, and Serve starts a new replica in the
    dead one's place."""
    import os
    import time

    import numpy as np
    from steady_load import SteadyLoad

    eng, tokens, _ = members
    own = tokens["u-steel-a"]
    wait("steel-a may call its model", lambda: answers(served, own, [good(test_windows)], 200), timeout=30, interval=0.3)
    before = pool_replicas()
    assert len(before) == 2 and running_pool_replicas() == 2, before
    retries_before = healthz(served)["pool_retries"]

    with SteadyLoad(served, own, test_windows[0][:16], rate_per_s=10) as load:
        cpu_before = {pid: cpu_ticks(pid) for pid in before.values()}
        time.sleep(3)  # steady state first
        work = {pid: cpu_ticks(pid) - cpu_before[pid] for pid in before.values()}
        victim = max(work, key=work.get)
        kill_while_computing(victim, lambda: load.in_flight() >= 1)
        killed_at = load.now()

        def restored() -> bool:
            alive = pool_replicas()
            return len(alive) == 2 and victim not in alive.values() and running_pool_replicas() == 2
        wait("the replica restored", restored, timeout=150, interval=0.5)
        restored_s = load.now() - killed_at
        time.sleep(2)  # and served by the restored pool
    failed = [s for s in load.sent if s.status != 200]
    across = [s for s in load.sent if s.sent_s < killed_at < s.done_s]
    after = [s for s in load.sent if s.sent_s >= killed_at]
    retried = healthz(served)["pool_retries"] - retries_before
    latency_ms = np.percentile([1000 * (s.done_s - s.sent_s) for s in load.sent], [50, 99])
    print(f"\nreplica kill: {len(failed)} failed of {len(load.sent)} requests ({len(across)} in flight at the kill, "
          f"{len(after)} sent after it); {retried} calls sent again by the ingress; replica restored in {restored_s:.1f} s; "
          f"latency p50 {latency_ms[0]:.0f} ms, p99 {latency_ms[1]:.0f} ms; CPU ticks of the replicas in 3 s of load {work}")
    assert failed == [], failed[:5]
    assert len(across) >= 1 and len(after) >= 20 and len({s.request_id for s in load.sent}) == len(load.sent)
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)


@pytest.mark.timeout(420, func_only=True)
def test_an_ingress_replica_killed_under_load_fails_only_the_calls_it_held(served, test_windows, members):
    """SIGKILL the HTTP ingress (authentication, access rules, metering) at a moment it computes
    while a client sends 10 requests a second, with one ingress replica and then with two, in an
    app of its own (route /ha, one pool replica). The calls the dead replica held are answered 500
    by Serve's proxy (its answer for a replica that died holding a call; measured: the 1 call in
    flight, each time); indai's client sends a 500 once more, and that try is answered. Every
    other request is answered 200: the proxy holds what it cannot hand to a live replica. With one
    replica those requests wait for the restart; with two the other replica answers them, so no
    request sent before the restart waits as long as the restart takes."""
    import time

    import numpy as np
    from ray import serve
    from steady_load import SteadyLoad

    from indai.platform import db
    from indai.platform.cli import _settings
    from indai.serving.app import ServeArgs, build_app
    from indai.serving.client import post_predict

    eng, tokens, _ = members
    own, url, app = tokens["u-steel-a"], f"{served}/ha", "indai-ha"
    try:
        for count in (1, 2):
            args = ServeArgs(model="it-cwru@champion", mlflow_uri=_settings().require_mlflow(), db_url=db.database_url(),
                             name=app, route_prefix="/ha", ingress_replicas=count, num_replicas=1, num_cpus=0.1)
            serve.run(build_app(args), name=app, route_prefix="/ha")
            wait("the /ha app answers", lambda: answers(url, own, [good(test_windows)], 200), timeout=60, interval=0.3)
            before = alive_actors(f"ServeReplica:{app}:Ingress")
            assert len(before) == count, before
            with SteadyLoad(url, own, test_windows[0][:16], rate_per_s=10, timeout_s=120) as load:
                cpu_before = {pid: cpu_ticks(pid) for pid in before.values()}
                time.sleep(3)
                work = {pid: cpu_ticks(pid) - cpu_before[pid] for pid in before.values()}
                victim = max(work, key=work.get)
                kill_while_computing(victim, lambda: load.in_flight() >= 1)
                killed_at = load.now()

                def restored() -> bool:
                    alive = alive_actors(f"ServeReplica:{app}:Ingress")
                    return len(alive) == count and victim not in alive.values()
                wait("the ingress restored", restored, timeout=150, interval=0.2)
                restored_s = load.now() - killed_at
                time.sleep(2)
            failed = [s for s in load.sent if s.status != 200]
            across = [s for s in load.sent if s.sent_s < killed_at < s.done_s]
            after = [s for s in load.sent if killed_at <= s.sent_s < killed_at + restored_s]
            waited = max(s.done_s - s.sent_s for s in after)
            p50, p99 = np.percentile([1000 * (s.done_s - s.sent_s) for s in load.sent], [50, 99])
            print(f"\ningress kill, {count} replica(s): {len(failed)} failed of {len(load.sent)} requests ({len(across)} in "
                  f"flight at the kill, {len(after)} sent before the restart); ingress restored in {restored_s:.1f} s; "
                  f"longest wait of a request sent meanwhile {waited:.2f} s; latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")
            # the calls the dead replica held: Serve's proxy answers them 500 (what it does for a replica that
            # died with a call in hand); none other fails, and indai's client sends a 500 once more
            assert all(s.status == 500 and s.sent_s <= killed_at + restored_s for s in failed), failed[:5]
            for _ in failed:
                assert post_predict(url, test_windows[0][:16], token=own)["predictions"]
            assert len(across) >= 1 and len(after) >= 10, (len(across), len(after))
            if count == 2:
                assert waited < restored_s, (waited, restored_s)  # the other replica answered; nobody waited for the restart
    finally:
        serve.delete(app)


@pytest.mark.timeout(300, func_only=True)
def test_the_serve_controller_and_the_http_proxy_killed_under_load(served, test_windows, members):
    """Serve's own processes, each SIGKILLed under 10 requests a second (a client without
    retries, so every failure is counted). The controller (control plane only): replicas and the
    proxy go on serving while Ray restarts it; no request fails. The HTTP proxy (the only one on
    this one-node cluster; a cluster has one on every node): its port refuses connections until
    the controller replaces it, after 3 failed health checks 2 s apart (RAY_SERVE_ENV, set by
    `indai up` and the chart; 10 s apart by default, about 30 s without the port); the requests
    sent in that window fail without an answer (or, rarely, with a 404 from the new proxy before
    it has the routes), all others are answered. indai's client retries
    refused connections for 11-23 s in all (serving/client.py); the window measured here is 6-7 s."""
    import os
    import signal
    import time

    from steady_load import SteadyLoad

    eng, tokens, _ = members
    own = tokens["u-steel-a"]
    wait("steel-a may call its model", lambda: answers(served, own, [good(test_windows)], 200), timeout=60, interval=0.3)
    for target in ("ServeController", "ProxyActor"):
        [victim] = list(alive_actors(target).values())
        with SteadyLoad(served, own, test_windows[0][:16], rate_per_s=10) as load:
            time.sleep(2)
            os.kill(victim, signal.SIGKILL)
            killed_at = load.now()
            wait(f"a new {target}", lambda: (pids := alive_actors(target).values()) and victim not in pids, timeout=120,
                 interval=0.1)

            def answered() -> bool:
                try:
                    return answers(served, own, [good(test_windows)], 200)
                except requests.ConnectionError:  # no proxy on the port yet
                    return False
            wait("an answer through it", answered, timeout=60, interval=0.1)
            back_s = load.now() - killed_at
            time.sleep(3)
        failed = [s for s in load.sent if s.status != 200]
        print(f"\n{target} killed: {len(failed)} failed of {len(load.sent)} requests; serving again after {back_s:.1f} s"
              + (f"; failures sent from {failed[0].sent_s - killed_at:.2f} s to {failed[-1].sent_s - killed_at:.2f} s after the kill, "
                 f"statuses {sorted({s.status for s in failed})}" if failed else ""))
        if target == "ServeController":
            assert failed == [], failed[:5]
        else:
            # no answer while the port is closed, nor for the calls the proxy held when it was killed
            # (sent before the kill, still open at it: up to 0.7 s before on this busy machine); a new
            # proxy that has not yet got the route table from the controller answers 404 for a moment
            # (seen once in 4 runs, with the 10 s period)
            assert failed and all(s.status in (0, 404) and s.done_s >= killed_at - 0.1 and s.sent_s <= killed_at + back_s
                                  for s in failed), failed[:5]
        assert [s for s in load.sent if s.sent_s > killed_at + back_s and s.status != 200] == []


@pytest.mark.timeout(180, func_only=True)
def test_a_pool_call_whose_replica_dies_after_accepting_it_is_sent_once_more(served, tmp_path):
    """The ingress's own retry, made certain: under load, Serve's router already re-sends the calls
    a dead replica had not yet acknowledged, so which calls reach the ingress's retry is a matter of
    timing. Here the replica is killed only after it has accepted the call and is working on it (a
    deployment whose first call stalls and says so in a file), and the ingress's pool call
    (`Ingress._ask_pool`, the code every predict goes through) answers from the other replica."""
    import asyncio
    import os
    import signal
    import threading
    import time
    import types
    from pathlib import Path

    from ray import serve

    from indai.serving.app import Ingress

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.05})
    class StallFirstCall:
        def __init__(self, marker: str):
            self.marker = Path(marker)

        async def predict(self, instances: list) -> dict:
            if not self.marker.exists():
                self.marker.write_text(str(os.getpid()))
                await asyncio.sleep(600)
            return {"predictions": [os.getpid()]}

    marker = tmp_path / "stalled-in"
    handle = serve.run(StallFirstCall.bind(str(marker)), name="retry-probe", route_prefix=None)
    try:
        ingress = types.SimpleNamespace(pool=handle, pool_retries=0)
        answer: dict = {}
        caller = threading.Thread(target=lambda: answer.update(
            asyncio.run(Ingress.func_or_class._ask_pool(ingress, "m/1", "predict", [{}]))))
        caller.start()
        wait("the first call stalled in a replica", lambda: marker.exists() and marker.read_text(), timeout=60, interval=0.05)
        victim = int(marker.read_text())
        time.sleep(2)  # the replica's "accepted" reaches the caller (it is sent before the call runs)
        os.kill(victim, signal.SIGKILL)
        caller.join(120)
        assert not caller.is_alive()
        assert ingress.pool_retries == 1 and answer["predictions"][0] not in (victim, None), (answer, victim)
    finally:
        serve.delete("retry-probe")


@pytest.mark.timeout(240, func_only=True)
@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_the_ingress_serves_while_the_database_is_down_and_meters_every_call_once(served, test_windows, members, postgres, outage):
    """PostgreSQL away for 8 s under a steady load (5 requests a second), either stopped (connections
    refused) or frozen (SIGSTOP: connections and statements taken, none answered; the ingress's
    database operations end after db_timeout_s): tokens and the access rule seen before ride out
    the outage (grace period), every request is answered 200, metering buffers while its writes
    fail, and once the database is back the calls table holds exactly the request ids that were
    answered, each once (a write whose answer was lost to the deadline may have committed: the
    retry adds nothing)."""
    import time
    from contextlib import contextmanager

    import psycopg
    from sqlalchemy import select
    from sqlalchemy.orm import Session
    from steady_load import SteadyLoad

    from indai.platform.db import Call

    @contextmanager
    def away():
        if outage == "frozen":
            with postgres.frozen():
                yield
            return
        postgres.stop()
        try:
            yield
        finally:
            postgres.start()

    eng, _, _ = members
    member = {"stopped": "chem-e", "frozen": "chem-f"}[outage]
    token = member_shared_it_cwru(eng, member, "chemicals", "consumer")
    inst = good(test_windows)
    warmup: list[str] = []  # metered too (a 403 until the share is seen, then a 200)

    def shared() -> bool:
        r = call(served, token, [inst])
        warmup.append(r.json()["request_id"])
        return r.status_code == 200
    wait(f"the share with {member}", shared, timeout=30, interval=0.3)
    start = healthz(served)["metering"]
    with SteadyLoad(served, token, [inst], rate_per_s=5) as load:
        time.sleep(2)
        with away():
            down_at = load.now()
            with pytest.raises(psycopg.OperationalError):  # really away: refused, or no answer in 2 s
                psycopg.connect(postgres.url.replace("+psycopg", ""), connect_timeout=2).close()
            # several token re-checks (2 s), access-rule reloads (2 s) and metering flushes (1 s); a
            # frozen server's first failure comes after a ping and a new connection, each db_timeout_s
            time.sleep(8 if outage == "stopped" else 18)
            during = healthz(served)["metering"]
            up_at = load.now()
        time.sleep(3 if outage == "stopped" else 8)  # a frozen write is given up on after db_timeout_s (5 s)
    answered = [s for s in load.sent if s.status == 200]
    while_down = [s for s in answered if down_at <= s.sent_s < up_at]
    print(f"\ndatabase {outage} {up_at - down_at:.1f} s: {len(answered)} of {len(load.sent)} requests answered 200 "
          f"({len(while_down)} while it was down); metering buffered {during['buffered']}, "
          f"{during['failures'] - start['failures']} failed writes")
    assert [s for s in load.sent if s.status != 200] == []
    slowest = max(s.done_s - s.sent_s for s in load.sent)
    print(f"slowest answer {slowest:.1f} s")
    # a member's call waits for the database at most a connection attempt or a ping and one (measured:
    # 10.0 s), never until the thaw (20 s). (Without the ingress's own deadline the calls were still
    # answered, as a new connection gives up after libpq's connect_timeout; the metering writes hung
    # instead, and the failed-writes count below stayed 0: measured.)
    assert slowest < 15
    assert len(while_down) >= 20 and during["buffered"] > 0 and during["failures"] > start["failures"]
    ids = {s.request_id for s in answered}

    def metered() -> list[str]:
        with Session(eng) as s:
            return list(s.scalars(select(Call.request_id).where(Call.member_id == member)))
    wait("metering caught up", lambda: len(metered()) >= len(ids) + len(warmup), timeout=30, interval=0.5)
    time.sleep(2)  # a late or repeated write would land now
    rows = metered()
    assert len(rows) == len(ids) + len(warmup) and set(rows) == ids | set(warmup)
    after = healthz(served)["metering"]
    assert after["buffered"] == 0 and after["dropped"] == 0


@pytest.mark.timeout(300, func_only=True)
def test_the_ingress_serves_while_the_registry_hangs(served, test_windows, members, services, trained_model):
    """The MLflow server frozen for 15 s (SIGSTOP on its process group: connections are taken,
    nothing is answered) under a steady load of 5 requests a second on it-cwru@champion. Aliases
    resolve from the platform's promotions and the loaded version serves, so every request is
    answered 200; a promoted version never loaded gets 503 with Retry-After after one bounded wait
    (registry_timeout_s, 5 s), not after MLflow's own 120 s and 7 retries; an alias never promoted
    is a 404 at once; the model list seen before stands in (platform/recent.py). Thawed, the new
    version loads."""
    import os
    import signal
    import time

    import mlflow
    from steady_load import SteadyLoad

    from indai.platform import promotion, registry
    from indai.platform.services import read_services
    from indai.serving.app import REGISTRY_AWAY

    token, inst = members[1]["u-steel-a"], good(test_windows)
    c = registry.client(services.mlflow_uri)
    mlflow.set_tracking_uri(services.mlflow_uri)
    new = mlflow.register_model(c.get_model_version("it-cwru", "1").source, "it-cwru").version  # never loaded by Serve
    wait("the new version ready", lambda: c.get_model_version("it-cwru", new).status == "READY", timeout=15, interval=0.3)
    promotion.promote(members[0], services.mlflow_uri, "it-cwru", int(new), "candidate", by="test-admin")
    assert call(served, token, [inst]).status_code == 200
    listing = requests.get(f"{served}/v1/models", headers=bearer(token), timeout=30)
    assert listing.status_code == 200 and "it-cwru" in [m["model"] for m in listing.json()["models"]]
    before_all = healthz(served)["lookups"]
    before = before_all["models"]
    mlflow_group = read_services()["mlflow_pid"]  # its own session: the group is the server and its workers
    during: dict = {}
    with SteadyLoad(served, token, [inst], rate_per_s=5) as load:
        time.sleep(2)
        frozen_at = load.now()
        os.killpg(mlflow_group, signal.SIGSTOP)
        try:
            with pytest.raises(requests.Timeout):  # really frozen
                requests.get(f"{services.mlflow_uri}/health", timeout=2)
            for what, model in (("new version", f"it-cwru/{new}"), ("unknown alias", "it-cwru@challenger")):
                t0 = time.monotonic()
                r = call(served, token, [inst], model=model)
                during[what] = (r.status_code, r.json()["detail"], r.headers.get("retry-after"), time.monotonic() - t0)
            r = requests.get(f"{served}/v1/models", headers=bearer(token), timeout=60)
            during["listing"] = (r.status_code, [m["model"] for m in r.json().get("models", [])])
            time.sleep(max(0.0, 15 - (load.now() - frozen_at)))
            during["lookups"] = healthz(served)["lookups"]
            thawed_at = load.now()
        finally:
            os.killpg(mlflow_group, signal.SIGCONT)
        time.sleep(3)
    answered = [s for s in load.sent if s.status == 200]
    while_frozen = [s for s in answered if frozen_at <= s.sent_s < thawed_at]
    slowest = sorted((s.done_s - s.sent_s for s in load.sent), reverse=True)[:3]  # (one sent just before may meet the freeze)
    print(f"\nMLflow frozen {thawed_at - frozen_at:.1f} s: {len(answered)} of {len(load.sent)} requests answered 200 "
          f"({len(while_frozen)} sent while frozen; the slowest three in {', '.join(f'{t:.2f}' for t in slowest)} s); new version "
          f"{during['new version'][3]:.1f} s to a 503, unknown alias {during['unknown alias'][3]:.1f} s to a 404; "
          f"lookups while frozen: {during['lookups']}")
    assert [s for s in load.sent if s.status != 200] == []
    assert len(while_frozen) >= 40
    assert during["new version"][:3] == (503, REGISTRY_AWAY, "1"), during["new version"]
    assert during["unknown alias"][:3] == (404, "model it-cwru has no promoted alias challenger: GET /v1/models lists the "
                                                "models you may call with their aliases (an admin promotes one with "
                                                "`indai model promote`)", None), during["unknown alias"]
    assert during["listing"][0] == 200 and during["listing"][1] == [m["model"] for m in listing.json()["models"]]
    models, versions = during["lookups"]["models"], during["lookups"]["versions"]
    assert models["away"] and models["stale_answers"] > before["stale_answers"] and models["failed_lookups"] > before["failed_lookups"]
    # (the counters are the replica's since it started; the platform database answered throughout the freeze)
    assert not versions["away"] and versions["failed_lookups"] == before_all["versions"]["failed_lookups"]

    # thawed: the listing finds MLflow back and the new version loads
    def listing_back() -> bool:
        return requests.get(f"{served}/v1/models", headers=bearer(token), timeout=30).status_code == 200 \
            and not healthz(served)["lookups"]["models"]["away"]
    wait("MLflow seen back", listing_back, timeout=60, interval=0.5)
    r = call(served, token, [inst], model=f"it-cwru/{new}")
    assert (r.status_code, r.json()["model_version"]) == (200, int(new))
    assert call(served, token, [inst], model="it-cwru@candidate").json()["model_version"] == int(new)
