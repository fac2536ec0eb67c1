"""Idempotent submission through the job gateway, over a real Ray job server and a real
PostgreSQL: a retried POST with the same Idempotency-Key is answered with the job its first
try created (also when that first answer was lost to a client timeout after Ray had the job),
never with a second job; and `indai train submit` rides out a stopped database by retrying.
Every count below comes from Ray's own job list, read with Ray's token, not the gateway's."""
import asyncio
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def gw(services, postgres):
    """A gateway on its own PostgreSQL database, in front of the session's Ray."""
    from servers import app_server

    from indai.platform import db, services as svc, tenancy
    from indai.platform.gateway import Limits, build_gateway
    from indai.platform.storage import open_store

    eng = db.engine(postgres.new_database("t_idem"))
    db.upgrade(eng)
    tenancy.add_member(eng, "cwru-demo", "CWRU demo", "other", "research")
    tenancy.add_member(eng, "auto-b", "Auto B", "automotive", "demand")
    tenancy.add_user(eng, "kim", "cwru-demo", "researcher")
    tenancy.add_user(eng, "lee", "auto-b", "researcher")
    tokens = {u: tenancy.create_token(eng, u)[1] for u in ("kim", "lee")}
    state = svc.read_services()
    ray = {"url": state["ray_dashboard"], "token": Path(state["ray_auth_token_path"]).read_text().strip()}
    app = build_gateway(ray["url"], eng, Limits(concurrent_jobs=10, gpus_per_job=1), ray_token=ray["token"],
                        store=open_store(services.store_uri))
    with app_server(app) as url:
        yield {"url": url, "eng": eng, "tokens": tokens, "ray": ray}
    eng.dispose()


def ray_jobs(ray: dict, marker: str) -> list[dict]:
    """Ray's own record of the jobs whose entrypoint carries `marker`."""
    r = requests.get(f"{ray['url']}/api/jobs/", headers={"X-Ray-Authorization": f"Bearer {ray['token']}"}, timeout=30)
    assert r.status_code == 200, r.text
    return [j for j in r.json() if marker in j["entrypoint"]]


def post(gw: dict, user: str, body: dict, key: str | None, timeout=(5, 60)) -> requests.Response:
    headers = {"Authorization": f"Bearer {gw['tokens'][user]}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{gw['url']}/api/jobs/", json=body, headers=headers, timeout=timeout)


def audited(gw: dict, sid: str) -> list[tuple[str, int]]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indai.platform.db import Audit

    with Session(gw["eng"]) as s:
        return [tuple(r) for r in s.execute(select(Audit.action, Audit.status).where(Audit.target == sid).order_by(Audit.id))]


def job_body(marker: str) -> dict:
    return {"entrypoint": f"python -c \"print('{marker}')\""}


def until_answered(call, deadline_s: float = 60) -> requests.Response:
    """The first answer that is not 409 (the same submission still in progress)."""
    deadline = time.time() + deadline_s
    while True:
        r = call()
        if r.status_code != 409 or time.time() > deadline:
            return r
        assert r.headers.get("retry-after") == "2" and "still in progress" in r.json()["detail"]
        time.sleep(0.5)


def test_same_key_twice_is_one_job_and_the_same_answer(gw):
    marker, key = f"idem-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    first = post(gw, "kim", job_body(marker), key)
    second = post(gw, "kim", job_body(marker), key)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert first.json()["submission_id"] == second.json()["submission_id"]
    assert second.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    jobs = ray_jobs(gw["ray"], marker)
    assert [j["submission_id"] for j in jobs] == [first.json()["submission_id"]]
    assert jobs[0]["metadata"]["indai.member"] == "cwru-demo"


def test_answer_lost_after_ray_had_the_job_is_found_by_the_retry(gw):
    """The network loses the gateway's answer to the first POST after the gateway has done all
    its work (Ray has the job). indai's client, which saw only a dropped connection, says it is
    retrying and retries with the same key: the answer names the job Ray already has."""
    from lossy_proxy import LossyProxy

    from indai.platform import submit

    marker, key = f"lost-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    proxy = LossyProxy(int(gw["url"].rsplit(":", 1)[1]), lose_prefix=b"POST /api/jobs/")
    proxy.lose = 1
    told = io.StringIO()
    try:
        sid = submit.with_retries(
            "the submission",
            lambda: submit.submitting_client(proxy.url, gw["tokens"]["kim"], key, submit.TIMEOUT).submit_job(**job_body(marker)),
            waits=(0.5, 1, 2, 4), stream=told)
    finally:
        proxy.close()
    assert proxy.lost == 1
    assert "no answer from the gateway" in told.getvalue() and "retrying the submission in 0.5 s (try 2 of 5" in told.getvalue()
    jobs = ray_jobs(gw["ray"], marker)
    assert [j["submission_id"] for j in jobs] == [sid]
    assert audited(gw, sid) == [("submit", 200), ("submit-replay", 200)]  # the retry was answered from the record


