"""The engine and the feed on CPU: the fast-path code (channels_last inputs, autocast settings,
prefetching feed) trains under DeepSpeed; the torch engine resumes to the very weights an
uninterrupted run reaches; batches gathered by index equal what a DataLoader would collate;
the chosen strategy reaches MLflow."""
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from indai.platform.errors import UserError
from indai.platform.storage import open_store
from indai.trainers import feed
from indai.trainers.config import TrainConfig
from indai.trainers.data import SplitDataset
from indai.trainers.loop import train_loop
from indai.trainers.synthetic import samples, windowed_split, write_dataset


def config(store, ref: str, name: str, modalities: list[str], **over) -> dict:
    cfg = {"recipe": "test_engine", "data": {"dataset": ref},
           "model": {"flavour": "debug", "modalities": modalities, "num_classes": 4, "dropout": 0.0,
                     "sensor": {"channels": 2, "length": 128}, "image": {"timm_name": "test_resnet", "size": 32}},
           "optim": {"epochs": 3, "batch_size": 64, "lr": 3e-3},
           "run": {"name": name, "launcher": "local", "progress": False, "resume": False, "timing_skip": 2},
           "store_uri": store.uri}
    for path, value in over.items():
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.fixture(scope="module")
def store_and_ref(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("engine-store"))
    ref, _ = write_dataset(store, "engine-syn", {"train": 512, "test": 128}, classes=4, sensor=(2, 128), image=32)
    return store, ref


def final_weights(store, run: str) -> dict[str, torch.Tensor]:
    return load(store.get_bytes(f"checkpoints/{run}/final/model.safetensors"))


def test_fast_path_trains_under_deepspeed_on_cpu(store_and_ref, capfd):
    """channels_last image inputs into BatchNorm (timm test_resnet, cnn1d sensor), compile off, ZeRO-0."""
    store, ref = store_and_ref
    out = train_loop(config(store, ref, "ds-fast", ["sensor", "image"], **{
        "deepspeed.strategy": "zero0", "run.channels_last": "on", "run.compile": False}))
    assert "strategy: zero0 as configured" in capfd.readouterr().err
    assert out["test"]["accuracy"] >= 0.9, out["test"]
    assert out["test"]["loss"] < 0.5 * math.log(4)  # chance is ln 4
    assert store.read_commit("checkpoints/ds-fast/epoch-00002")["strategy"] == "zero0"
    # DeepSpeed built its CPU ops with this environment's ninja, as Ray's workers do (one build log, one hash)
    assert shutil.which("ninja") == str(Path(sys.executable).parent / "ninja")
    assert any(f.endswith("mp_rank_00_model_states.pt") for f in store.list("checkpoints/ds-fast/epoch-00002"))
    timing = out["timing"]
    assert (timing["steps"], timing["skipped_steps"], timing["steady_steps"]) == (24, 2, 22)
    assert timing["samples_per_s"] == pytest.approx(22 * 64 / timing["steady_seconds"], rel=1e-3)


