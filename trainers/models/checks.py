"""Config checks that need to know the encoders: which timm names a recipe may give, and which
sensor window lengths and widths the registered sensor encoders accept.

Why one module: both model families (trainers.models.multimodal.config and
trainers.models.report_writer.config) build the same encoders, so they refuse the same things
with the same messages, when the config is validated (the CLI, before a job starts) instead of
in a worker's first forward pass ("max_pool1d() Invalid computed output size: 0"). The sensor
encoders' geometry is defined here, without torch, and trainers.models.multimodal.model builds
the layers from these very numbers, so the limits computed below are the architecture's own.
"""
from __future__ import annotations

import difflib
import functools
import re

# ---- image backbones: a timm architecture by name --------------------------------------------------

TIMM_NAME = re.compile(r"^[a-z0-9_.]{1,64}$")


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def check_timm_name(name: str) -> str:
    """`name` when it is an architecture timm knows (optionally with a pretrained tag such as
    resnet50.a1_in1k), else ValueError. Only plain names pass: timm resolves `hf-hub:org/repo` by
    fetching the model's config from the Hugging Face Hub and `local-dir:/path` by reading a folder
    of the host, even with pretrained=False, and neither belongs in a recipe (weights come from the
    mirror, `image.pretrained`)."""
    if not isinstance(name, str) or not TIMM_NAME.fullmatch(name):
        raise ValueError(f"timm_name {name!r} is not a timm architecture name: use lower-case letters, digits, '_' and "
                         "'.' only, at most 64 (e.g. resnet50, efficientnet_lite0); hub or folder references "
                         "('hf-hub:...', 'local-dir:...') are refused: pretrained weights come from the weight mirror "
                         "(image.pretrained)")
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], _timm_names(), n=3, cutoff=0.6)
        raise ValueError(f"timm_name {name!r} is not an architecture timm {timm.__version__} knows"
                         + (f": did you mean {', '.join(close)}?" if close else "")
                         + " (timm.list_models('resnet*') lists the names)")
    return name


# ---- sensor encoders ---------------------------------------------------------------------------------

# cnn1d (SensorCNN): four stages, each a convolution (kernel, stride, padding), BatchNorm, ReLU and
# a max pooling by CNN1D_POOL. The first convolution is wide and strided: it sees a whole impact
# period of a bearing fault.
CNN1D_CONVS: tuple[tuple[int, int, int], ...] = ((64, 8, 28), (3, 1, 1), (3, 1, 1), (3, 1, 1))
CNN1D_POOL = 2
PATCH_HEAD_WIDTH = 64  # patch_transformer: one attention head per this many channels of its width


def cnn1d_output_length(length: int) -> int:
    """Samples left of a window of `length` after SensorCNN's stages (torch's Conv1d and MaxPool1d
    output sizes); 0 or less: the window is too short for the encoder."""
    n = length
    for kernel, stride, padding in CNN1D_CONVS:
        n = (n + 2 * padding - kernel) // stride + 1
        if n < 1:
            return n
        n //= CNN1D_POOL
    return n


@functools.lru_cache(maxsize=1)
def cnn1d_min_length() -> int:
    """The shortest window SensorCNN can encode (128 with the stages above)."""
    length = 1
    while cnn1d_output_length(length) < 1:  # the output grows with the window: the first that fits
        length += 1
    return length


def patch_transformer_heads(width: int) -> int:
    return max(1, width // PATCH_HEAD_WIDTH)


def _widths_near(width: int, heads_of) -> str:
    """The nearest widths below and above `width` that the heads divide."""
    below = next((w for w in range(width - 1, 0, -1) if w % heads_of(w) == 0), None)
    above = next(w for w in range(width + 1, 2 * width + 2) if w % heads_of(w) == 0)
    return " or ".join(str(w) for w in (below, above) if w is not None)


def check_sensor(kind: str, length: int, width: int, patch: int) -> None:
    """ValueError when the sensor encoder `kind` cannot take windows of `length` samples at this width."""
    if kind == "cnn1d":
        least = cnn1d_min_length()
        if length < least:
            raise ValueError(f"sensor.length {length} is too short for the cnn1d encoder: its strided first convolution "
                             f"and {len(CNN1D_CONVS)} poolings by {CNN1D_POOL} need windows of at least {least} samples. "
                             f"Ingest the data with sensor.window of {least} or more, or use sensor.kind: patch_transformer")
    elif kind == "patch_transformer":
        if length < patch:
            raise ValueError(f"sensor.length {length} is shorter than sensor.patch {patch}: the patch_transformer cuts "
                             f"windows into patches of {patch} samples; set sensor.patch to at most {length}")
        heads = patch_transformer_heads(width)
        if width % heads:
            raise ValueError(f"sensor.width {width} is not divisible by the patch_transformer's {heads} attention heads "
                             f"(one per {PATCH_HEAD_WIDTH} channels): use a width of "
                             f"{_widths_near(width, patch_transformer_heads)}")


def check_heads(what: str, width: int, heads: int) -> None:
    """ValueError when `heads` attention heads do not split `width` evenly."""
    if width % heads:
        raise ValueError(f"{what}.width {width} is not divisible by {what}.heads {heads}: each head takes an equal share "
                         f"of the width; use a width of {_widths_near(width, lambda _w: heads)} (or other heads)")
