"""A tiny random-initialised Llama with a tokenizer trained offline: the report writer's `debug` LM.

CI cannot download a pretrained LM, and a random model with a made-up vocabulary tests nothing
about tokenisation. So the tokenizer is trained here with the `tokenizers` library (byte-level
BPE, about 512 ids) on real maintenance text and on every template text (Korean included), and
the LM is a 2-layer Llama of width 64 with random weights. The folder is a plain Hugging Face
folder (config.json, model.safetensors, tokenizer.json, ...) that goes into the weight mirror
like any downloaded model:

    python -m indai.trainers.models.report_writer.tiny /tmp/tiny-llama
    indai models mirror add tiny-llama-rw /tmp/tiny-llama --format hf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

SPECIAL = ("<pad>", "<s>", "</s>")


def corpus(extra: Iterable[str] = ()) -> list[str]:
    """Texts the tokenizer learns from: the templates (both languages), the nestor work orders
    if that data package is installed, and `extra`."""
    from indai.platform.instruct import load_templates, template_texts

    from importlib import metadata

    import pandas as pd

    texts = template_texts(load_templates()[0])
    try:
        csv = Path(metadata.distribution("nist-nestor").locate_file("nestor/datasets/excavators-cleaned.csv"))
        frame = pd.read_csv(csv, usecols=["OriginalShorttext", "MajorSystem", "Part", "Action", "FM"])
        for col in frame.columns:
            texts += [str(v) for v in frame[col].dropna().tolist()]
    except (metadata.PackageNotFoundError, FileNotFoundError):
        pass
    return texts + list(extra)


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE (every string encodes; nothing is unknown) with <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL[0], bos_token=SPECIAL[1], eos_token=SPECIAL[2])


def build_tiny_lm(folder: str | Path, texts: list[str] | None = None, vocab_size: int = 512, seed: int = 0,
                  hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                  init_std: float = 0.2) -> Path:
    """Write the tiny Llama's Hugging Face folder; return it.

    `init_std` is ten times Llama's 0.02: with width 64 and the default, the frozen output layer
    keeps every logit within about +-1.3 whatever the hidden state, so no adapter could make the
    model confident and a loss curve would say nothing. A pretrained LM has no such cap."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts if texts is not None else corpus(), vocab_size)
    tokenizer.save_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=1024,
                         pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], tie_word_embeddings=False,
                         initializer_range=init_std)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a tiny random Llama (and its offline-trained tokenizer) as a Hugging Face folder")
    p.add_argument("folder")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_tiny_lm(a.folder, vocab_size=a.vocab, seed=a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
