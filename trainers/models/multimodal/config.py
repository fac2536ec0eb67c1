"""Typed configuration of the multimodal model family."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from indai.platform.config import Strict
from indai.trainers.models.checks import check_heads, check_sensor, check_timm_name
from indai.trainers.models.presets import with_flavour

Modality = Literal["sensor", "image", "text"]
MIRROR_NAME = r"^[a-z0-9][a-z0-9._-]{0,127}$"


class LoraConfig(Strict):
    """Low-rank adapters (peft LoRA) on an encoder's backbone; the backbone itself stays frozen."""

    r: int = Field(default=8, ge=1, le=512, description="rank of the adapter matrices")
    alpha: float = Field(default=16.0, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        default=None, description="module names (or dotted suffixes) that get adapters; default: attention q/v "
                                  "(query/value, q_proj/v_proj, fused qkv) in transformers, every conv and linear in CNNs")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not t or not all(p.isidentifier() or p.isdigit() for p in t.split(".")) for t in v)):
            raise ValueError("lora.target_modules must be a non-empty list of module names such as query or blocks.0.qkv")
        return v


class TuneConfig(Strict):
    """How an encoder is trained: which of its parameters learn, and how fast."""

    policy: Literal["full", "linear_probe", "partial", "lora", "frozen"] = Field(
        default="full", description="full: everything trains; linear_probe: backbone frozen (eval mode), only the "
                                    "projection to `dim` trains; partial: the last `unfreeze_last` blocks and the "
                                    "projection train; lora: adapters on the frozen backbone plus the projection; "
                                    "frozen: nothing in the encoder trains")
    unfreeze_last: int = Field(default=1, ge=0, description="partial: blocks that train, counted from the output end "
                                                            "(the stem/embeddings count as the first block)")
    lr_mult: float = Field(default=1.0, gt=0, le=100, description="the backbone's learning rate relative to optim.lr "
                                                                  "(the fusion, head and the encoder's projection train at optim.lr)")
    layer_decay: float | None = Field(default=None, gt=0, le=1, description="layer-wise LR decay: the last block gets "
                                      "lr * lr_mult, each block below it one more factor of layer_decay (BEiT/ULMFiT)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape (policy lora)")


class SensorEncoderConfig(Strict):
    kind: Literal["cnn1d", "patch_transformer"] = Field(default="cnn1d", description="registered sensor encoder")
    channels: int = Field(default=1, ge=1, description="set from the dataset manifest")
    length: int = Field(default=1024, ge=16, description="samples per window; set from the manifest")
    width: int = Field(default=32, ge=4, description="base number of filters / hidden size")
    patch: int = Field(default=16, ge=2, description="patch size (patch_transformer)")
    layers: int = Field(default=2, ge=1, description="transformer layers (patch_transformer)")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="fine-tuning policy of this encoder")

    @model_validator(mode="after")
    def _fits_the_encoder(self):
        # also when the launcher sets length from the dataset's window (validate_assignment)
        check_sensor(self.kind, self.length, self.width, self.patch)
        return self


class ImageEncoderConfig(Strict):
    timm_name: str = Field(default="test_resnet", description="a timm architecture name (lower-case letters, digits, '_', "
                                                              "'.'), e.g. resnet50; pretrained weights come from the mirror")
    size: int = Field(default=64, ge=16, le=1024, description="square input size in pixels")
    pretrained: str | None = Field(default=None, pattern=MIRROR_NAME,
                                   description="weight-mirror entry whose weights initialise the backbone, e.g. "
                                               "efficientnet-lite0 (null: random init)")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="fine-tuning policy of this encoder")

    @field_validator("timm_name")
    @classmethod
    def _timm_name(cls, v: str) -> str:
        return check_timm_name(v)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _mirror_name(cls, v):
        if v is False:  # older recipes wrote `pretrained: false`
            return None
        if v is True:
            raise ValueError("image.pretrained: true is not accepted: name a weight-mirror entry, "
                             "e.g. pretrained: efficientnet-lite0 (`indai` mirrors weights; nothing is fetched from a hub)")
        return v


