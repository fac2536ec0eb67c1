"""GPU tier: the train steps do not make the host wait for the GPU.

Every read of a device value on the host (`.item()`, a Python `if` on a tensor, a copy from
pageable memory) blocks the host until the GPU has run everything queued so far; then the GPU
idles while the host prepares the next step. The plain loop of bench/train_throughput.py never
does it; a loop that does it every step cannot reach that loop's throughput on small, fast steps.
CUDA's sync debug mode reports each such wait: a run of twice the steps must report no more
waits than the shorter run (the fusion loop), or at most one more per extra step (the report
writer, whose Hugging Face LM checks its mask arguments on the host in every forward).
Runs on the lent GPU machine only (bench/gpu/run.sh); skipped where CUDA is absent."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

from indai.platform.storage import open_store
from indai.trainers.synthetic import write_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]


def host_waits(fn) -> tuple[int, object]:
    """(waits reported while `fn` ran, what it returned)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught), out


@pytest.mark.parametrize("resident", ["on", "off"])
def test_the_fusion_loop_steps_make_no_host_wait(tmp_path, resident):
    from indai.trainers.loop import train_loop

    store = open_store(tmp_path / "store")
    waits = {}
    for n in (256, 512):  # 8 and 16 steps of 32; the same test split and checkpoints
        ref, _ = write_dataset(store, f"sync-{n}", {"train": n, "test": 64}, classes=4, sensor=(2, 128), image=32, text_len=32)
        cfg = {"recipe": "sync", "data": {"dataset": ref, "device_resident": resident},
               "model": {"flavour": "debug", "modalities": ["sensor", "image", "text"], "num_classes": 4,
                         "sensor": {"kind": "cnn1d", "channels": 2, "length": 128},
                         "image": {"timm_name": "test_resnet", "size": 32}, "text": {"max_len": 32}},
               "optim": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "clip": 1.0},
               "run": {"name": f"sync-{resident}-{n}", "launcher": "local", "use_gpu": True, "progress": False,
                       "resume": False, "log_every": 10**6, "timing_skip": 2},
               "store_uri": store.uri}
        waits[n], out = host_waits(lambda: train_loop(cfg))
        assert out["step"] == n // 32
    assert waits[256] > 0  # the run's edges (timing, evaluation, checkpoint) do wait: the count is live
    assert waits[512] == waits[256], waits


def test_report_writer_steps_wait_at_most_once_each(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import report_writer_throughput as rwb

    from indai.trainers.engine import build_engine
    from indai.trainers.loop import setup_distributed
    from indai.trainers.models.report_writer.model import ReportWriter, hold_frozen_in_bf16
    from indai.trainers.models.report_writer.train import train_step

    s = rwb.SHAPES["tiny"]
    cfg = rwb.train_config(s, 4, compile=False, cuda=True)
    d = setup_distributed(cfg)
    model = ReportWriter(cfg.model, rwb.lm_folder(tmp_path, s["lm"]), load_pretrained=False).to(d.device)
    engine, _ = build_engine(model, cfg, d, lambda step: 1.0)
    assert hold_frozen_in_bf16(model.lm) > 0
    batch = rwb.host_batch(s, 4, 300, seed=0)  # pinned, as the DataLoader's pin_memory gives it
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)

    def steps(n: int):
        for _ in range(n):  # the worker's own step (train_report_writer calls it per batch)
            train_step(engine, batch, d.device, sums)
        torch.cuda.synchronize()

    steps(2)  # warm-up: allocator, cuBLAS and cuDNN set-up
    few, _ = host_waits(lambda: steps(4))
    many, _ = host_waits(lambda: steps(8))
    assert many - few <= 4, (few, many)
    assert torch.isfinite(sums).all() and sums[1].item() == 14 * 4 * s["response"]
