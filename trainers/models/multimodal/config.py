"""Typed configuration of the multimodal model family."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from indai.platform.config import Strict

Modality = Literal["sensor", "image", "text"]


class SensorEncoderConfig(Strict):
    kind: Literal["cnn1d", "patch_transformer"] = Field(default="cnn1d", description="registered sensor encoder")
    channels: int = Field(default=1, ge=1, description="set from the dataset manifest")
    length: int = Field(default=1024, ge=16, description="samples per window; set from the manifest")
    width: int = Field(default=32, ge=4, description="base number of filters / hidden size")
    patch: int = Field(default=16, ge=2, description="patch size (patch_transformer)")
    layers: int = Field(default=2, ge=1, description="transformer layers (patch_transformer)")


class ImageEncoderConfig(Strict):
    timm_name: str = Field(default="test_resnet", description="any timm model name, e.g. resnet50; pretrained weights come from the mirror")
    size: int = Field(default=64, ge=16, le=1024, description="square input size in pixels")
    pretrained: bool = False


class TextEncoderConfig(Strict):
    max_len: int = Field(default=128, ge=8, le=4096, description="UTF-8 bytes per text")
    width: int = Field(default=64, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)


FLAVOURS: dict[str, dict] = {
    # tiny, for CPU tests: trains in seconds
    "debug": {"dim": 32, "fusion_heads": 2, "sensor": {"width": 8, "layers": 1}, "image": {"size": 32},
              "text": {"width": 32, "layers": 1, "heads": 2, "max_len": 32}},
    "small": {},
    # the reference shapes of ../shared/GPU.md
    "base": {"dim": 384, "fusion_heads": 6, "fusion_layers": 2,
             "sensor": {"kind": "patch_transformer", "width": 384, "layers": 4, "patch": 16},
             "image": {"timm_name": "resnet50", "size": 224}, "text": {"width": 384, "layers": 4, "heads": 6}},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ModelConfig(Strict):
    family: Literal["multimodal"] = "multimodal"
    flavour: Literal["debug", "small", "base"] = Field(default="small", description="size preset; debug is for CPU tests")
    modalities: list[Modality] = Field(default=["sensor"], min_length=1, description="which encoders the model has")
    task: Literal["classification"] = "classification"
    num_classes: int = Field(default=2, ge=2, description="set from the dataset manifest")
    dim: int = Field(default=64, ge=8, description="width of the fusion tokens")
    fusion_layers: int = Field(default=1, ge=1)
    fusion_heads: int = Field(default=4, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    sensor: SensorEncoderConfig = SensorEncoderConfig()
    image: ImageEncoderConfig = ImageEncoderConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    sensor_mean: list[float] | None = Field(default=None, description="per-channel normalisation (from the manifest)")
    sensor_std: list[float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _flavour(cls, data):
        """The flavour's preset lies under whatever the recipe sets explicitly."""
        if isinstance(data, dict):
            preset = FLAVOURS.get(data.get("flavour", "small"))
            if preset is None:
                raise ValueError(f"flavour must be one of {sorted(FLAVOURS)}")
            data = _merge(preset, data)
        return data

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities must not repeat")
        if self.dim % self.fusion_heads:
            raise ValueError("dim must be divisible by fusion_heads")
        return self
