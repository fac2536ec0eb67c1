"""The report writer's loss is the mean over every response token of an optimizer step, however
the step's samples are cut into micro-batches and ranks (trainers/models/report_writer/train.py
TokenWindows). The same 32 instruction records (responses of very different lengths) are trained
for two optimizer steps three ways, each by `torchrun -m indai.trainers.loop cfg.json`:

- one process, one batch of 32 (torch data parallel engine): the reference;
- one process, 4 accumulated micro-batches of 8;
- two processes (gloo), DeepSpeed ZeRO-2, 2 accumulated micro-batches of 8 on each.

Each step's gradient norm (before clipping, as the engines report it in the progress lines) and
the trained adapters must come out the same. Averaging the micro-batches' means instead, as the
engines do by themselves, gives each run another gradient."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROGRESS = "[indai] progress "


@pytest.fixture
def records(tmp_path, monkeypatch):
    from indai.platform import instruct, mirror
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store
    from indai.trainers.models.report_writer.tiny import build_tiny_lm

    tmp = tmp_path
    monkeypatch.setenv("INDAI_HOME", str(tmp / "home"))  # the mirror's local cache
    store = open_store(tmp / "store")
    mirror.add(store, "tiny-llama-rw", [build_tiny_lm(tmp / "tiny")], "hf", architecture=None, source="tiny.py",
               licence="Apache-2.0")
    name, version, _ = ingest(REPO / "examples/nestor-excavators/dataset.yaml", store, progress=False)
    name, version, manifest = instruct.build(store, instruct.InstructSpec(sources=[f"{name}@{version}"], max_records=16),
                                             progress=False)
    assert manifest["split"]["records"]["train"] == 32
    return tmp, store, f"{name}@{version}", manifest


def train(records, run: str, procs: int, *overrides: str) -> tuple[list[float], dict]:
    """(each optimizer step's gradient norm, the trained tensors) of a 2-epoch run."""
    from safetensors.torch import load_file

    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.models.report_writer.train import complete_from_manifest

    tmp, store, ref, manifest = records
    cfg = load_config(TrainConfig, REPO / "trainers/recipes/report_writer_debug.yaml",
                      [f"data.dataset={ref}", "optim.epochs=2", "optim.warmup_frac=0", "model.lora.dropout=0",
                       f"run.name={run}", "run.progress=false", "run.log_every=1", *overrides])
    cfg = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})
    path = tmp / f"{run}.json"
    path.write_text(cfg.model_dump_json())
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={procs}", "-m", "indai.trainers.loop", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(ln[len(PROGRESS):]) for ln in done.stdout.splitlines() if ln.startswith(PROGRESS)]
    norms: dict[int, float] = {}
    for e in events:  # the last line of each epoch that names a gradient norm: that epoch's one optimizer step
        if "grad_norm" in e:
            norms[e["epoch"]] = e["grad_norm"]
    local = store.download_dir(f"checkpoints/{run}/final", tmp / run)
    return [norms[1], norms[2]], load_file(str(local / "trained.safetensors"))


