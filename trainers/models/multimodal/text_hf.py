"""A Hugging Face text encoder from the weight mirror, with the tokenizer it was trained with.

Maintenance text is short, domain-specific and often in two languages; a pretrained sentence
encoder (e.g. all-MiniLM-L6-v2) starts far ahead of our byte transformer. The weights, the
config and the tokenizer.json come from the air-gapped mirror (`indai.trainers.pretrained`),
never from a hub. `text.pretrained` loads the mirror entry's weights; `text.config_from`
builds the same architecture from its config.json with random init (and still uses its
tokenizer). The model takes [B, T] int64 ids padded with the tokenizer's pad id — the same
signature as the byte encoder — and derives the attention mask as ids != pad id, so the
exported program needs nothing but the ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from indai.platform.errors import UserError
from indai.platform.modalities import TOKENIZER_FILE, TextTokenizer
from indai.trainers.models import register

PAD_TOKENS = ("[PAD]", "<pad>")


def mirror_folder(name: str, store=None) -> Path:
    """The verified local folder of a weight-mirror entry (config.json, tokenizer.json, weights)."""
    from indai.trainers.pretrained import hf_dir

    return Path(hf_dir(name, store))


def pad_id(folder: Path) -> int:
    """The padding id: config.json's pad_token_id, else the tokenizer's [PAD]/<pad> token."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("pad_token_id") is not None:
        return int(config["pad_token_id"])
    vocab = json.loads((folder / TOKENIZER_FILE).read_text()).get("model", {}).get("vocab", {})
    vocab = vocab if isinstance(vocab, dict) else {}
    for token in PAD_TOKENS:
        if token in vocab:
            return int(vocab[token])
    raise UserError(f"{folder.name}: neither config.json nor tokenizer.json names a padding token: this text encoder cannot be used")


def hf_tokenizer(folder: Path, max_len: int) -> TextTokenizer:
    return TextTokenizer.from_hf_file(folder / TOKENIZER_FILE, max_len, pad_id(folder))


def model_tokenizer(model_cfg, store=None) -> TextTokenizer:
    """The tokenizer a model config's text encoder reads: UTF-8 bytes, or the mirror entry's."""
    t = model_cfg.text
    if t.kind != "hf":
        return TextTokenizer.utf8(t.max_len)
    return hf_tokenizer(mirror_folder(t.pretrained or t.config_from, store), t.max_len)


@register("text", "hf")
class HFTextEncoder(nn.Module):
    """AutoModel (BERT-like encoder) -> mean over real tokens or the first token -> `out` to dim."""

    def __init__(self, dim: int, folder: Path, load_weights: bool = True, pooling: str = "mean", max_len: int = 128, **_):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise UserError(f"text.max_len {max_len} is longer than the {config.model_type} encoder's {limit} positions: use at most {limit}")
        if load_weights:
            self.backbone = AutoModel.from_pretrained(folder, config=config, local_files_only=True, dtype=torch.float32)
        else:
            self.backbone = AutoModel.from_config(config, dtype=torch.float32)
        if getattr(self.backbone, "pooler", None) is not None:  # we pool ourselves; an unused pooler gets no gradient
            self.backbone.pooler = None
        self.pad_id = pad_id(folder)
        self.pooling = pooling
        self.out = nn.Linear(config.hidden_size, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != self.pad_id
        hidden = self.backbone(input_ids=tokens, attention_mask=keep.long()).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            w = keep.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.out(pooled)
