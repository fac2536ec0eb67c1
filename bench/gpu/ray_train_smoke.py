"""Ray Train + Ray Data smoke check for the carried, trimmed Ray (bench/gpu/make_carry.sh).

Proves that the trimmed Ray tree still starts a local cluster, streams a Ray Data dataset
into a TorchTrainer worker and returns its reported metrics and checkpoint, before anything
bigger is run on it. Here (CPU) it checks the trimming rule; on the lent GPU machine, with
--gpu, that the worker gets the GPU and NCCL comes up.

Usage (after `source bench/gpu/setup.sh`): python3 bench/gpu/ray_train_smoke.py [--gpu]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time


def train_one_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        losses = []
        for batch in shard.iter_torch_batches(batch_size=8, device=device):
            loss = ((model(batch["x"].float()).squeeze(-1) - batch["y"].float()) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with tempfile.TemporaryDirectory() as folder:
            torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
            ray.train.report({"epoch": epoch, "loss": sum(losses) / len(losses), "device": str(device),
                              "backend": dist.get_backend()},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))


def main() -> int:
    use_gpu = "--gpu" in sys.argv
    started = time.time()
    import ray
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(logging_level="WARNING")
    rows = [{"x": [i / 64, 1.0, 0.0, 0.5], "y": i / 32} for i in range(64)]
    dataset = ray.data.from_items(rows)
    result = TorchTrainer(
        train_one_worker, train_loop_config={"epochs": 2}, datasets={"train": dataset},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu),
        run_config=RunConfig(name="smoke", storage_path=tempfile.mkdtemp(prefix="ray-smoke-")),
    ).fit()
    ray.shutdown()
    metrics = result.metrics or {}
    print(f"ray {ray.__version__} from {os.path.dirname(ray.__file__)}: metrics {metrics}, "
          f"checkpoint {result.checkpoint is not None}, {time.time() - started:.1f} s")
    expected_device = "cuda" if use_gpu else "cpu"
    ok = metrics.get("epoch") == 1 and metrics.get("device", "").startswith(expected_device) and result.checkpoint
    print("ray_train_smoke:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