def test_auto_picks_ddp_and_a_resumed_run_reaches_the_uninterrupted_weights(store_and_ref, capfd):
    store, ref = store_and_ref
    straight = train_loop(config(store, ref, "straight", ["sensor"], **{"optim.epochs": 2}))
    assert "auto chose ddp" in capfd.readouterr().err
    assert store.read_commit("checkpoints/straight/epoch-00001")["strategy"] == "ddp"

    cfg = config(store, ref, "crashed", ["sensor"], **{"optim.epochs": 2, "run.resume": True})
    train_loop(cfg)
    for gone in ("checkpoints/crashed/epoch-00001", "checkpoints/crashed/final"):  # as if it died after epoch 1
        store.delete_prefix(gone)
    resumed = train_loop(cfg)
    assert "resumed run crashed from epoch-00000" in capfd.readouterr().err
    assert resumed["step"] == straight["step"] == 16
    assert resumed["timing"]["steps"] == 8  # only the second epoch ran
    a, b = final_weights(store, "straight"), final_weights(store, "crashed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    with pytest.raises(UserError, match="written with strategy ddp"):
        train_loop(config(store, ref, "crashed", ["sensor"], **{"optim.epochs": 3, "run.resume": True,
                                                                "deepspeed.strategy": "zero2"}))


def windowed_dataset(text_len: int = 16) -> SplitDataset:
    return windowed_split(20, text_len)


def test_gathered_batches_equal_collated_ones():
    ds = windowed_dataset()
    order = [7, 3, 19, 0, 11]
    fast = feed.IndexBatches(ds, order, batch_size=4, pin=False)
    assert fast.fast and len(fast) == 2
    expected = [torch.utils.data.default_collate([ds[i] for i in order[:4]]),
                torch.utils.data.default_collate([ds[i] for i in order[4:]])]
    for got, want in zip(fast, expected):
        assert got.keys() == want.keys() == {"label", "mask", "sensor", "image", "text"}
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

    class WithExtra(SplitDataset):  # a dataset with an input gather does not know: per-sample fallback
        def __getitem__(self, i):
            return {**super().__getitem__(i), "weight": torch.tensor(float(i))}

    extra = WithExtra.__new__(WithExtra)
    extra.__dict__.update(ds.__dict__)
    slow = feed.IndexBatches(extra, order, batch_size=4, pin=False)
    assert not slow.fast
    assert torch.equal(next(iter(slow))["weight"], torch.tensor([7.0, 3.0, 19.0, 0.0]))


def test_a_resident_copy_gathers_the_same_batches_and_stays_on_the_host_without_cuda():
    ds = windowed_dataset()
    order = [7, 3, 19, 0, 11]
    moved = feed.resident(ds, torch.device("cpu"))  # the device copy, on the one device here
    assert torch.is_tensor(moved.starts) and not torch.is_tensor(ds.starts)  # window starts indexed on the device
    for got, want in zip(feed.IndexBatches(moved, order, 4, pin=False), feed.IndexBatches(ds, order, 4, pin=False)):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert feed.split_bytes(ds) == sum(t.numel() * t.element_size() for t in (ds.label, ds.mask, ds.signal, ds.image, ds.text))
    cfg = TrainConfig.model_validate({"recipe": "t", "data": {"dataset": "x", "device_resident": "on"}, "run": {"name": "t"}})
    assert not feed.stays_resident(ds, cfg, torch.device("cpu"))  # the host is where it is already
    assert not feed.batches(ds, order, cfg, torch.device("cpu")).resident


def test_images_arrive_channels_last_and_parameters_stay_contiguous():
    ds = windowed_dataset()
    cfg = TrainConfig.model_validate({"recipe": "t", "data": {"dataset": "x"}, "optim": {"batch_size": 8},
                                      "run": {"name": "t", "channels_last": "on"}})
    batches = list(feed.batches(ds, list(range(20)), cfg, torch.device("cpu")))
    assert [len(b["label"]) for b in batches] == [8, 8, 4]
    image = batches[0]["image"]
    assert image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
    assert torch.equal(image, ds.image[:8])  # same values, other memory layout
    assert batches[0]["sensor"].is_contiguous()  # only 4-D images change layout
    off = list(feed.batches(ds, list(range(20)), cfg.model_copy(update={"run": cfg.run.model_copy(update={"channels_last": "auto"})}),
                            torch.device("cpu")))
    assert off[0]["image"].is_contiguous()  # auto = off without CUDA


def test_strategy_is_logged_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from indai.trainers.engine import log_choice
    from indai.trainers.strategy import choose

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("engine", artifact_location=(tmp_path / "art").as_uri()))
    cfg = TrainConfig.model_validate({"recipe": "t", "data": {"dataset": "x"}, "run": {"name": "t"},
                                      "mlflow_uri": uri, "mlflow_run_id": run.info.run_id})
    choice = choose("auto", 7_000_000_000, 7_000_000_000, 80 * 2**30, 8)
    log_choice(cfg, choice)
    got = client.get_run(run.info.run_id).data
    assert got.params["strategy.chosen"] == "zero2"
    assert got.tags["indai.strategy_reason"] == choice.reason


