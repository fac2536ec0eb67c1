"""The report writer: encoders -> projection -> k prefix embeddings each -> causal LM.

A sensor window or an image is turned by a registered encoder (the multimodal family's) into
one vector, and a small MLP projects it to `k` embeddings of the LM's width. They are placed
before the prompt's token embeddings; a sample that lacks the modality gets learned
placeholder embeddings instead, so every position is always attended (no fully masked rows,
and the same layout in a batch of mixed samples). The LM is frozen and gets LoRA adapters;
projections, placeholders and (optionally) encoders train. Only the response tokens carry a
loss: prefix, instruction and input are labelled IGNORE (`report_format.assemble`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from indai.platform.report_format import PREFIX_ORDER, Tokens, assemble, generate, prompt_ids
from indai.trainers.models import build, register
from indai.trainers.models.report_writer.config import ReportWriterConfig


class PrefixEncoder(nn.Module):
    """forward(x [B, ...], present [B]) -> [B, k, hidden]: the encoder's projection where the
    modality is present, the learned placeholder where it is not."""

    def __init__(self, encoder: nn.Module, encoder_dim: int, hidden: int, tokens: int, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.encoder = encoder
        self.tokens, self.hidden = tokens, hidden
        self.proj = nn.Sequential(nn.Linear(encoder_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * hidden))
        self.absent = nn.Parameter(torch.zeros(tokens, hidden))
        nn.init.trunc_normal_(self.absent, std=0.02)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        e = self.proj(self.encoder(self.norm(x))).view(x.shape[0], self.tokens, self.hidden)
        keep = present.to(e.dtype).view(-1, 1, 1)
        return e * keep + self.absent.to(e.dtype) * (1 - keep)


def _sensor_prefix(cfg: ReportWriterConfig, hidden: int) -> PrefixEncoder:
    from indai.trainers.models.multimodal.model import SensorNorm  # registers the sensor encoders

    s = cfg.sensor
    encoder = build("sensor", s.kind, channels=s.channels, dim=cfg.encoder_dim, length=s.length, width=s.width,
                    patch=s.patch, layers=s.layers)
    return PrefixEncoder(encoder, cfg.encoder_dim, hidden, s.tokens, SensorNorm(s.channels, cfg.sensor_mean, cfg.sensor_std))


def _image_prefix(cfg: ReportWriterConfig, hidden: int, store, load_weights: bool) -> PrefixEncoder:
    from indai.trainers.models.multimodal.model import ImageEncoder

    i = cfg.image
    encoder = ImageEncoder(i.timm_name, cfg.encoder_dim, pretrained=i.pretrained, store=store, load_weights=load_weights)
    return PrefixEncoder(encoder, cfg.encoder_dim, hidden, i.tokens)


def load_lm(folder: Path, load_weights: bool = True):
    """The causal LM of a mirror folder (safetensors only, no remote code), in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if load_weights:
        return AutoModelForCausalLM.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                                    trust_remote_code=False, dtype=torch.float32)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def add_lora(lm, cfg: ReportWriterConfig):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = [t for t in cfg.lora.targets if t not in present]
    if missing:
        from indai.platform.errors import UserError

        raise UserError(f"lora.targets {missing} are not modules of the LM {lm.config.model_type}: "
                        f"linear modules are named like {sorted(n for n in present if n.endswith('proj'))[:8]}")
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.targets),
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(lm, lcfg)


def hold_frozen_in_bf16(module: nn.Module) -> int:
    """Frozen fp32 parameters of `module` (the LM) become bf16; trainable ones (the adapters) stay
    fp32. Under bf16 autocast a weight that needs no gradient is cast again at every use (autocast
    caches only the casts of trainable leaves): a frozen fp32 LM paid a full copy of itself in each
    forward, recomputation and backward, and held twice the memory. Returns the parameters cast.
    For training only: export merges the adapters into the mirror's own weights."""
    n = 0
    for p in module.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            n += p.numel()
    return n


