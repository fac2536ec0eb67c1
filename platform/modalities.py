"""How each modality becomes a tensor, shared by training and serving.

Training (indai.trainers) and serving (indai.serving) must turn text and images into model
inputs the same way, or a served model sees other numbers than it was trained on. Both import
these functions from here; the model itself only ever sees arrays.
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from indai.platform.errors import UserError

MODALITIES = ("sensor", "image", "text")
TEXT_PAD = 0
TEXT_VOCAB = 257  # 0 = padding, 1..256 = UTF-8 byte value + 1
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


def tokenize_bytes(texts: list[str], max_len: int) -> np.ndarray:
    """UTF-8 byte tokens (Korean and English alike), right-padded with 0: int64 [N, max_len]."""
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, t in enumerate(texts):
        raw = np.frombuffer(str(t).encode("utf-8")[:max_len], dtype=np.uint8)
        out[i, : raw.size] = raw.astype(np.int64) + 1
    return out


def image_to_array(img, size: int) -> np.ndarray:
    """A PIL image -> uint8 [size, size, 3] (RGB, resized)."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_image(b64: str, size: int) -> np.ndarray:
    """Base64 PNG/JPEG from a request -> uint8 [size, size, 3]; refuses what is not an image."""
    from PIL import Image, UnidentifiedImageError

    if len(b64) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UserError(f"image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB: send a smaller image")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image is not valid base64: send the PNG or JPEG file bytes base64-encoded") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise UserError(f"image format {img.format} is not accepted: send PNG or JPEG")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise UserError(f"image of {img.width}x{img.height} pixels is too large: at most {MAX_IMAGE_PIXELS} pixels")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UserError("image could not be decoded: send a PNG or JPEG file, base64-encoded") from None
    from indai.platform.connectors.images import decode_image_bytes

    try:  # the ingest's decoding (orientation, 16-bit), so serving sees what training saw
        return decode_image_bytes(raw, "image", size, "RGB").pixels
    except UserError:
        raise UserError("image could not be decoded: send a PNG or JPEG file, base64-encoded") from None


def images_to_tensor_layout(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] scaled to 0..1 (the model normalises further)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def check_sensor(window: np.ndarray, channels: list[str], length: int,
                 sent_channels: list[str] | None = None, sent_rate: float | None = None,
                 rate: float | None = None) -> np.ndarray:
    """Validate one sensor window against what the model was trained on; return float32 [C, L]."""
    arr = np.asarray(window, dtype=np.float32)
    if sent_channels is not None and list(sent_channels) != list(channels):
        raise UserError(f"sensor channels {list(sent_channels)} do not match the model's {list(channels)}: send them in that order")
    if sent_rate is not None and rate is not None and abs(float(sent_rate) - float(rate)) > 1e-6 * rate:
        raise UserError(f"sensor sampling rate {sent_rate} Hz does not match the model's {rate} Hz: resample before sending")
    if arr.shape != (len(channels), length):
        raise UserError(f"sensor window has shape {list(arr.shape)}, the model expects [{len(channels)}, {length}] (channels x samples)")
    if not np.isfinite(arr).all():
        raise UserError("sensor window holds NaN or infinite values: clean or drop those samples")
    return arr