def test_background_prefetch_keeps_order_raises_and_stops():
    import threading
    import time

    assert list(feed.ahead(range(10), lambda x: x * x, depth=2)) == [x * x for x in range(10)]

    def broken():
        yield 1
        raise ValueError("shard 3 is damaged")

    it = feed.ahead(broken(), lambda x: x, depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="shard 3 is damaged"):
        next(it)

    endless = feed.ahead(iter(int, 1), lambda x: x, depth=2)  # a source that never ends
    assert next(endless) == 0
    endless.close()  # an abandoned epoch: the producer thread must end, not block on a full queue
    deadline = time.time() + 5
    while any(t.name == "indai-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "indai-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_frozen_encoder_stays_out_of_checkpoints_and_a_resume_reaches_the_same_weights(store_and_ref, strategy, tmp_path):
    """The sensor encoder frozen (its tune policy): checkpoints hold the image encoder, fusion and
    head, not it, under the torch engine and under DeepSpeed; a run resumed from them ends with
    the weights of the uninterrupted run."""
    store, ref = store_and_ref
    over = {"optim.epochs": 2, "model.sensor.tune.policy": "frozen", "deepspeed.strategy": strategy, "run.resume": True}
    straight = train_loop(config(store, ref, f"frozen-{strategy}", ["sensor", "image"], **over))
    frozen = store.read_commit(f"checkpoints/frozen-{strategy}/epoch-00001")["frozen"]
    assert frozen and all(n.startswith("encoders.sensor.") for n in frozen)
    folder = store.download_dir(f"checkpoints/frozen-{strategy}/epoch-00001", tmp_path / "checkpoint")
    if strategy == "ddp":
        held = set(load((folder / "model.safetensors").read_bytes()))
    else:  # DeepSpeed's module file: tensors and plain containers, so no unpickling of objects
        held = set(torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"])
    assert not held & set(frozen)
    assert any(k.startswith("encoders.image.") for k in held) and any(k.startswith("head.") for k in held)

    crashed = config(store, ref, f"frozen-{strategy}-crashed", ["sensor", "image"], **over)
    train_loop(crashed)
    for gone in ("epoch-00001", "final"):  # as if it died after the first epoch
        store.delete_prefix(f"checkpoints/frozen-{strategy}-crashed/{gone}")
    resumed = train_loop(crashed)
    assert resumed["step"] == straight["step"] and resumed["timing"]["steps"] == straight["timing"]["steps"] // 2
    a, b = final_weights(store, f"frozen-{strategy}"), final_weights(store, f"frozen-{strategy}-crashed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_under_deepspeed_a_checkpoint_missing_a_trained_tensor_is_refused(store_and_ref):
    """Frozen parameters may be absent from a DeepSpeed checkpoint, nothing else: the same check
    as the torch engine's (trainers.checkpoint.module_loader, DeepSpeed's custom_load_fn)."""
    store, ref = store_and_ref
    over = {"optim.epochs": 1, "model.sensor.tune.policy": "frozen", "deepspeed.strategy": "zero2", "run.resume": True}
    cfg = config(store, ref, "ds-missing", ["sensor", "image"], **over)
    train_loop(cfg)
    store.delete_prefix("checkpoints/ds-missing/final")
    key = "checkpoints/ds-missing/epoch-00000/mp_rank_00_model_states.pt"
    import io

    states = torch.load(io.BytesIO(store.get_bytes(key)), weights_only=True)
    held = [k for k in states["module"] if k.startswith("head.")]
    del states["module"][held[0]]
    buf = io.BytesIO()
    torch.save(states, buf)
    store.put_bytes(key, buf.getvalue())
    with pytest.raises(UserError, match=rf"1 tensor\(s\) missing or unexpected, e.g. {held[0]}"):
        train_loop(config(store, ref, "ds-missing", ["sensor", "image"], **dict(over, **{"optim.epochs": 2})))


# ---- evaluation under ZeRO-3: every forward is a collective --------------------------------------

def _write(store, name: str, labels: dict[str, list[int]]) -> str:
    """A dataset version with these labels per split (sensor windows of 2 x 128)."""
    from indai.platform import datasets

    rng = np.random.default_rng(0)
    writer = datasets.VersionWriter(store, name)
    for split, y in labels.items():
        writer.put_shard(split, 0, dict(samples(len(y), 4, rng, sensor=(2, 128)), label=np.asarray(y, np.int64)))
    version, _ = writer.commit({"member": "synthetic", "constructed": True, "classes": [f"class{i}" for i in range(4)],
                                "modalities": {"sensor": {"channels": ["ch0", "ch1"], "window": 128,
                                                          "norm": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}},
                                "split": {"records": {s: len(y) for s, y in labels.items()}}})
    return f"{name}@{version}"


def _zero3_rank(rank: int, world: int, port: int, configs: list[dict], out_dir: str) -> None:
    import datetime
    import json
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a shared machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    # a deadlock fails the collective after this long, instead of hanging the test for gloo's 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        results = [train_loop(cfg) for cfg in configs]  # the loop keeps the process group it finds
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results, default=str))
    finally:
        dist.destroy_process_group()


def test_zero3_evaluates_shards_of_unequal_size_on_two_ranks(tmp_path):
    """Under ZeRO-3 a rank with one more evaluation batch than the other waited in that forward's
    parameter gather while the other waited in the scorer's all-reduce. Batch 4 on 2 ranks: a
    val split of 9 gives rank 0 two batches and rank 1 one; a test split of 1 gives rank 1 none
    at all; the anomaly task fits its Gaussian on 9 training normals, 2 batches against 1. Every
    sample counts once, the filler forwards not at all. Sensor width 96: two convolution weights of
    the encoder (110,592 and 221,184 elements) are over ZeRO-3's persistence threshold (1e5), so
    they are partitioned and every forward gathers them (the debug model's tensors are all below
    it: ZeRO-3 keeps them whole, and its forwards gather nothing)."""
    import json

    import torch.multiprocessing as mp

    from indai.trainers.loop import _free_port

    store = open_store(tmp_path / "store")
    cls = _write(store, "uneven", {"train": [0, 1, 2, 3] * 8, "val": [0, 1, 2, 3, 0, 1, 2, 3, 0], "test": [2]})
    # anomaly: train keeps its 9 normals (class0); val and test hold normals and anomalies
    anomaly = _write(store, "uneven-anomaly", {"train": [0] * 9 + [1, 2, 3], "val": [0, 0, 0, 0, 0, 1, 2, 0, 3],
                                               "test": [0, 1, 0, 2, 0, 3, 0, 1, 0]})
    over = {"optim.epochs": 1, "optim.batch_size": 4, "deepspeed.strategy": "zero3", "run.log_every": 1000,
            "model.sensor.width": 96}
    configs = [config(store, cls, "zero3-cls", ["sensor"], **over),
               config(store, anomaly, "zero3-anomaly", ["sensor"],
                      **over, **{"model.task": "anomaly", "model.anomaly.normal_class": "class0"})]
    mp.spawn(_zero3_rank, args=(2, _free_port(), configs, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        classified, detected = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert classified["step"] == 4  # 32 training samples, 16 a rank, 4 a batch
        assert classified["val"]["n"] == 9 and sum(map(sum, classified["val"]["confusion"])) == 9
        assert classified["test"]["n"] == 1 and sum(map(sum, classified["test"]["confusion"])) == 1
        test, val = detected["test"], detected["val"]
        assert (test["n"], test["n_normal"], test["n_anomalous"]) == (9, 5, 4)
        assert (val["n"], val["n_normal"], test["calibration_normals"]) == (9, 6, 6)
        assert test["tp"] + test["fp"] + test["fn"] + test["tn"] == 9
    assert store.read_commit("checkpoints/zero3-cls/epoch-00000")["strategy"] == "zero3"
    # the partitioned weights: one shard per rank of the optimizer state
    assert sum("optim_states" in f for f in store.list("checkpoints/zero3-cls/epoch-00000")) == 2


# ---- the LR schedule and the optimizer steps that run -------------------------------------------

@pytest.mark.parametrize("strategy,loader_workers", [("ddp", 0), ("zero0", 0), ("zero2", 0), ("ddp", 1)])
def test_lr_schedule_spans_the_optimizer_steps_that_run_also_after_a_resume(tmp_path, strategy, loader_workers,
                                                                            monkeypatch, capfd):
    """7 batches an epoch, grad_accum 4, 4 epochs: both engines count micro-batches across epoch
    ends, so 28 micro-batches take 7 optimizer steps (not 4 x (7 // 4) = 4, which left the last 3
    steps at learning rate 0). Progress reports micro-batches against micro-batches.

    The first epoch's checkpoint (step 7) lies inside the accumulation window of micro-batches
    5-8, whose gradients no engine saves: a run resumed from it goes on from the window's start
    (epoch 1, batch 4, step 4, with the random generators' state there: dropout is on) and ends
    with the uninterrupted run's weights, under either engine and under ZeRO-2 (gradients
    partitioned). Going on at step 7 would step the window with one micro-batch's gradient. With
    DataLoader workers (data.num_workers 1) the loader draws its workers' seed from a generator of
    its own: from the global one, its first draw in the resumed run shifted the dropout masks."""
    import json

    from indai.trainers import loop
    from indai.trainers.relay import PROGRESS_PREFIX

    built = []
    real_build = loop.build_engine

    def recording_build(model, cfg, d, lr_lambda, *args, **kwargs):
        engine, sched = real_build(model, cfg, d, lr_lambda, *args, **kwargs)
        built.append((engine, sched, lr_lambda))
        return engine, sched

    monkeypatch.setattr(loop, "build_engine", recording_build)
    store = open_store(tmp_path / "store")
    ref, _ = write_dataset(store, "accum", {"train": 28, "test": 8}, classes=4, sensor=(2, 128))
    cfg = config(store, ref, f"accum-{strategy}", ["sensor"], **{
        "optim.epochs": 4, "optim.batch_size": 4, "optim.grad_accum": 4, "deepspeed.strategy": strategy,
        "model.dropout": 0.3, "data.num_workers": loader_workers, "run.log_every": 1, "run.keep_checkpoints": 4,
        "run.resume": True})
    capfd.readouterr()
    out = train_loop(cfg)
    whole = final_weights(store, f"accum-{strategy}")
    engine, sched, factor = built[-1]
    assert out["step"] == 28 and engine.global_steps == 7 and sched.last_epoch == 7
    assert all(factor(k) > 0 for k in range(7)) and factor(7) == 0.0  # the cosine ends with the last step
    events = [json.loads(line[len(PROGRESS_PREFIX):]) for line in capfd.readouterr().out.splitlines()
              if line.startswith(PROGRESS_PREFIX)]
    assert {e["steps"] for e in events} == {28} and max(e["step"] for e in events) == 28
    assert all(e["step"] <= e["steps"] for e in events)

    first = store.read_commit(f"checkpoints/accum-{strategy}/epoch-00000")
    assert first["step"] == 7 and first["resume_at"] == {"epoch": 0, "batch": 4, "step": 4}
    assert "resume_at" not in store.read_commit(f"checkpoints/accum-{strategy}/epoch-00003")  # a window never closed

    for tag in ("epoch-00001", "epoch-00002", "epoch-00003", "final"):  # as if it died after the first epoch (step 7)
        store.delete_prefix(f"checkpoints/accum-{strategy}/{tag}")
    capfd.readouterr()
    resumed = train_loop(cfg)
    assert f"resumed run accum-{strategy} from epoch-00000 (epoch 0, step 4, batch 4 of the epoch)" in capfd.readouterr().err
    engine, sched, _ = built[-1]
    assert resumed["step"] == 28 and resumed["timing"]["steps"] == 24
    assert engine.micro_steps == 28 and engine.global_steps == 7 and sched.last_epoch == 7
    again = final_weights(store, f"accum-{strategy}")
    assert again.keys() == whole.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6, msg=name)


# ---- the gradient norm every engine reports ------------------------------------------------------

@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_every_engine_reports_the_pre_clip_gradient_norm_and_clips_alike(tmp_path, capfd, clip):
    """The same run (one rank, same data and seed) under the torch engine (ddp), DeepSpeed ZeRO-0
    (clipped by indai in the optimizer's pre-step hook, since DeepSpeed keeps no norm there) and
    ZeRO-2 (DeepSpeed's own norm), with gradients clipped far below their norm, and not clipped
    (optim.clip 0: DeepSpeed's own default would clip at 1.0, below these norms): each optimizer
    step's `grad_norm` in the progress lines is the same before-clipping norm, and the losses that
    follow, which depend on every earlier step, are the same."""
    import json

    from indai.trainers.relay import PROGRESS_PREFIX

    store = open_store(tmp_path / "store")
    ref, _ = write_dataset(store, "norms", {"train": 64, "test": 16}, classes=4, sensor=(2, 128))
    seen = {}
    for strategy in ("ddp", "zero0", "zero2"):
        capfd.readouterr()
        train_loop(config(store, ref, f"norm-{strategy}", ["sensor"], **{
            "optim.epochs": 1, "optim.batch_size": 8, "optim.grad_accum": 2, "optim.clip": clip,
            "deepspeed.strategy": strategy, "run.log_every": 1}))
        events = [json.loads(line[len(PROGRESS_PREFIX):]) for line in capfd.readouterr().out.splitlines()
                  if line.startswith(PROGRESS_PREFIX) and '"step"' in line]
        seen[strategy] = {e["step"]: (e.get("grad_norm"), e["loss"]) for e in events if "val_accuracy" not in e}
    ddp = seen["ddp"]
    assert sorted(ddp) == list(range(1, 9))  # 8 micro-batches, 4 optimizer steps, each logged
    assert ddp[1][0] is None and all(ddp[s][0] is not None for s in range(2, 9))  # none before the first step
    assert min(ddp[s][0] for s in range(2, 9)) > max(clip, 1.0)  # clipping (at 0.05, or DeepSpeed's 1.0) would bite
    for strategy in ("zero0", "zero2"):
        assert sorted(seen[strategy]) == sorted(ddp), strategy
        for step, (norm, loss) in ddp.items():
            other_norm, other_loss = seen[strategy][step]
            assert math.isclose(other_loss, loss, rel_tol=1e-4, abs_tol=1e-5), (strategy, step, other_loss, loss)
            assert (other_norm is None) == (norm is None), (strategy, step)
            if norm is not None:
                assert math.isclose(other_norm, norm, rel_tol=1e-4), (strategy, step, other_norm, norm)


@pytest.mark.parametrize("where", ["window start", "mid-epoch"])
def test_a_resumed_run_logs_each_step_once_and_the_whole_epochs_loss(tmp_path, where, monkeypatch, capfd):
    """A run dies right after a checkpoint from which it goes on inside an epoch: an accumulation
    window's start before the checkpoint (7 batches an epoch, grad_accum 4: the first epoch's
    checkpoint, step 7, goes on from step 4) or a mid-epoch checkpoint (run.checkpoint_every_steps
    4 of 8 batches). Resumed into the same MLflow run, every step's metrics are there once, with
    the values of a run that never stopped: the steps run again (5-7) are not logged a second time,
    and the resumed epoch's loss is the whole epoch's (the sum before the resume point is carried
    in the checkpoint), not the loss of the batches after the restart."""
    from mlflow.tracking import MlflowClient

    from indai.trainers import checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("resume-metrics", artifact_location=(tmp_path / "art").as_uri())
    store = open_store(tmp_path / "store")
    if where == "window start":
        train, over, dies_after, batches = 28, {"optim.grad_accum": 4}, checkpoint.epoch_tag(0), 7
    else:
        train, over, dies_after, batches = 32, {"run.checkpoint_every_steps": 4}, checkpoint.mid_epoch_tag(0, 4), 8
    ref, _ = write_dataset(store, "resume-metrics", {"train": train, "test": 8}, classes=4, sensor=(2, 128))

    def run_config(name: str) -> dict:
        run_id = client.create_run(experiment, run_name=name).info.run_id
        return config(store, ref, name, ["sensor"], mlflow_uri=uri, mlflow_run_id=run_id, **over, **{
            "optim.epochs": 3, "optim.batch_size": 4, "model.dropout": 0.3, "run.log_every": 1, "run.resume": True})

    def epoch_lines(err: str) -> list[str]:
        return [line.split(" (")[0] for line in err.splitlines() if line.startswith("epoch ")]

    whole = run_config("whole")
    capfd.readouterr()
    train_loop(whole)
    whole_lines = epoch_lines(capfd.readouterr().err)

    class Died(Exception):
        pass

    real_save = checkpoint.save

    def save_then_die(engine, store, run_name, tag, *args, **kwargs):
        real_save(engine, store, run_name, tag, *args, **kwargs)
        if tag == dies_after:
            raise Died(tag)

    stopped = run_config("stopped")
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Died):
        train_loop(stopped)
    monkeypatch.setattr(checkpoint, "save", real_save)
    held = store.read_commit(f"checkpoints/stopped/{dies_after}")
    assert held["step"] == (7 if where == "window start" else 4)
    assert ("resume_at" in held) == (where == "window start") and held["epoch_sums"][0] > 0
    capfd.readouterr()
    train_loop(stopped)
    err = capfd.readouterr().err
    assert "resumed run stopped from " + dies_after + " (epoch 0, step 4, batch 4 of the epoch)" in err
    assert epoch_lines(err) == whole_lines  # the resumed first epoch prints the whole epoch's loss

    total = 3 * batches
    for key, steps in (("train_loss", list(range(1, total + 1))), ("lr", list(range(1, total + 1))),
                       ("epoch_train_loss", [batches, 2 * batches, total]), ("test_accuracy", [total])):
        want = sorted((m.step, m.value) for m in client.get_metric_history(whole["mlflow_run_id"], key))
        got = sorted((m.step, m.value) for m in client.get_metric_history(stopped["mlflow_run_id"], key))
        assert [s for s, _ in got] == steps, key  # each step once
        assert [s for s, _ in want] == steps, key
        for (s, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), (key, s)
