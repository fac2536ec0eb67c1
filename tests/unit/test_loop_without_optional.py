"""The GPU machine has no Ray, no MLflow and (until the GPU script installs it) no DeepSpeed:
the train loop must import and train there. A subprocess blocks those imports outright."""
import json
import subprocess
import sys
import textwrap

from indai.platform.storage import open_store
from indai.trainers.synthetic import write_dataset

BLOCKER = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
""")

IMPORT_ONLY = BLOCKER + textwrap.dedent("""
    import indai.trainers.loop
    print(json.dumps({m: m in sys.modules for m in ("mlflow", "ray", "deepspeed")}))
""")

TRAIN = BLOCKER + textwrap.dedent("""
    import torch.distributed as dist
    from indai.trainers.loop import train_loop
    # a file rendezvous: no TCP port to race other tests for (the loop keeps a group it finds)
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2] + ".pg", rank=0, world_size=1)
    out = train_loop(json.loads(open(sys.argv[2]).read()))
    print(json.dumps({"step": out["step"], "accuracy": out["test"]["accuracy"],
                      "loaded": [m for m in ("mlflow", "ray", "deepspeed") if m in sys.modules]}))
""")


def run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loop_imports_with_mlflow_and_ray_blocked():
    assert run(IMPORT_ONLY, "mlflow,ray") == {"mlflow": False, "ray": False, "deepspeed": False}


def test_loop_trains_with_mlflow_ray_and_deepspeed_blocked(tmp_path):
    store = open_store(tmp_path / "store")
    ref, _ = write_dataset(store, "blocked", {"train": 256, "test": 64}, classes=4, sensor=(2, 128))
    cfg = {"recipe": "t", "data": {"dataset": ref},
           "model": {"flavour": "debug", "modalities": ["sensor"], "num_classes": 4, "sensor": {"channels": 2, "length": 128}},
           "optim": {"epochs": 2, "batch_size": 64},
           "run": {"name": "blocked", "launcher": "local", "progress": False, "log_every": 1},  # log_every 1: metrics every step
           "store_uri": store.uri}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = run(TRAIN, "mlflow,ray,deepspeed", str(path))
    assert out["step"] == 8 and out["loaded"] == []
    assert 0 <= out["accuracy"] <= 1
    assert store.committed_children("checkpoints/blocked") == ["epoch-00000", "epoch-00001", "final"]
