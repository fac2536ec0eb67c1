"""A steady request load from a real HTTP client, for fault tests: POST /v1/predict at a fixed
rate from a thread pool until the block ends, with every answer kept (status, request id, when
it was sent), so a test can count exactly what failed around the moment it injected a fault."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class Sent:
    sent_s: float  # when it was sent, seconds after the load started
    done_s: float  # when its answer (or error) came
    status: int  # 0: no HTTP answer (refused, dropped, timed out)
    request_id: str
    error: str  # empty for a 200


class SteadyLoad:
    """`with SteadyLoad(url, token, instances, rate_per_s) as load:` sends requests at the rate
    until the block ends; then `load.sent` holds every answer, in the order sent. No retries:
    what the server answers is what is counted."""

    def __init__(self, url: str, token: str, instances: list[dict], rate_per_s: float, workers: int = 16, timeout_s: float = 60):
        self.url, self.timeout_s = f"{url.rstrip('/')}/v1/predict", timeout_s
        self.body, self.headers = {"instances": instances}, {"Authorization": f"Bearer {token}"}
        self.period_s = 1.0 / rate_per_s
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="steady-load")
        self._futures = []
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True)
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._open: dict[int, float] = {}  # requests sent and not yet answered: thread id -> when sent

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self._t0

    def in_flight(self, older_than_s: float = 0.0) -> int:
        """Requests sent at least `older_than_s` ago and not answered yet."""
        now = self.now()
        with self._lock:
            return sum(now - t >= older_than_s for t in self._open.values())

    def _one(self) -> Sent:
        sent_s, me = self.now(), threading.get_ident()
        with self._lock:
            self._open[me] = sent_s
        try:
            r = requests.post(self.url, json=self.body, headers=self.headers, timeout=self.timeout_s)
        except requests.RequestException as e:
            return Sent(sent_s, self.now(), 0, "", type(e).__name__)
        finally:
            with self._lock:
                del self._open[me]
        try:
            request_id = r.json().get("request_id") or ""
        except ValueError:
            request_id = ""
        return Sent(sent_s, self.now(), r.status_code, request_id, "" if r.status_code == 200 else r.text[:300])

    def _dispatch(self) -> None:
        n = 0
        while not self._stop.is_set():
            due_s = n * self.period_s
            if self._stop.wait(max(0.0, due_s - self.now())):
                return
            self._futures.append(self._pool.submit(self._one))
            n += 1

    def __enter__(self) -> "SteadyLoad":
        self._t0 = time.monotonic()
        self._dispatcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._dispatcher.join(10)
        try:
            self.sent = [f.result(timeout=self.timeout_s + 30) for f in self._futures]
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
