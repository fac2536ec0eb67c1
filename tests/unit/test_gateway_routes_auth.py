"""Every route of the job gateway refuses missing, malformed, unknown, expired, revoked and
other members' tokens. The routes are enumerated from the app itself, so a route added later
without authentication fails this test (issue 9). A real uvicorn server on loopback; Ray is not
needed, because a refused request never reaches it (the upstream URL is a closed port)."""
import asyncio
import re
from datetime import timedelta

import aiohttp
import pytest
import requests
from fastapi.routing import APIRoute, APIWebSocketRoute
from servers import app_server
from sqlalchemy.orm import Session

from indai.platform import db, tenancy
from indai.platform.gateway import build_gateway

PUBLIC = {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
SAMPLE = {"job_id": "raysubmit_ABCDEF1234567890", "protocol": "gcs", "name": "_ray_pkg_0123456789abcdef.zip"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    eng = db.engine(f"sqlite:///{tmp_path_factory.mktemp('gw') / 'platform.db'}")
    db.upgrade(eng)
    tenancy.add_member(eng, "steel-a", "Steel A", "steel", "demand")
    for user in ("kim", "old", "gone"):
        tenancy.add_user(eng, user, "steel-a", "researcher")
    tokens = {u: tenancy.create_token(eng, u) for u in ("kim", "old", "gone")}
    tenancy.revoke_token(eng, tokens["gone"][0])
    with Session(eng) as s, s.begin():  # as if issued long ago
        row = s.get(tenancy.Token, tokens["old"][0])
        row.expires_at = tenancy.utcnow() - timedelta(days=1)
    app = build_gateway("http://127.0.0.1:9", eng)
    with app_server(app) as url:
        yield app, url, {u: t for u, (_, t) in tokens.items()}


def _path(template: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: SAMPLE[m.group(1)], template)


def _bad_headers(tokens: dict) -> dict:
    return {"missing": {}, "not bearer": {"Authorization": f"Basic {tokens['kim']}"},
            "malformed": {"Authorization": "Bearer not-a-token"},
            "unknown": {"Authorization": "Bearer indai_0000000000000000_" + "x" * 43},
            "expired": {"Authorization": f"Bearer {tokens['old']}"},
            "revoked": {"Authorization": f"Bearer {tokens['gone']}"}}


def test_the_enumeration_sees_every_route(gateway):
    app, _, _ = gateway
    http = {r.path for r in app.routes if isinstance(r, APIRoute)} - PUBLIC
    ws = {r.path for r in app.routes if isinstance(r, APIWebSocketRoute)}
    assert {"/api/jobs/", "/api/jobs/{job_id}", "/api/packages/{protocol}/{name}"} <= http
    assert ws == {"/api/jobs/{job_id}/logs/tail"}
    assert all(set(re.findall(r"{(\w+)}", p)) <= set(SAMPLE) for p in http | ws), "give the new path parameter a sample value"


def test_every_http_route_refuses_bad_tokens(gateway):
    app, url, tokens = gateway
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.path not in PUBLIC for m in r.methods - {"HEAD"}]
    assert len(routes) >= 9
    for method, template in routes:
        for why, headers in _bad_headers(tokens).items():
            r = requests.request(method, url + _path(template), headers=headers, timeout=30)
            assert r.status_code == 401, (method, template, why, r.status_code, r.text)
            assert tokens["kim"] not in r.text
    ok = requests.get(f"{url}/api/indai/whoami", headers={"Authorization": f"Bearer {tokens['kim']}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["member"] == "steel-a"  # the same server lets a good token in


def test_the_log_websocket_refuses_bad_tokens(gateway):
    app, url, tokens = gateway
    paths = [r.path for r in app.routes if isinstance(r, APIWebSocketRoute)]

    async def close_code(path: str, headers: dict) -> int | None:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url.replace("http", "ws", 1) + _path(path), headers=headers) as ws:
                    await ws.receive(timeout=10)
                    return ws.close_code
            except aiohttp.WSServerHandshakeError as e:  # refused before the upgrade
                return e.status

    for path in paths:
        for why, headers in _bad_headers(tokens).items():
            code = asyncio.run(close_code(path, headers))
            assert code in (4401, 403), (path, why, code)


@pytest.fixture(scope="module")
def scoped(tmp_path_factory):
    """A gateway whose Ray is a closed port, with tokens that are valid but lack job scopes: a
    consumer's (models:predict, feedback:write), an admin's narrowed to models:predict, a
    researcher's narrowed to jobs:read, and a researcher's full token. Whatever reaches Ray
    answers 503 here, so a 403 shows the gateway refused before asking it."""
    eng = db.engine(f"sqlite:///{tmp_path_factory.mktemp('gw-scopes') / 'platform.db'}")
    db.upgrade(eng)
    tenancy.add_member(eng, "steel-a", "Steel A", "steel", "demand")
    for user, role in (("park", "consumer"), ("root", "admin"), ("kim", "researcher")):
        tenancy.add_user(eng, user, "steel-a", role)
    tokens = {"consumer": tenancy.create_token(eng, "park")[1],
              "admin-predict": tenancy.create_token(eng, "root", "predict", scopes=["models:predict"])[1],
              "read-only": tenancy.create_token(eng, "kim", "reader", scopes=["jobs:read"])[1],
              "researcher": tenancy.create_token(eng, "kim")[1]}
    with app_server(build_gateway("http://127.0.0.1:9", eng)) as url:
        yield url, eng, tokens


def test_job_routes_need_their_scope_whatever_the_role(scoped):
    """jobs:read to list, read and tail; jobs:submit to stop, delete and handle packages. The
    admin bypass comes from the token's admin scope, so an admin's token narrowed to
    models:predict is refused like a consumer's."""
    url, eng, tokens = scoped
    job, pkg = SAMPLE["job_id"], SAMPLE["name"]
    needs = [("GET", "/api/jobs/", "jobs:read"), ("GET", f"/api/jobs/{job}", "jobs:read"),
             ("GET", f"/api/jobs/{job}/logs", "jobs:read"), ("POST", f"/api/jobs/{job}/stop", "jobs:submit"),
             ("DELETE", f"/api/jobs/{job}", "jobs:submit"), ("GET", f"/api/packages/gcs/{pkg}", "jobs:submit"),
             ("PUT", f"/api/packages/gcs/{pkg}", "jobs:submit"), ("POST", "/api/jobs/", "jobs:submit")]
    for who in ("consumer", "admin-predict"):
        for method, path, scope in needs:
            body = {"entrypoint": "echo"} if path == "/api/jobs/" and method == "POST" else None
            r = requests.request(method, url + path, json=body, timeout=30, headers={"Authorization": f"Bearer {tokens[who]}"})
            assert r.status_code == 403, (who, method, path, r.status_code, r.text)
            assert f"lacks scope '{scope}'" in r.json()["detail"], (who, method, path, r.text)
    reader = {"Authorization": f"Bearer {tokens['read-only']}"}
    for method, path, scope in needs:
        r = requests.request(method, url + path, timeout=30, headers=reader)
        if scope == "jobs:submit":
            assert r.status_code == 403 and "lacks scope 'jobs:submit'" in r.json()["detail"], (method, path, r.text)
        else:  # allowed: it went on to ask Ray, which is not there
            assert r.status_code == 503, (method, path, r.status_code, r.text)
    # promoting a model needs models:promote (then, that the token's member owns the model)
    for who in ("consumer", "admin-predict", "read-only", "researcher"):
        r = requests.post(f"{url}/api/indai/models/m/promote", json={"version": 1}, timeout=30,
                          headers={"Authorization": f"Bearer {tokens[who]}"})
        expected = ("member steel-a does not own model m" if who == "researcher" else "lacks scope 'models:promote'")
        assert r.status_code == 403 and expected in r.json()["detail"], (who, r.text)
    from sqlalchemy import select

    with Session(eng) as s:
        refused = set(s.execute(select(db.Audit.user_id, db.Audit.action, db.Audit.status).where(db.Audit.status == 403)))
    assert {("park", "logs", 403), ("root", "stop", 403), ("root", "delete", 403), ("kim", "stop", 403),
            ("park", "model.promote", 403), ("kim", "model.promote", 403)} <= refused


def test_the_log_websocket_needs_jobs_read(scoped):
    url, _, tokens = scoped

    async def close_code(token: str) -> int | None:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{url.replace('http', 'ws', 1)}/api/jobs/{SAMPLE['job_id']}/logs/tail",
                                              headers={"Authorization": f"Bearer {token}"}) as ws:
                    await ws.receive(timeout=10)
                    return ws.close_code
            except aiohttp.WSServerHandshakeError as e:  # closed (4403) before the upgrade: HTTP 403
                return e.status

    assert asyncio.run(close_code(tokens["consumer"])) == 403
    assert asyncio.run(close_code(tokens["admin-predict"])) == 403
    assert asyncio.run(close_code(tokens["read-only"])) == 1013  # allowed: on to Ray, which is not there


def test_a_job_id_that_would_change_the_upstream_url_is_refused(scoped):
    """A submission whose job_id (Ray's old name for submission_id) is "mine?0" would be looked
    up as job "mine": counted against no quota, and its owner could not stop it. Refused before
    Ray is asked (it would answer 503 here)."""
    url, _, tokens = scoped
    r = requests.post(f"{url}/api/jobs/", json={"entrypoint": "echo", "job_id": "mine?0"}, timeout=30,
                      headers={"Authorization": f"Bearer {tokens['researcher']}"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == ("submission refused: field job_id: Value error, must be 1-100 letters, digits, "
                                  "'_' or '-': choose another id or leave it out")
