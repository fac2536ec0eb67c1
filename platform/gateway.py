"""The job gateway: Ray's Jobs REST API with per-member identity in front of it.

Ray's job API runs any code it is given and knows no users (CVE-2023-48022). The gateway
speaks the same API (`/api/version`, `/api/jobs/...`), so the stock `ray job submit --address
http://<gateway> --headers '{"Authorization": "Bearer <token>"}'` and `JobSubmissionClient`
work unchanged, and forwards to the real job server only what passes:
- every request carries a valid token (tenancy.verify; revocation takes effect at once);
- a token acts only within its scopes: `jobs:read` to list, see and tail jobs, `jobs:submit` to
  submit, upload packages, stop and delete; a researcher's token sees and changes only its
  member's jobs; a token with the `admin` scope (not merely one of an admin user) sees all;
  a consumer's token holds neither job scope; someone else's job answers 404, as if it did
  not exist;
- working_dir packages live in one namespace in Ray, shared by every member, and their names
  are predictable (content hashes). So the gateway gives each member a namespace of its own:
  the package name a member's client uses is mapped to `_ray_pkg_<sha256(member:uri)>.zip`
  upstream, on the package routes and in the submission alike. A member only ever checks,
  uploads and runs its own uploads; nobody can plant code under a name another member's
  client will compute, nor run another member's package;
- a submission is checked field by field (unknown fields, host paths, pip indexes refused)
  and against the member's quotas (concurrent jobs, GPUs per job). Admission is one step per
  member: counting its running jobs and reserving the new one happen under a per-member lock
  (in this process) and, on PostgreSQL, a lock on the member's row (across gateway replicas),
  and a reserved job Ray does not know yet counts as running, so parallel submissions cannot
  all slip under the limit;
- each job is tagged with member, user and recipe; every decision goes to the audit log;
- a submission that carries an `Idempotency-Key` header is submitted at most once per member
  and key: the key is recorded with the job's row before Ray is asked, so a client that retries
  (a 503 while the database was down, or an answer lost to a timeout after Ray had the job)
  gets the original submission back instead of a second job. Keys are kept KEY_TTL_S (24 h,
  as Stripe does); a key older than that names a new submission;
- Ray's job server down answers 503 with Retry-After on every route that needs it (the routes
  that do not, such as whoami, keep working); a submission Ray cannot have received (its
  connection was refused or never opened) drops its reservation, so a retry submits at once.

Beside Ray's API, `POST /api/indai/models/{name}/promote` lets a researcher promote a version of
a model its member owns (platform/promotion.py: what members are served), with the
`models:promote` scope; an admin's token may promote any model.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import string
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import quote

import requests
import urllib3
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import delete as sql_delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from indai.platform import tenancy
from indai.platform.errors import UserError
from indai.platform.db import Audit, Job, Member, SubmissionKey, utcnow
from indai.platform.settings import OFFLINE_ENV

MAX_BODY = 1024 * 1024
MAX_PACKAGE = 100 * 1024 * 1024
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMISSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
PACKAGE_RE = re.compile(r"^_ray_pkg_[0-9a-f]{16,64}\.zip$")
ENV_KEY_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# a reservation younger than this whose job Ray does not know yet is still being submitted by
# the request that made it (Ray's answer takes at most a minute, plus its agent start-up waits)
IN_FLIGHT_S = 300.0
KEY_TTL_S = 24 * 3600.0  # how long an Idempotency-Key names its submission
RAY_DOWN = "the Ray job server did not answer"
DB_DOWN = "the platform database is unavailable: retry later"
log = logging.getLogger("indai.gateway")
FORBIDDEN_ENV = {"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "RAY_ADDRESS"}


def valid_job_id(job_id: str) -> bool:
    """A job id from a request path: letters, digits, '_' and '-' (at most 100), so it cannot change the
    upstream URL it is put into. fullmatch, because with '$' alone "id\\n" would pass."""
    return isinstance(job_id, str) and SUBMISSION_ID_RE.fullmatch(job_id) is not None


def valid_package(protocol: str, name: str) -> bool:
    """Only gcs://_ray_pkg_<hex>.zip working_dir packages go upstream."""
    return protocol == "gcs" and isinstance(name, str) and PACKAGE_RE.fullmatch(name) is not None


