"""Dataset versions as torch datasets, sharded across workers without padding.

A split holds either windowed sensor signals (`sensor_signal` [C, T] + `sensor_starts`) or
ready arrays (`sensor` [N, C, L], `image` [N, H, W, 3] uint8, `text` [N] strings), plus
`label` and an optional presence `mask` [N, 3]. Each item is a dict of tensors that the
model's forward takes by name.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from indai.platform.modalities import MODALITIES, TextTokenizer, images_to_tensor_layout


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, size, size, 3] with Pillow's bilinear resize, the resize serving
    applies to a request's image (platform.modalities.decode_image)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return out


class SplitDataset(Dataset):
    def __init__(self, arrays: dict[str, np.ndarray], window: int | None = None, text_len: int = 128,
                 modalities: list[str] | None = None, tokenizer: TextTokenizer | None = None):
        label = torch.as_tensor(arrays["label"])  # class index, or a float target (task regression, trainers.tasks)
        self.label = label.float() if label.is_floating_point() else label.long()
        n = len(self.label)
        self.modalities = modalities or [m for m in MODALITIES if m in arrays or (m == "sensor" and "sensor_signal" in arrays)]
        self.window = window
        self.signal = torch.as_tensor(arrays["sensor_signal"]) if "sensor_signal" in arrays else None
        self.starts = arrays.get("sensor_starts")
        self.sensor = torch.as_tensor(arrays["sensor"], dtype=torch.float32) if "sensor" in arrays else None
        self.image = torch.as_tensor(images_to_tensor_layout(arrays["image"])) if "image" in arrays else None
        tokenizer = tokenizer or TextTokenizer.utf8(text_len)  # the model's tokenizer (modalities.TextTokenizer)
        self.text = torch.as_tensor(tokenizer.encode(list(arrays["text"]))) if "text" in arrays else None
        mask = arrays.get("mask")
        self.mask = torch.as_tensor(mask, dtype=torch.float32) if mask is not None else torch.ones(n, 3)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"label": self.label[i], "mask": self.mask[i]}
        if "sensor" in self.modalities:
            if self.signal is not None:
                s = int(self.starts[i])
                item["sensor"] = self.signal[:, s: s + self.window]
            else:
                item["sensor"] = self.sensor[i]
        if "image" in self.modalities:
            item["image"] = self.image[i]
        if "text" in self.modalities:
            item["text"] = self.text[i]
        return item


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank::world, optionally shuffled per epoch with a shared seed; unlike
    DistributedSampler it never repeats samples, so evaluation counts each sample once.
    `set_epoch(epoch, start)` begins the epoch's order at this rank's `start`-th sample: a run
    resumed mid-epoch (trainers.checkpoint) goes on where it stopped, skipping and repeating nothing."""

    def __init__(self, n: int, rank: int, world: int, shuffle: bool, seed: int = 0):
        self.n, self.rank, self.world, self.shuffle, self.seed, self.epoch = n, rank, world, shuffle, seed, 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self._full_length():
            raise ValueError(f"start {start} is outside this rank's {self._full_length()} samples")
        self.epoch, self.start = epoch, start

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng(self.seed + self.epoch).permutation(self.n)

    def __iter__(self):
        order = self._order()
        if self.shuffle:  # equal length on every rank, so collective steps stay in lockstep
            per = self.n // self.world
            mine = order[self.rank * per: (self.rank + 1) * per]
        else:
            mine = order[self.rank:: self.world]
        return iter(mine[self.start:].tolist())

    def _full_length(self) -> int:
        return self.n // self.world if self.shuffle else len(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return self._full_length() - self.start


def to_samples(arrays: dict[str, np.ndarray], window: int | None, text_len: int, modalities: list[str] | None,
               tokenizer: TextTokenizer | None = None) -> dict[str, np.ndarray]:
    """A shard's arrays as one numpy array per model input, a row per sample (windows cut,
    text tokenised, images in tensor layout): what a streaming loader hands to the loop."""
    ds = SplitDataset(arrays, window, text_len, modalities, tokenizer)
    out = {"label": ds.label.numpy(), "mask": ds.mask.numpy()}
    if "sensor" in ds.modalities:
        if ds.signal is not None:
            idx = np.asarray(ds.starts)[:, None] + np.arange(window)[None, :]
            out["sensor"] = np.ascontiguousarray(ds.signal.numpy()[:, idx].transpose(1, 0, 2))
        else:
            out["sensor"] = ds.sensor.numpy()
    if "image" in ds.modalities:
        out["image"] = ds.image.numpy()
    if "text" in ds.modalities:
        out["text"] = ds.text.numpy()
    return out
