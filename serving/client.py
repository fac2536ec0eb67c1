"""Calling a served model over HTTP, and measuring it on a held-out dataset split.

`evaluate_split` sends every window of a split as its own request (as a shop-floor client
would), then reports the accuracy of the served answers and the request latency."""
from __future__ import annotations

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


RETRIES = 5


def post_predict(base_url: str, instances: list[dict], token: str | None = None, model: str | None = None, timeout: float = 30.0,
                 session: requests.Session | None = None) -> dict:
    http = session or requests
    body = {"instances": instances, **({"model": model} if model else {})}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(RETRIES + 1):  # 429 and 503 say when to come back (Retry-After); other answers are final
        try:
            r = http.post(f"{base_url.rstrip('/')}/v1/predict", json=body, headers=headers, timeout=timeout)
        except requests.RequestException as e:
            raise UserError(f"the model server at {base_url} did not answer ({type(e).__name__}): is `indai serve` running?") from None
        if r.status_code not in (429, 503) or attempt == RETRIES:
            break
        time.sleep(min(10.0, float(r.headers.get("Retry-After", "1") or 1)))
    if r.status_code != 200:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text[:300]
        raise UserError(f"the model server refused the request ({r.status_code}): {detail}")
    return r.json()


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
