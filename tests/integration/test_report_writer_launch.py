"""The report writer without Ray: `torchrun -m indai.trainers.loop cfg.json` with 2 processes
(gloo) under DeepSpeed ZeRO-3 — parameters sharded across the ranks, LoRA adapters inside —
then the same run again with more epochs, which resumes from its last checkpoint. This is the
path the GPU machine uses (no Ray there)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_zero3_two_processes_and_resume(tmp_path, monkeypatch):
    from indai.platform import instruct, mirror
    from indai.platform.config import load_config
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store
    from indai.trainers.config import TrainConfig
    from indai.trainers.models.report_writer.tiny import build_tiny_lm
    from indai.trainers.models.report_writer.train import complete_from_manifest

    monkeypatch.setenv("INDAI_HOME", str(tmp_path / "home"))  # the mirror's local cache
    store = open_store(tmp_path / "store")
    mirror.add(store, "tiny-llama-rw", [build_tiny_lm(tmp_path / "tiny")], "hf", architecture=None, source="tiny.py",
               licence="Apache-2.0")
    name, version, _ = ingest(REPO / "examples/nestor-excavators/dataset.yaml", store, progress=False)
    name, version, manifest = instruct.build(store, instruct.InstructSpec(sources=[f"{name}@{version}"], max_records=16),
                                             progress=False)
    assert manifest["split"]["records"]["train"] == 32

    def run(epochs: int, *extra: str) -> subprocess.CompletedProcess:
        cfg = load_config(TrainConfig, REPO / "trainers/recipes/report_writer_debug.yaml",
                          [f"data.dataset={name}@{version}", f"optim.epochs={epochs}", "optim.batch_size=8",
                           "deepspeed.strategy=zero3", "run.name=plain-rw", "run.progress=false", *extra])
        cfg = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})
        path = tmp_path / "cfg.json"
        path.write_text(cfg.model_dump_json())
        torchrun = Path(sys.executable).parent / "torchrun"
        done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "indai.trainers.loop", str(path)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = run(1, "run.timing_skip=0", "run.profile_steps=2")
    assert "strategy: zero3 as configured" in first.stderr
    # 32 records / 2 ranks / 8 per batch = 2 steps an epoch
    result = json.loads([ln for ln in first.stdout.splitlines() if ln.startswith("{")][-1])
    assert result["step"] == 2
    # run.profile_steps: both steps of each rank recorded, one trace per rank beside the checkpoints
    assert result["profile"]["steps"] == 2 and result["profile"]["top"], result["profile"]
    assert "[indai] profile: 2 step(s) from step 0" in first.stderr
    assert {f"checkpoints/plain-rw/profile/rank-{r}.trace.json.gz" for r in (0, 1)} <= set(store.list("checkpoints/plain-rw/profile"))
    files = store.list("checkpoints/plain-rw/epoch-00000")
    assert sum("zero_pp_rank" in f and "model_states" in f for f in files) == 2, files  # parameters sharded: one file per rank
    # the frozen LM is not in it (the adapters and prefix encoders are): it is less than a bf16 copy of the LM
    frozen = store.read_commit("checkpoints/plain-rw/epoch-00000")["frozen"]
    assert frozen and all(n.startswith("lm.") and "lora_" not in n for n in frozen)
    held = store.download_dir("checkpoints/plain-rw/epoch-00000", tmp_path / "epoch-00000")
    size = sum(f.stat().st_size for f in held.rglob("*") if f.is_file())
    # beside the weights, each rank's model-states file carries the random generators' state (a
    # fixed ~7 KB, trainers.checkpoint.rng_state), which this toy LM is small enough to feel
    from indai.trainers import checkpoint as ckpt

    rng_bytes = len(json.dumps(ckpt.rng_state())) * sum("model_states" in f for f in files)
    assert size - rng_bytes < 2 * sum(v[0] for v in frozen.values()), (size, rng_bytes)
    again = run(2)
    assert "resumed run plain-rw from epoch-00000 (epoch 1, step 2)" in again.stderr
    assert "epoch 2/2" in again.stderr and "epoch 1/2" not in again.stderr
    assert json.loads([ln for ln in again.stdout.splitlines() if ln.startswith("{")][-1])["step"] == 4
    assert store.is_committed("checkpoints/plain-rw/final")
    from safetensors.torch import load_file

    local = store.download_dir("checkpoints/plain-rw/final", tmp_path / "final")
    trained = load_file(str(local / "trained.safetensors"))
    assert trained and all("lora_" in k or k.startswith("prefix.") for k in trained)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # the gathered adapters learned