def test_concurrent_tries_with_one_key_make_one_job(gw):
    """Four tries at once race on the (member, key) unique constraint: one job, one id."""
    marker, key = f"race-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: until_answered(lambda: post(gw, "kim", job_body(marker), key)), range(4)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    ids = {a.json()["submission_id"] for a in answers}
    jobs = ray_jobs(gw["ray"], marker)
    assert len(ids) == 1 and [j["submission_id"] for j in jobs] == list(ids)
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3


def test_a_reservation_left_by_a_gateway_that_died_before_ray(gw):
    """A gateway killed between recording the key and asking Ray leaves a pending reservation
    whose job Ray never got (written here as it would have left it). While it is young a retry
    hears 409 (the first try may still be on its way); once it is older than IN_FLIGHT_S the
    retry takes it over and submits: one job, under a fresh id."""
    import hashlib
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from indai.platform.db import Job, SubmissionKey, utcnow
    from indai.platform.gateway import IN_FLIGHT_S, Submission

    marker, key, orphan = f"orphan-{uuid.uuid4().hex[:12]}", str(uuid.uuid4()), f"raysubmit_orphan{uuid.uuid4().hex[:8]}"
    fingerprint = hashlib.sha256(Submission.model_validate(job_body(marker)).model_dump_json(exclude_none=True).encode()).hexdigest()
    with Session(gw["eng"]) as s, s.begin():
        s.add(Job(submission_id=orphan, member_id="cwru-demo", user_id="kim", recipe="custom", gpus=0, submitted_at=utcnow()))
        s.add(SubmissionKey(member_id="cwru-demo", key=key, submission_id=orphan, request_hash=fingerprint, state="pending",
                            created_at=utcnow()))
    young = post(gw, "kim", job_body(marker), key)
    assert young.status_code == 409 and young.headers["retry-after"] == "2" and orphan in young.json()["detail"]
    with Session(gw["eng"]) as s, s.begin():
        s.query(SubmissionKey).filter_by(key=key).update({"created_at": utcnow() - timedelta(seconds=IN_FLIGHT_S + 1)})
    taken_over = post(gw, "kim", job_body(marker), key)
    assert taken_over.status_code == 200, taken_over.text
    sid = taken_over.json()["submission_id"]
    assert sid != orphan and [j["submission_id"] for j in ray_jobs(gw["ray"], marker)] == [sid]
    again = post(gw, "kim", job_body(marker), key)
    assert again.json()["submission_id"] == sid and again.headers.get("idempotent-replayed") == "true"
    with Session(gw["eng"]) as s:
        assert s.get(Job, orphan) is None  # the orphan's row went with its reservation


def test_the_same_key_of_another_member_is_independent(gw):
    marker, key = f"other-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    kim = post(gw, "kim", job_body(marker), key)
    lee = post(gw, "lee", job_body(marker), key)
    assert kim.status_code == 200 and lee.status_code == 200, (kim.text, lee.text)
    assert kim.json()["submission_id"] != lee.json()["submission_id"]
    assert "idempotent-replayed" not in lee.headers
    jobs = ray_jobs(gw["ray"], marker)
    assert sorted(j["metadata"]["indai.member"] for j in jobs) == ["auto-b", "cwru-demo"]


def test_a_key_reused_for_a_different_submission_is_refused(gw):
    marker, key = f"reuse-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    assert post(gw, "kim", job_body(marker), key).status_code == 200
    r = post(gw, "kim", job_body(marker + "-changed"), key)
    assert r.status_code == 422 and "already used for a different submission" in r.json()["detail"]
    assert len(ray_jobs(gw["ray"], marker)) == 1  # the changed body made no job either


@pytest.mark.parametrize("key", ["", "short", "x" * 129, "../../etc/passwd-0123", "key with spaces 0123",
                                 "clé-idempotence-0123", "abc%2e%2e0123456789", "0123456789abcdef;x=1"])
def test_malformed_keys_are_refused_before_anything_runs(gw, key):
    marker = f"badkey-{uuid.uuid4().hex[:12]}"
    r = post(gw, "kim", job_body(marker), key)
    assert r.status_code == 400 and "Idempotency-Key header must be 16-128 letters" in r.json()["detail"], r.text
    assert ray_jobs(gw["ray"], marker) == []


