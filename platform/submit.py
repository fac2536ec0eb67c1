"""`indai train submit`: send a recipe to the cluster through the job gateway and follow it.

It speaks only the Ray Jobs API that the gateway serves (Ray's own JobSubmissionClient with
the member's token in the Authorization header), so what it can do is exactly what a stock
`ray job submit` through the gateway can do. The recipe travels as a working_dir package;
the job runs `indai train recipe.yaml` on the cluster, whose object store and MLflow the job
finds from the cluster's environment. The recipe's dataset is declared in the job metadata
so the gateway refuses, before anything runs, a dataset the member may not read.

Retrying: each submission carries a fresh `Idempotency-Key` (a UUID), kept across its own
retries. The client retries, with bounded backoff and a line to the user each time, when the
gateway answers 503 (its database or Ray is down), 502/504, 409 (the same submission still in
progress) or does not answer at all; the gateway answers a retry with the job the first try
created, so a lost answer never becomes a second job.

Following: the job's log is streamed; the training loop's `[indai] progress {...}` lines
drive a progress bar, `[indai] result {...}` gives the MLflow run and registered version.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from indai.platform.errors import UserError

PROGRESS_RE = re.compile(r"\[indai\] progress (\{.*\})")
RESULT_RE = re.compile(r"\[indai\] result (\{.*\})")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0, 15.0)  # seconds before each retry: 6 tries within about half a minute
RETRY_STATUS = (409, 502, 503, 504)  # the same submission in progress; the gateway or what is behind it down
TIMEOUT = (10.0, 120.0)  # (connect, read) seconds for each call to the gateway


class GatewayUnavailable(Exception):
    """A transient answer from the gateway: the same call may be tried again."""


def _transient(e: Exception) -> str | None:
    """Why a failed call to the gateway is worth another try, or None if it is not."""
    import requests

    if isinstance(e, GatewayUnavailable):
        return str(e)
    if isinstance(e, requests.Timeout):
        return "the gateway did not answer in time"
    if isinstance(e, (requests.ConnectionError, ConnectionError)):
        return f"no answer from the gateway ({e.__class__.__name__})"
    if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code in RETRY_STATUS:
        try:
            detail = str(e.response.json().get("detail", ""))[:300]
        except (ValueError, AttributeError):
            detail = ""
        return f"the gateway answered {e.response.status_code}" + (f" ({detail})" if detail else "")
    m = re.match(r"Request failed with status code (\d{3})", str(e))  # Ray's JobSubmissionClient
    if m and int(m.group(1)) in RETRY_STATUS:
        return f"the gateway answered {m.group(1)} ({_detail(e)})"
    return None


def with_retries(what: str, call, waits: tuple[float, ...] = RETRY_WAITS, stream=None, note: str = ""):
    """call(), tried again after each wait in `waits` while it fails transiently; the user is
    told about each retry. After the last try the failure becomes a UserError."""
    for attempt in range(len(waits) + 1):
        try:
            return call()
        except Exception as e:
            why = _transient(e)
            if why is None:
                raise
            if attempt == len(waits):
                raise UserError(f"{what} failed {attempt + 1} times, the last time because {why}: try again later") from None
            print(f"indai: {why}; retrying {what} in {waits[attempt]:g} s (try {attempt + 2} of {len(waits) + 1}{note})",
                  file=stream or sys.stderr, flush=True)
            time.sleep(waits[attempt])


@dataclass
class Followed:
    status: str = "PENDING"
    result: dict = field(default_factory=dict)
    last_progress: dict = field(default_factory=dict)
    lines: int = 0


class LogFollower:
    """Turns log text into printed lines, a progress bar and the final result."""

    def __init__(self, show: bool = True, stream=None):
        from tqdm import tqdm

        self.out = Followed()
        self.stream = stream or sys.stderr
        self.bar = tqdm(total=0, desc="training", unit="step", file=self.stream, disable=not show, dynamic_ncols=True)
        self.show = show

    def feed(self, text: str) -> None:
        for line in text.splitlines():
            self.out.lines += 1
            if m := PROGRESS_RE.search(line):
                try:
                    ev = json.loads(m.group(1))
                except ValueError:
                    continue
                self.out.last_progress = ev
                if ev.get("steps"):
                    self.bar.total = int(ev["steps"])
                self.bar.n = int(ev.get("step", self.bar.n))
                post = {"epoch": f"{ev.get('epoch')}/{ev.get('epochs')}", "loss": ev.get("loss")}
                if ev.get("val_accuracy") is not None:
                    post["val_acc"] = f"{ev['val_accuracy']:.3f}"
                self.bar.set_postfix(post, refresh=False)
                self.bar.refresh()
                continue
            if m := RESULT_RE.search(line):
                try:
                    self.out.result = json.loads(m.group(1))
                except ValueError:
                    pass
                continue
            if self.show:
                self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def _client(gateway: str, token: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(gateway, headers={"Authorization": f"Bearer {token}"}, verify=True)
    except (ConnectionError, RuntimeError) as e:
        raise UserError(f"job gateway {gateway} is not reachable or refused the token ({str(e).splitlines()[0][:200]})") from None


def submitting_client(gateway: str, token: str, key: str, timeout: tuple[float, float]):
    """Ray's client carrying the idempotency key, with a time limit on every call (Ray's own
    has none, so a gateway that never answers would hang the submission)."""
    from ray.job_submission import JobSubmissionClient

    class TimedClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kw):
            kw.setdefault("timeout", timeout)
            return super()._do_request(method, endpoint, **kw)

    return TimedClient(gateway, headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key}, verify=True)


def whoami(gateway: str, token: str, timeout: tuple[float, float] = TIMEOUT) -> dict:
    """Who the gateway says the token is; GatewayUnavailable (or requests' connection errors)
    when that may change on a retry."""
    import requests

    try:
        r = requests.get(f"{gateway.rstrip('/')}/api/indai/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout):
        raise
    except requests.RequestException as e:
        raise UserError(f"job gateway {gateway} is not reachable: {e.__class__.__name__}") from None
    detail = (r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text[:200]) if r.content else ""
    if r.status_code in RETRY_STATUS:
        raise GatewayUnavailable(f"the gateway answered {r.status_code} ({detail})")
    if r.status_code != 200:
        raise UserError(f"job gateway {gateway} refused the token: {detail or r.status_code}")
    return r.json()


def submit(gateway: str, token: str, recipe: str | Path, overrides: list[str], member: str | None = None, gpus: float = 0,
           cpus: float | None = None, waits: tuple[float, ...] = RETRY_WAITS,
           timeout: tuple[float, float] = TIMEOUT) -> tuple[str, dict]:
    """Submit; return (submission id, the principal the gateway saw). Transient failures are
    retried after each of `waits` (seconds) with the same idempotency key."""
    from indai.platform.cli import load_train_config

    recipe = Path(recipe)
    cfg = load_train_config(str(recipe), overrides)  # bad recipes fail here, not on the cluster
    me = with_retries("the token check", lambda: whoami(gateway, token, timeout), waits)
    if member and member != me["member"] and me["role"] != "admin":
        raise UserError(f"this token belongs to member {me['member']!r}, not {member!r}: use a token of {member}")
    if gpus and not cfg.run.use_gpu:
        overrides = [*overrides, "run.use_gpu=true"]
    work = Path(tempfile.mkdtemp(prefix="indai-submit-"))
    try:
        shutil.copyfile(recipe, work / "recipe.yaml")
        entry = "indai train recipe.yaml" + "".join(f" {_quote(o)}" for o in overrides)
        key = str(uuid.uuid4())  # one logical submission: the same key on every retry of it

        def send() -> str:
            client = submitting_client(gateway, token, key, timeout)
            return client.submit_job(
                entrypoint=entry, runtime_env={"working_dir": str(work)},
                metadata={"indai.datasets": cfg.data.dataset, "indai.recipe_file": recipe.name[:100]},
                entrypoint_num_gpus=gpus or None, entrypoint_num_cpus=cpus)
        try:
            sid = with_retries("the submission", send, waits, note=f"; Idempotency-Key {key}, so it is submitted once")
        except UserError:
            raise
        except Exception as e:  # Ray raises RuntimeError, or AuthenticationError for 401/403 answers
            raise UserError(f"the gateway refused the job: {_detail(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sid, me


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _detail(e: Exception) -> str:
    text = str(e)
    m = re.search(r'"detail":\s*"([^"]+)"', text)
    return m.group(1) if m else text.splitlines()[-1][:300]


def follow(gateway: str, token: str, sid: str, show: bool = True, poll_s: float = 2.0) -> Followed:
    """Stream the job's log until it ends; the status comes from the job record."""
    client = _client(gateway, token)
    follower = LogFollower(show=show)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            follower.feed(chunk)

    try:
        asyncio.run(tail())
    except Exception:  # the tail socket can drop (gateway restart); fall back to polling the log
        while client.get_job_status(sid).value not in TERMINAL:
            time.sleep(poll_s)
        logs = client.get_job_logs(sid)
        follower.feed(logs)
    for _ in range(30):  # the tail ends when the driver exits; the record catches up shortly after
        status = client.get_job_status(sid).value
        if status in TERMINAL:
            break
        time.sleep(1)
    follower.out.status = status
    if not follower.out.result:  # the tail may have ended before the last line: read the full log once
        follower.feed("\n".join(l for l in client.get_job_logs(sid).splitlines() if RESULT_RE.search(l)))
    follower.close()
    return follower.out
