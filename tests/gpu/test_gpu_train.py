"""GPU tier: the same train loop on CUDA (NCCL, bf16 through DeepSpeed's torch_autocast).
Runs on the lent GPU machine only; skipped where CUDA is absent."""
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]


def test_cwru_on_gpu_with_bf16_autocast(tmp_path):
    from indai.platform.config import load_config
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import complete_from_manifest
    from indai.trainers.loop import deepspeed_config, train_loop

    store = open_store(tmp_path / "store")
    name, version, manifest = ingest(REPO / "examples/cwru-0hp/dataset.yaml", store, progress=False)
    cfg = load_config(TrainConfig, REPO / "trainers/recipes/cwru_sensor.yaml",
                      [f"data.dataset={name}@{version}", "optim.epochs=3", "run.name=gpu", "run.launcher=local",
                       "run.use_gpu=true", "run.progress=false"])
    cfg = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})
    assert deepspeed_config(cfg, cuda=True)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    out = train_loop(cfg.model_dump(mode="json"))
    assert out["test"]["accuracy"] >= 0.97