@pytest.fixture
def gw_behind_proxy(gw):
    """A second gateway on the same database whose way to Ray's job server runs through a
    loopback proxy the test can take down (connections refused) or make lose Ray's answers,
    with a member of its own that has no jobs yet."""
    from lossy_proxy import LossyProxy
    from servers import app_server

    from indai.platform import tenancy
    from indai.platform.gateway import Limits, build_gateway

    member, user = f"ship-{uuid.uuid4().hex[:6]}", f"park-{uuid.uuid4().hex[:6]}"
    tenancy.add_member(gw["eng"], member, "Ship C", "shipbuilding", "demand")
    tenancy.add_user(gw["eng"], user, member, "researcher")
    proxy = LossyProxy(int(gw["ray"]["url"].rsplit(":", 1)[1]), lose_prefix=b"POST /api/jobs/")
    app = build_gateway(proxy.url, gw["eng"], Limits(concurrent_jobs=10, gpus_per_job=1), ray_token=gw["ray"]["token"])
    try:
        with app_server(app) as url:
            yield dict(gw, url=url, proxy=proxy, user=user, member=member,
                       tokens={**gw["tokens"], user: tenancy.create_token(gw["eng"], user)[1]})
    finally:
        proxy.close()


def key_rows(gw: dict, key: str) -> list[tuple[str, str]]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indai.platform.db import SubmissionKey

    with Session(gw["eng"]) as s:
        return [tuple(r) for r in s.execute(select(SubmissionKey.submission_id, SubmissionKey.state)
                                             .where(SubmissionKey.key == key))]


async def tail_close_code(url: str, sid: str, headers: dict) -> int | None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws', 1)}/api/jobs/{sid}/logs/tail", headers=headers) as ws:
            await ws.receive(timeout=30)
            return ws.close_code


