"""Model and encoder registry: components are built from registered names, never from dotted
paths in user YAML (a recipe can name only what the code registered)."""
from __future__ import annotations

from typing import Callable

from indai.platform.errors import UserError

_REGISTRY: dict[str, dict[str, Callable]] = {"sensor": {}, "text": {}, "model": {}}


def register(kind: str, name: str):
    def wrap(fn: Callable) -> Callable:
        _REGISTRY[kind][name] = fn
        return fn
    return wrap


def build(kind: str, name: str, **kwargs):
    """Build a registered component; unset (None) kwargs are dropped so defaults apply."""
    try:
        fn = _REGISTRY[kind][name]
    except KeyError:
        raise UserError(f"unknown {kind} component {name!r}; registered: {sorted(_REGISTRY[kind])}") from None
    return fn(**{k: v for k, v in kwargs.items() if v is not None})


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def create_model(cfg, **kwargs):
    """Build the model a ModelConfig describes (importing the families registers them); kwargs
    go to the family's builder (multimodal: store=, load_pretrained=)."""
    from indai.trainers.models import multimodal  # noqa: F401  (registers encoders)

    return build("model", cfg.family, cfg=cfg, **kwargs)