def member_package(member: str, name: str) -> str:
    """The name in Ray's storage of the package a member's client calls `name`.

    Ray keeps packages in one cluster-wide namespace, overwrites on upload, and its client skips
    the upload of a package that already exists; package names are content hashes anyone can
    compute. Without this mapping a member could upload code under the name another member's
    client is about to compute, and that member's job would run it. Hashing the member into the
    name gives every member a namespace of its own that no other member can reach (member ids
    hold no ':'). The result keeps Ray's `_ray_pkg_<hex>.zip` form (64 hex digits)."""
    digest = hashlib.sha256(f"{member}:gcs://{name}".encode()).hexdigest()
    return f"_ray_pkg_{digest}.zip"


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
    py_modules or host paths; working_dir only as a package uploaded through this gateway (by
    the submitting member: see member_package). working_dir is the only package URI accepted;
    a new one (py_modules, say) must be mapped per member in _submit before it is allowed here."""

    model_config = ConfigDict(extra="forbid")
    working_dir: str | None = Field(default=None, pattern=r"^gcs://_ray_pkg_[0-9a-f]{16,64}\.zip$")
    env_vars: dict[str, str] | None = None


class Submission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entrypoint: str = Field(min_length=1, max_length=10_000)
    submission_id: str | None = None
    job_id: str | None = None  # Ray's deprecated name for submission_id: the same rule
    runtime_env: RuntimeEnv | None = None
    metadata: dict[str, str] | None = None
    entrypoint_num_cpus: float | None = Field(default=None, ge=0, le=1024)
    entrypoint_num_gpus: float | None = Field(default=None, ge=0, le=64)
    entrypoint_memory: int | None = Field(default=None, ge=0)
    entrypoint_resources: dict[str, float] | None = None
    entrypoint_label_selector: dict[str, str] | None = None

    @field_validator("submission_id", "job_id")
    @classmethod
    def _names_a_job_in_urls(cls, value: str | None) -> str | None:
        # The id becomes part of the upstream URLs (/api/jobs/<id>): "mine?0" would ask Ray about
        # job "mine", so the job could be neither counted against the quota nor stopped.
        if value is not None and not valid_job_id(value):
            raise ValueError("must be 1-100 letters, digits, '_' or '-': choose another id or leave it out")
        return value


def new_submission_id() -> str:
    """A submission id in Ray's own form, chosen here so it can be recorded before Ray is asked."""
    return "raysubmit_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(16))


def recipe_of(entrypoint: str) -> str:
    m = re.search(r"\bindai\s+train\s+(\S+\.ya?ml)", entrypoint)
    return m.group(1) if m else "custom"


def _error(status: int, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def never_reached(exc: requests.RequestException) -> bool:
    """True when a request failed before a connection to the server was open (refused, no such
    host, connect timeout), so the server cannot have received it; False when it may have (a
    connection dropped or a read timeout after the request was sent)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if isinstance(exc, requests.ConnectionError) and exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


JOB_IDENTITY_ENV = ("INDAI_JOB_MEMBER", "INDAI_JOB_ROLE", "INDAI_JOB_USER")


def is_admin(p: tenancy.Principal) -> bool:
    """Whether the token may act on every member's jobs: it holds the `admin` scope. An admin
    user's token narrowed to other scopes acts like a researcher's of the admin's member."""
    return "admin" in p.scopes


def job_role(p: tenancy.Principal) -> str:
    """The role a job runs with (INDAI_JOB_ROLE, which the dataset reader enforces) and the
    dataset check uses: admin only with the admin scope, for the same reason as is_admin."""
    if p.role == "admin" and not is_admin(p):
        return "researcher"
    return p.role


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=9_999_999_999, description="the registered version to serve")
    alias: str = Field(default="champion", max_length=64, description="the alias members call it by")


