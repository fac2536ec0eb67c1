"""Fine-tuning pretrained encoders: which parameters learn, how fast, and how adapters leave.

A pretrained backbone is worth most when it is changed least: a linear probe or a few top
blocks often beat full fine-tuning on the small labelled sets members bring, and LoRA
adapters train a large encoder with a fraction of its optimizer state. Each encoder's `tune`
block (config.TuneConfig) picks a policy; this module applies it to a built model
(`apply_tuning`), builds the optimizer's parameter groups (`param_groups`: discriminative
and layer-wise decayed learning rates, no weight decay on norms and biases) and merges LoRA
adapters back into plain weights for export (`merge_for_export`), so that a served model
never needs peft.

Every encoder ends in `out`, the new linear projection to the fusion width; it trains with
every policy but `frozen`, at the base learning rate. The rest is the backbone, split into
blocks from input to output (`block_groups`): timm's own group matcher where the backbone
has one, an encoder's `tuning_blocks()` where it declares them, else the encoder's largest
ModuleList (the stem before it is the first block, whatever follows it joins the last).
"""
from __future__ import annotations

import sys
import types

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from indai.platform.errors import UserError

PROJECTION = "out"
# attention projections that get adapters in transformers by default (BERT, OPT/Llama, DistilBERT, ours/timm fused qkv)
ATTENTION_QV = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin", "qkv")
# parameters that are not weights to shrink: positions and learned tokens (besides every 1-d tensor)
NO_DECAY_NAMES = ("pos", "pos_embed", "cls_token", "reg_token", "fusion_token", "modality_embed", "position_embeddings")


def _is_projection(name: str) -> bool:
    return name == PROJECTION or name.startswith(PROJECTION + ".")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _largest_module_list(encoder: nn.Module) -> str | None:
    best, size = None, 0
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.ModuleList) and not _is_projection(name) and len(mod) > size:
            best, size = name, len(mod)
    return best


def block_groups(encoder: nn.Module) -> list[list[str]]:
    """The backbone's parameter names (relative to the encoder) in blocks, input to output."""
    names = [n for n, _ in encoder.named_parameters() if not _is_projection(n)]
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(backbone, "group_matcher"):  # timm models know their blocks
        from timm.models import group_parameters

        groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
        out = [[f"backbone.{n}" for n in g] for g in groups.values()]
        rest = [n for n in names if not n.startswith("backbone.")]
        return [rest + out[0], *out[1:]] if rest else out
    if hasattr(encoder, "tuning_blocks"):
        prefixes = encoder.tuning_blocks()
    else:
        blocks = _largest_module_list(encoder)
        if blocks is None:
            return [names]
        prefixes = [[f"{blocks}.{i}"] for i in range(len(encoder.get_submodule(blocks)))]
    groups: list[list[str]] = [[] for _ in range(len(prefixes) + 1)]
    seen_block = False
    for n in names:
        idx = next((i + 1 for i, pres in enumerate(prefixes) if any(_under(n, p) for p in pres)), None)
        if idx is None:  # before the first block: the stem; after one: joins the last block
            idx = len(prefixes) if seen_block else 0
        seen_block = seen_block or idx > 0
        groups[idx].append(n)
    return [g for g in groups if g]


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def keep_in_eval(module: nn.Module) -> None:
    """`module` and its children ignore `train()` from now on (frozen BatchNorm statistics,
    no dropout in a frozen backbone). The override is per instance and survives deepcopy."""
    for m in module.modules():
        m.train = types.MethodType(_stay_in_eval, m)
    nn.Module.train(module, False)


def default_lora_targets(encoder: nn.Module) -> list[str]:
    """Attention q/v projections in a transformer; otherwise every plain conv and linear layer."""
    mods = [(n, m) for n, m in encoder.named_modules() if n and not _is_projection(n)]
    attention = [n for n, m in mods if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ATTENTION_QV]
    if attention:
        return attention
    # exact types only: subclasses such as timm's Conv2dSame pad in forward, which an adapter would not
    return [n for n, m in mods if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d) and getattr(m, "groups", 1) == 1]


def _lora_targets(modality: str, encoder: nn.Module, wanted: list[str] | None) -> list[str]:
    if wanted is None:
        targets = default_lora_targets(encoder)
    else:
        names = [n for n, _ in encoder.named_modules() if n and not _is_projection(n)]
        targets = []
        for t in wanted:
            hits = [n for n in names if n == t or n.endswith("." + t)]
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in encoder.named_modules()
                                 if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not _is_projection(n)})
                raise UserError(f"{modality}.tune.lora.target_modules: {t!r} names no layer of the {modality} encoder; "
                                f"its linear/conv layers are named {leaves[:20]}")
            targets += hits
    if not targets:
        raise UserError(f"the {modality} encoder has no linear or conv layer for LoRA adapters: use another tune.policy")
    return sorted(set(targets))