class ReportWriter(nn.Module):
    def __init__(self, cfg: ReportWriterConfig, lm_folder: Path, store=None, load_pretrained: bool = True):
        """`lm_folder`: the LM's mirror folder; `load_pretrained=False` builds the LM and image
        backbone with random weights (export loads trained weights over them anyway)."""
        super().__init__()
        self.cfg = cfg
        lm_folder = Path(lm_folder)
        lm = load_lm(lm_folder, load_pretrained)
        for p in lm.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            # non-reentrant: the frozen embeddings' output needs no grad for LoRA below to get one
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False
        self.lm = add_lora(lm, cfg)
        hidden = lm.config.hidden_size
        self.prefix = nn.ModuleDict()
        if "sensor" in cfg.modalities:
            self.prefix["sensor"] = _sensor_prefix(cfg, hidden)
        if "image" in cfg.modalities:
            self.prefix["image"] = _image_prefix(cfg, hidden, store, load_pretrained)
        if not cfg.train_encoders:
            for m in self.prefix.values():
                m.encoder.requires_grad_(False)
        gen = lm_folder / "generation_config.json"
        self.tokens = Tokens.from_folder(lm_folder / "tokenizer.json", json.loads((lm_folder / "config.json").read_text()),
                                         json.loads(gen.read_text()) if gen.is_file() else None)

    def compile_regions(self) -> list[nn.Module]:
        """What `run.compile` compiles (trainers.engine.compile_regions): each decoder layer of the
        LM, one graph reused by all of them, and each prefix encoder. The forward itself takes
        Python lists of ids and stays eager."""
        layers = [m for m in self.lm.modules() if type(m).__name__.endswith("DecoderLayer")]
        return layers + [self.prefix[m] for m in self.prefix]

    def prefix_embeddings(self, n: int, sensor=None, image=None, mask=None) -> torch.Tensor | None:
        inputs = {"sensor": sensor, "image": image}
        parts = []
        for i, m in enumerate(PREFIX_ORDER):
            if m not in self.prefix:
                continue
            if inputs[m] is None:
                raise ValueError(f"the model has a {m} prefix: pass {m}= (zeros and mask 0 when absent)")
            present = mask[:, i] if mask is not None else torch.ones(n, device=inputs[m].device)
            parts.append(self.prefix[m](inputs[m], present))
        return torch.cat(parts, 1) if parts else None

    def forward(self, prompts: list[list[int]], responses: list[list[int]], sensor=None, image=None,
                mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the response tokens, number of those tokens)."""
        prefix = self.prefix_embeddings(len(prompts), sensor, image, mask)
        x, _, _, labels = assemble(prefix, prompts, self.lm.get_input_embeddings(), self.tokens.pad, responses)
        # Rows are padded on the right, so under causal attention no scored token sees padding, and
        # the default positions (0, 1, ...) are each row's own: the LM runs without a mask or
        # position ids. The loss is the same (a test compares it with the masked call); attention
        # runs in SDPA's causal flash kernel instead of a masked one, and no [B, 1, L, L] mask is
        # built. (Either way Hugging Face reads one value on the host per forward: a mask that
        # might be all ones, or positions that might be packed sequences.)
        logits = self.lm(inputs_embeds=x, use_cache=False).logits
        target = labels[:, 1:]
        n = (target != -100).sum()
        loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        return loss / n.clamp(min=1), n

    @torch.no_grad()
    def generate(self, instructions: list[str], texts: list[str], max_new_tokens: int | list[int], sensor=None, image=None,
                 mask=None, temperature: float = 0.0, generator=None) -> list[tuple[list[int], str]]:
        """Bounded decoding (greedy, or sampling at a temperature); stops at EOS."""
        n = len(instructions)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if any(not 0 <= lim <= self.cfg.max_new_tokens for lim in limits):
            raise ValueError(f"max_new_tokens must be within 0..{self.cfg.max_new_tokens} (the model's bound)")
        prompts = [prompt_ids(self.tokens, ins, txt, self.cfg.max_input_tokens)[0] for ins, txt in zip(instructions, texts)]
        was = self.training
        self.eval()
        try:
            prefix = self.prefix_embeddings(n, sensor, image, mask)
            x, attn, pos, _ = assemble(prefix, prompts, self.lm.get_input_embeddings(), self.tokens.pad)
            return generate(self.lm, x, attn, pos, limits, self.tokens.eos, temperature, generator)
        finally:
            self.train(was)


@register("model", "report_writer")
def report_writer(cfg: ReportWriterConfig, lm_folder: Path, store=None, load_pretrained: bool = True) -> ReportWriter:
    return ReportWriter(cfg, lm_folder, store, load_pretrained)
