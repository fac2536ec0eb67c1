"""The same train loop without Ray: `torchrun -m indai.trainers.loop cfg.json` with 2 processes
(gloo), for ZeRO stages 0 and 2 — the path used where Ray is not installed (the GPU machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_torchrun_two_processes(tmp_path, zero_stage):
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store
    from indai.trainers.launch import complete_from_manifest
    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig

    store = open_store(tmp_path / "store")
    name, version, manifest = ingest(REPO / "examples/cwru-0hp/dataset.yaml", store, progress=False)
    cfg = load_config(TrainConfig, REPO / "trainers/recipes/cwru_sensor.yaml",
                      [f"data.dataset={name}@{version}", "optim.epochs=2", f"deepspeed.zero_stage={zero_stage}",
                       "run.name=plain", "run.progress=false"])
    cfg = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2",
                           "-m", "indai.trainers.loop", str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["test_accuracy"] >= 0.9
    # 2 processes share the epoch: 6264 windows / 2 ranks / 64 per batch = 49 steps an epoch
    assert out["step"] == 2 * 49
    assert store.committed_children("checkpoints/plain") == ["epoch-00000", "epoch-00001", "final"]
    files = store.list("checkpoints/plain/epoch-00001")
    if zero_stage == 2:  # optimizer state is partitioned: one shard per rank
        assert sum("optim_states" in f for f in files) == 2, files
