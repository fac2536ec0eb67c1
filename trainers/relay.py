"""What a training job tells its user while it runs: progress events and rank 0's lines.

The train loop runs in Ray Train workers, and Ray relays a worker's output to the driver
prefixed with `(RayTrainWorker pid=...)`, line by line, with no way for the driver to
recognise a progress event in it: the user of `indai train` or `indai demo` read raw
`[indai] progress {...}` JSON instead of a progress bar. So the driver of a Ray run opens a
board (a small Ray actor, no CPU) and names it to the workers in their environment; rank 0
sends its events and lines there, and the driver shows them:
- on a terminal, as the same progress bar `indai train submit` draws (`submit.LogFollower`),
  with the lines printed above it;
- elsewhere (a job's log, CI, a pipe), as the lines they always were: events on stdout as
  `[indai] progress {...}` (what `indai train submit` follows in a cluster job's log), lines on
  stderr.
Without a board (the local launcher, torchrun, a test calling the loop) the worker prints
them itself, in the same form.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from contextlib import contextmanager
from typing import Iterator

PROGRESS_PREFIX = "[indai] progress "
BOARD_ENV = "INDAI_PROGRESS_BOARD"  # the board's actor name, in the workers' environment
NAMESPACE = "indai-progress"
KEEP = 10_000  # events and lines a board holds for a driver that fell behind; older ones are dropped
POLL_S = 0.5

_board = None  # (name, handle) of this process's driver's board, looked up once per board


def _to_board(kind: str, payload, wait: bool = False) -> bool:
    """Send to the driver's board; False where there is none (or it is gone: the caller prints).
    `wait`: until the board holds it, and with it everything this process sent before (Ray runs
    one caller's calls to an actor in order). A line waits, so that the driver, which takes the
    board's last items when the fit returns, never misses the end of a run; an event does not."""
    global _board
    name = os.environ.get(BOARD_ENV)
    if not name:
        return False
    try:
        import ray

        if _board is None or _board[0] != name:
            _board = (name, ray.get_actor(name, namespace=NAMESPACE))
        ref = _board[1].put.remote(kind, payload)
    except Exception:  # the driver went away, or Ray is not connected here: print instead
        return False
    if wait:
        try:
            ray.get(ref, timeout=30)
        except ray.exceptions.GetTimeoutError:  # sent, and perhaps shown late: never printed a second time
            pass
        except Exception:  # the board is gone (its driver ended): the caller prints it
            return False
    return True


def event(**fields) -> None:
    """A progress event (epoch, epochs, step, steps, loss, ...), from rank 0."""
    if not _to_board("event", fields):
        print(PROGRESS_PREFIX + json.dumps(fields), flush=True)


def say(text: str) -> None:
    """A line for the user (an epoch's summary, a checkpoint written), from rank 0."""
    if not _to_board("line", text, wait=True):
        print(text, file=sys.stderr, flush=True)


class Board:
    """The driver's mailbox: workers put, the driver takes everything since it last looked."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []

    def put(self, kind: str, payload) -> None:
        self.items.append((kind, payload))
        if len(self.items) > KEEP:
            del self.items[: len(self.items) - KEEP]

    def take(self) -> list[tuple[str, object]]:
        items, self.items = self.items, []
        return items


class Show:
    """Shows what a board holds: a progress bar and lines above it on a terminal, else the lines
    a worker would have printed."""

    def __init__(self, stream=None, terminal: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.follower = None
        if self.terminal:
            from indai.platform.submit import LogFollower

            self.follower = LogFollower(show=True, stream=self.stream)

    def __call__(self, kind: str, payload) -> None:
        if kind == "event":
            line = PROGRESS_PREFIX + json.dumps(payload)
            if self.follower is not None:
                self.follower.feed(line)
            else:
                print(line, flush=True)
        elif self.follower is not None:
            self.follower.bar.write(str(payload), file=self.stream)
        else:
            print(payload, file=self.stream, flush=True)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()


@contextmanager
def board(show: Show | None = None) -> Iterator[dict]:
    """Around a Ray Train fit, in the driver: a board for this run's workers and a thread that
    shows what reaches it. Yields the environment the workers need to find it. Ray must be
    connected."""
    import ray

    show = show or Show()
    name = f"board-{uuid.uuid4().hex}"
    actor = ray.remote(Board).options(name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=1).remote()
    ray.get(actor.take.remote())  # started before any worker looks for it
    stop = threading.Event()

    def drain() -> None:
        for kind, payload in ray.get(actor.take.remote(), timeout=30):
            show(kind, payload)

    def follow() -> None:
        while not stop.wait(POLL_S):
            try:
                drain()
            except Exception:  # a slow answer: the next round takes what this one missed
                continue

    thread = threading.Thread(target=follow, name="indai-progress", daemon=True)
    thread.start()
    try:
        yield {BOARD_ENV: name}
    finally:
        stop.set()
        thread.join(timeout=60)
        try:
            drain()  # what arrived after the last round
        except Exception:
            pass
        show.close()
        ray.kill(actor)
