"""Metrics from the train loops to MLflow, sent by a background thread so training never waits on
the tracking server.

Rank 0 adds metrics as it trains; `flush()` hands what was added to the sender and returns at
once. The sender posts them in batches (one `log_batch` request per 1000) and, while the server
is away (no connection, a connection cut mid-answer, a 5xx: `registry.tracking_server_away`),
keeps them, in order and with their first timestamps, and tries again with backoff. MLflow
drops exact repeats, so a batch that arrived but whose answer was lost is not doubled when it
is sent again. At most MAX_PENDING are kept (the oldest are dropped beyond that, with a warning).

What MLflow has not confirmed yet goes into each checkpoint (`unsent()`; `restore()` on resume),
so a job killed while the server was away loses no metric either; a run resumed from an
accumulation window's start, before its checkpoint, does not log the steps it runs again a
second time. Other errors (a deleted run, a rejected metric) stop the sender and are raised in
the loop at its next flush. `close()` waits for the sender: one last try once the server is
away, then what is left is reported as lost.
"""
from __future__ import annotations

import sys
import threading
import time

BATCH = 1000  # MLflow accepts at most 1000 metrics a log_batch request
RETRY_WAITS = (2.0, 5.0, 10.0, 30.0, 60.0)  # seconds between tries while the server is away, then 60 s


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class MetricBuffer:
    """Rank 0's metrics for one MLflow run; inert (nothing imported, nothing sent) without one."""

    MAX_PENDING = 100_000  # a few MB; hours of logging at the usual log_every

    def __init__(self, cfg, enabled: bool):
        self.items: list = []  # added since the last flush; only the loop's thread touches it
        self.client = None
        self._outbox: list = []  # handed to the sender and not yet confirmed; the loop only appends
        self._cv = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._logged_through: int | None = None  # a resumed run stepping again through steps it had logged (restore)
        if enabled and cfg.mlflow_uri and cfg.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=cfg.mlflow_uri)
            self.run_id = cfg.mlflow_run_id

    def add(self, key: str, value: float, step: int) -> None:
        if self.client is not None:  # without a tracking URI mlflow is never imported (the GPU machine has none)
            if self._logged_through is not None and step <= self._logged_through:
                return  # logged before the checkpoint this run resumed from went on from an earlier step
            from mlflow.entities import Metric

            self.items.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def flush(self) -> None:
        """Hand what was added to the sender; returns at once."""
        if self.client is None:
            return
        self._raise_error()
        if not self.items:
            return
        with self._cv:
            self._outbox.extend(self.items)
            self._cv.notify()
        self.items = []
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name="indai-metrics", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Send what is left and stop the sender. A server still away gets one more try (MLflow's
        own retries, about 4 minutes); then what it did not take is lost, with a warning."""
        if self.client is None:
            return
        self.flush()
        if self._thread is not None:
            with self._cv:
                self._closing = True
                self._cv.notify()
            self._thread.join()
            self._thread = None
        with self._cv:
            if self._outbox and self._error is None:
                _say(f"MLflow did not take the run's last {len(self._outbox)} metrics: lost (the server is still away)")
                self._outbox = []
        self._raise_error()

    def unsent(self) -> list[list]:
        """What MLflow has not confirmed, as [key, value, timestamp, step] rows for a checkpoint."""
        with self._cv:
            return [[m.key, m.value, m.timestamp, m.step] for m in (*self._outbox, *self.items)]

    def restore(self, rows: list | None, logged_through: int | None = None) -> None:
        """Queue again what a checkpoint says MLflow had not confirmed (sent by the next flush).
        `logged_through` (trainers.checkpoint.logged_through): the checkpoint's step, where the
        resumed run goes on from an earlier one and steps through these again; what it adds for
        them is left out, so each step's metrics stay in MLflow once, as the first run logged them."""
        self._logged_through = logged_through
        if self.client is None or not rows:
            return
        from mlflow.entities import Metric

        self.items[:0] = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in rows]

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _send_loop(self) -> None:
        from indai.platform.registry import tracking_server_away

        failures, away_since = 0, None
        while True:
            with self._cv:
                while not self._outbox and not self._closing:
                    self._cv.wait()
                if not self._outbox:
                    return
                batch = self._outbox[:BATCH]  # only the sender removes from the front: these stay first
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001  (each kind is decided below)
                if not tracking_server_away(exc):
                    with self._cv:
                        self._error = exc
                        self._outbox = []
                    return
                with self._cv:
                    dropped = max(0, len(self._outbox) - self.MAX_PENDING)
                    del self._outbox[:dropped]
                    kept, closing = len(self._outbox), self._closing
                wait = RETRY_WAITS[min(failures, len(RETRY_WAITS) - 1)]
                failures += 1
                away_since = away_since or time.monotonic()
                if closing:
                    return  # the last try has failed: close() reports what is lost
                _say(f"MLflow did not take {kept} metrics ({str(exc).splitlines()[0][:200]}); kept, training goes on, "
                     f"sending again in {wait:g} s" + (f"; the oldest {dropped} dropped (at most {self.MAX_PENDING} are kept)"
                                                     if dropped else ""))
                with self._cv:
                    self._cv.wait_for(lambda: self._closing, timeout=wait)
                continue
            with self._cv:
                del self._outbox[:len(batch)]
                left = len(self._outbox)
            if away_since is not None and not left:
                _say(f"MLflow is back: the metrics kept for {time.monotonic() - away_since:.0f} s are sent")
                failures, away_since = 0, None
