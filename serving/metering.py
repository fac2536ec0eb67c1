"""Metering of inference calls: recorded in memory at once, written to the platform database
in batches by a background task, so serving never waits on the database.

Each call is one row of the `calls` table keyed by its request id; a batch is inserted with
"on conflict do nothing", so a batch retried after a failed or uncertain write counts every
call once. While the database is down the buffer keeps the calls (up to `max_buffer`, then
the oldest are dropped and counted) and the next flush catches up.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy.engine import Engine


@dataclass
class CallRecord:
    request_id: str
    member_id: str
    model: str
    model_version: int | None
    process: str
    at: datetime
    status: int
    latency_ms: float
    instances: int


class Meter:
    """The buffer is shared by the event loop (`record`, `pending`) and the flushing thread
    (`flush`, run with asyncio.to_thread), so every change to it holds `_lock`; the database
    write itself runs outside the lock, on a chunk taken off the front of the buffer."""

    def __init__(self, eng: Engine, flush_s: float = 1.0, batch: int = 1000, max_buffer: int = 200_000):
        self.eng, self.flush_s, self.batch, self.max_buffer = eng, flush_s, batch, max_buffer
        self.buffer: deque[CallRecord] = deque()
        self._unwritten: dict[str, CallRecord] = {}  # buffered or being written, by request id
        self._lock = threading.Lock()
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.last_error = ""
        self._task: asyncio.Task | None = None

    def record(self, rec: CallRecord) -> None:
        with self._lock:
            if len(self.buffer) >= self.max_buffer:
                self._drop(self.buffer.popleft())
            self.buffer.append(rec)
            self._unwritten[rec.request_id] = rec
        if self._task is None or self._task.done():
            try:
                self._task = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:  # no loop (a synchronous caller): flush on the next call
                pass

    def _drop(self, rec: CallRecord) -> None:  # holding _lock
        self.dropped += 1
        self._forget(rec)

    def _forget(self, rec: CallRecord) -> None:  # holding _lock
        if self._unwritten.get(rec.request_id) is rec:
            del self._unwritten[rec.request_id]

    def pending(self, request_id: str) -> CallRecord | None:
        """The call if it is not in the database yet (buffered, or in a write under way)."""
        with self._lock:
            return self._unwritten.get(request_id)

    async def _run(self) -> None:
        while self.buffer:
            await asyncio.sleep(self.flush_s)
            await asyncio.to_thread(self.flush)

    def flush(self) -> int:
        """Write what is buffered (in batches); on failure put the chunk back in front, dropping
        (and counting) its oldest calls only if the buffer filled up meanwhile."""
        from sqlalchemy.exc import SQLAlchemyError

        done = 0
        while True:
            with self._lock:
                chunk = [self.buffer.popleft() for _ in range(min(self.batch, len(self.buffer)))]
            if not chunk:
                return done
            try:
                self._insert(chunk)
            except SQLAlchemyError as e:
                with self._lock:
                    self.failures += 1
                    self.last_error = str(e).splitlines()[0][:200]
                    n_drop = max(0, len(chunk) - max(0, self.max_buffer - len(self.buffer)))
                    for rec in chunk[:n_drop]:
                        self._drop(rec)
                    self.buffer.extendleft(reversed(chunk[n_drop:]))
                return done
            with self._lock:
                for rec in chunk:
                    self._forget(rec)
                self.written += len(chunk)
            done += len(chunk)

    def _insert(self, chunk: list[CallRecord]) -> None:
        from indai.platform.db import Call

        rows = [r.__dict__ for r in chunk]
        if self.eng.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        with self.eng.begin() as conn:
            conn.execute(insert(Call).on_conflict_do_nothing(index_elements=["request_id"]), rows)

    def stats(self) -> dict:
        with self._lock:
            return {"buffered": len(self._unwritten), "written": self.written, "dropped": self.dropped,
                    "failures": self.failures, "last_error": self.last_error}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


class RateLimiter:
    """Token bucket per member: `rate` calls per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.state: dict[str, tuple[float, float]] = {}

    def allow(self, member: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self.state.get(member, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self.state[member] = (tokens, now)
            return False
        self.state[member] = (tokens - 1, now)
        return True
