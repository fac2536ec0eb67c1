"""Answers looked up recently, and what is answered while their source is away.

The serving ingress looks up, for each call, the caller's token (`tenancy.TokenCache`), the
model's access rule (platform database, or the model's registry tags), the version an alias
points at, and for `GET /v1/models` the registered names. `Recent` keeps each answer for
`fresh_s` seconds, so that a change (a share, an alias moved) is seen by the first call after
that. When a lookup fails because its source is away (`SourceAway`: the database or MLflow
unreachable, timing out, answering 5xx, or refusing the service's own credentials), the answer
seen last stands in for up to `grace_s` seconds after it was last confirmed, and from then on
the lookups of answers it holds run in the background: one member's call, not every call, meets
the outage, and only while the source is known to be up does a call wait for a lookup. A key
with no answer to stand in raises `SourceAway` (the ingress's 503 with Retry-After). Any other
failure of a lookup (no such alias, say) is the caller's answer and drops what was kept for the
key. The price: once the source is back, the first call of each kept answer is still answered
from it while its lookup runs.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SourceAway(Exception):
    """A lookup's source did not answer, failed (5xx) or refused the service's own credentials:
    not the caller's fault, and sending again later may work. Its text is for the caller; `detail`
    (the source's address, the account, the error) only for the service's log."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


class Recent(Generic[K, V]):
    """`lookup(key, kept)` looks the key up again; `kept` is the answer kept for it, if any (a
    token's re-check reads the principal verified before). `get(key, first)` may name the lookup
    of a key with nothing kept (a token's first check needs the token, which is not kept)."""

    def __init__(self, lookup: Callable[[K, V | None], V], fresh_s: float, grace_s: float, size: int = 10_000,
                 clock: Callable[[], float] = time.monotonic, workers: int = 2, log: Callable[[str], None] = lambda line: None):
        self._lookup, self.fresh_s, self.grace_s, self.size, self._clock = lookup, fresh_s, grace_s, size, clock
        self._log = log
        self._kept: dict[K, tuple[V, float]] = {}
        self._running: set[K] = set()
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(workers, thread_name_prefix="indai-lookup")
        self.away_since: float | None = None  # when a lookup last found the source away, until one succeeds
        self.stale_answers = 0  # answers given from what was kept, past fresh_s, while a lookup could not confirm it
        self.failed_lookups = 0  # lookups that found the source away (in calls and in the background)

    def stats(self) -> dict:
        return {"away": self.away_since is not None, "stale_answers": self.stale_answers,
                "failed_lookups": self.failed_lookups, "kept": len(self._kept)}

    def get(self, key: K, first: Callable[[], V] | None = None) -> V:
        now = self._clock()
        with self._lock:
            hit = self._kept.get(key)
            if hit and now - hit[1] < self.fresh_s:
                return hit[0]
            usable = hit is not None and now - hit[1] < self.grace_s
            if usable and (self.away_since is not None or key in self._running):
                # the source is away (or this key's lookup is under way): answer what was kept, and
                # let one lookup in the background find out whether the source is back
                self.stale_answers += 1
                if key not in self._running:
                    self._running.add(key)
                    self._background.submit(self._refresh, key, hit[0])
                return hit[0]
            self._running.add(key)
        try:
            return self._fetch(key, hit[0] if hit else None, first)
        except SourceAway:
            if usable:
                with self._lock:
                    self.stale_answers += 1
                return hit[0]
            raise
        finally:
            with self._lock:
                self._running.discard(key)

    def _fetch(self, key: K, kept: V | None, first: Callable[[], V] | None = None) -> V:
        try:
            value = first() if kept is None and first is not None else self._lookup(key, kept)
        except SourceAway as e:
            with self._lock:
                self.failed_lookups += 1
                went = self.away_since is None
                if went:
                    self.away_since = self._clock()
            if went:
                self._log(f"{e.detail}; answers confirmed in the last {self.grace_s:g} s stand in meanwhile, and are looked up "
                          "again in the background")
            raise
        except Exception:
            self._back()  # the source answered, if only to refuse
            with self._lock:
                self._kept.pop(key, None)
            raise
        self._back()
        with self._lock:
            if len(self._kept) >= self.size and key not in self._kept:
                self._kept.clear()
            self._kept[key] = (value, self._clock())
        return value

    def _back(self) -> None:
        with self._lock:
            since, self.away_since = self.away_since, None
        if since is not None:
            self._log(f"the source is back after {self._clock() - since:.1f} s")

    def _refresh(self, key: K, kept: V) -> None:
        try:
            self._fetch(key, kept)
        except Exception:  # SourceAway: the kept answer stands; anything else dropped it, and the next call meets it
            pass
        finally:
            with self._lock:
                self._running.discard(key)
