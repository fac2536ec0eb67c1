"""Typed configuration of the report writer: a causal LM from the weight mirror with sensor and
image encoders whose outputs become prefix embeddings of the LM, tuned with LoRA."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from indai.platform.config import Strict
from indai.trainers.models.checks import check_sensor, check_timm_name
from indai.trainers.models.presets import with_flavour

MIRROR_NAME = r"^[a-z0-9][a-z0-9._-]{0,127}$"
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class LoraSpec(Strict):
    """peft LoRA on the LM's linear layers; the LM's own weights stay frozen."""

    r: int = Field(default=16, ge=1, le=1024, description="rank of the adapter matrices")
    alpha: float = Field(default=32.0, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=32,
                               description="names of the LM's linear modules that get adapters (Llama/Qwen: q_proj, "
                                           "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")

    @field_validator("targets")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not MODULE_NAME.match(t)]
        if bad:
            raise ValueError(f"lora.targets {bad} are not module names like q_proj")
        return v


class SensorPrefixConfig(Strict):
    kind: Literal["cnn1d", "patch_transformer"] = Field(default="cnn1d", description="registered sensor encoder (trainers.models.multimodal)")
    channels: int = Field(default=1, ge=1, description="set from the dataset manifest")
    length: int = Field(default=1024, ge=16, description="samples per window; set from the manifest")
    width: int = Field(default=32, ge=4, description="base number of filters / hidden size")
    patch: int = Field(default=16, ge=2, description="patch size (patch_transformer)")
    layers: int = Field(default=2, ge=1, description="transformer layers (patch_transformer)")
    tokens: int = Field(default=8, ge=1, le=256, description="prefix embeddings the window becomes")

    @model_validator(mode="after")
    def _fits_the_encoder(self):
        # the multimodal family's sensor encoders: the same limits (trainers.models.checks)
        check_sensor(self.kind, self.length, self.width, self.patch)
        return self


class ImagePrefixConfig(Strict):
    timm_name: str = Field(default="test_resnet", description="timm architecture (lower-case letters, digits, '_', '.')")
    size: int = Field(default=64, ge=16, le=1024, description="square input size; set from the manifest")
    pretrained: str | None = Field(default=None, pattern=MIRROR_NAME, description="weight-mirror entry of the backbone (null: random init)")
    tokens: int = Field(default=8, ge=1, le=256, description="prefix embeddings the image becomes")

    @field_validator("timm_name")
    @classmethod
    def _timm_name(cls, v: str) -> str:
        return check_timm_name(v)  # the same rule as the multimodal family's image encoder


FLAVOURS: dict[str, dict] = {
    # tiny, for CPU tests: a two-layer LM of width 64 trains in seconds
    "debug": {"encoder_dim": 32, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "sensor": {"width": 8, "tokens": 2}, "image": {"size": 32, "tokens": 2},
              "max_input_tokens": 96, "max_response_tokens": 160, "max_new_tokens": 48},
    # a ~1B Llama/Qwen-shaped LM on a GPU
    "base": {"encoder_dim": 512, "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]},
             "sensor": {"kind": "patch_transformer", "width": 256, "layers": 4, "tokens": 8},
             "image": {"timm_name": "resnet50", "size": 224, "tokens": 8},
             "gradient_checkpointing": True, "max_input_tokens": 512, "max_response_tokens": 512, "max_new_tokens": 256},
}


class ReportWriterConfig(Strict):
    family: Literal["report_writer"] = "report_writer"
    flavour: Literal["debug", "base"] = Field(default="base", description="size preset; debug is for CPU tests")
    lm: str = Field(pattern=MIRROR_NAME, description="weight-mirror entry of the causal LM (a Hugging Face folder: "
                                                     "config.json, safetensors, tokenizer files)")
    modalities: list[Literal["sensor", "image"]] = Field(default=[], description="prefix encoders; set from the dataset manifest")
    encoder_dim: int = Field(default=256, ge=8, le=8192, description="width of an encoder's output before the projection")
    sensor: SensorPrefixConfig = SensorPrefixConfig()
    image: ImagePrefixConfig = ImagePrefixConfig()
    sensor_mean: list[float] | None = Field(default=None, description="per-channel normalisation (from the manifest)")
    sensor_std: list[float] | None = None
    lora: LoraSpec = LoraSpec()
    train_encoders: bool = Field(default=True, description="encoders learn with the projections (false: only projections and LoRA)")
    gradient_checkpointing: bool = Field(default=False, description="recompute the LM's activations in backward (less memory, ~30 % slower)")
    max_input_tokens: int = Field(default=512, ge=8, le=32768, description="tokens of the input text kept (longer inputs are cut)")
    max_response_tokens: int = Field(default=512, ge=8, le=32768, description="response tokens learned per record (longer ones are cut)")
    max_new_tokens: int = Field(default=256, ge=1, le=8192, description="the served model's bound on generated tokens")
    temperature: float = Field(default=0.0, ge=0, le=2, description="default decoding of the served model: 0 greedy, > 0 sampling")

    @model_validator(mode="before")
    @classmethod
    def _flavour(cls, data):
        """The flavour's preset lies under whatever the recipe sets explicitly."""
        return with_flavour(data, FLAVOURS, "base")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities must not repeat")
        return self
