"""The report writer's artefact (`indai-report-writer/1`) and the runtime that serves it.

A report writer is a causal LM with sensor and image encoders in front of it, whose outputs
enter the LM as prefix embeddings. Its artefact holds no pickle and no Python code:

    indai_model.json            the card: format, inputs, bounds, decoding, sha256 of every file
    lm/config.json, lm/*.safetensors, lm/generation_config.json
                                the LM with the LoRA adapters merged in (a plain HF folder)
    tokenizer.json              the LM's fast tokenizer (read by the `tokenizers` library)
    prefix_<modality>.pt2       each modality's encoder + projection as a torch.export program:
                                (x [B, ...], present [B]) -> [B, k, hidden]

The encoders stay programs, so the many registered encoders need no twin here and serving never
imports training code; the LM is a Hugging Face model built from its config (no remote code).
Training builds its batches and decodes with the same functions (`prompt_ids`, `assemble`,
`generate`), so a served model sees exactly the layout it learned: [prefix][prompt][response].
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indai.platform.errors import UserError
from indai.platform.model_format import load_program, sha256_file
from indai.platform.modalities import MAX_TOKENIZER_BYTES, check_sensor, decode_image, images_to_tensor_layout

FORMAT = "indai-report-writer/1"
CARD = "indai_model.json"
LM_DIR = "lm"
TOKENIZER = "tokenizer.json"
PREFIX_ORDER = ("sensor", "image")
MAX_INSTRUCTION_CHARS = 2000
IGNORE = -100

PROMPT_HEAD = "### Instruction:\n{instruction}\n\n"
PROMPT_INPUT = "### Input:\n"
PROMPT_TAIL = "\n\n### Response:\n"


def prefix_file(modality: str) -> str:
    return f"prefix_{modality}.pt2"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CARD)


def write_card(folder: Path, card: dict) -> Path:
    """The card with the sha256 of every file in the folder."""
    folder = Path(folder)
    card = dict(card, format=FORMAT, files={f: sha256_file(folder / f) for f in _files(folder)})
    path = folder / CARD
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False))
    return path


def verify_files(folder: Path, card: dict) -> None:
    """Every file is named by the card with its hash, and nothing else is there."""
    listed = card.get("files")
    if not isinstance(listed, dict) or not listed:
        raise UserError(f"{folder}: the card lists no files: not a {FORMAT} model")
    present = _files(folder)
    if sorted(listed) != present:
        extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
        raise UserError(f"{folder}: files {extra} are not in the card and {missing} are missing: refusing to load it")
    for name, sha in listed.items():
        if sha256_file(folder / name) != sha:
            raise UserError(f"{folder / name} does not match the hash in its card: refusing to load it")


# ---- tokens ---------------------------------------------------------------------------------------

@dataclass
class Tokens:
    """The LM's tokenizer (tokenizer.json, `tokenizers` library) and the ids that matter here."""

    tokenizer: object
    bos: list[int]
    eos: set[int]
    eos_id: int  # the one that ends a training response (the LM config's first)
    pad: int

    @classmethod
    def from_folder(cls, tokenizer_json: Path, lm_config: dict, generation_config: dict | None = None) -> "Tokens":
        from tokenizers import Tokenizer

        if not tokenizer_json.is_file():
            raise UserError(f"{tokenizer_json} does not exist: the LM needs a fast tokenizer (tokenizer.json)")
        if tokenizer_json.stat().st_size > MAX_TOKENIZER_BYTES:
            raise UserError(f"{tokenizer_json} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB: is it a tokenizer.json?")
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust parser raises its own exception type
            raise UserError(f"{tokenizer_json} could not be read ({str(e)[:200]})") from None
        tok.no_truncation()
        tok.no_padding()
        eos: list[int] = []
        for cfg in (lm_config, generation_config or {}):
            v = cfg.get("eos_token_id")
            eos += [int(i) for i in (v if isinstance(v, list) else [v]) if i is not None]
        if not eos:
            raise UserError("the LM's config names no eos_token_id: generation could not stop")
        bos_id = lm_config.get("bos_token_id")
        added = tok.encode("", add_special_tokens=True).ids  # what the tokenizer's template puts in front (Llama: BOS)
        bos = [bos_id] if bos_id is not None and bos_id in added else []
        pad = lm_config.get("pad_token_id")
        return cls(tok, bos, set(eos), eos[0], int(pad) if pad is not None else eos[0])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def prompt_ids(tokens: Tokens, instruction: str, text: str, max_input_tokens: int) -> tuple[list[int], bool]:
    """[BOS] instruction [input] response-marker as ids; instruction plus input are cut to
    `max_input_tokens` (the instruction to half of it first). Returns (ids, whether cut)."""
    head = tokens.encode(PROMPT_HEAD.format(instruction=instruction.strip()))
    limit = max(1, max_input_tokens // 2)
    cut = len(head) > limit
    head = head[:limit]
    body: list[int] = []
    if text and text.strip():
        room = max(0, max_input_tokens - len(head))
        body = tokens.encode(text.strip())
        cut = cut or len(body) > room
        body = tokens.encode(PROMPT_INPUT) + body[:room]
    return tokens.bos + head + body + tokens.encode(PROMPT_TAIL), cut


# ---- batches: [prefix][prompt][response] ----------------------------------------------------------

def assemble(prefix, prompts: list[list[int]], embed, pad_id: int, responses: list[list[int]] | None = None):
    """Embeddings, attention mask, position ids and labels of a batch.

    `prefix`: [B, P, H] or None (the modalities' projected embeddings); `embed`: the LM's token
    embedding. Each row is [prefix][prompt][response]. Training (`responses` given) pads on the
    right and labels only the response tokens (prefix, prompt and padding are IGNORE);
    generation pads on the left, so every row ends where decoding continues. Positions count
    attended tokens only, so a row's positions do not depend on its padding; padded positions
    hold zeros.

    The layout (ids, mask, labels, where each row starts) is built on the host and reaches the
    device in one copy (pinned, asynchronous on CUDA): no per-row transfers, each of which would
    make the host wait for the device and leave the GPU idle while the next batch is assembled.
    """
    import torch

    train = responses is not None
    device = embed.weight.device
    toks = [p + (responses[i] if train else []) for i, p in enumerate(prompts)]
    b, p = len(toks), prefix.shape[1] if prefix is not None else 0
    width = max(1, max(len(t) for t in toks))
    longest = p + max(len(t) for t in toks)
    lengths = np.array([p + len(t) for t in toks])
    shift = np.zeros(b, dtype=np.int64) if train else longest - lengths  # left padding moves each row right
    cols = np.arange(p + width)
    # host layout, one array: ids (right-aligned after the prefix), mask, labels, gather index
    host = np.zeros((4, b, p + width), dtype=np.int64)
    host[0] = pad_id
    host[2] = IGNORE
    for i, t in enumerate(toks):
        host[0, i, p: p + len(t)] = t
        if train:
            start = p + len(prompts[i])
            host[2, i, start: start + len(responses[i])] = responses[i]
    host[1] = (cols >= shift[:, None]) & (cols < (shift + lengths)[:, None])
    host[3] = np.clip(cols - shift[:, None], 0, p + width - 1)  # position k of a row holds the unshifted column k - shift
    packed = torch.from_numpy(host)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    ids, attn, labels, index = packed[0, :, p:], packed[1, :, :longest], packed[2, :, :longest], packed[3, :, :longest]
    token_embeds = embed(ids)  # one call: under ZeRO-3 the embedding is gathered once
    x = token_embeds if prefix is None else torch.cat([prefix.to(token_embeds.dtype), token_embeds], 1)
    if train:  # right padding: every row already starts at column 0
        x = x[:, :longest]
    else:
        x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = x * attn.unsqueeze(-1).to(x.dtype)  # padding holds zeros, as the model never attends to it
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return x, attn, positions, labels


def _next_token(logits, temperature: float, generator):
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(lm, embeds, attn, positions, limits: list[int], eos: set[int], temperature: float = 0.0,
             generator=None) -> list[tuple[list[int], str]]:
    """Decode from a left-padded batch with the KV cache: each sequence stops at an EOS id or at
    its own limit of new tokens. Returns (new ids without the EOS, "eos" | "length") per row."""
    import torch

    b = embeds.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    reason = ["length"] * b
    done = [lim <= 0 for lim in limits]
    with torch.no_grad():
        step = lm(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=True)
        past, last = step.past_key_values, positions[:, -1]
        for _ in range(max(limits, default=0)):
            nxt = _next_token(step.logits[:, -1], temperature, generator)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in eos:
                    done[i], reason[i] = True, "eos"
                    continue
                out[i].append(t)
                done[i] = len(out[i]) >= limits[i]
            if all(done):
                break
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=attn.device)], 1)
            last = last + 1
            step = lm(inputs_embeds=lm.get_input_embeddings()(nxt[:, None]), attention_mask=attn,
                      position_ids=last[:, None], past_key_values=past, use_cache=True)
            past = step.past_key_values
    return list(zip(out, reason))