class TextEncoderConfig(Strict):
    kind: Literal["byte_transformer", "hf"] = Field(
        default="byte_transformer", description="byte_transformer: our UTF-8 byte encoder; hf: a Hugging Face "
                                                "encoder from the weight mirror, with its own tokenizer")
    pretrained: str | None = Field(default=None, pattern=MIRROR_NAME,
                                   description="hf: weight-mirror entry with the weights, config and tokenizer.json, "
                                               "e.g. all-minilm-l6-v2")
    config_from: str | None = Field(default=None, pattern=MIRROR_NAME,
                                    description="hf without pretrained weights: mirror entry whose config.json and "
                                                "tokenizer.json define the encoder, trained from random init")
    pooling: Literal["mean", "cls"] = Field(default="mean", description="hf: mean over non-padding tokens, or the first ([CLS]) token")
    max_len: int = Field(default=128, ge=8, le=4096, description="UTF-8 bytes (byte_transformer) or tokens (hf) per text")
    width: int = Field(default=64, ge=8, description="byte_transformer: hidden size")
    layers: int = Field(default=2, ge=1, description="byte_transformer: transformer layers")
    heads: int = Field(default=4, ge=1, description="byte_transformer: attention heads")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="fine-tuning policy of this encoder")

    @model_validator(mode="after")
    def _source(self):
        if self.kind == "hf" and (self.pretrained is None) == (self.config_from is None):
            raise ValueError("text.kind hf needs exactly one of text.pretrained (a mirror entry with weights, "
                             "e.g. all-minilm-l6-v2) or text.config_from (architecture only, random init)")
        if self.kind == "byte_transformer" and (self.pretrained or self.config_from):
            raise ValueError("text.pretrained / text.config_from apply to text.kind hf; the byte_transformer trains from scratch")
        if self.kind == "byte_transformer":  # an hf encoder has its own width and heads (its config.json)
            check_heads("text", self.width, self.heads)
        return self


class RegressionConfig(Strict):
    """The loss of task regression, on targets standardised with the training split's mean and std."""

    loss: Literal["huber", "mse"] = Field(default="huber", description="huber: robust to a few wrong labels; mse: squared error")
    huber_delta: float = Field(default=1.0, gt=0, description="huber: where the loss turns linear, in target standard deviations")


class AnomalyConfig(Strict):
    """Task anomaly (trainers.tasks): trained on the normal class only, scored by the Mahalanobis
    distance of the fused embedding, flagged above a threshold calibrated on validation normals."""

    normal_class: str | None = Field(default=None, max_length=64,
                                     description="the dataset class that is normal: training sees only it; every "
                                                 "other class counts as an anomaly in validation and test")
    false_alarm_rate: float = Field(default=0.05, gt=0, lt=1,
                                    description="the threshold lets at most this share of the validation split's "
                                                "normal samples score above it")
    shrinkage: float = Field(default=0.1, ge=0, le=1, description="covariance shrinkage toward a scaled identity, so the "
                                                                  "Mahalanobis distance stays defined with few samples")


ANOMALY_PRETEXT = 4  # self-supervised transforms the anomaly head tells apart (trainers.tasks)


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


class ModelConfig(Strict):
    family: Literal["multimodal"] = "multimodal"
    flavour: Literal["debug", "small", "base"] = Field(default="small", description="size preset; debug is for CPU tests")
    modalities: list[Modality] = Field(default=["sensor"], min_length=1, description="which encoders the model has")
    task: Literal["classification", "regression", "anomaly"] = Field(
        default="classification", description="classification: class probabilities; regression: one value in the "
                                              "target's units; anomaly: a score from normal data only (trainers.tasks)")
    num_classes: int = Field(default=2, ge=2, description="classification: set from the dataset manifest")
    regression: RegressionConfig = Field(default_factory=RegressionConfig, description="task regression: the loss")
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig, description="task anomaly: normal class and threshold")
    target_mean: float | None = Field(default=None, description="regression: mean of the training targets (set by the launcher)")
    target_std: float | None = Field(default=None, gt=0, description="regression: standard deviation of the training targets")
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
        return with_flavour(data, FLAVOURS, "small")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities must not repeat")
        if self.dim % self.fusion_heads:
            raise ValueError("dim must be divisible by fusion_heads")
        if self.task == "anomaly" and not {"sensor", "image"} & set(self.modalities):
            raise ValueError("task anomaly needs a sensor or image modality: its self-supervised training transforms "
                             "those (time reversal and sign of a window, rotation of an image); text alone has none")
        return self
