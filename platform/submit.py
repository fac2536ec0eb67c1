"""`indai train submit`: send a recipe to the cluster through the job gateway and follow it.

It speaks only the Ray Jobs API that the gateway serves (Ray's own JobSubmissionClient with
the member's token in the Authorization header), so what it can do is exactly what a stock
`ray job submit` through the gateway can do. The recipe travels as a working_dir package;
the job runs `indai train recipe.yaml` on the cluster, whose object store and MLflow the job
finds from the cluster's environment. The recipe's dataset is declared in the job metadata
so the gateway refuses, before anything runs, a dataset the member may not read.

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
from dataclasses import dataclass, field
from pathlib import Path

from indai.platform.errors import UserError

PROGRESS_RE = re.compile(r"\[indai\] progress (\{.*\})")
RESULT_RE = re.compile(r"\[indai\] result (\{.*\})")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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


def whoami(gateway: str, token: str) -> dict:
    import requests

    try:
        r = requests.get(f"{gateway.rstrip('/')}/api/indai/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except requests.RequestException as e:
        raise UserError(f"job gateway {gateway} is not reachable: {e.__class__.__name__}") from None
    if r.status_code != 200:
        raise UserError(f"job gateway {gateway} refused the token: {r.json().get('detail', r.text) if r.content else r.status_code}")
    return r.json()


def submit(gateway: str, token: str, recipe: str | Path, overrides: list[str], member: str | None = None, gpus: float = 0,
           cpus: float | None = None) -> tuple[str, dict]:
    """Submit; return (submission id, the principal the gateway saw)."""
    from indai.platform.cli import load_train_config

    recipe = Path(recipe)
    cfg = load_train_config(str(recipe), overrides)  # bad recipes fail here, not on the cluster
    me = whoami(gateway, token)
    if member and member != me["member"] and me["role"] != "admin":
        raise UserError(f"this token belongs to member {me['member']!r}, not {member!r}: use a token of {member}")
    if gpus and not cfg.run.use_gpu:
        overrides = [*overrides, "run.use_gpu=true"]
    work = Path(tempfile.mkdtemp(prefix="indai-submit-"))
    try:
        shutil.copyfile(recipe, work / "recipe.yaml")
        entry = "indai train recipe.yaml" + "".join(f" {_quote(o)}" for o in overrides)
        client = _client(gateway, token)
        try:
            sid = client.submit_job(
                entrypoint=entry, runtime_env={"working_dir": str(work)},
                metadata={"indai.datasets": cfg.data.dataset, "indai.recipe_file": recipe.name[:100]},
                entrypoint_num_gpus=gpus or None, entrypoint_num_cpus=cpus)
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
