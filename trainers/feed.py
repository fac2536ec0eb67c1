"""Batches to the device so that the GPU never waits on data, and the clock that shows it.

A torch DataLoader over an in-memory split calls `__getitem__` once per sample and stacks the
results: at batch 128 of 224-pixel images that is 128 small copies, a stack and a pinning copy
on the training thread for every step. Here a batch is gathered from the split's tensors with
one `index_select` per input, straight into pinned memory, on a background thread that also
issues the host-to-device copy on a side CUDA stream, `data.prefetch` batches ahead; the step
only waits on an event. Image inputs become channels_last on the device (the parameters stay
contiguous for DeepSpeed). On CPU the same batches are produced in line.

`StepClock` stamps step boundaries for the steady-state throughput the loop reports: it leaves
out the first `run.timing_skip` steps, evaluation and checkpoints, and synchronises the device
only at the edges of a measured stretch, so measuring does not slow the steps it measures.
"""
from __future__ import annotations

import copy
import math
import queue
import resource
import statistics
import threading
import time
from contextlib import closing

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, default_collate


def channels_last_enabled(cfg, cuda: bool) -> bool:
    return cfg.run.channels_last == "on" or (cfg.run.channels_last == "auto" and cuda)


# ---- gathering batches from an in-memory split -------------------------------------------------

def _take(src: torch.Tensor, idx: torch.Tensor, pin: bool) -> torch.Tensor:
    if src.device.type != "cpu":  # a device-resident split: gathered where it lies
        return src.index_select(0, idx)
    out = torch.empty((len(idx),) + tuple(src.shape[1:]), dtype=src.dtype, pin_memory=pin)
    return torch.index_select(src, 0, idx, out=out)


def gather(ds, idx: torch.Tensor, pin: bool = False) -> dict[str, torch.Tensor]:
    """The batch `default_collate([ds[i] for i in idx])` gives, for a trainers.data.SplitDataset,
    with one copy per input (into pinned memory when `pin`)."""
    batch = {"label": _take(ds.label, idx, pin), "mask": _take(ds.mask, idx, pin)}
    if "sensor" in ds.modalities:
        if ds.signal is not None:
            starts = ds.starts[idx] if torch.is_tensor(ds.starts) else torch.as_tensor(np.asarray(ds.starts)[idx.numpy()],
                                                                                       dtype=torch.long)
            cols = starts[:, None] + torch.arange(ds.window, device=starts.device)  # [B, W] sample positions in the signal
            windows = ds.signal[:, cols].permute(1, 0, 2)
            if ds.signal.device.type != "cpu":
                batch["sensor"] = windows.contiguous()
            else:
                out = torch.empty((len(idx), ds.signal.shape[0], ds.window), dtype=ds.signal.dtype, pin_memory=pin)
                batch["sensor"] = out.copy_(windows)
        else:
            batch["sensor"] = _take(ds.sensor, idx, pin)
    if "image" in ds.modalities:
        batch["image"] = _take(ds.image, idx, pin)
    if "text" in ds.modalities:
        batch["text"] = _take(ds.text, idx, pin)
    return batch


def _same_layout(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k], b[k]) for k in a)


def gathers_like_collate(ds) -> bool:
    """Whether `gather` reproduces the dataset's own items (a dataset with other inputs or
    another layout falls back to per-sample loading)."""
    if len(ds) == 0:
        return False
    idx = torch.arange(min(2, len(ds)))
    try:
        return _same_layout(gather(ds, idx), default_collate([ds[int(i)] for i in idx]))
    except (AttributeError, TypeError, IndexError, RuntimeError):
        return False


