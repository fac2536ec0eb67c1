"""Size presets ("flavours") of the model families' configs.

A recipe names a flavour and sets only what differs from it: the preset lies under the recipe's
own values, nested blocks merged key by key. Both families (multimodal, report_writer) resolve
their flavour through `with_flavour`, so the rule is the same everywhere.
"""
from __future__ import annotations


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`; nested dicts merge, everything else in `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_flavour(data, flavours: dict[str, dict], default: str):
    """A config's raw fields with its flavour's preset under them (pydantic "before" validators)."""
    if not isinstance(data, dict):
        return data
    preset = flavours.get(data.get("flavour", default))
    if preset is None:
        raise ValueError(f"flavour must be one of {sorted(flavours)}")
    return merge(preset, data)
