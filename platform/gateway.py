"""The job gateway: Ray's Jobs REST API with per-member identity in front of it.

Ray's job API runs any code it is given and knows no users (CVE-2023-48022). The gateway
speaks the same API (`/api/version`, `/api/jobs/...`), so the stock `ray job submit --address
http://<gateway> --headers '{"Authorization": "Bearer <token>"}'` and `JobSubmissionClient`
work unchanged, and forwards to the real job server only what passes:
- every request carries a valid token (tenancy.verify; revocation takes effect at once);
- a researcher submits, sees, tails and stops only their member's jobs; an admin sees all;
  a consumer submits nothing; someone else's job answers 404, as if it did not exist;
- a submission is checked field by field (unknown fields, host paths, pip indexes refused)
  and against the member's quotas (concurrent jobs, GPUs per job);
- each job is tagged with member, user and recipe; every decision goes to the audit log.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field

import requests
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from indai.platform import tenancy
from indai.platform.db import Audit, Job, utcnow
from indai.platform.settings import OFFLINE_ENV

MAX_BODY = 1024 * 1024
MAX_PACKAGE = 100 * 1024 * 1024
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMISSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
PACKAGE_RE = re.compile(r"^_ray_pkg_[0-9a-f]{16,64}\.zip$")
ENV_KEY_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
FORBIDDEN_ENV = {"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "RAY_ADDRESS"}


def _env(name: str, default: str):
    return field(default_factory=lambda: float(os.environ.get(name, default)))


@dataclass
class Limits:
    """Per-member quotas; defaults come from the environment when the gateway is built."""

    concurrent_jobs: float = _env("INDAI_QUOTA_CONCURRENT_JOBS", "4")
    gpus_per_job: float = _env("INDAI_QUOTA_GPUS_PER_JOB", "8")
    gpu_hours_per_month: float = _env("INDAI_QUOTA_GPU_HOURS_PER_MONTH", "1000")


class RuntimeEnv(BaseModel):
    """The runtime_env fields a job may set. No pip/conda/uv (no arbitrary indexes), no
    py_modules or host paths; working_dir only as a package uploaded through this gateway."""

    model_config = ConfigDict(extra="forbid")
    working_dir: str | None = Field(default=None, pattern=r"^gcs://_ray_pkg_[0-9a-f]{16,64}\.zip$")
    env_vars: dict[str, str] | None = None


class Submission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entrypoint: str = Field(min_length=1, max_length=10_000)
    submission_id: str | None = Field(default=None, pattern=SUBMISSION_ID_RE.pattern)
    job_id: str | None = None
    runtime_env: RuntimeEnv | None = None
    metadata: dict[str, str] | None = None
    entrypoint_num_cpus: float | None = Field(default=None, ge=0, le=1024)
    entrypoint_num_gpus: float | None = Field(default=None, ge=0, le=64)
    entrypoint_memory: int | None = Field(default=None, ge=0)
    entrypoint_resources: dict[str, float] | None = None
    entrypoint_label_selector: dict[str, str] | None = None


def recipe_of(entrypoint: str) -> str:
    m = re.search(r"\bindai\s+train\s+(\S+\.ya?ml)", entrypoint)
    return m.group(1) if m else "custom"


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


JOB_IDENTITY_ENV = ("INDAI_JOB_MEMBER", "INDAI_JOB_ROLE", "INDAI_JOB_USER")


def build_gateway(ray_url: str, eng: Engine, limits: Limits | None = None, ray_token: str | None = None,
                  store=None) -> FastAPI:
    """`ray_token`: Ray's own token (token authentication); the gateway adds it to every call
    upstream, in Ray's own header, so the member's token never reaches Ray. `store`: the
    object store, to check the dataset versions a job declares (metadata `indai.datasets`)
    against the reading rule; every job also runs with its member in INDAI_JOB_MEMBER, which
    indai's dataset reader enforces inside the job."""
    limits = limits or Limits()
    ray_url = ray_url.rstrip("/")
    upstream_headers = {"X-Ray-Authorization": f"Bearer {ray_token}"} if ray_token else {}
    app = FastAPI(title="indai job gateway", version="1",
                  description="Ray Jobs REST API with per-member authentication, ownership, quotas and audit.")
    http = requests.Session()

    def audit(p: tenancy.Principal | None, action: str, target: str, status: int, detail: str = "") -> None:
        with Session(eng) as s, s.begin():
            s.add(Audit(at=utcnow(), user_id=p.user if p else None, member_id=p.member if p else None,
                        action=action, target=target[:256], status=status, detail=detail[:2000]))

    def principal(headers) -> tenancy.Principal:
        auth = headers.get("authorization", "")
        return tenancy.verify(eng, auth[7:].strip() if auth.lower().startswith("bearer ") else None)

    def upstream(method: str, path: str, **kw) -> requests.Response:
        return http.request(method, f"{ray_url}{path}", timeout=60, headers=upstream_headers, **kw)

    def owned(p: tenancy.Principal, job_id: str) -> dict | None:
        """Ray's record of the job if the principal may see it, else None (answered as 404)."""
        if not SUBMISSION_ID_RE.match(job_id):
            return None
        r = upstream("GET", f"/api/jobs/{job_id}")
        if r.status_code != 200:
            return None
        info = r.json()
        member = (info.get("metadata") or {}).get("indai.member")
        return info if (p.role == "admin" or member == p.member) else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Authenticate every request and refuse oversized bodies before anything else runs."""
        size = request.headers.get("content-length")
        limit = MAX_PACKAGE if request.url.path.startswith("/api/packages/") else MAX_BODY
        if size is not None and (not size.isdigit() or int(size) > limit):
            return _error(413, f"request body is over the limit of {limit} bytes")
        if request.url.path in ("/openapi.json", "/docs", "/healthz"):
            return await call_next(request)
        try:
            request.state.principal = await asyncio.to_thread(principal, request.headers)
        except tenancy.AuthError as e:
            await asyncio.to_thread(audit, None, f"{request.method} {request.url.path}"[:64], request.url.path, 401, str(e))
            return _error(401, str(e))
        except SQLAlchemyError:
            return _error(503, "the platform database is unavailable: retry later")
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/indai/whoami")
    def whoami(request: Request) -> dict:
        p: tenancy.Principal = request.state.principal
        return {"user": p.user, "member": p.member, "role": p.role}

    @app.get("/api/version")
    def version() -> Response:
        r = upstream("GET", "/api/version")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.post("/api/jobs/")
    async def submit(request: Request):
        p: tenancy.Principal = request.state.principal
        try:
            p.require("jobs:submit")
        except tenancy.AuthError as e:
            await asyncio.to_thread(audit, p, "submit", "-", 403, str(e))
            return _error(403, f"{e}: a {p.role} may not submit jobs")
        try:
            body = Submission.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            detail = f"field {'.'.join(map(str, first['loc'])) or '(body)'}: {first['msg']}"
            await asyncio.to_thread(audit, p, "submit", "-", 400, detail)
            return _error(400, f"submission refused: {detail}")
        return await asyncio.to_thread(_submit, p, body)

    def _submit(p: tenancy.Principal, body: Submission) -> JSONResponse:
        env = (body.runtime_env.env_vars if body.runtime_env else None) or {}
        bad_env = [k for k in env if not ENV_KEY_RE.match(k) or k in FORBIDDEN_ENV or k.startswith("INDAI_JOB_")]
        if bad_env:
            audit(p, "submit", "-", 400, f"env vars {bad_env}")
            return _error(400, f"submission refused: environment variables {bad_env} may not be set by a job")
        gpus = body.entrypoint_num_gpus or 0
        if gpus > limits.gpus_per_job:
            audit(p, "submit", "-", 429, f"gpus {gpus}")
            return _error(429, f"quota: at most {limits.gpus_per_job:g} GPUs per job for member {p.member}; this job asks for {gpus:g}")
        running, used = member_usage(p.member)
        if gpus > 0 and used >= limits.gpu_hours_per_month:
            audit(p, "submit", "-", 429, f"{used:.2f} GPU-hours used")
            return _error(429, f"quota: member {p.member} used {used:.2f} of {limits.gpu_hours_per_month:g} GPU-hours this month: GPU jobs are refused until next month")
        if running >= limits.concurrent_jobs:
            audit(p, "submit", "-", 429, f"{running} running")
            return _error(429, f"quota: member {p.member} already runs {running} jobs (limit {limits.concurrent_jobs:g} at a time): wait or stop one")
        refused = check_datasets(p, (body.metadata or {}).get("indai.datasets", ""))
        if refused:
            audit(p, "submit", "-", 403, refused)
            return _error(403, f"submission refused: {refused}")
        payload = body.model_dump(exclude_none=True)
        payload["metadata"] = {**(body.metadata or {}), "indai.member": p.member, "indai.user": p.user,
                               "indai.recipe": recipe_of(body.entrypoint)}
        runtime_env = payload.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**env, **OFFLINE_ENV, "INDAI_JOB_MEMBER": p.member, "INDAI_JOB_ROLE": p.role, "INDAI_JOB_USER": p.user}
        r = upstream("POST", "/api/jobs/", json=payload)
        for wait in (0.5, 1, 2, 4, 8, 15):  # Ray answers 500 until a node's job agent has registered (start-up, load)
            if r.status_code != 500 or "No available agent" not in r.text:
                break
            time.sleep(wait)
            r = upstream("POST", "/api/jobs/", json=payload)
        if r.status_code == 200:
            sid = r.json().get("submission_id") or r.json().get("job_id")
            with Session(eng) as s, s.begin():
                s.add(Job(submission_id=sid, member_id=p.member, user_id=p.user, recipe=payload["metadata"]["indai.recipe"],
                          gpus=gpus, submitted_at=utcnow()))
            audit(p, "submit", sid, 200, body.entrypoint[:500])
        else:
            audit(p, "submit", "-", r.status_code, r.text[:500])
        return JSONResponse(status_code=r.status_code, content=r.json() if r.headers.get("content-type", "").startswith("application/json") else {"detail": r.text})

    def check_datasets(p: tenancy.Principal, declared: str) -> str | None:
        """Why the principal may not read one of the declared dataset versions, or None."""
        from indai.platform import datasets
        from indai.platform.errors import UserError

        refs = [r.strip() for r in declared.split(",") if r.strip()]
        if not refs:
            return None
        if store is None:
            return "this gateway has no object store configured to check the job's datasets"
        for text in refs[:32]:
            try:
                datasets.check_read(store, datasets.parse_ref(text), p.member, p.role)
            except UserError as e:
                return str(e)
        return None

    def member_usage(member: str) -> tuple[int, float]:
        """(jobs still running, GPU-hours used this calendar month) for a member, from the jobs
        it submitted through the gateway and Ray's start/end times of each."""
        now = utcnow()
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        with Session(eng) as s:
            rows = list(s.execute(select(Job.submission_id, Job.gpus).where(Job.member_id == member)))
        running, gpu_hours = 0, 0.0
        for sid, gpus in rows:
            r = upstream("GET", f"/api/jobs/{sid}")
            if r.status_code != 200:
                continue
            info = r.json()
            if info.get("status") not in TERMINAL:
                running += 1
            if gpus and info.get("start_time"):
                start = max(info["start_time"] / 1000, month_start.timestamp())
                end = (info.get("end_time") or now.timestamp() * 1000) / 1000
                gpu_hours += gpus * max(0.0, end - start) / 3600
        return running, gpu_hours

    @app.get("/api/jobs/")
    def list_jobs(request: Request):
        p: tenancy.Principal = request.state.principal
        r = upstream("GET", "/api/jobs/")
        jobs = r.json() if r.status_code == 200 else []
        if p.role != "admin":
            jobs = [j for j in jobs if (j.get("metadata") or {}).get("indai.member") == p.member]
        return JSONResponse(jobs)

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str, request: Request):
        info = owned(request.state.principal, job_id)
        return JSONResponse(info) if info else _error(404, f"job {job_id} does not exist")

    @app.get("/api/jobs/{job_id}/logs")
    def logs(job_id: str, request: Request):
        if not owned(request.state.principal, job_id):
            return _error(404, f"job {job_id} does not exist")
        r = upstream("GET", f"/api/jobs/{job_id}/logs")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    def act_on_owned(p: tenancy.Principal, method: str, job_id: str, suffix: str, action: str) -> Response:
        """Forward a change to a job the principal may see; audit it either way."""
        if not owned(p, job_id):
            audit(p, action, job_id[:128], 404, "not visible")
            return _error(404, f"job {job_id} does not exist")
        r = upstream(method, f"/api/jobs/{job_id}{suffix}")
        audit(p, action, job_id, r.status_code, "")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: str, request: Request):
        return act_on_owned(request.state.principal, "POST", job_id, "/stop", "stop")

    @app.delete("/api/jobs/{job_id}")
    def delete(job_id: str, request: Request):
        return act_on_owned(request.state.principal, "DELETE", job_id, "", "delete")

    def bad_package(protocol: str, name: str) -> JSONResponse | None:
        if protocol != "gcs" or not PACKAGE_RE.match(name):
            return _error(400, "only gcs://_ray_pkg_<hash>.zip working_dir packages are accepted")
        return None

    @app.get("/api/packages/{protocol}/{name}")
    def package_exists(protocol: str, name: str):
        if refused := bad_package(protocol, name):
            return refused
        r = upstream("GET", f"/api/packages/{protocol}/{name}")
        return Response(r.content, status_code=r.status_code)

    @app.put("/api/packages/{protocol}/{name}")
    async def package_upload(protocol: str, name: str, request: Request):
        if refused := bad_package(protocol, name):
            return refused
        p = request.state.principal
        try:
            p.require("jobs:submit")
        except tenancy.AuthError as e:
            return _error(403, str(e))
        data = await request.body()
        if len(data) > MAX_PACKAGE:
            return _error(413, f"working_dir package is over {MAX_PACKAGE // (1024 * 1024)} MiB")
        r = await asyncio.to_thread(upstream, "PUT", f"/api/packages/{protocol}/{name}", data=data)
        await asyncio.to_thread(audit, p, "upload", name, r.status_code, f"{len(data)} bytes")
        return Response(r.content, status_code=r.status_code)

    @app.websocket("/api/jobs/{job_id}/logs/tail")
    async def tail(ws: WebSocket, job_id: str):
        try:
            p = await asyncio.to_thread(principal, ws.headers)
        except tenancy.AuthError:
            await ws.close(code=4401)
            return
        if not await asyncio.to_thread(owned, p, job_id):
            await ws.close(code=4404)
            return
        import aiohttp

        await ws.accept()
        async with aiohttp.ClientSession(headers=upstream_headers) as session:
            async with session.ws_connect(f"{ray_url.replace('http', 'ws', 1)}/api/jobs/{job_id}/logs/tail") as up:
                async for msg in up:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await ws.send_text(msg.data)
                    else:
                        break
        await ws.close()

    return app


def serve(host: str, port: int, ray_url: str, eng: Engine, ray_token: str | None = None, store=None) -> None:
    import uvicorn

    uvicorn.run(build_gateway(ray_url, eng, ray_token=ray_token, store=store), host=host, port=port, log_level="warning")
