"""GPU tier for the engine: the GPU path trains (loss falls), saves and resumes; bf16 autocast +
BatchNorm + channels_last image inputs train under the torch engine and each ZeRO stage; the
prefetching feed hands over the same numbers a DataLoader would, on the device, in channels_last;
the checksum of frozen weights in checkpoints is the same on CUDA as on the CPU.
Runs on the lent GPU machine only (bench/gpu/run.sh); skipped where CUDA is absent."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load

from indai.platform.storage import open_store
from indai.trainers import feed
from indai.trainers.config import TrainConfig
from indai.trainers.data import SplitDataset
from indai.trainers.synthetic import samples, write_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def config(store, ref: str, name: str, **over) -> dict:
    cfg = {"recipe": "gpu_engine", "data": {"dataset": ref},
           "model": {"flavour": "debug", "modalities": ["sensor", "image", "text"], "num_classes": 4, "dropout": 0.0,
                     "sensor": {"kind": "cnn1d", "channels": 2, "length": 128},
                     "image": {"timm_name": "test_resnet", "size": 32}, "text": {"max_len": 32}},
           "optim": {"epochs": 3, "batch_size": 64, "lr": 3e-3},
           "run": {"name": name, "launcher": "local", "use_gpu": True, "progress": False, "resume": False,
                   "channels_last": "on", "timing_skip": 2},
           "store_uri": store.uri}
    for path, value in over.items():
        section, key = path.split(".")
        cfg.setdefault(section, {})[key] = value
    return cfg


@pytest.fixture(scope="module")
def store_and_ref(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("gpu-engine-store"))
    ref, _ = write_dataset(store, "gpu-syn", {"train": 512, "test": 128}, classes=4, sensor=(2, 128), image=32, text_len=32)
    return store, ref


def test_gpu_path_trains_saves_and_resumes(store_and_ref, capfd):
    from indai.trainers.loop import train_loop

    store, ref = store_and_ref
    cfg = config(store, ref, "gpu-resume", **{"optim.epochs": 2, "run.resume": True})
    first = train_loop(cfg)
    err = capfd.readouterr().err
    assert "auto chose ddp" in err
    # 16 steps of bf16 training: clearly learning (chance is 0.25 and loss log 4), not converged
    assert first["test"]["accuracy"] >= 0.5 and first["test"]["loss"] < 0.8 * math.log(4), first["test"]
    assert first["timing"]["device"].startswith("cuda") and first["timing"]["peak_memory_gib"] > 0
    for gone in ("checkpoints/gpu-resume/epoch-00001", "checkpoints/gpu-resume/final"):  # as if it died after epoch 1
        store.delete_prefix(gone)
    resumed = train_loop(cfg)
    assert "resumed run gpu-resume from epoch-00000" in capfd.readouterr().err
    assert resumed["step"] == first["step"] == 16 and resumed["timing"]["steps"] == 8
    assert resumed["test"]["accuracy"] >= 0.5


def test_gpu_resume_inside_an_accumulation_window_under_zero2(store_and_ref, capfd):
    """DeepSpeed ZeRO-2 on CUDA, grad_accum 3, 8 batches an epoch, dropout on: the first epoch ends
    inside the window that began after its 6th batch, so its checkpoint goes on from there
    (trainers.checkpoint.WindowStart: the CUDA generator and the BatchNorm statistics as they were
    then). The resumed run ends near the uninterrupted one's weights: on the CPU they are equal
    (tests/unit/test_engine.py); here cuDNN's autotuned kernels may sum in another order, so each
    tensor only has to agree to 1 % of its norm (not measured yet: the bound is a guess)."""
    pytest.importorskip("deepspeed")
    from indai.trainers.loop import train_loop

    store, ref = store_and_ref
    cfg = config(store, ref, "gpu-window", **{"optim.epochs": 2, "optim.grad_accum": 3, "model.dropout": 0.2,
                                              "deepspeed.strategy": "zero2", "run.resume": True})
    first = train_loop(cfg)
    whole = load(store.get_bytes("checkpoints/gpu-window/final/model.safetensors"))
    meta = store.read_commit("checkpoints/gpu-window/epoch-00000")
    assert meta["step"] == 8 and meta["resume_at"] == {"epoch": 0, "batch": 6, "step": 6}
    for gone in ("checkpoints/gpu-window/epoch-00001", "checkpoints/gpu-window/final"):
        store.delete_prefix(gone)
    capfd.readouterr()
    resumed = train_loop(cfg)
    assert "resumed run gpu-window from epoch-00000 (epoch 0, step 6, batch 6 of the epoch)" in capfd.readouterr().err
    assert resumed["step"] == first["step"] == 16 and resumed["timing"]["steps"] == 10
    again = load(store.get_bytes("checkpoints/gpu-window/final/model.safetensors"))
    drift = {k: float((again[k] - v).float().norm() / v.float().norm().clamp_min(1e-6)) for k, v in whole.items()
             if v.is_floating_point()}
    assert max(drift.values()) < 1e-2, sorted(drift.items(), key=lambda kv: kv[1])[-3:]


@pytest.mark.parametrize("strategy", ["ddp", "zero0", "zero2", "zero3"])
def test_bf16_batchnorm_channels_last_under_each_strategy(store_and_ref, strategy, capfd):
    if strategy != "ddp":
        pytest.importorskip("deepspeed")
    from indai.trainers.engine import deepspeed_config
    from indai.trainers.loop import train_loop

    store, ref = store_and_ref
    cfg = config(store, ref, f"gpu-{strategy}", **{"deepspeed.strategy": strategy})
    ds = deepspeed_config(TrainConfig.model_validate(cfg), cuda=True)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    out = train_loop(cfg)
    assert f"strategy: {strategy}" in capfd.readouterr().err
    assert out["test"]["accuracy"] >= 0.5 and out["test"]["loss"] < 0.8 * math.log(4), out["test"]
    weights = load(store.get_bytes(f"checkpoints/gpu-{strategy}/final/model.safetensors"))
    running = [v for k, v in weights.items() if k.endswith("running_var")]
    assert running and all(torch.isfinite(v).all() for v in running)
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in running)  # BatchNorm statistics were updated


@pytest.mark.parametrize("resident", ["off", "auto"])
def test_prefetched_batches_on_cuda_equal_collated_ones(resident):
    rng = np.random.default_rng(0)
    ds = SplitDataset(samples(40, 3, rng, sensor=(2, 64), image=16, text_len=16), None, 16, ["sensor", "image", "text"])
    cfg = TrainConfig.model_validate({"recipe": "t", "data": {"dataset": "x", "prefetch": 2, "device_resident": resident},
                                      "optim": {"batch_size": 16}, "run": {"name": "t"}})
    order = list(range(39, -1, -1))
    got_feed = feed.batches(ds, order, cfg, torch.device("cuda:0"))
    assert got_feed.resident == (resident == "auto")  # a 40-sample split fits: gathered on the device
    got = list(got_feed)
    assert [len(b["label"]) for b in got] == [16, 16, 8]
    for b, start in zip(got, (0, 16, 32)):
        want = torch.utils.data.default_collate([ds[i] for i in order[start: start + 16]])
        assert b.keys() == want.keys()
        for k in want:
            assert b[k].is_cuda and torch.equal(b[k].cpu(), want[k]), k
        assert b["image"].is_contiguous(memory_format=torch.channels_last)  # auto = on with CUDA
    it = iter(feed.batches(ds, order, cfg, torch.device("cuda:0")))
    next(it)
    it.close()  # an abandoned epoch stops its producer thread instead of hanging


def test_windows_gathered_on_the_device_equal_collated_ones():
    from indai.trainers.synthetic import windowed_split

    ds = windowed_split()
    cfg = TrainConfig.model_validate({"recipe": "t", "data": {"dataset": "x", "device_resident": "on"},
                                      "optim": {"batch_size": 4}, "run": {"name": "t"}})
    order = [7, 3, 19, 0, 11]
    got = list(feed.batches(ds, order, cfg, torch.device("cuda:0")))
    for b, part in zip(got, (order[:4], order[4:])):
        want = torch.utils.data.default_collate([ds[i] for i in part])
        for k in want:
            assert b[k].is_cuda and torch.equal(b[k].cpu(), want[k]), k


def test_a_failing_source_raises_in_the_consumer():
    def broken():
        yield {"x": torch.ones(2)}
        raise ValueError("shard 3 is damaged")

    it = iter(feed.ToDevice(broken(), torch.device("cuda:0"), channels_last=False, depth=2))
    assert torch.equal(next(it)["x"].cpu(), torch.ones(2))
    with pytest.raises(ValueError, match="shard 3 is damaged"):
        next(it)


def test_the_frozen_checksum_is_the_same_on_cuda_as_on_cpu():
    """A checkpoint written on the GPU (frozen LM held in bf16) must resume on another device or
    with the weights in fp32: trainers.checkpoint's checksum is exact integers over bf16 bits."""
    from indai.trainers import checkpoint

    t = torch.randn(3 * checkpoint._CHUNK + 7, generator=torch.Generator().manual_seed(0)) * 0.02
    on_cpu = checkpoint._checksum(t, 0)
    on_cuda = checkpoint._checksum(t.cuda(), 0)
    held_bf16 = checkpoint._checksum(t.cuda().to(torch.bfloat16), 0)
    assert on_cpu.tolist() == on_cuda.cpu().tolist() == held_bf16.cpu().tolist()
