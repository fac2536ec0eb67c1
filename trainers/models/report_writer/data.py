"""Instruction records as training samples: prompt ids, response ids, and the sensor window /
image beside them. Tokenised once, up front (records are short); batches are padded by
`report_format.assemble` inside the model, so a batch here is lists of ids plus tensors."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from indai.platform.modalities import images_to_tensor_layout
from indai.platform.report_format import Tokens, prompt_ids
from indai.trainers.models.report_writer.config import ReportWriterConfig


class InstructDataset(Dataset):
    def __init__(self, arrays: dict[str, np.ndarray], tokens: Tokens, cfg: ReportWriterConfig):
        self.prompts = [prompt_ids(tokens, str(ins), str(inp), cfg.max_input_tokens)[0]
                        for ins, inp in zip(arrays["instruction"], arrays["input"])]
        self.responses = []
        for r in arrays["response"]:
            ids = tokens.encode(str(r))
            # a cut response does not end: it gets no EOS, so the model never learns to stop mid-sentence
            self.responses.append(ids[: cfg.max_response_tokens] + ([tokens.eos_id] if len(ids) <= cfg.max_response_tokens else []))
        n = len(self.prompts)
        self.mask = torch.as_tensor(arrays["mask"], dtype=torch.float32) if "mask" in arrays else torch.zeros(n, 3)
        self.sensor = None
        if "sensor" in cfg.modalities:
            if "sensor" not in arrays:
                raise ValueError("the model has a sensor prefix but the records hold no sensor windows")
            self.sensor = torch.as_tensor(arrays["sensor"], dtype=torch.float32)
        self.image = None
        if "image" in cfg.modalities:
            if "image" not in arrays:
                raise ValueError("the model has an image prefix but the records hold no images")
            self.image = arrays["image"]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        item = {"prompt": self.prompts[i], "response": self.responses[i], "mask": self.mask[i]}
        if self.sensor is not None:
            item["sensor"] = self.sensor[i]
        if self.image is not None:
            item["image"] = torch.from_numpy(images_to_tensor_layout(self.image[i: i + 1])[0])
        return item


def collate(items: list[dict]) -> dict:
    out = {"prompts": [it["prompt"] for it in items], "responses": [it["response"] for it in items],
           "mask": torch.stack([it["mask"] for it in items])}
    for key in ("sensor", "image"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
