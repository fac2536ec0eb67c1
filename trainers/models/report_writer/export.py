"""Write a trained report writer as an `indai-report-writer/1` folder (platform.report_format).

The LoRA adapters are merged into the LM, which is saved as a plain Hugging Face folder
(safetensors); each modality's encoder + projection becomes a torch.export program with a
dynamic batch; the LM's tokenizer.json is copied; the card names every file with its sha256.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from indai.platform.report_format import LM_DIR, TOKENIZER, prefix_file, write_card
from indai.trainers.models.report_writer.model import ReportWriter

TRAINED = ("prefix.", "lora_")


def trained_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What training changed: LoRA adapters and the prefix modules (encoders, projections,
    placeholders, normalisation buffers); the frozen LM weights come from the mirror."""
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items() if k.startswith("prefix.") or "lora_" in k}


def load_trained(model: ReportWriter, weights: dict[str, torch.Tensor]) -> None:
    """Put trained weights into a freshly built model; every saved tensor must find its place
    and every trainable one must be given."""
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"trained weights {result.unexpected_keys[:5]} have no place in this model: another configuration?")
    missing = [k for k in result.missing_keys if k.startswith("prefix.") or "lora_" in k]
    if missing:
        raise ValueError(f"trained weights lack {missing[:5]}")


def _example(model: ReportWriter, modality: str, batch: int = 2) -> torch.Tensor:
    cfg = model.cfg
    if modality == "sensor":
        return torch.randn(batch, cfg.sensor.channels, cfg.sensor.length)
    return torch.rand(batch, 3, cfg.image.size, cfg.image.size)


def export(model: ReportWriter, lm_folder: Path, folder: Path, card: dict) -> Path:
    """The artefact folder `folder` (created); returns the card's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    with torch.no_grad():
        for m, module in model.prefix.items():
            x = _example(model, m)
            present = torch.ones(x.shape[0])
            batch = torch.export.Dim.DYNAMIC
            program = torch.export.export(module, (x, present), dynamic_shapes=({0: batch}, {0: batch}))
            torch.export.save(program, str(folder / prefix_file(m)))
        merged = model.lm.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(folder / LM_DIR)
    shutil.copyfile(Path(lm_folder) / TOKENIZER, folder / TOKENIZER)
    return write_card(folder, card)


def card_inputs(model: ReportWriter, sensor_meta: dict | None) -> dict:
    cfg = model.cfg
    inputs: dict = {"text": {"max_tokens": cfg.max_input_tokens, "tokenizer": TOKENIZER}}
    if "sensor" in cfg.modalities:
        inputs["sensor"] = {"channels": (sensor_meta or {}).get("channels", [f"ch{i}" for i in range(cfg.sensor.channels)]),
                            "length": cfg.sensor.length, "sampling_rate_hz": (sensor_meta or {}).get("sampling_rate_hz")}
    if "image" in cfg.modalities:
        inputs["image"] = {"size": cfg.image.size, "formats": ["PNG", "JPEG"]}
    return inputs
