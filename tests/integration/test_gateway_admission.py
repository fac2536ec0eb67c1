"""Admission under load: the concurrent-jobs quota holds when submissions of one member arrive
at once, on one gateway over SQLite (the embedded default) and on two gateway replicas over one
PostgreSQL (a cluster). Ray is the session's real job server, reached through a loopback
forwarder that makes it slow, as a loaded Ray is: a submission takes 1 s to be accepted and a
job lookup 0.3 s, which is the window in which admissions used to race. Every count below comes
from Ray's own job list, read with Ray's token."""
import asyncio
import contextlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SUBMIT_DELAY_S, LOOKUP_DELAY_S = 1.0, 0.3


def slow_forwarder(target: str):
    """An ASGI app that forwards everything to Ray's job server, holding each job submission
    SUBMIT_DELAY_S and each lookup of one job LOOKUP_DELAY_S before passing it on."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def forward(path: str, request: Request):
        if request.method == "POST" and path == "api/jobs/":
            await asyncio.sleep(SUBMIT_DELAY_S)
        elif request.method == "GET" and path.startswith("api/jobs/") and path.count("/") == 2 and path != "api/jobs/":
            await asyncio.sleep(LOOKUP_DELAY_S)
        headers = {k: v for k, v in request.headers.items() if k in ("x-ray-authorization", "content-type")}
        body = await request.body()
        r = await asyncio.to_thread(requests.request, request.method, f"{target}/{path}", data=body, headers=headers,
                                    params=dict(request.query_params), timeout=60)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    return app


@pytest.fixture(scope="module")
def ray(services):
    """Ray's job server as it is ({url, token}) and behind the slow forwarder (slow_url)."""
    from servers import app_server

    from indai.platform import services as svc

    state = svc.read_services()
    ray = {"url": state["ray_dashboard"], "token": Path(state["ray_auth_token_path"]).read_text().strip()}
    with app_server(slow_forwarder(ray["url"])) as slow_url:
        yield dict(ray, slow_url=slow_url)


def ray_jobs(ray: dict, marker: str) -> list[dict]:
    r = requests.get(f"{ray['url']}/api/jobs/", headers={"X-Ray-Authorization": f"Bearer {ray['token']}"}, timeout=30)
    assert r.status_code == 200, r.text
    return [j for j in r.json() if marker in j["entrypoint"]]


def stop_all(ray: dict, marker: str) -> None:
    for job in ray_jobs(ray, marker):
        requests.post(f"{ray['url']}/api/jobs/{job['submission_id']}/stop",
                      headers={"X-Ray-Authorization": f"Bearer {ray['token']}"}, timeout=30)


def platform_db(request, kind: str, tmp_path):
    """A fresh platform database of the given kind, with one member and its researcher."""
    from indai.platform import db, tenancy

    if kind == "sqlite":
        eng = db.engine(f"sqlite:///{tmp_path / 'platform.db'}")
    else:
        eng = db.engine(request.getfixturevalue("postgres").new_database("t_adm"))
    db.upgrade(eng)
    tenancy.add_member(eng, "steel-a", "Steel A", "steel", "demand")
    tenancy.add_user(eng, "kim", "steel-a", "researcher")
    return eng, tenancy.create_token(eng, "kim")[1]


def orphan(eng, age_s: float) -> str:
    """A reservation as a gateway leaves it while it is asking Ray (or after it died doing so):
    the member's job row, of a job Ray does not know, reserved `age_s` seconds ago."""
    from sqlalchemy.orm import Session

    from indai.platform.db import Job, utcnow

    sid = f"raysubmit_orphan{uuid.uuid4().hex[:8]}"
    with Session(eng) as s, s.begin():
        s.add(Job(submission_id=sid, member_id="steel-a", user_id="kim", recipe="custom", gpus=0,
                  submitted_at=utcnow() - timedelta(seconds=age_s)))
    return sid


@pytest.mark.parametrize("kind,replicas", [("sqlite", 1), ("postgresql", 2)])
def test_parallel_submissions_are_admitted_up_to_the_limit(ray, request, tmp_path, kind, replicas):
    """Four submissions of one member at once (spread over the replicas), with a limit of one
    job at a time: one job, three clear refusals. The member also has an old reservation Ray
    never got, which counts for nothing but is looked up at each admission."""
    from servers import app_server

    from indai.platform.gateway import IN_FLIGHT_S, Limits, build_gateway

    eng, token = platform_db(request, kind, tmp_path)
    orphan(eng, age_s=2 * IN_FLIGHT_S)
    marker = f"adm-{kind}-{uuid.uuid4().hex[:8]}"
    body = {"entrypoint": f"python -c \"import time; print('{marker}'); time.sleep(60)\""}
    auth = {"Authorization": f"Bearer {token}"}
    start = threading.Barrier(4)
    try:
        with contextlib.ExitStack() as stack:
            urls = [stack.enter_context(app_server(build_gateway(ray["slow_url"], eng, Limits(concurrent_jobs=1, gpus_per_job=1),
                                                                 ray_token=ray["token"])))
                    for _ in range(replicas)]

            def submit(i: int) -> requests.Response:
                start.wait()
                return requests.post(f"{urls[i % replicas]}/api/jobs/", json=body, headers=auth, timeout=120)

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(submit, range(4)))
        assert sorted(a.status_code for a in answers) == [200, 429, 429, 429], [(a.status_code, a.text) for a in answers]
        for refused in (a for a in answers if a.status_code == 429):
            assert refused.json()["detail"] == ("quota: member steel-a already runs 1 jobs (limit 1 at a time): "
                                                "wait or stop one")
        [admitted] = [a.json()["submission_id"] for a in answers if a.status_code == 200]
        assert [j["submission_id"] for j in ray_jobs(ray, marker)] == [admitted]
    finally:
        stop_all(ray, marker)
        eng.dispose()


def test_a_job_still_on_its_way_to_ray_counts_as_running(ray, request, tmp_path):
    """A reservation younger than IN_FLIGHT_S whose job Ray does not know yet is a submission
    still being made: it takes the member's only slot. Once older, Ray never got it, and the
    slot is free again."""
    from servers import app_server
    from sqlalchemy.orm import Session

    from indai.platform.db import Job, utcnow
    from indai.platform.gateway import IN_FLIGHT_S, Limits, build_gateway

    eng, token = platform_db(request, "sqlite", tmp_path)
    sid = orphan(eng, age_s=5)
    marker = f"inflight-{uuid.uuid4().hex[:8]}"
    body = {"entrypoint": f"python -c \"print('{marker}')\""}
    auth = {"Authorization": f"Bearer {token}"}
    try:
        with app_server(build_gateway(ray["url"], eng, Limits(concurrent_jobs=1, gpus_per_job=1), ray_token=ray["token"])) as url:
            r = requests.post(f"{url}/api/jobs/", json=body, headers=auth, timeout=60)
            assert r.status_code == 429, r.text
            assert r.json()["detail"] == "quota: member steel-a already runs 1 jobs (limit 1 at a time): wait or stop one"
            with Session(eng) as s, s.begin():
                s.get(Job, sid).submitted_at = utcnow() - timedelta(seconds=IN_FLIGHT_S + 1)
            r = requests.post(f"{url}/api/jobs/", json=body, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            assert [j["submission_id"] for j in ray_jobs(ray, marker)] == [r.json()["submission_id"]]
    finally:
        stop_all(ray, marker)
        eng.dispose()
