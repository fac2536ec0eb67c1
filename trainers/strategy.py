"""Which parallel strategy a run uses, chosen from the model's size and the device's free memory.

On one GPU a naive DeepSpeed wrapping cost a small multimodal model a third of its throughput
(../shared/GPU.md), and ZeRO-3 cost two thirds; sharding pays only when the model states do not
fit. So `deepspeed.strategy: auto` takes the cheapest strategy whose per-device model states
(weights, gradients, optimizer moments) fit in a share of the free device memory, leaving the
rest for activations:

    ddp            plain data parallel (torch DDP; nothing wrapped on one device)
    zero2          + optimizer state and gradients sharded across ranks (DeepSpeed)
    zero3          + parameters sharded (DeepSpeed)
    zero3_offload  parameters and optimizer state in host memory (DeepSpeed), only when nothing else fits

With one rank, sharding divides by one and saves nothing, so auto goes from ddp straight to
offload. This module is pure arithmetic, so the choice is the same for the same sizes everywhere
and is tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("ddp", "zero0", "zero1", "zero2", "zero3", "zero3_offload")
AUTO_ORDER = ("ddp", "zero2", "zero3")

# Mixed precision through autocast keeps fp32 master weights: 4 bytes a weight, 4 a gradient,
# 8 for AdamW's two moments. Gradients and moments exist only for trainable parameters.
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8


@dataclass(frozen=True)
class Choice:
    strategy: str
    """One of STRATEGIES."""
    zero_stage: int | None
    """DeepSpeed ZeRO stage, None for the torch engine (ddp)."""
    offload: bool
    """Parameters and optimizer state live in host memory (zero3_offload)."""
    state_bytes: int
    """Model states this strategy keeps on each device (weights + gradients + optimizer)."""
    reason: str
    """One line: what was chosen and why, with the numbers."""

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage is not None


def state_bytes(strategy: str, params: int, trainable: int, world: int) -> int:
    """Bytes of model states on each device under `strategy` with `world` ranks."""
    w = max(1, world)
    weights, grads, adam = WEIGHT_BYTES * params, GRAD_BYTES * trainable, ADAM_BYTES * trainable
    if strategy in ("ddp", "zero0"):
        return weights + grads + adam
    if strategy == "zero1":
        return weights + grads + adam // w
    if strategy == "zero2":
        return weights + (grads + adam) // w
    if strategy == "zero3":
        return (weights + grads + adam) // w
    if strategy == "zero3_offload":
        return 0  # layers are fetched from host memory as they run
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")


def _stage(strategy: str) -> int | None:
    return None if strategy == "ddp" else int(strategy[4])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose(requested: str, params: int, trainable: int, free_bytes: int, world: int,
           state_fraction: float = 0.5) -> Choice:
    """The strategy for a model of `params` weights (`trainable` of them learn) on ranks with
    `free_bytes` free device memory each. `requested` is "auto" or one of STRATEGIES."""
    budget = int(free_bytes * state_fraction)
    sizes = f"{params / 1e6:.1f} M parameters ({trainable / 1e6:.1f} M trainable), {world} rank(s), " \
            f"{_gib(free_bytes)} free per device"
    if requested != "auto":
        if requested not in STRATEGIES:
            raise ValueError(f"unknown strategy {requested!r}; one of auto, {', '.join(STRATEGIES)}")
        need = state_bytes(requested, params, trainable, world)
        fits = "fits" if need <= budget else "does NOT fit"
        return Choice(requested, _stage(requested), requested == "zero3_offload", need,
                      f"{requested} as configured: model states {_gib(need)} per device {fits} in "
                      f"{state_fraction:.0%} of the free memory ({sizes})")
    for strategy in AUTO_ORDER:
        need = state_bytes(strategy, params, trainable, world)
        if need <= budget:
            why = {"ddp": "plain data parallel is the fastest when the model states fit",
                   "zero2": "sharding optimizer state and gradients makes them fit; parameters stay whole",
                   "zero3": "only sharding the parameters as well makes them fit"}[strategy]
            return Choice(strategy, _stage(strategy), False, need,
                          f"auto chose {strategy}: model states {_gib(need)} per device fit in {state_fraction:.0%} "
                          f"of the free memory ({_gib(budget)}); {why} ({sizes})")
    least = state_bytes("zero3", params, trainable, world)
    return Choice("zero3_offload", 3, True, 0,
                  f"auto chose zero3_offload: even fully sharded the model states need {_gib(least)} per device, "
                  f"over {state_fraction:.0%} of the free memory ({_gib(budget)}); parameters and optimizer state "
                  f"go to host memory, which is slow ({sizes})")


def requested_strategy(strategy: str, zero_stage: int | None) -> str:
    """The config's request: an explicit `zero_stage` (older recipes) with strategy auto means
    that ZeRO stage (the config refuses the two when they contradict each other)."""
    if zero_stage is None or strategy != "auto":
        return strategy
    return f"zero{zero_stage}"