def test_ray_job_server_down_is_a_503_and_a_retry_submits_once(gw_behind_proxy):
    """Ray's job server refuses connections under a running gateway. A submission it cannot have
    received is answered 503 with Retry-After and leaves no reservation, so the retry after
    Ray is back submits at once (no 409 wait). Every route that needs Ray answers 503 (not
    500) meanwhile; whoami, which does not, keeps working."""
    from sqlalchemy.orm import Session

    from indai.platform.db import Job

    g = gw_behind_proxy
    user, marker, key = g["user"], f"raydown-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    auth = {"Authorization": f"Bearer {g['tokens'][user]}"}
    g["proxy"].down()
    try:
        r = post(g, user, job_body(marker), key)
        assert r.status_code == 503 and r.headers["retry-after"] == "30", r.text
        assert "did not answer (unreachable): nothing was submitted" in r.json()["detail"]
        assert key_rows(g, key) == []
        with Session(g["eng"]) as s:
            assert s.query(Job).filter_by(member_id=g["member"]).count() == 0  # the job's row went with the key
        assert requests.get(f"{g['url']}/api/indai/whoami", headers=auth, timeout=30).json()["member"] == g["member"]
    finally:
        g["proxy"].up()
    first = post(g, user, job_body(marker), key)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers, first.text
    sid = first.json()["submission_id"]
    assert [j["submission_id"] for j in ray_jobs(g["ray"], marker)] == [sid]
    assert key_rows(g, key) == [(sid, "submitted")]

    g["proxy"].down()  # the member now has a job: its quota check is what needs Ray first
    try:
        for method, path in (("POST", "/api/jobs/"), ("GET", "/api/jobs/"), ("GET", f"/api/jobs/{sid}"),
                             ("GET", f"/api/jobs/{sid}/logs"), ("POST", f"/api/jobs/{sid}/stop"), ("GET", "/api/version")):
            body = job_body(marker + "-2") if path == "/api/jobs/" and method == "POST" else None
            r = requests.request(method, f"{g['url']}{path}", json=body, headers=auth, timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"] == "30", (method, path, r.status_code, r.text)
            assert r.json()["detail"].startswith("the Ray job server did not answer (ConnectionError): retry in a minute")
        assert asyncio.run(tail_close_code(g["url"], sid, auth)) == 1013  # the log websocket: "try again later"
    finally:
        g["proxy"].up()
    assert [j["submission_id"] for j in ray_jobs(g["ray"], marker)] == [sid]
    assert requests.get(f"{g['url']}/api/jobs/{sid}", headers=auth, timeout=30).status_code == 200


def test_rays_answer_lost_keeps_the_reservation_and_the_retry_finds_the_job(gw_behind_proxy):
    """The connection to Ray drops after Ray took the job (its answer is lost on the way to
    the gateway): the gateway cannot know, so it keeps the reservation and says the job may
    exist; the retry with the same key finds it in Ray and answers with it. One job."""
    g = gw_behind_proxy
    user, marker, key = g["user"], f"raylost-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    g["proxy"].lose = 1
    r = post(g, user, job_body(marker), key)
    assert g["proxy"].lost == 1
    assert r.status_code == 503 and "may have been submitted: retry with the same Idempotency-Key" in r.json()["detail"], r.text
    [(sid, state)] = key_rows(g, key)
    assert state == "pending" and sid in r.json()["detail"]
    again = post(g, user, job_body(marker), key)
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true", again.text
    assert again.json()["submission_id"] == sid
    assert [j["submission_id"] for j in ray_jobs(g["ray"], marker)] == [sid]
    assert key_rows(g, key) == [(sid, "submitted")]


def test_train_submit_rides_out_ray_coming_back(gw_behind_proxy):
    """indai's client retrying through an outage of Ray's job server: it says so, and the
    submission goes through once Ray is back (here after 2 s). One job."""
    from indai.platform import submit

    g = gw_behind_proxy
    user, marker, key = g["user"], f"rayback-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    told = io.StringIO()
    g["proxy"].down()
    back = threading.Timer(2.0, g["proxy"].up)
    back.start()
    try:
        sid = submit.with_retries(
            "the submission",
            lambda: submit.submitting_client(g["url"], g["tokens"][user], key, submit.TIMEOUT).submit_job(**job_body(marker)),
            waits=(0.5, 1, 2, 4, 8), stream=told)
    finally:
        back.join()
    assert "the gateway answered 503 (the Ray job server did not answer" in told.getvalue(), told.getvalue()
    assert [j["submission_id"] for j in ray_jobs(g["ray"], marker)] == [sid]


def test_a_key_older_than_its_lifetime_names_a_new_submission(gw):
    """Keys are kept KEY_TTL_S (a day): the same key a day later is a new job, and the
    expired record is gone from the table."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from indai.platform.db import SubmissionKey, utcnow
    from indai.platform.gateway import KEY_TTL_S

    marker, key = f"ttl-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    first = post(gw, "kim", job_body(marker), key)
    assert first.status_code == 200, first.text
    assert post(gw, "kim", job_body(marker), key).headers.get("idempotent-replayed") == "true"  # within its lifetime
    with Session(gw["eng"]) as s, s.begin():
        s.query(SubmissionKey).filter_by(key=key).update({"created_at": utcnow() - timedelta(seconds=KEY_TTL_S + 1)})
    later = post(gw, "kim", job_body(marker), key)
    assert later.status_code == 200 and "idempotent-replayed" not in later.headers, later.text
    assert later.json()["submission_id"] != first.json()["submission_id"]
    assert sorted(j["submission_id"] for j in ray_jobs(gw["ray"], marker)) == sorted(
        [first.json()["submission_id"], later.json()["submission_id"]])
    assert key_rows(gw, key) == [(later.json()["submission_id"], "submitted")]


def test_train_submit_retries_while_the_database_is_down_and_submits_once(gw, postgres, cwru_dataset, repo):
    """PostgreSQL stopped under the gateway: a clear 503; `indai train submit` says it is
    retrying, goes through once the database is back, and Ray holds exactly one job of it."""
    name, version, _ = cwru_dataset
    run_name = f"idem-{uuid.uuid4().hex[:8]}"
    auth = {"Authorization": f"Bearer {gw['tokens']['kim']}"}
    postgres.stop()
    try:
        r = requests.post(f"{gw['url']}/api/jobs/", json=job_body("down"), headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
                          timeout=30)
        assert r.status_code == 503 and "database is unavailable" in r.json()["detail"]
        exe = Path(sys.executable).parent / "indai"
        proc = subprocess.Popen([str(exe), "train", "submit", str(repo / "trainers" / "recipes" / "cwru_sensor.yaml"),
                                 "--member", "cwru-demo", "--no-follow", f"data.dataset={name}@{version}", f"run.name={run_name}",
                                 "optim.epochs=1", "run.workers=1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "INDAI_GATEWAY": gw["url"], "INDAI_TOKEN": gw["tokens"]["kim"]})
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.time() + 90
        while not any("retrying" in line for line in err):
            assert proc.poll() is None and time.time() < deadline, "".join(err)[-3000:]
            time.sleep(0.2)
    finally:
        postgres.start()
    # not communicate(): it would read stderr too, beside the reader thread, and close it under it
    proc.wait(timeout=120)  # (stdout, the submission id and a few lines, fits in the pipe's buffer)
    out = proc.stdout.read()
    reader.join(10)
    assert proc.returncode == 0, "".join(err)[-3000:]
    said = "".join(err)
    assert "the gateway answered 503 (the platform database is unavailable" in said and "retrying" in said
    sid = out.strip().splitlines()[-1]
    jobs = ray_jobs(gw["ray"], f"run.name={run_name}")
    assert [j["submission_id"] for j in jobs] == [sid]
    stopped = requests.post(f"{gw['url']}/api/jobs/{sid}/stop", headers=auth, timeout=30)  # no need to train it
    assert stopped.status_code == 200
