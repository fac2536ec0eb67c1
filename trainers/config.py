"""The training configuration: everything the train loop needs, typed and validated.

A recipe YAML loads into TrainConfig; `key=value` overrides apply on top. The train loop
receives the config as a plain dict (Ray ships it to workers) and validates it again, so a
worker never runs on fields it did not check.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from indai.platform.config import Strict
from indai.trainers.models.multimodal.config import ModelConfig

RUN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DataConfig(Strict):
    dataset: str = Field(description="dataset reference: name, name@latest or name@<version>")
    num_workers: int = Field(default=0, ge=0, le=16, description="DataLoader worker processes per trainer")
    loader: Literal["auto", "memory", "stream"] = Field(
        default="auto", description="stream: the train split through Ray Data from the object store (Ray launcher); "
                                    "memory: loaded whole; auto: stream when the train split is over stream_above_mb")
    stream_above_mb: float = Field(default=2048, ge=0, description="auto streams a train split larger than this")
    shuffle_buffer: int = Field(default=4096, ge=0, description="samples in each worker's local shuffle buffer when streaming")


class OptimConfig(Strict):
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-3, gt=0, le=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_frac: float = Field(default=0.05, ge=0, lt=1, description="share of steps with linear warm-up, then cosine decay")
    clip: float = Field(default=1.0, ge=0, description="gradient clipping norm (0 = off)")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="ZeRO stage: 0 plain data parallel, 2 shards optimizer state and gradients, 3 also parameters")
    bf16: Literal["auto", "on", "off"] = Field(default="auto", description="bf16 autocast through DeepSpeed's torch_autocast; auto = on with CUDA")


class RunConfig(Strict):
    name: str = Field(description="run name; checkpoints live under checkpoints/<name>/ and a re-run resumes from them")
    experiment: str = Field(default="indai", description="MLflow experiment")
    register_as: str | None = Field(default=None, description="registered model name (None: do not register)")
    alias: str | None = Field(default=None, description="alias to point at the new version, e.g. champion (or use `indai model promote`)")
    launcher: Literal["ray", "local"] = Field(default="ray", description="ray: Ray Train TorchTrainer; local: this process (or torchrun)")
    process: str = Field(default="", pattern=r"^([a-z0-9][a-z0-9_-]{0,63})?$", description="the member's process the model serves (KPI report)")
    workers: int = Field(default=2, ge=1, le=1024, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1, description="Ray Train restarts after a worker failure (-1: unlimited)")
    resume: bool = Field(default=True, description="continue from the run's latest committed checkpoint if there is one")
    seed: int = 0
    log_every: int = Field(default=25, ge=1, description="steps between metric batches sent to MLflow")
    progress: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError("run name must be lower-case letters, digits, '.', '_' or '-' (at most 64)")
        return v

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.match(v):
            raise ValueError("model name must be letters, digits, '.', '_' or '-' (at most 128)")
        return v


class TrainConfig(Strict):
    recipe: str = Field(description="recipe name, recorded with the run and the model")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    run: RunConfig
    store_uri: str | None = Field(default=None, description="filled by the launcher from the platform settings")
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