def test_a_step_s_loss_is_per_token_across_micro_batches_and_ranks(records):
    tmp, store, ref, manifest = records
    from indai.platform import datasets
    from indai.platform.instruct import read_records

    from tokenizers import Tokenizer

    responses = read_records(store, datasets.parse_ref(ref), "train", manifest)["response"]
    tokenizer = Tokenizer.from_file(str(tmp / "tiny" / "tokenizer.json"))
    tokens = np.array([len(tokenizer.encode(str(r)).ids) for r in responses])
    assert tokens.max() >= 2 * tokens.min(), tokens  # precondition: the micro-batches differ in response tokens

    one_batch = train(records, "rw-loss-one", 1, "deepspeed.strategy=ddp", "optim.batch_size=32", "optim.grad_accum=1")
    accumulated = train(records, "rw-loss-accum", 1, "deepspeed.strategy=ddp", "optim.batch_size=8", "optim.grad_accum=4")
    two_ranks = train(records, "rw-loss-ranks", 2, "deepspeed.strategy=zero2", "optim.batch_size=8", "optim.grad_accum=2")

    ref_norms, ref_weights = one_batch
    assert all(n > 0 for n in ref_norms), ref_norms
    for norms, weights in (accumulated, two_ranks):
        assert np.allclose(norms, ref_norms, rtol=1e-4), (norms, ref_norms)
        assert weights.keys() == ref_weights.keys()
        # Adam's first steps move a parameter by about lr * sign(gradient) wherever the gradient is
        # far above its epsilon, so the rounding of another summation order can move a single
        # near-zero component by up to ~lr (seen: 1.3e-4 at most, lr 0.03); each tensor as a whole
        # must agree (seen: 7e-5 relative). The norms above agree to ~1e-6 relative; averaging the
        # micro-batches' means instead moves them by 0.6 %.
        drift = {k: float((weights[k] - ref_weights[k]).norm() / ref_weights[k].norm().clamp_min(1e-12)) for k in ref_weights}
        assert max(drift.values()) < 1e-3, sorted(drift.items(), key=lambda kv: kv[1])[-3:]


def test_a_run_resumed_inside_an_accumulation_window_ends_with_the_uninterrupted_weights(records, capfd):
    """32 records in micro-batches of 8 with grad_accum 3, 3 epochs, one process, in this one: 4
    micro-batches an epoch, so the first epoch ends inside the window of micro-batches 4-6, which
    began at its 4th batch. Its checkpoint records that start (trainers.checkpoint.WindowStart),
    and a run resumed from it (the later checkpoints deleted, as if it died after the first epoch)
    goes on from there, halfway into the first epoch, with LoRA dropout drawing what the
    uninterrupted run drew: the adapters come out as the uninterrupted run's, and the resumed first
    epoch's loss is the whole epoch's (the sums of its first 3 batches are in the checkpoint)."""
    from safetensors.torch import load

    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.loop import train_loop
    from indai.trainers.models.report_writer.train import complete_from_manifest

    tmp, store, ref, manifest = records
    cfg = load_config(TrainConfig, REPO / "trainers/recipes/report_writer_debug.yaml",
                      [f"data.dataset={ref}", "optim.epochs=3", "optim.batch_size=8", "optim.grad_accum=3",
                       "deepspeed.strategy=ddp", "model.lora.dropout=0.2", "run.name=rw-window", "run.launcher=local",
                       "run.progress=false", "run.keep_checkpoints=3"])
    config = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri}).model_dump(mode="json")
    def epoch_lines() -> list[str]:
        return [line.split(" (")[0] for line in capfd.readouterr().err.splitlines() if line.startswith("epoch ")]

    capfd.readouterr()
    assert train_loop(config)["step"] == 12
    whole_lines = epoch_lines()
    whole = load(store.get_bytes("checkpoints/rw-window/final/trained.safetensors"))
    meta = store.read_commit("checkpoints/rw-window/epoch-00000")
    assert meta["step"] == 4 and meta["resume_at"] == {"epoch": 0, "batch": 3, "step": 3}
    loss_sum, tokens = meta["epoch_sums"]  # the first 3 batches' summed loss and response tokens
    assert loss_sum > 0 and tokens == int(tokens) > 0
    for tag in ("epoch-00001", "epoch-00002", "final"):
        store.delete_prefix(f"checkpoints/rw-window/{tag}")
    assert train_loop(config)["step"] == 12
    assert len(whole_lines) == 3 and epoch_lines() == whole_lines  # "epoch 1/3: loss ..., val loss ...", each epoch
    again = load(store.get_bytes("checkpoints/rw-window/final/trained.safetensors"))
    assert again.keys() == whole.keys() and any("lora_B" in k and v.abs().sum() > 0 for k, v in whole.items())
    for name, tensor in whole.items():
        np.testing.assert_allclose(again[name].numpy(), tensor.numpy(), rtol=0, atol=1e-6, err_msg=name)
