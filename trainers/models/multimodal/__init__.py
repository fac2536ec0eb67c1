"""Multimodal model family: sensor, image and text encoders fused over present modalities."""
from indai.trainers.models.multimodal import model  # noqa: F401  (registers the family)
from indai.trainers.models.multimodal.config import ModelConfig  # noqa: F401
