"""Export a trained multimodal model as a torch.export program with a dynamic batch size."""
from __future__ import annotations

from pathlib import Path

import torch

from indai.platform.model_format import PROGRAM
from indai.trainers.models.multimodal.config import ModelConfig
from indai.trainers.models.multimodal.model import MultimodalModel


def example_inputs(cfg: ModelConfig, batch: int = 2) -> dict[str, torch.Tensor]:
    x: dict[str, torch.Tensor] = {}
    if "sensor" in cfg.modalities:
        x["sensor"] = torch.randn(batch, cfg.sensor.channels, cfg.sensor.length)
    if "image" in cfg.modalities:
        x["image"] = torch.rand(batch, 3, cfg.image.size, cfg.image.size)
    if "text" in cfg.modalities:
        x["text"] = torch.randint(1, 200, (batch, cfg.text.max_len))
    x["mask"] = torch.ones(batch, 3)
    return x


def export(model: MultimodalModel, folder: Path) -> Path:
    model = model.eval().cpu()
    inputs = example_inputs(model.cfg)
    dyn = {k: {0: torch.export.Dim.DYNAMIC} for k in inputs}
    program = torch.export.export(model, (), kwargs=inputs, dynamic_shapes=dyn)
    path = Path(folder) / PROGRAM
    torch.export.save(program, str(path))
    return path


def card_inputs(cfg: ModelConfig, sensor_meta: dict | None, text_tokenizer: dict | None = None) -> dict:
    """The card's `inputs`; `text_tokenizer` is what TextTokenizer.save wrote (default: UTF-8 bytes)."""
    inputs: dict = {}
    if "sensor" in cfg.modalities:
        inputs["sensor"] = {"channels": (sensor_meta or {}).get("channels", [f"ch{i}" for i in range(cfg.sensor.channels)]),
                            "length": cfg.sensor.length, "sampling_rate_hz": (sensor_meta or {}).get("sampling_rate_hz")}
    if "image" in cfg.modalities:
        inputs["image"] = {"size": cfg.image.size, "formats": ["PNG", "JPEG"]}
    if "text" in cfg.modalities:
        inputs["text"] = {"max_len": cfg.text.max_len,
                          "tokenizer": text_tokenizer or {"kind": "utf8-bytes", "max_len": cfg.text.max_len}}
    return inputs
