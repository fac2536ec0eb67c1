"""The request and response schema of the predict endpoint, one for all modalities.

Published as OpenAPI at `/openapi.json` (and browsable at `/docs`)."""
from __future__ import annotations

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


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(default=None, max_length=200, description="registered model: name@alias (follows the alias) or "
                                                                         "name/version (pinned); default: the service's default model")
    instances: list[Instance] = Field(min_length=1, max_length=MAX_INSTANCES)


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    request_id: str
    model: str = Field(description="the reference the server was asked to serve, e.g. cwru-bearing@champion")
    model_version: int = Field(description="the registered version that answered")
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    model: str
    model_version: int
    modalities: list[str]
    classes: list[str]
    inputs: dict
    dataset: str | None = None


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


class ModelListing(BaseModel):
    models: list[dict] = Field(description="models the caller may call: model, owner, visibility, process")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="request_id of the prediction being rated")
    rating: int = Field(ge=0, le=100, description="how useful the prediction was, 0-100")
    true_label: str | None = Field(default=None, max_length=128, description="the right answer, if known")
    comment: str | None = Field(default=None, max_length=2000)


class FeedbackResponse(BaseModel):
    request_id: str
    stored: bool
