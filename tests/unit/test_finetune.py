"""Fine-tuning policies on the debug model: what trains, what stays in eval mode, the optimizer's
learning rates, and LoRA adapters merged away for export."""
import pytest
import torch
from pydantic import ValidationError

from indai.platform.errors import UserError
from indai.trainers import finetune
from indai.trainers.models import create_model
from indai.trainers.models.multimodal import ModelConfig
from indai.trainers.models.multimodal.export import example_inputs


def cfg(sensor=None, image=None, text=None, **kw) -> ModelConfig:
    kw = {"dropout": 0.0, **kw}
    return ModelConfig(flavour="debug", modalities=["sensor", "image", "text"], num_classes=3,
                       sensor={"channels": 2, "length": 256, **(sensor or {})}, image=image or {}, text=text or {}, **kw)


def tuned(c: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(c)
    report = finetune.apply_tuning(model, c, log=False)
    return model, report


def trainable(model, modality: str) -> set[str]:
    return {n for n, p in model.encoders[modality].named_parameters() if p.requires_grad}


def every(model, modality: str) -> set[str]:
    return {n for n, _ in model.encoders[modality].named_parameters()}


def steps(model, c: ModelConfig, n: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(finetune.param_groups(model, c, lr, 0.1), lr=lr)
    model.train()
    for i in range(n):
        torch.manual_seed(100 + i)
        x = example_inputs(c, batch=4)
        loss = torch.nn.functional.cross_entropy(model(**x), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_full_is_the_default_and_trains_everything():
    model, report = tuned(cfg())
    assert all(p.requires_grad for p in model.parameters())
    assert report["model"]["trainable"] == report["model"]["total"] == sum(p.numel() for p in model.parameters())
    assert finetune.mlflow_params(report)["tune.sensor.trainable_params"] == str(report["sensor"]["total"])


def test_frozen_and_linear_probe():
    model, report = tuned(cfg(sensor={"tune": {"policy": "frozen"}}, text={"tune": {"policy": "linear_probe"}},
                              image={"tune": {"policy": "linear_probe"}}))
    assert trainable(model, "sensor") == set() and report["sensor"]["trainable"] == 0
    assert trainable(model, "text") == {"out.weight", "out.bias"}
    assert trainable(model, "image") == {"out.weight", "out.bias"}
    assert report["text"]["trainable"] == 32 * 32 + 32  # the projection: width 32 -> dim 32
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("encoders."))


def test_partial_unfreezes_exactly_the_last_blocks():
    model, _ = tuned(cfg(sensor={"tune": {"policy": "partial", "unfreeze_last": 2}},
                         image={"tune": {"policy": "partial", "unfreeze_last": 1}},
                         text={"layers": 3, "tune": {"policy": "partial", "unfreeze_last": 2}}))
    # cnn1d: 4 conv+BN stages (body.0/1, 4/5, 8/9, 12/13): the last two and the projection
    assert trainable(model, "sensor") == {f"body.{i}.{w}" for i in (8, 9, 12, 13) for w in ("weight", "bias")} | {"out.weight", "out.bias"}
    # timm test_resnet: blocks by timm's group matcher, the last one is layer4
    image = trainable(model, "image")
    assert image == {n for n in every(model, "image") if n.startswith(("backbone.layer4.", "out."))} and len(image) > 2
    # byte transformer with 3 layers: [pos, embed], blocks.0, blocks.1, blocks.2 + final norm
    assert trainable(model, "text") == {n for n in every(model, "text") if n.startswith(("blocks.1.", "blocks.2.", "norm.", "out."))}


def test_partial_with_more_blocks_than_the_encoder_has_is_a_user_error():
    with pytest.raises(UserError, match=r"unfreeze_last is 9 but the sensor encoder has 4 blocks"):
        tuned(cfg(sensor={"tune": {"policy": "partial", "unfreeze_last": 9}}))


def test_batchnorm_of_frozen_parts_stays_in_eval_mode():
    model, _ = tuned(cfg(sensor={"tune": {"policy": "partial", "unfreeze_last": 1}},
                         image={"tune": {"policy": "lora"}}, text={"tune": {"policy": "linear_probe"}}, dropout=0.1))
    model.train()
    sensor = model.encoders["sensor"]
    assert [sensor.body[i].training for i in (1, 5, 9, 13)] == [False, False, False, True]
    bns = [m for m in model.encoders["image"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # LoRA: the base network is frozen
    assert not any(m.training for n, m in model.encoders["text"].named_modules() if n and not n.startswith("out"))
    assert model.encoders["text"].out.training and model.head.training and model.fusion[0].training
    model.eval()
    model.train()  # a second round of train() changes nothing
    assert not sensor.body[1].training and sensor.body[13].training


def test_linear_probe_leaves_the_backbone_bit_identical():
    c = cfg(sensor={"tune": {"policy": "linear_probe"}}, image={"tune": {"policy": "linear_probe"}},
            text={"tune": {"policy": "linear_probe"}})
    model, _ = tuned(c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps(model, c)
    after = model.state_dict()
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    for k, v in before.items():
        if k.startswith("encoders.") and ".out." not in k:
            assert torch.equal(v, after[k]), k  # BN running statistics included
        elif k in learning:
            assert not torch.equal(v, after[k]), k
    assert any(k.endswith("running_mean") for k in before) and "encoders.text.out.weight" in learning


def test_lora_trains_only_adapters_and_merges_into_the_plain_model():
    c = cfg(sensor={"tune": {"policy": "lora", "lora": {"r": 2}}}, image={"tune": {"policy": "lora", "lora": {"r": 4}}},
            text={"tune": {"policy": "lora", "lora": {"r": 4, "alpha": 8}}})
    plain_keys = set(create_model(c).state_dict())
    model, report = tuned(c)
    for m in ("sensor", "image", "text"):
        names = trainable(model, m)
        assert names == {n for n in every(model, m) if ".lora_" in n or n.startswith("out.")}, m
        assert any(".lora_A." in n for n in names) and report[m]["trainable"] < report[m]["total"]
    # defaults: fused qkv in our transformer, every plain conv in the CNNs
    assert {n.split(".lora_")[0] for n in trainable(model, "text") if ".lora_" in n} == {"blocks.0.qkv"}
    assert {n.split(".lora_")[0] for n in trainable(model, "sensor") if ".lora_" in n} == {f"body.{i}" for i in (0, 4, 8, 12)}
    steps(model, c, n=3)  # lora_B starts at zero: train so that the adapters change the output
    model.eval()
    torch.manual_seed(7)
    x = example_inputs(c, batch=3)
    with torch.no_grad():
        adapted = model(**x)
        assert finetune.has_adapters(model)
        finetune.merge_for_export(model)
        merged = model(**x)
    assert not finetune.has_adapters(model)
    assert set(model.state_dict()) == plain_keys
    assert torch.allclose(adapted, merged, atol=1e-5)
    fresh = create_model(c).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(**x), adapted, atol=1e-5)
        assert not torch.allclose(create_model(c).eval()(**x), adapted, atol=1e-3)


def test_lora_target_modules_are_checked():
    model, _ = tuned(cfg(text={"tune": {"policy": "lora", "lora": {"target_modules": ["proj"]}}}))
    assert {n.split(".lora_")[0] for n in trainable(model, "text") if ".lora_" in n} == {"blocks.0.proj"}
    with pytest.raises(UserError, match=r"text.tune.lora.target_modules: 'query' names no layer of the text encoder"):
        tuned(cfg(text={"tune": {"policy": "lora", "lora": {"target_modules": ["query"]}}}))
    with pytest.raises(ValidationError, match="non-empty list of module names"):
        cfg(text={"tune": {"policy": "lora", "lora": {"target_modules": ["os.system()"]}}})


def test_param_groups_learning_rates_and_weight_decay():
    c = cfg(sensor={"tune": {"policy": "frozen"}}, image={"tune": {"policy": "linear_probe"}},
            text={"layers": 2, "tune": {"lr_mult": 0.1, "layer_decay": 0.5}})
    model, _ = tuned(c)
    groups = finetune.param_groups(model, c, 1e-3, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in groups)  # each parameter once
    assert set(where) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups[0]["lr"] == 1e-3 and groups[0]["name"].startswith("head")

    def lr_wd(name):
        return where[name]["lr"], where[name]["weight_decay"]

    assert lr_wd("head.1.weight") == (1e-3, 0.05) and lr_wd("head.1.bias") == (1e-3, 0.0)
    assert lr_wd("fusion_token") == (1e-3, 0.0) and lr_wd("fusion.0.qkv.weight") == (1e-3, 0.05)
    assert lr_wd("encoders.image.out.weight") == (1e-3, 0.05)  # the probe itself trains at the base lr
    assert lr_wd("encoders.text.out.weight") == (1e-3, 0.05)
    # text: 3 blocks ([pos, embed], blocks.0, blocks.1 + norm): 1e-3 * 0.1 * 0.5^(2 - depth)
    assert lr_wd("encoders.text.blocks.1.qkv.weight") == pytest.approx((1e-4, 0.05))
    assert lr_wd("encoders.text.norm.weight") == pytest.approx((1e-4, 0.0))
    assert lr_wd("encoders.text.blocks.0.mlp.0.weight") == pytest.approx((5e-5, 0.05))
    assert lr_wd("encoders.text.embed.weight") == pytest.approx((2.5e-5, 0.05))
    assert lr_wd("encoders.text.pos") == pytest.approx((2.5e-5, 0.0))
    assert where["encoders.text.embed.weight"]["name"] == "text.block0" and where["encoders.text.pos"]["name"] == "text.block0.no_decay"
    assert not any(n.startswith("encoders.sensor.") for n in where)


def test_pretrained_config_fields():
    assert ModelConfig(image={"pretrained": False}).image.pretrained is None  # older recipes
    assert ModelConfig(image={"pretrained": "efficientnet-lite0"}).image.pretrained == "efficientnet-lite0"
    with pytest.raises(ValidationError, match="name a weight-mirror entry"):
        ModelConfig(image={"pretrained": True})
    with pytest.raises(ValidationError, match="string_pattern_mismatch|should match pattern"):
        ModelConfig(image={"pretrained": "../etc"})
    with pytest.raises(ValidationError, match="exactly one of text.pretrained"):
        ModelConfig(modalities=["text"], text={"kind": "hf"})
    with pytest.raises(ValidationError, match="apply to text.kind hf"):
        ModelConfig(modalities=["text"], text={"pretrained": "all-minilm-l6-v2"})
    t = ModelConfig(modalities=["text"], text={"kind": "hf", "pretrained": "all-minilm-l6-v2", "pooling": "cls",
                                               "tune": {"policy": "lora", "lora": {"r": 4}}}).text
    assert (t.kind, t.pooling, t.tune.policy, t.tune.lora.r, t.tune.lora.alpha) == ("hf", "cls", "lora", 4, 16.0)
