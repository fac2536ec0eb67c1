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