# ---- the served model -----------------------------------------------------------------------------

def mlflow_signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.string, "instruction", required=False),
        ColSpec(DataType.string, "text", required=False),
        ColSpec(Array(Array(DataType.double)), "sensor", required=False),
        ColSpec(DataType.string, "image", required=False),
        ColSpec(DataType.long, "max_new_tokens", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string, "text")]))


FIELDS = {"instruction", "text", "sensor", "channels", "sampling_rate_hz", "image", "max_new_tokens"}


class ReportWriterModel:
    """A loaded report writer: `predict([{"instruction": ..., "text": ..., "sensor": ..., "image": ...}])`
    -> `[{"text": ..., "tokens": n, "finish_reason": "eos" | "length", "input_truncated": bool}]`."""

    def __init__(self, card: dict, lm, tokens: Tokens, prefixes: dict):
        self.card, self.lm, self.tokens, self.prefixes = card, lm, tokens, prefixes
        self.modalities = card["modalities"]
        self.classes: list[str] = []
        self.bound = int(card["generation"]["max_new_tokens"])

    @classmethod
    def load(cls, folder: str | Path, card: dict | None = None) -> "ReportWriterModel":
        import torch
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        card = card or json.loads((folder / CARD).read_text())
        if card.get("format") != FORMAT:
            raise UserError(f"{folder}: model format {card.get('format')!r} is not {FORMAT!r}")
        verify_files(folder, card)
        lm_config = json.loads((folder / LM_DIR / "config.json").read_text())
        if "auto_map" in lm_config:
            raise UserError(f"{folder}: the LM config asks for remote code (auto_map): refusing to load it")
        gen_path = folder / LM_DIR / "generation_config.json"
        tokens = Tokens.from_folder(folder / TOKENIZER, lm_config, json.loads(gen_path.read_text()) if gen_path.is_file() else None)
        lm = AutoModelForCausalLM.from_pretrained(folder / LM_DIR, local_files_only=True, use_safetensors=True,
                                                  trust_remote_code=False, dtype=torch.float32).eval()
        prefixes = {m: load_program(folder / prefix_file(m)).module() for m in card["modalities"]}
        return cls(card, lm, tokens, prefixes)

    def prepare(self, sample: dict) -> dict:
        """Validate one request instance against the card; tokenise its prompt."""
        if not isinstance(sample, dict):
            raise UserError("each input must be an object with instruction, text, sensor and/or image")
        unknown = set(sample) - FIELDS
        if unknown:
            raise UserError(f"unknown input field(s) {sorted(unknown)}: use {sorted(FIELDS)}")
        inputs = self.card["inputs"]
        extra = [m for m in PREFIX_ORDER if sample.get(m) is not None and m not in self.modalities]
        if extra:
            raise UserError(f"this report writer reads {self.modalities or 'text only'}, not {extra}")
        instruction = sample.get("instruction") or self.card["generation"]["default_instruction"]
        text = sample.get("text") or ""
        if not isinstance(instruction, str) or not isinstance(text, str):
            raise UserError("instruction and text must be strings")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise UserError(f"instruction is {len(instruction)} characters, over {MAX_INSTRUCTION_CHARS}: shorten it")
        limit = sample.get("max_new_tokens")
        if limit is None:
            limit = self.bound
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or not 1 <= limit <= self.bound:
            raise UserError(f"max_new_tokens must be an integer from 1 to this model's bound of {self.bound}")
        ids, cut = prompt_ids(self.tokens, instruction, text, int(inputs["text"]["max_tokens"]))
        out = {"ids": ids, "cut": cut, "limit": int(limit)}
        if sample.get("sensor") is not None:
            s = inputs["sensor"]
            try:
                arr = np.asarray(sample["sensor"], dtype=np.float32)
            except (TypeError, ValueError):
                raise UserError("sensor must be a list of channels, each a list of numbers") from None
            out["sensor"] = check_sensor(arr, s["channels"], s["length"], sample.get("channels"), sample.get("sampling_rate_hz"),
                                         s.get("sampling_rate_hz"))
        if sample.get("image") is not None:
            out["image"] = decode_image(sample["image"], inputs["image"]["size"])
        return out

    def _prefix(self, prepared: list[dict]):
        import torch

        parts = []
        for m in PREFIX_ORDER:
            if m not in self.modalities:
                continue
            present = torch.tensor([float(m in p) for p in prepared])
            if m == "sensor":
                s = self.card["inputs"]["sensor"]
                zero = np.zeros((len(s["channels"]), s["length"]), np.float32)
                x = torch.from_numpy(np.stack([p.get("sensor", zero) for p in prepared]))
            else:
                size = self.card["inputs"]["image"]["size"]
                zero = np.zeros((size, size, 3), np.uint8)
                x = torch.from_numpy(images_to_tensor_layout(np.stack([p.get("image", zero) for p in prepared])))
            parts.append(self.prefixes[m](x, present))
        return torch.cat(parts, 1) if parts else None

    def run(self, prepared: list[dict]) -> list[dict]:
        """Generate for a batch of prepared instances (see `prepare`)."""
        import torch

        with torch.inference_mode():
            x, attn, pos, _ = assemble(self._prefix(prepared), [p["ids"] for p in prepared], self.lm.get_input_embeddings(),
                                       self.tokens.pad)
            decoded = generate(self.lm, x, attn, pos, [p["limit"] for p in prepared], self.tokens.eos,
                               float(self.card["generation"].get("temperature", 0.0)))
        return [{"text": self.tokens.decode(ids), "tokens": len(ids), "finish_reason": why, "input_truncated": p["cut"]}
                for (ids, why), p in zip(decoded, prepared)]

    def predict(self, samples: list[dict]) -> list[dict]:
        return self.run([self.prepare(s) for s in samples])
