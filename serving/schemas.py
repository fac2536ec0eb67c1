"""The request and response schema of the predict endpoint, one for all modalities.

Published as OpenAPI at `/openapi.json` (and browsable at `/docs`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INSTANCES = 256


class Instance(BaseModel):
    """One sample: any subset of the model's modalities."""

    model_config = ConfigDict(extra="forbid")
    sensor: list[list[float]] | None = Field(default=None, description="sensor window: one list of samples per channel [channels][samples], raw units")
    channels: list[str] | None = Field(default=None, description="channel names in the order sent; checked against the model's")
    sampling_rate_hz: float | None = Field(default=None, gt=0, description="sampling rate of the window; checked against the model's")
    image: str | None = Field(default=None, description="PNG or JPEG file, base64-encoded")
    text: str | None = Field(default=None, max_length=100_000, description="free text (Korean or English)")
    instruction: str | None = Field(default=None, max_length=2000, description="report writers: what to write, e.g. \"Summarise the "
                                                                             "likely fault and the next maintenance step.\" (default: the model's)")
    max_new_tokens: int | None = Field(default=None, ge=1, le=8192, description="report writers: at most this many generated tokens "
                                                                              "(default and upper bound: the model's own bound)")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(default=None, max_length=200, description="registered model: name@alias (follows the alias) or "
                                                                         "name/version (pinned); default: the service's default model")
    instances: list[Instance] = Field(min_length=1, max_length=MAX_INSTANCES)


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class ValuePrediction(BaseModel):
    """A regression model's answer."""

    value: float = Field(description="the predicted value, in the unit of the training target")


class AnomalyPrediction(BaseModel):
    """An anomaly detector's answer."""

    score: float = Field(description="anomaly score: distance from the normal data the model was trained on")
    anomaly: bool = Field(description="score above the threshold")
    threshold: float = Field(description="the threshold, calibrated on validation normals at the model's target false-alarm rate")


class Generation(BaseModel):
    """A report writer's answer."""

    text: str = Field(description="the generated text")
    tokens: int = Field(description="generated tokens (at most the request's or the model's max_new_tokens)")
    finish_reason: Literal["eos", "length"] = Field(description="eos: the model ended the text; length: it reached max_new_tokens")
    input_truncated: bool = Field(description="the instruction and text were longer than the model reads and were cut")


class PredictResponse(BaseModel):
    request_id: str
    model: str = Field(description="the reference the server was asked to serve, e.g. cwru-bearing@champion")
    model_version: int = Field(description="the registered version that answered")
    predictions: list[Prediction | ValuePrediction | AnomalyPrediction | Generation] = Field(
        description="classifiers: label and probabilities; regression: value; anomaly detectors: score, anomaly, "
                    "threshold; report writers: generated text")


class ModelInfo(BaseModel):
    model: str
    model_version: int
    modalities: list[str]
    classes: list[str]
    inputs: dict
    task: str = Field(default="classification", description="classification, regression, anomaly or report (generated text)")
    dataset: str | None = None


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


class ModelListing(BaseModel):
    models: list[dict] = Field(description="models the caller may call: model, owner, visibility, process, and "
                                                  "aliases (the promoted ones: {alias: version})")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="request_id of the prediction being rated")
    rating: int = Field(ge=0, le=100, description="how useful the prediction was, 0-100")
    true_label: str | None = Field(default=None, max_length=128, description="the right answer, if known")
    comment: str | None = Field(default=None, max_length=2000)


class FeedbackResponse(BaseModel):
    request_id: str
    stored: bool
