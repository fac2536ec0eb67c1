"""The training configuration: everything the train loop needs, typed and validated.

A recipe YAML loads into TrainConfig; `key=value` overrides apply on top. The train loop
receives the config as a plain dict (Ray ships it to workers) and validates it again, so a
worker never runs on fields it did not check.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from indai.platform.config import Strict
from indai.trainers.models.multimodal.config import ModelConfig
from indai.trainers.models.report_writer.config import ReportWriterConfig

def _family(value) -> str:
    """Which model config a recipe's `model:` is: its `family` (recipes before families say none)."""
    family = value.get("family") if isinstance(value, dict) else getattr(value, "family", None)
    return family or "multimodal"


AnyModelConfig = Annotated[Union[Annotated[ModelConfig, Tag("multimodal")], Annotated[ReportWriterConfig, Tag("report_writer")]],
                           Discriminator(_family)]

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
    prefetch: int = Field(default=2, ge=1, le=16, description="batches gathered, pinned and copied to the GPU ahead of the "
                                                              "step on a side stream (CUDA only)")
    device_resident: Literal["auto", "on", "off"] = Field(
        default="auto", description="keep an in-memory split on the GPU and gather each batch there (no host-to-device "
                                    "copy per step); auto: when the split takes at most a quarter of the free GPU memory")
    image_size: int | None = Field(default=None, ge=16, le=1024,
                                   description="train and serve the model at this square image size: the dataset's images are "
                                               "resized (bilinear, as serving resizes requests) when loaded into memory; "
                                               "default: the size they were ingested at")


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
    strategy: Literal["auto", "ddp", "zero0", "zero1", "zero2", "zero3", "zero3_offload"] = Field(
        default="auto", description="auto: the cheapest strategy whose model states fit in state_memory_fraction of the "
                                    "free device memory (ddp, then zero2, zero3, zero3_offload; trainers.strategy), logged "
                                    "with its reason; ddp: torch data parallel without DeepSpeed; zeroN: DeepSpeed ZeRO stage N")
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        default=None, description="older recipes: an explicit DeepSpeed ZeRO stage, the same as strategy zeroN "
                                  "(0 plain data parallel, 2 shards optimizer state and gradients, 3 also parameters)")
    state_memory_fraction: float = Field(default=0.5, gt=0, le=1, description="auto: share of the free device memory the "
                                                                                 "model states may take; the rest is for activations")
    bf16: Literal["auto", "on", "off"] = Field(default="auto", description="bf16 through torch autocast (DeepSpeed's torch_autocast, "
                                                                           "never its bf16 mode, which breaks BatchNorm); auto = on with CUDA")

    @model_validator(mode="after")
    def _one_request(self):
        if self.zero_stage is not None and self.strategy not in ("auto", f"zero{self.zero_stage}") and not (
                self.zero_stage == 3 and self.strategy == "zero3_offload"):
            raise ValueError(f"deepspeed.zero_stage {self.zero_stage} contradicts deepspeed.strategy {self.strategy}: set only one")
        return self


class RunConfig(Strict):
    name: str = Field(description="run name; checkpoints live under checkpoints/<name>/ and a re-run resumes from them")
    experiment: str = Field(default="indai", description="MLflow experiment")
    register_as: str | None = Field(default=None, description="registered model name (None: do not register)")
    alias: str | None = Field(default=None, description="registry alias to label the new version with, e.g. candidate; "
                                                       "members are served what `indai model promote` records, never this label")
    launcher: Literal["ray", "local"] = Field(default="ray", description="ray: Ray Train TorchTrainer; local: this process (or torchrun)")
    process: str = Field(default="", pattern=r"^([a-z0-9][a-z0-9_-]{0,63})?$", description="the member's process the model serves (KPI report)")
    workers: int = Field(default=2, ge=1, le=1024, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints")
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1, description="also checkpoint every this many train steps (micro-batches) inside an epoch, so a "
                                        "restart loses at most this many steps: it resumes at that position of the epoch's "
                                        "sample order; a multiple of optim.grad_accum; needs the memory loader (a streamed "
                                        "epoch has no position to resume at); None: at epoch ends only")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1, description="Ray Train restarts after a worker failure (-1: unlimited)")
    resume: bool = Field(default=True, description="continue from the run's latest committed checkpoint if there is one; "
                                                    "false: start from nothing, refused when the run already has "
                                                    "checkpoints (resume it, or choose a new run.name)")
    seed: int = 0
    log_every: int = Field(default=25, ge=1, description="steps between metric batches sent to MLflow")
    progress: bool = True
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="the least severe of Ray Train's own messages shown in the output (launcher ray): "
                                       "INFO adds the resources requested, the worker group's start and each report, as Ray prints "
                                       "them by default (Ray's session folder keeps its own under logs/train/ at any level)")
    compile: bool = Field(default=False, description="torch.compile the model inside the engine (pays on GPU for long runs; "
                                                     "the first steps compile). The report writer compiles by regions: "
                                                     "each decoder layer and prefix encoder")
    channels_last: Literal["auto", "on", "off"] = Field(default="auto", description="image inputs in channels_last memory format "
                                                                                     "(parameters stay contiguous); auto = on with CUDA")
    timing_skip: int = Field(default=10, ge=0, description="steps left out of the steady-state throughput the loop reports "
                                                           "(compilation, allocator and cuDNN warm-up)")
    profile_steps: int = Field(default=0, ge=0, le=200, description="record this many train steps after the warm-up "
                                                                  "(timing_skip) with torch.profiler: a trace per rank beside the "
                                                                  "checkpoints, and a summary (ms per step, how busy the GPU "
                                                                  "was, the costliest operators) in the log, result and MLflow; "
                                                                  "0: off")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME_RE.fullmatch(v):
            raise ValueError("run name must be lower-case letters, digits, '.', '_' or '-' (at most 64)")
        return v

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.fullmatch(v):
            raise ValueError("model name must be letters, digits, '.', '_' or '-' (at most 128)")
        return v


class CompareConfig(Strict):
    """Fine-tuned against from scratch (trainers.compare): the same recipe, dataset version, split and seed."""

    scratch: bool = Field(default=False, description="also train the recipe from scratch, under one parent MLflow run with "
                                                     "a comparison table (the same as `indai train --compare-scratch`)")
    scratch_overrides: list[str] = Field(default_factory=list, max_length=32,
                                         description="key.path=value overrides of the from-scratch run, applied after every "
                                                     "`pretrained` became null and every tune policy full, e.g. "
                                                     "model.text.kind=byte_transformer")


class TrainConfig(Strict):
    recipe: str = Field(description="recipe name, recorded with the run and the model")
    data: DataConfig
    model: AnyModelConfig = Field(default_factory=ModelConfig, description="the model family's config, chosen by `family` "
                                                                           "(multimodal, the default, or report_writer)")
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    run: RunConfig
    compare: CompareConfig = Field(default_factory=CompareConfig, description="fine-tuned against from scratch")
    store_uri: str | None = Field(default=None, description="filled by the launcher from the platform settings")
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None

    @model_validator(mode="after")
    def _step_checkpoints(self):
        every = self.run.checkpoint_every_steps
        if every is not None and self.model.family == "report_writer":
            raise ValueError("run.checkpoint_every_steps: the report writer checkpoints at epoch ends only; drop it "
                             "or use run.checkpoint_every")
        if every is not None and every % self.optim.grad_accum:
            raise ValueError(f"run.checkpoint_every_steps {every} must be a multiple of optim.grad_accum "
                             f"{self.optim.grad_accum}: a checkpoint between accumulation steps would lose their gradients")
        return self
