"""Calling a served model over HTTP, and measuring it on a held-out dataset split.

`evaluate_split` sends every window of a split as its own request (as a shop-floor client
would), then reports the accuracy of the served answers and the request latency.

`post_predict` retries what a restart or an overload causes: answers 429, 502, 503 and 504, and
connections that were refused or dropped, up to RETRIES times, waiting as the server's
Retry-After says, else 0.2 s doubled each time (with jitter, at most MAX_WAIT_S). A 500 is tried
once more: it is what Serve's proxy answers for a call whose ingress replica died while holding
it (RELIABILITY.md), and a second 500 is final (an error of the server stays one). A prediction has
no side effect but its metering row, so sending it again is safe; an attempt that reached the
ingress is metered under its own request id with its own status. A read timeout is not retried
(the server may still be working on it: sending it again would double the load)."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import requests

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.progress import bar


@dataclass
class Evaluation:
    n: int
    correct: int
    latencies_ms: list[float]
    seconds: float
    model_version: int | None

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> str:
        return (f"served accuracy {self.accuracy:.4f} ({self.correct}/{self.n}); latency p50 {self.percentile(50):.1f} ms, "
                f"p99 {self.percentile(99):.1f} ms; {self.n / self.seconds:.1f} requests/s; model version {self.model_version}")


RETRIES = 7  # waits of 11-23 s in all: more than the ~7 s Serve takes to replace a dead HTTP proxy
RETRY_STATUSES = (429, 502, 503, 504)  # come back later: overload, a restarting replica or proxy, the database down
RETRY_ONCE = (500,)  # an ingress replica that died holding the call; twice is a real error
BACKOFF_S = 0.2
MAX_WAIT_S = 10.0


def retry_wait(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait after failed try number `attempt` (0-based)."""
    if retry_after and retry_after.strip().isdigit():
        return min(MAX_WAIT_S, float(retry_after))
    return min(MAX_WAIT_S, BACKOFF_S * 2 ** attempt) * random.uniform(0.5, 1.0)


def post_predict(base_url: str, instances: list[dict], token: str | None = None, model: str | None = None, timeout: float = 30.0,
                 session: requests.Session | None = None) -> dict:
    http = session or requests
    body = {"instances": instances, **({"model": model} if model else {})}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    seen_once = False  # a RETRY_ONCE answer came already
    for attempt in range(RETRIES + 1):
        try:
            r = http.post(f"{base_url.rstrip('/')}/v1/predict", json=body, headers=headers, timeout=timeout)
        except requests.ConnectionError as e:  # refused or dropped (includes connect timeouts); other errors are final
            if attempt == RETRIES:
                raise UserError(f"the model server at {base_url} did not answer ({type(e).__name__}, {attempt + 1} tries): "
                                "is `indai serve` running?") from None
            time.sleep(retry_wait(attempt))
            continue
        except requests.RequestException as e:
            raise UserError(f"the model server at {base_url} did not answer ({type(e).__name__}): is `indai serve` running?") from None
        once = r.status_code in RETRY_ONCE and not seen_once
        seen_once = seen_once or r.status_code in RETRY_ONCE
        if attempt == RETRIES or not (r.status_code in RETRY_STATUSES or once):
            break
        time.sleep(retry_wait(attempt, r.headers.get("Retry-After")))
    if r.status_code != 200:
        raise refusal(r, "the model server refused the request")
    return r.json()


def refusal(r, what: str) -> UserError:
    """An indai service's answer other than 200 as one line: `what (status): its detail`."""
    try:
        detail = r.json().get("detail")
    except ValueError:  # (not JSON: a proxy's page)
        detail = r.text[:300]
    return UserError(f"{what} ({r.status_code}): {detail}")


def split_instances(store, ref: datasets.DatasetRef, split: str, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """A windowed sensor split as request instances (raw values) with their true labels."""
    manifest = datasets.read_manifest(store, ref)
    arrays = datasets.load_split(store, ref, split, manifest)
    sensor = manifest["modalities"]["sensor"]
    window = sensor["window"]
    starts, labels = arrays["sensor_starts"], arrays["label"]
    n = len(starts) if limit is None else min(limit, len(starts))
    signal = arrays["sensor_signal"]
    instances = [{"sensor": signal[:, int(s): int(s) + window].tolist(), "channels": sensor["channels"],
                  "sampling_rate_hz": sensor["sampling_rate_hz"]} for s in starts[:n]]
    return instances, [manifest["classes"][int(i)] for i in labels[:n]]


def evaluate_split(base_url: str, instances: list[dict], labels: list[str], concurrency: int = 4,
                   progress: bool = True, token: str | None = None, model: str | None = None) -> Evaluation:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=concurrency)
    session.mount("http://", adapter)

    def one(inst: dict) -> tuple[str, float, int]:
        t0 = time.perf_counter()
        out = post_predict(base_url, [inst], token=token, model=model, session=session)
        return out["predictions"][0]["label"], (time.perf_counter() - t0) * 1000, out["model_version"]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(bar(pool.map(one, instances), desc="predict over HTTP", total=len(instances), enabled=progress))
    seconds = time.perf_counter() - start
    correct = sum(pred == true for (pred, _, _), true in zip(results, labels))
    return Evaluation(n=len(results), correct=correct, latencies_ms=[r[1] for r in results], seconds=seconds,
                      model_version=results[0][2] if results else None)
