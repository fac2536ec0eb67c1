"""Pretrained weights for trainers, from the air-gapped mirror only.

Why this module exists
----------------------
A recipe names a mirror entry (`model.image.pretrained: efficientnet-lite0`); the trainer gets a
model with those weights through the two functions here, and nothing else: no
`pretrained=True`, no hub id, no download. `timm_backbone` builds the timm model from its name
with random weights and loads the mirrored safetensors into it strictly, so a wrong architecture
or a renamed layer is an error that names the keys, not a silently half-initialised network.
`hf_dir` gives a verified local folder for `from_pretrained(path, local_files_only=True)`.
Both switch the Hugging Face libraries offline first.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from indai.platform import mirror as weight_mirror
from indai.platform.errors import UserError
from indai.platform.settings import go_offline

if TYPE_CHECKING:
    import torch.nn as nn

    from indai.platform.storage import ObjectStore


def open_mirror_store(store: "ObjectStore | str | None" = None) -> "ObjectStore":
    """The object store holding the mirror: the one given, a URI, or the platform's."""
    from indai.platform.settings import load_settings
    from indai.platform.storage import ObjectStore, open_store

    if isinstance(store, ObjectStore):
        return store
    return open_store(store or load_settings().store_uri)


def _check_kwargs(timm_kwargs: dict) -> None:
    if timm_kwargs.get("pretrained"):
        raise UserError("pretrained=True would ask a hub for weights: name a mirror entry instead "
                        "(`indai models mirror ls` lists them)")
    if timm_kwargs.get("features_only"):
        raise UserError("features_only models do not load mirrored weights; use num_classes=0 (pooled features) "
                        "or forward_features")


def timm_backbone(arch: str | None, mirror: str | None, store: "ObjectStore | str | None" = None, **timm_kwargs) -> "nn.Module":
    """`timm.create_model(arch, pretrained=False, **timm_kwargs)` with the mirror entry's weights
    loaded strictly. `arch` may be None to use the card's architecture; `mirror` None gives
    random init. A head of another size than the stored one (e.g. num_classes=0 or a new class
    count) starts from random init; every other weight must match by name and shape."""
    go_offline()
    import timm

    _check_kwargs(timm_kwargs)
    timm_kwargs.pop("pretrained", None)
    if mirror is None:
        if not arch:
            raise UserError("name a timm architecture or a mirror entry for the backbone")
        return timm.create_model(arch, pretrained=False, **timm_kwargs)
    store = open_mirror_store(store)
    card = weight_mirror.read_card(store, mirror)
    if card["format"] != "timm":
        raise UserError(f"mirror entry {mirror!r} holds {card['format']} weights, not a timm model: "
                        "mirror timm weights (or a state dict with --convert/--architecture)")
    if arch and arch != card["architecture"]:
        raise UserError(f"mirror entry {mirror!r} holds weights for {card['architecture']}, not {arch}: "
                        f"set the architecture to {card['architecture']} or leave it out")
    arch = card["architecture"]
    folder = weight_mirror.local_dir(store, mirror)
    model = timm.create_model(arch, pretrained=False, **timm_kwargs)
    load_strict(model, folder / card["weights"][0], card)
    model.pretrained_cfg = {**(model.pretrained_cfg or {}),
                            **{k: tuple(v) if isinstance(v, list) else v for k, v in card.get("preprocess", {}).items()},
                            "indai_mirror": mirror}
    return model


def load_strict(model: "nn.Module", weights: Path, card: dict) -> None:
    """Load a safetensors file into a timm model; every key and shape must match, except a head
    whose size differs from the stored one (it keeps its fresh init)."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    heads = weight_mirror.head_prefixes(model)
    expected = model.state_dict()
    keep_head = getattr(model, "num_classes", None) == card.get("num_classes")
    if not keep_head:
        state = {k: v for k, v in state.items() if not weight_mirror.under(k, heads)}
    problems = weight_mirror.layout_problems({k: tuple(v.shape) for k, v in expected.items()},
                                             {k: tuple(v.shape) for k, v in state.items()},
                                             ignore_missing=() if keep_head else heads)
    if problems:
        raise UserError(f"mirror entry {card['name']!r} does not load into {card['architecture']} with these options: "
                        f"{'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


def hf_dir(mirror: str, store: "ObjectStore | str | None" = None) -> Path:
    """A verified local folder of a Hugging Face mirror entry, for
    `AutoModel/AutoTokenizer/AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`."""
    go_offline()
    return weight_mirror.hf_dir(open_mirror_store(store), mirror)
