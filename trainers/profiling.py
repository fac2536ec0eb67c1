"""`run.profile_steps`: a few train steps under torch.profiler, to see where a step's time goes.

After the warm-up (`run.timing_skip` steps), `run.profile_steps` steps of each rank run under
torch.profiler (CPU, and CUDA kernels on a GPU). Each rank's trace goes to the object store
beside the run's checkpoints, `checkpoints/<run>/profile/rank-<r>.trace.json.gz`, and `indai
train` also logs it to the MLflow run (artifacts under profile/; open it in Perfetto or
chrome://tracing). Rank 0 prints a summary, which also goes into the run's result and MLflow:

- wall milliseconds per profiled step;
- on a GPU, how busy the device was: the time some kernel or copy ran, over the span from the
  first of them in the profiled steps to the last. A loop that makes the host wait for the device, or
  whose host work is slower than the device's, leaves gaps; a loop that keeps the GPU fed is
  near 1;
- the operators that took the most time (device time on a GPU, CPU time otherwise).

The profiler slows the steps it records; they count in the run's samples/s like any other.
`Profile.steps` wraps the loop's batch iterator, like `trainers.feed.StepClock`, so the loop
body does not change.
"""
from __future__ import annotations

import gzip
import os
import sys
import tempfile
import time

import torch

from indai.trainers import relay

TOP = 8
STEP_RANGE = "indai step "  # each profiled step's named range in the trace


class Profile:
    def __init__(self, cfg, rank: int, device: torch.device, store=None):
        self.first, self.count = cfg.run.timing_skip, cfg.run.profile_steps
        self.rank, self.device, self.store, self.run = rank, device, store, cfg.run.name
        self.seen = 0  # steps started, over all epochs
        self.profiler = None
        self.started = 0.0
        self.recorded = None  # (profiler, steps, wall seconds) once the window has closed
        self.mark = None  # the current step's range
        self.result: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.count > 0

    def steps(self, source):
        """`source`'s batches; the profiler runs from the boundary before step `first` to the one
        after step `first + count - 1`, or to the end of the epoch, whichever comes first."""
        for batch in source:
            if self.enabled and self.recorded is None:
                if self.profiler is not None:
                    self._end_step()
                    if self.seen == self.first + self.count:
                        self._stop()
                if self.profiler is None and self.recorded is None and self.seen == self.first:
                    self._start()
                if self.profiler is not None:  # each step a named range in the trace
                    self.mark = torch.profiler.record_function(f"{STEP_RANGE}{self.seen}")
                    self.mark.__enter__()
            self.seen += 1
            yield batch
        if self.profiler is not None:  # the epoch ended inside the window: the window ends with it
            self._stop()

    def finish(self) -> dict | None:
        """At the end of training: close a window the last epoch cut short, then summarise and
        save the trace (here, not between steps, so that no step waits for it); the summary or None."""
        if self.profiler is not None:
            self._stop()
        if self.recorded is not None and self.result is None:
            self._summarise(*self.recorded)
        return self.result

    # --

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self.profiler = profile(activities=activities)
        self.profiler.start()
        self.started = time.perf_counter()

    def _end_step(self) -> None:
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None

    def _stop(self) -> None:
        self._end_step()
        self._sync()  # the profiled steps' kernels are done before the trace closes
        wall = time.perf_counter() - self.started
        prof, self.profiler = self.profiler, None
        prof.stop()
        self.recorded = (prof, self.seen - self.first, wall)

    def _summarise(self, prof, steps: int, wall: float) -> None:
        # kernels and copies; a named range (record_function) is mirrored on the GPU's timeline as a
        # user annotation spanning its kernels and the gaps between them: not device work
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
                   and e.time_range.end > e.time_range.start]
        busy = None
        if kernels:
            span = max(end for _, end in kernels) - min(start for start, _ in kernels)
            busy = round(_union(kernels) / span, 4) if span > 0 else None
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = sorted((a for a in prof.key_averages() if not a.is_user_annotation),  # operators, not named ranges
                          key=lambda a: getattr(a, key), reverse=True)
        top = [{"op": a.key, "ms_per_step": round(getattr(a, key) / 1000 / max(1, steps), 3)}
               for a in averages[:TOP] if getattr(a, key) > 0]
        self.result = {"rank": self.rank, "first_step": self.first, "steps": steps,
                       "wall_ms_per_step": round(1000 * wall / max(1, steps), 3), "device_busy": busy,
                       "top": top, "trace": self._save(prof)}
        if self.rank == 0:
            relay.say(f"[indai] profile: {steps} step(s) from step {self.first}: {describe(self.result)}"
                      + (f"; trace {self.result['trace']}" if self.result["trace"] else ""))

    def _save(self, prof) -> str | None:
        """The trace's key in the store, or None. A trace that cannot be saved is reported, not
        raised: the run's final weights are written after this, and a diagnostic must not cost them."""
        if self.store is None:
            return None
        key = f"checkpoints/{self.run}/profile/rank-{self.rank}.trace.json.gz"
        fd, path = tempfile.mkstemp(prefix="indai-trace-", suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                self.store.put_bytes(key, gzip.compress(f.read(), compresslevel=5))
        except Exception as e:  # noqa: BLE001  (any store or file error: the run goes on)
            print(f"[indai] profile: the trace of rank {self.rank} was not saved to {key}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            return None
        finally:
            os.unlink(path)
        return key


def log_traces(cfg, store) -> int:
    """The driver's part (inside the run's MLflow run): each rank's trace of this run as an MLflow
    artifact under profile/, so it is found beside the run's plots. Returns how many."""
    if not cfg.run.profile_steps:
        return 0
    import mlflow

    keys = sorted(k for k in store.list(f"checkpoints/{cfg.run.name}/profile/") if k.endswith(".trace.json.gz"))
    try:
        with tempfile.TemporaryDirectory(prefix="indai-profile-") as tmp:
            for key in keys:
                local = os.path.join(tmp, key.rsplit("/", 1)[-1])
                store.get_file(key, local)
                mlflow.log_artifact(local, artifact_path="profile")
    except Exception as e:  # noqa: BLE001  (registration comes next: a diagnostic must not cost it)
        print(f"[indai] profile: the traces were not logged to MLflow ({type(e).__name__}: {e}); they stay in the "
              f"store under checkpoints/{cfg.run.name}/profile/", file=sys.stderr, flush=True)
        return 0
    return len(keys)


def describe(profiled: dict, ops: int = 3) -> str:
    """One line: ms per step, how busy the GPU was (if one ran), the costliest operators."""
    busy = profiled["device_busy"]
    return (f"{profiled['wall_ms_per_step']} ms/step" + (f", device busy {100 * busy:.1f} %" if busy is not None else "")
            + "; most time: " + ", ".join(f"{t['op']} {t['ms_per_step']} ms" for t in profiled["top"][:ops]))


def record_profile(metrics, profiled: dict, step: int) -> None:
    """The summary's numbers as MLflow metrics of the run (rank 0's buffer sends them)."""
    metrics.add("profile_ms_per_step", profiled["wall_ms_per_step"], step)
    if profiled["device_busy"] is not None:
        metrics.add("profile_device_busy", profiled["device_busy"], step)


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total