def _inject_lora(modality: str, encoder: nn.Module, tune) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = _lora_targets(modality, encoder, tune.lora.target_modules)
    config = LoraConfig(r=tune.lora.r, lora_alpha=tune.lora.alpha, lora_dropout=tune.lora.dropout,
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, encoder)


def _is_adapter(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def _apply_policy(modality: str, encoder: nn.Module, tune) -> None:
    policy = tune.policy
    if policy == "lora":
        _inject_lora(modality, encoder, tune)
    groups = block_groups(encoder)
    if policy == "partial" and tune.unfreeze_last > len(groups):
        raise UserError(f"{modality}.tune.unfreeze_last is {tune.unfreeze_last} but the {modality} encoder has "
                        f"{len(groups)} blocks: use at most {len(groups)} (or policy full)")
    trainable_backbone = {
        "full": {n for g in groups for n in g},
        "partial": {n for g in groups[len(groups) - tune.unfreeze_last:] for n in g},
        "lora": {n for g in groups for n in g if _is_adapter(n)},
    }.get(policy, set())
    for name, p in encoder.named_parameters():
        p.requires_grad_(name in trainable_backbone or (_is_projection(name) and policy != "frozen"))
    if policy == "frozen":
        keep_in_eval(encoder)
    elif policy == "linear_probe":
        for name, child in encoder.named_children():
            if not _is_projection(name):
                keep_in_eval(child)
    elif policy != "full":  # batch statistics of frozen layers stay what pretraining measured
        for m in encoder.modules():
            params = list(m.parameters(recurse=False))
            if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in params):
                keep_in_eval(m)


def _count(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_tuning(model: nn.Module, model_cfg, log: bool = True) -> dict:
    """Apply each encoder's tune policy to a freshly built model (before the optimizer and the
    DeepSpeed engine see it); return trainable/total parameter counts per encoder."""
    report: dict = {}
    for modality, encoder in model.encoders.items():
        tune = getattr(model_cfg, modality).tune
        _apply_policy(modality, encoder, tune)
        trainable, total = _count(encoder.parameters())
        report[modality] = {"policy": tune.policy, "trainable": trainable, "total": total}
    trainable, total = _count(model.parameters())
    report["model"] = {"trainable": trainable, "total": total}
    if log:
        for k, v in report.items():
            policy = f" ({v['policy']})" if "policy" in v else ""
            print(f"tuning {k}{policy}: {v['trainable']:,} of {v['total']:,} parameters train "
                  f"({100 * v['trainable'] / max(1, v['total']):.1f} %)", file=sys.stderr, flush=True)
    return report


def mlflow_params(report: dict) -> dict[str, str]:
    """The counts of `apply_tuning` as flat MLflow parameters."""
    out = {}
    for k, v in report.items():
        out[f"tune.{k}.trainable_params"] = str(v["trainable"])
        out[f"tune.{k}.total_params"] = str(v["total"])
    return out


def _no_decay(name: str, param, extra: set[str]) -> bool:
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or name in extra


def _timm_no_decay(modality: str, encoder: nn.Module) -> set[str]:
    backbone = getattr(encoder, "backbone", None)
    names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    return {f"encoders.{modality}.backbone.{n}" for n in names}


def lr_scales(model: nn.Module, model_cfg) -> dict[str, tuple[str, float]]:
    """Each parameter's (group name, learning-rate factor): 1 for fusion, head and projections;
    lr_mult * layer_decay^(blocks above it) for an encoder's backbone."""
    scales: dict[str, tuple[str, float]] = {}
    for modality, encoder in model.encoders.items():
        tune = getattr(model_cfg, modality).tune
        groups = block_groups(encoder)
        for depth, names in enumerate(groups):
            factor = tune.lr_mult * (tune.layer_decay ** (len(groups) - 1 - depth) if tune.layer_decay else 1.0)
            for n in names:
                scales[f"encoders.{modality}.{n}"] = (f"{modality}.block{depth}", factor)
        for n, _ in encoder.named_parameters():
            if _is_projection(n):
                scales[f"encoders.{modality}.{n}"] = (f"{modality}.{PROJECTION}", 1.0)
    return scales


def param_groups(model: nn.Module, model_cfg, base_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: the fusion and head first (so the
    first group's lr is the base lr), then per encoder block; norms, biases, positions and
    learned tokens without weight decay. Each group carries `name` and `lr_scale`."""
    scales = lr_scales(model, model_cfg)
    extra = {n for m, e in model.encoders.items() for n in _timm_no_decay(m, e)}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group, factor = scales.get(name, ("head", 1.0))
        decay = not _no_decay(name, p, extra)
        key = (group, decay)
        if key not in groups:
            groups[key] = {"params": [], "name": group + ("" if decay else ".no_decay"), "lr_scale": factor,
                           "lr": base_lr * factor, "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    head = [g for k, g in groups.items() if k[0] == "head"]
    return head + [g for k, g in groups.items() if k[0] != "head"]


def has_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_for_export(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back in its place:
    the model then has the plain model's modules and state-dict keys (in place; returned)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model