def build_gateway(ray_url: str, eng: Engine, limits: Limits | None = None, ray_token: str | None = None,
                  store=None, mlflow_uri: str | None = None) -> FastAPI:
    """`ray_token`: Ray's own token (token authentication); the gateway adds it to every call
    upstream, in Ray's own header, so the member's token never reaches Ray. `store`: the
    object store, to check the dataset versions a job declares (metadata `indai.datasets`)
    against the reading rule; every job also runs with its member in INDAI_JOB_MEMBER, which
    indai's dataset reader enforces inside the job. `mlflow_uri`: the registry the promotion
    route reads versions' files from (None: that route answers 503)."""
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
        return http.request(method, f"{ray_url}{path}", timeout=(10, 60), headers=upstream_headers, **kw)

    def owned(p: tenancy.Principal, job_id: str) -> dict | None:
        """Ray's record of the job if the principal may see it, else None (answered as 404)."""
        if not valid_job_id(job_id):
            return None
        r = upstream("GET", f"/api/jobs/{job_id}")
        if r.status_code != 200:
            return None
        info = r.json()
        member = (info.get("metadata") or {}).get("indai.member")
        return info if (is_admin(p) or member == p.member) else None

    def scope_refusal(p: tenancy.Principal, scope: str, action: str, target: str, what: str) -> JSONResponse | None:
        """403 (audited) when the token lacks `scope`, else None. Checked before Ray is asked, so
        a token without the scope learns nothing, not even whether a job exists."""
        try:
            p.require(scope)
        except tenancy.AuthError as e:
            audit(p, action, target[:128], 403, str(e))
            return _error(403, f"{e}: {what} needs a token with the {scope!r} scope (a researcher's default token has it; "
                               "`indai token ls` shows each token's scopes)")
        return None

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
            return _error(503, DB_DOWN)
        return await call_next(request)

    @app.exception_handler(requests.RequestException)
    async def ray_unreachable(request: Request, exc: requests.RequestException):
        """Any route that needed Ray while its job server was down or hung: 503, never a 500."""
        log.warning("%s %s: %s (%s)", request.method, request.url.path, RAY_DOWN, exc.__class__.__name__)
        return _error(503, f"{RAY_DOWN} ({exc.__class__.__name__}): retry in a minute; if it persists, "
                           "ask the platform admin whether the Ray head is running", retry_after=30)

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
        key = request.headers.get("idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            await asyncio.to_thread(audit, p, "submit", "-", 400, "malformed Idempotency-Key")
            return _error(400, "submission refused: the Idempotency-Key header must be 16-128 letters, digits, '-' or '_' "
                               "(send a fresh UUID for each new submission, and the same one when retrying it)")
        try:
            body = Submission.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            detail = f"field {'.'.join(map(str, first['loc'])) or '(body)'}: {first['msg']}"
            await asyncio.to_thread(audit, p, "submit", "-", 400, detail)
            return _error(400, f"submission refused: {detail}")
        try:
            return await asyncio.to_thread(_submit, p, body, key)
        except SQLAlchemyError:
            return _error(503, DB_DOWN + (" with the same Idempotency-Key" if key else ""))

    def _submit(p: tenancy.Principal, body: Submission, key: str | None) -> JSONResponse:
        """Replay an earlier submission with the same key, or admit, reserve and forward a new one."""
        fingerprint = hashlib.sha256(body.model_dump_json(exclude_none=True).encode()).hexdigest()
        if key and (earlier := find_key(p.member, key)) is not None:
            if (answer := replay(p, earlier, fingerprint)) is not None:
                return answer
        if (refused := admission(p, body)) is not None:
            return refused
        payload = body.model_dump(exclude_none=True)
        job_id = payload.pop("job_id", None)  # Ray's deprecated name for the submission id
        payload["submission_id"] = sid = payload.get("submission_id") or job_id or new_submission_id()
        payload["metadata"] = {**(body.metadata or {}), "indai.member": p.member, "indai.user": p.user,
                               "indai.recipe": recipe_of(body.entrypoint)}
        env = (body.runtime_env.env_vars if body.runtime_env else None) or {}
        runtime_env = payload.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**env, **OFFLINE_ENV, "INDAI_JOB_MEMBER": p.member, "INDAI_JOB_ROLE": job_role(p),
                                   "INDAI_JOB_USER": p.user}
        if body.runtime_env and body.runtime_env.working_dir:
            own = own_package(p, body.runtime_env.working_dir)
            if isinstance(own, JSONResponse):
                return own
            runtime_env["working_dir"] = own
        if (refused := admit_and_reserve(p, body, key, sid, fingerprint, payload)) is not None:
            return refused
        try:
            r = post_job(payload)
        except requests.RequestException as e:
            if never_reached(e):  # Ray cannot have the job: drop the reservation, a retry submits afresh
                release(p.member, key, sid)
                audit(p, "submit", sid, 503, f"Ray job server unreachable: {e.__class__.__name__}")
                return _error(503, f"{RAY_DOWN} (unreachable): nothing was submitted; retry in a minute", retry_after=30)
            # the request may have reached Ray: keep the reservation, so a retry with the key finds the job
            audit(p, "submit", sid, 503, f"Ray job server did not answer: {e.__class__.__name__}")
            then = "retry with the same Idempotency-Key" if key else f"look for job {sid} before submitting again"
            return _error(503, f"{RAY_DOWN}; job {sid} may have been submitted: {then}", retry_after=30)
        if r.status_code == 200:
            settle(p, key, sid, body.entrypoint)
        else:
            release(p.member, key, sid)
            audit(p, "submit", "-", r.status_code, r.text[:500])
        return JSONResponse(status_code=r.status_code, content=r.json() if r.headers.get("content-type", "").startswith("application/json") else {"detail": r.text})

    def admission(p: tenancy.Principal, body: Submission) -> JSONResponse | None:
        """The refusal of a new submission on what it asks for alone (environment, GPUs per job,
        datasets), or None. The quotas that depend on the member's other jobs are checked by
        admit_and_reserve, under the member's lock."""
        env = (body.runtime_env.env_vars if body.runtime_env else None) or {}
        bad_env = [k for k in env if not ENV_KEY_RE.fullmatch(k) or k in FORBIDDEN_ENV or k.startswith("INDAI_JOB_")]
        if bad_env:
            audit(p, "submit", "-", 400, f"env vars {bad_env}")
            return _error(400, f"submission refused: environment variables {bad_env} may not be set by a job")
        gpus = body.entrypoint_num_gpus or 0
        if gpus > limits.gpus_per_job:
            audit(p, "submit", "-", 429, f"gpus {gpus}")
            return _error(429, f"quota: at most {limits.gpus_per_job:g} GPUs per job for member {p.member}; this job asks for {gpus:g}")
        refused = check_datasets(p, (body.metadata or {}).get("indai.datasets", ""))
        if refused:
            audit(p, "submit", "-", 403, refused)
            return _error(403, f"submission refused: {refused}")
        return None

    def quota_refusal(p: tenancy.Principal, body: Submission, running: int, used: float) -> tuple[int, str, str] | None:
        """(status, audit detail, message) when the member's usage leaves no room for the job, else None."""
        gpus = body.entrypoint_num_gpus or 0
        if gpus > 0 and used >= limits.gpu_hours_per_month:
            return 429, f"{used:.2f} GPU-hours used", (
                f"quota: member {p.member} used {used:.2f} of {limits.gpu_hours_per_month:g} GPU-hours this month: "
                "GPU jobs are refused until next month")
        if running >= limits.concurrent_jobs:
            return 429, f"{running} running", (
                f"quota: member {p.member} already runs {running} jobs (limit {limits.concurrent_jobs:g} at a time): wait or stop one")
        return None

    def own_package(p: tenancy.Principal, uri: str) -> str | JSONResponse:
        """The upstream URI of the working_dir package `uri` as the member uploaded it (see
        member_package), or the refusal when the member never uploaded it: a package another
        member uploaded under that name is not the submitter's, and is never what runs."""
        mapped = member_package(p.member, uri.removeprefix("gcs://"))
        r = upstream("GET", f"/api/packages/gcs/{mapped}")  # Ray also pins it for a while: it is not collected before the job starts
        if r.status_code == 200:
            return f"gcs://{mapped}"
        if r.status_code == 404:
            audit(p, "submit", "-", 400, f"working_dir {uri} not uploaded by member {p.member}")
            return _error(400, f"submission refused: working_dir package {uri} was not uploaded by member {p.member}: upload it "
                               "through this gateway first (ray job submit and JobSubmissionClient do so when runtime_env.working_dir "
                               "is a local folder)")
        return _error(503, f"the Ray job server answered {r.status_code} when asked for package {uri}: retry in a minute",
                      retry_after=30)

    # Admission (count the member's running jobs, then reserve the new one) must be one step per
    # member: two submissions that both count before either reserves would both fit under the limit.
    # _submit runs in worker threads (asyncio.to_thread), so the in-process lock is a threading
    # lock; on PostgreSQL the member's row is locked too, which holds across gateway replicas.
    member_locks: dict[str, threading.Lock] = {}
    member_locks_guard = threading.Lock()

    @contextmanager
    def member_turn(member: str):
        """A session in a transaction that only one admission of `member` holds at a time."""
        with member_locks_guard:
            lock = member_locks.setdefault(member, threading.Lock())
        with lock, Session(eng) as s, s.begin():
            if eng.dialect.name == "postgresql":
                # FOR NO KEY UPDATE: excludes the other replicas' admissions of this member until
                # this transaction ends, without blocking foreign-key checks (a user being added).
                s.execute(select(Member.id).where(Member.id == member).with_for_update(key_share=True))
            yield s

    def admit_and_reserve(p: tenancy.Principal, body: Submission, key: str | None, sid: str, fingerprint: str,
                          payload: dict) -> JSONResponse | None:
        """Check the quotas that depend on the member's other jobs and record the job (and its
        key) before Ray is asked, in one transaction under the member's turn. The unique
        constraint on (member, key) decides between two tries with one key: the loser replays."""
        refused = None
        try:
            with member_turn(p.member) as s:
                refused = quota_refusal(p, body, *member_usage(p.member, s))
                if refused is None:
                    if key:  # expired keys go first: one of them may be the key a client now uses again
                        s.execute(sql_delete(SubmissionKey).where(SubmissionKey.created_at < key_cutoff()))
                    s.add(Job(submission_id=sid, member_id=p.member, user_id=p.user, recipe=payload["metadata"]["indai.recipe"],
                              gpus=payload.get("entrypoint_num_gpus") or 0, submitted_at=utcnow()))
                    if key:
                        s.add(SubmissionKey(member_id=p.member, key=key, submission_id=sid, request_hash=fingerprint,
                                            state="pending", created_at=utcnow()))
        except IntegrityError:
            if key and (earlier := find_key(p.member, key)) is not None:
                return replay(p, earlier, fingerprint) or _error(409, "a submission with this Idempotency-Key was just replaced: retry")
            audit(p, "submit", sid[:128], 400, "submission id in use")
            return _error(400, f"submission refused: submission id {sid} is already used: choose another or leave it out")
        if refused is not None:  # audited after the turn, so the lock is held no longer than needed
            status, detail, message = refused
            audit(p, "submit", "-", status, detail)
            return _error(status, message)
        return None

    def post_job(payload: dict) -> requests.Response:
        r = upstream("POST", "/api/jobs/", json=payload)
        for wait in (0.5, 1, 2, 4, 8, 15):  # Ray answers 500 until a node's job agent has registered (start-up, load)
            if r.status_code != 500 or "No available agent" not in r.text:
                break
            time.sleep(wait)
            r = upstream("POST", "/api/jobs/", json=payload)
        return r

    def find_key(member: str, key: str) -> SubmissionKey | None:
        """The member's live record of the key (one older than KEY_TTL_S counts as gone)."""
        with Session(eng, expire_on_commit=False) as s:
            return s.scalars(select(SubmissionKey).where(SubmissionKey.member_id == member, SubmissionKey.key == key,
                                                         SubmissionKey.created_at >= key_cutoff())).first()

    def key_cutoff():
        return utcnow() - timedelta(seconds=KEY_TTL_S)

    def replay(p: tenancy.Principal, earlier: SubmissionKey, fingerprint: str) -> JSONResponse | None:
        """The answer to a retry of an earlier submission; None when that earlier try died
        before Ray had its job (its reservation is dropped and the submission starts afresh)."""
        sid = earlier.submission_id
        if earlier.request_hash != fingerprint:
            audit(p, "submit", sid, 422, "Idempotency-Key reused for a different submission")
            return _error(422, f"submission refused: this Idempotency-Key was already used for a different submission (job {sid}): "
                               "use a fresh key for a new job")
        if earlier.state != "submitted":
            try:
                r = upstream("GET", f"/api/jobs/{sid}")
            except requests.RequestException:
                return _error(503, f"{RAY_DOWN}: retry later with the same Idempotency-Key", retry_after=30)
            if r.status_code == 200 and (r.json().get("metadata") or {}).get("indai.member") != p.member:
                release(p.member, earlier.key, sid)  # a job of that id that is not this member's: not ours to name
                return _error(400, f"submission refused: submission id {sid} is already used: choose another or leave it out")
            if r.status_code == 200:  # the earlier try's answer was lost after Ray had the job
                mark_submitted(earlier.id)
            elif r.status_code != 404:
                return _error(503, f"the Ray job server answered {r.status_code}: retry later with the same Idempotency-Key")
            elif (utcnow() - tenancy.aware(earlier.created_at)).total_seconds() < IN_FLIGHT_S:
                return JSONResponse(status_code=409, headers={"Retry-After": "2"},
                                    content={"detail": f"the submission with this Idempotency-Key (job {sid}) is still in progress: retry in a few seconds"})
            else:
                release(p.member, earlier.key, sid)
                return None
        audit(p, "submit-replay", sid, 200, "same Idempotency-Key: the earlier submission")
        return JSONResponse({"job_id": sid, "submission_id": sid}, headers={"Idempotent-Replayed": "true"})

    def mark_submitted(key_row_id: int) -> None:
        with Session(eng) as s, s.begin():
            row = s.get(SubmissionKey, key_row_id)
            if row is not None:
                row.state = "submitted"

    def settle(p: tenancy.Principal, key: str | None, sid: str, entrypoint: str) -> None:
        """Ray accepted the job: mark its key submitted and audit. The job runs whatever happens
        here, so a database that went down meanwhile costs the audit line, not the answer."""
        try:
            if key and (row := find_key(p.member, key)) is not None:
                mark_submitted(row.id)
            if entrypoint:
                audit(p, "submit", sid, 200, entrypoint[:500])
        except SQLAlchemyError as e:
            log.warning("job %s was submitted but not recorded as such (%s); a retry with its key finds it in Ray",
                        sid, e.__class__.__name__)

    def release(member: str, key: str | None, sid: str) -> None:
        """Ray refused the job or cannot have received it: drop its reservation so that a retry
        submits it afresh."""
        try:
            with Session(eng) as s, s.begin():
                if key:
                    s.execute(sql_delete(SubmissionKey).where(SubmissionKey.member_id == member, SubmissionKey.key == key,
                                                          SubmissionKey.submission_id == sid))
                s.execute(sql_delete(Job).where(Job.submission_id == sid, Job.member_id == member))
        except SQLAlchemyError as e:
            log.warning("the reservation of job %s could not be dropped (%s)", sid, e.__class__.__name__)

    def check_datasets(p: tenancy.Principal, declared: str) -> str | None:
        """Why the principal may not read one of the declared dataset versions, or None."""
        from indai.platform import datasets

        refs = [r.strip() for r in declared.split(",") if r.strip()]
        if not refs:
            return None
        if store is None:
            return "this gateway has no object store configured to check the job's datasets"
        for text in refs[:32]:
            try:
                datasets.check_read(store, datasets.parse_ref(text), p.member, job_role(p))
            except UserError as e:
                return str(e)
        return None

    def member_usage(member: str, s: Session) -> tuple[int, float]:
        """(jobs still running, GPU-hours used this calendar month) for a member, from the jobs
        it submitted through the gateway and Ray's start/end times of each. A job reserved less
        than IN_FLIGHT_S ago that Ray does not know yet is running: its submission is still on
        its way to Ray (an older one never got there, and no longer counts)."""
        now = utcnow()
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        rows = list(s.execute(select(Job.submission_id, Job.gpus, Job.submitted_at).where(Job.member_id == member)))
        running, gpu_hours = 0, 0.0
        for sid, gpus, submitted_at in rows:
            # quoted: a row recorded before submission ids were checked may hold '?' or '/'
            r = upstream("GET", f"/api/jobs/{quote(sid, safe='')}")
            if r.status_code == 404 and (now - tenancy.aware(submitted_at)).total_seconds() < IN_FLIGHT_S:
                running += 1
                continue
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
        if refused := scope_refusal(p, "jobs:read", "list", "-", "listing jobs"):
            return refused
        r = upstream("GET", "/api/jobs/")
        jobs = r.json() if r.status_code == 200 else []
        if not is_admin(p):
            jobs = [j for j in jobs if (j.get("metadata") or {}).get("indai.member") == p.member]
        return JSONResponse(jobs)

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str, request: Request):
        p: tenancy.Principal = request.state.principal
        if refused := scope_refusal(p, "jobs:read", "get", job_id, "reading a job"):
            return refused
        info = owned(p, job_id)
        return JSONResponse(info) if info else _error(404, f"job {job_id} does not exist")

    @app.get("/api/jobs/{job_id}/logs")
    def logs(job_id: str, request: Request):
        p: tenancy.Principal = request.state.principal
        if refused := scope_refusal(p, "jobs:read", "logs", job_id, "reading a job's logs"):
            return refused
        if not owned(p, job_id):
            return _error(404, f"job {job_id} does not exist")
        r = upstream("GET", f"/api/jobs/{job_id}/logs")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    def act_on_owned(p: tenancy.Principal, method: str, job_id: str, suffix: str, action: str) -> Response:
        """Forward a change to a job the principal may see; audit it either way. Changing a job
        takes the scope that submits one."""
        if refused := scope_refusal(p, "jobs:submit", action, job_id, f"{'stopping' if action == 'stop' else 'deleting'} a job"):
            return refused
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
        if not valid_package(protocol, name):
            return _error(400, "only gcs://_ray_pkg_<hash>.zip working_dir packages are accepted")
        return None

    # The package routes are the first half of Ray's client's working_dir flow: GET (does the
    # package exist? 200 or 404) and, on 404, PUT; then the submission names gcs://<name>. Both
    # routes act on the member's own namespace (member_package), as does the submission, so the
    # stock client works unchanged and only ever sees the packages its own member uploaded.
    @app.get("/api/packages/{protocol}/{name}")
    def package_exists(protocol: str, name: str, request: Request):
        p: tenancy.Principal = request.state.principal
        if refused := scope_refusal(p, "jobs:submit", "package-check", name, "checking a working_dir package"):
            return refused
        if refused := bad_package(protocol, name):
            return refused
        r = upstream("GET", f"/api/packages/gcs/{member_package(p.member, name)}")
        if r.status_code == 404:  # Ray's text would name the upstream package, which the member never used
            return Response(f"Package gcs://{name} does not exist for member {p.member}", status_code=404)
        return Response(r.content, status_code=r.status_code)

    @app.put("/api/packages/{protocol}/{name}")
    async def package_upload(protocol: str, name: str, request: Request):
        p: tenancy.Principal = request.state.principal
        refused = await asyncio.to_thread(scope_refusal, p, "jobs:submit", "upload", name, "uploading a working_dir package")
        if refused:
            return refused
        if refused := bad_package(protocol, name):
            return refused
        data = await request.body()
        if len(data) > MAX_PACKAGE:
            return _error(413, f"working_dir package is over {MAX_PACKAGE // (1024 * 1024)} MiB")
        mapped = member_package(p.member, name)
        r = await asyncio.to_thread(upstream, "PUT", f"/api/packages/gcs/{mapped}", data=data)
        await asyncio.to_thread(audit, p, "upload", name, r.status_code, f"{len(data)} bytes, stored as {mapped}")
        return Response(r.content, status_code=r.status_code)

    @app.websocket("/api/jobs/{job_id}/logs/tail")
    async def tail(ws: WebSocket, job_id: str):
        try:
            p = await asyncio.to_thread(principal, ws.headers)
        except tenancy.AuthError:
            await ws.close(code=4401)
            return
        if await asyncio.to_thread(scope_refusal, p, "jobs:read", "tail", job_id, "following a job's log"):
            await ws.close(code=4403)
            return
        try:
            if not await asyncio.to_thread(owned, p, job_id):
                await ws.close(code=4404)
                return
        except requests.RequestException:  # accepted first, so the client sees the close code, 1013: try again later
            await ws.accept()
            await ws.close(code=1013, reason=RAY_DOWN[:120])
            return
        import aiohttp

        await ws.accept()
        try:
            async with aiohttp.ClientSession(headers=upstream_headers) as session:
                async with session.ws_connect(f"{ray_url.replace('http', 'ws', 1)}/api/jobs/{job_id}/logs/tail") as up:
                    async for msg in up:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            await ws.send_text(msg.data)
                        else:
                            break
        except aiohttp.ClientError:  # Ray went away while the log was followed
            await ws.close(code=1013, reason=RAY_DOWN[:120])
            return
        await ws.close()

    @app.post("/api/indai/models/{name}/promote")
    async def promote(name: str, request: Request):
        """Serve `version` of a model the token's member owns under `alias` (an admin's: any model)."""
        from indai.platform import promotion, registry
        from indai.platform.db import ModelAccess

        p: tenancy.Principal = request.state.principal
        if refused := await asyncio.to_thread(scope_refusal, p, "models:promote", "model.promote", name,
                                              "promoting a model version"):
            return refused
        try:
            registry.check_model_name(name)
            body = Promotion.model_validate_json(await request.body())
            registry.check_alias(body.alias)
        except ValidationError as e:
            first = e.errors()[0]
            return _error(400, f"field {'.'.join(map(str, first['loc'])) or '(body)'}: {first['msg']} "
                               '(send {"version": 3, "alias": "champion"})')
        except UserError as e:
            return _error(400, str(e))

        def owner() -> str | None:
            with Session(eng) as s:
                row = s.get(ModelAccess, name)
                return row.owner_member_id if row else None

        try:
            owned_by = await asyncio.to_thread(owner)
        except SQLAlchemyError:
            return _error(503, DB_DOWN)
        if not is_admin(p) and owned_by != p.member:
            await asyncio.to_thread(audit, p, "model.promote", f"{name}@{body.alias}", 403, f"owner {owned_by}")
            return _error(403, f"member {p.member} does not own model {name}: only its owner's researchers, or an admin, may "
                               "promote it (an admin records the owner with `indai model share`)")
        if not mlflow_uri:
            return _error(503, "this gateway has no model registry configured (INDAI_MLFLOW_URI): ask the platform admin")
        try:
            done = await asyncio.to_thread(promotion.promote, eng, mlflow_uri, name, body.version, body.alias, p.user,
                                           log.warning, p.member)
        except promotion.ModelAltered as e:
            return _error(409, str(e))
        except (registry.RegistryAway, registry.RegistryRefused) as e:
            log.warning("promoting %s/%s: %s", name, body.version, e)
            return _error(503, "the model registry did not answer or refused the gateway: retry later", retry_after=30)
        except registry.ModelMissing:
            return _error(404, f"model {name} has no version {body.version} in the registry")
        except UserError as e:
            return _error(400, str(e))
        except SQLAlchemyError:
            return _error(503, DB_DOWN)
        return done

    return app


def serve(host: str, port: int, ray_url: str, eng: Engine, ray_token: str | None = None, store=None,
          mlflow_uri: str | None = None) -> None:
    import uvicorn

    uvicorn.run(build_gateway(ray_url, eng, ray_token=ray_token, store=store, mlflow_uri=mlflow_uri), host=host, port=port,
                log_level="warning")
