"""What long work is doing: named stages with timings, and progress bars for loops."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Stages:
    """Prints `[stage] name ... done in 1.2 s` and keeps the timings for a summary."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"==> {name}", file=self.stream, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.timings[name] = took
            print(f"<== {name}: {took:.1f} s", file=self.stream, flush=True)

    def summary(self) -> str:
        width = max((len(n) for n in self.timings), default=0)
        rows = [f"  {n:<{width}}  {t:8.1f} s" for n, t in self.timings.items()]
        rows.append(f"  {'total':<{width}}  {sum(self.timings.values()):8.1f} s")
        return "stage timings:\n" + "\n".join(rows)


def bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)