class IndexBatches:
    """The sampler's order in batches of `batch_size` (the last one may be short), each
    gathered from the split's tensors, or per sample where `gather` does not fit the dataset."""

    def __init__(self, ds, sampler, batch_size: int, pin: bool):
        self.ds, self.sampler, self.batch_size, self.pin = ds, sampler, batch_size, pin
        self.fast = gathers_like_collate(ds)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def fetch(self, idx: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch; `idx` a list, or a tensor on the split's device."""
        if self.fast:
            return gather(self.ds, torch.as_tensor(idx, dtype=torch.long), self.pin)
        batch = default_collate([self.ds[int(i)] for i in idx])
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def __iter__(self):
        order = list(iter(self.sampler))
        where = self.ds.label.device if self.fast else torch.device("cpu")
        if where.type == "cuda":
            # the epoch's order reaches a device-resident split in one asynchronous copy from pinned
            # memory. Indices made on the device from a list at every step were a pageable copy, and
            # that makes the host wait until the GPU has finished all work queued so far: the loop
            # could never queue a step ahead of the one the GPU was running.
            order = torch.as_tensor(order, dtype=torch.long).pin_memory().to(where, non_blocking=True)
        for i in range(0, len(order), self.batch_size):
            yield self.fetch(order[i: i + self.batch_size])


class _ByBatch(torch.utils.data.Dataset):
    """For DataLoader workers: item = a whole batch of indices (BatchSampler, batch_size=None)."""

    def __init__(self, batches: IndexBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches.ds)

    def __getitem__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.batches.fetch(idx)


# ---- to the device -------------------------------------------------------------------------------

def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if device.type == "cuda" and not v.is_cuda and not v.is_pinned():
            v = v.pin_memory()  # an asynchronous copy needs page-locked memory
        v = v.to(device, non_blocking=True)
        if channels_last and v.dim() == 4 and v.is_floating_point():
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


class ToDevice:
    """Batches of `source` on `device`. On CUDA a background thread gathers, pins and copies
    `depth` batches ahead on a side stream; the consumer's stream waits on each batch's event."""

    def __init__(self, source, device: torch.device, channels_last: bool, depth: int = 2, resident: bool = False):
        self.source, self.device, self.channels_last, self.depth = source, device, channels_last, depth
        self.resident = resident  # the source gathers on the device already: nothing to copy ahead

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        if self.device.type != "cuda" or self.resident:
            for batch in self.source:
                yield _to_device(batch, self.device, self.channels_last)
            return
        yield from self._prefetched()

    def _prefetched(self):
        stream = torch.cuda.Stream(self.device)

        def start() -> None:
            torch.cuda.set_device(self.device)

        def copy(batch: dict):  # on the background thread: the copies queue on the side stream
            with torch.cuda.stream(stream):
                moved = _to_device(batch, self.device, self.channels_last)
                done = torch.cuda.Event()
                done.record(stream)
            return moved, done

        with closing(ahead(self.source, copy, self.depth, start)) as ready:
            for moved, done in ready:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(done)
                for v in moved.values():
                    v.record_stream(current)  # memory the side stream allocated is in use on this stream now
                yield moved


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def ahead(source, work, depth: int, start=None):
    """`work(item)` for each item of `source`, computed on a background thread up to `depth`
    items ahead, yielded in order. An exception on the thread is raised here; closing this
    generator (an abandoned epoch) stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if start is not None:
                start()
            for item in source:
                if not put(work(item)):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))

    worker = threading.Thread(target=produce, name="indai-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join(timeout=30)


# ---- a split that lives on the device -------------------------------------------------------------

RESIDENT_SHARE = 0.25  # data.device_resident auto: a split may take this share of the device's free memory


def split_bytes(ds) -> int:
    return sum(t.numel() * t.element_size() for t in (ds.label, ds.mask, ds.signal, ds.sensor, ds.image, ds.text)
               if t is not None)


def stays_resident(ds, cfg, device: torch.device) -> bool:
    """data.device_resident: a CUDA split that fits (auto: within RESIDENT_SHARE of the free
    memory) is copied to the device once, and each step's batch is gathered there, so no step
    waits on a host-to-device copy. Needs the fast gather (trainers.data.SplitDataset inputs)."""
    if device.type != "cuda" or cfg.data.device_resident == "off" or cfg.data.num_workers > 0 or not gathers_like_collate(ds):
        return False
    if cfg.data.device_resident == "on":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return split_bytes(ds) <= RESIDENT_SHARE * free


def resident(ds, device: torch.device):
    """A shallow copy of a SplitDataset whose tensors (and window starts) lie on `device`."""
    moved = copy.copy(ds)
    for name in ("label", "mask", "signal", "sensor", "image", "text"):
        value = getattr(ds, name)
        if value is not None:
            setattr(moved, name, value.to(device))
    if ds.starts is not None:
        moved.starts = torch.as_tensor(np.asarray(ds.starts), dtype=torch.long, device=device)
    return moved


def batches(ds, sampler, cfg, device: torch.device) -> ToDevice:
    """An in-memory split's batches on `device`, in the sampler's order (a fresh order per epoch
    through the sampler's set_epoch): gathered on the device when the split stays there
    (`stays_resident`), else on the host (in DataLoader workers when data.num_workers > 0) and
    copied ahead."""
    cuda = device.type == "cuda"
    if stays_resident(ds, cfg, device):
        source = IndexBatches(resident(ds, device), sampler, cfg.optim.batch_size, pin=False)
        return ToDevice(source, device, channels_last_enabled(cfg, cuda), cfg.data.prefetch, resident=True)
    source = IndexBatches(ds, sampler, cfg.optim.batch_size, pin=cuda and cfg.data.num_workers == 0)
    if cfg.data.num_workers > 0:
        source = DataLoader(_ByBatch(source), sampler=BatchSampler(sampler, cfg.optim.batch_size, drop_last=False),
                            batch_size=None, num_workers=cfg.data.num_workers, pin_memory=cuda,
                            persistent_workers=True, prefetch_factor=cfg.data.prefetch,
                            # the workers' base seed from a generator of its own, not from the global one dropout draws from
                            generator=torch.Generator().manual_seed(cfg.run.seed))
    return ToDevice(source, device, channels_last_enabled(cfg, cuda), cfg.data.prefetch)


def to_device(source, cfg, device: torch.device) -> ToDevice:
    """Batches from elsewhere (a Ray Data stream) on `device`, prefetched the same way."""
    return ToDevice(source, device, channels_last_enabled(cfg, device.type == "cuda"), cfg.data.prefetch)


# ---- the step clock ------------------------------------------------------------------------------

def _batch_size(batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


class StepClock:
    """Steady-state steps, samples and seconds of the train loop (see the module docstring)."""

    def __init__(self, skip: int, world: int, device: torch.device):
        self.skip, self.world, self.device = skip, world, device
        self.steps_done = self.steady_steps = self.steady_samples = 0
        self.steady_seconds = 0.0
        self.durations: list[float] = []
        self.first_step_unix: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def steps(self, source):
        """`source`'s batches, stamping the boundary between consecutive steps. A stretch counts
        once the epoch's batches are done (an abandoned epoch adds nothing)."""
        start = last = None
        prev, steps, samples, durations = 0, 0, 0, []
        for batch in source:
            if start is not None:  # a measured step has just ended
                now = time.perf_counter()
                durations.append(now - last)
                last = now
                steps, samples = steps + 1, samples + prev
            elif self.steps_done >= self.skip:  # warm-up is over: the measured stretch begins here
                self._sync()
                start = last = time.perf_counter()
            if self.first_step_unix is None:
                self.first_step_unix = time.time()
            prev = _batch_size(batch)
            self.steps_done += 1
            yield batch
        if start is not None:  # the epoch's last step ends when the device is done with it
            self._sync()
            now = time.perf_counter()
            durations.append(now - last)
            self.steady_steps += steps + 1
            self.steady_samples += samples + prev
            self.steady_seconds += now - start
            self.durations += durations

    def peak_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS

    def summary(self) -> dict:
        secs = self.steady_seconds
        return {"device": str(self.device), "world": self.world, "threads": torch.get_num_threads(),
                "steps": self.steps_done, "skipped_steps": min(self.skip, self.steps_done),
                "steady_steps": self.steady_steps, "steady_seconds": round(secs, 4),
                "samples_per_s": round(self.steady_samples * self.world / secs, 2) if secs > 0 else None,
                "step_ms_mean": round(1000 * secs / self.steady_steps, 3) if self.steady_steps else None,
                "step_ms_median": round(1000 * statistics.median(self.durations), 3) if self.durations else None,
                "first_step_unix": self.first_step_unix, "peak_memory_gib": round(self.peak_memory_gib(), 3)}
