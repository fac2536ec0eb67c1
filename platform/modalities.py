"""How each modality becomes a tensor, shared by training and serving.

Training (indai.trainers) and serving (indai.serving) must turn text and images into model
inputs the same way, or a served model sees other numbers than it was trained on. Both import
these functions from here; the model itself only ever sees arrays.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from pathlib import Path

import numpy as np

from indai.platform.errors import UserError

MODALITIES = ("sensor", "image", "text")
TEXT_PAD = 0
TEXT_VOCAB = 257  # 0 = padding, 1..256 = UTF-8 byte value + 1
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
# all the images of one request together. Decoding is what a request costs (about 0.7 s of one core
# for a 4096x4096 PNG) and a request may hold up to 256 instances, each a small file that declares
# the full MAX_IMAGE_PIXELS: the per-image bound alone lets one request take minutes of CPU.
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_PIXELS


def tokenize_bytes(texts: list[str], max_len: int) -> np.ndarray:
    """UTF-8 byte tokens (Korean and English alike), right-padded with 0: int64 [N, max_len]."""
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, t in enumerate(texts):
        raw = np.frombuffer(str(t).encode("utf-8")[:max_len], dtype=np.uint8)
        out[i, : raw.size] = raw.astype(np.int64) + 1
    return out


TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


class TextTokenizer:
    """Text -> int64 ids [N, max_len], right-padded with `pad_id`: the one tokenisation that the
    training data, the streaming loader and the served model all use.

    `utf8-bytes` is our byte vocabulary (tokenize_bytes); `hf` is a Hugging Face fast tokenizer
    read from its tokenizer.json by the `tokenizers` library (Rust, a JSON file: no pickle, no
    code). The model card describes it (`spec`), the artefact folder holds the file, and
    `from_card` checks the file's sha256 before using it. Picklable (it ships to Ray Data
    tasks as its JSON text).
    """

    def __init__(self, kind: str, max_len: int, pad_id: int = TEXT_PAD, tokenizer_json: str | None = None):
        if kind not in ("utf8-bytes", "hf"):
            raise UserError(f"text tokenizer kind {kind!r} is not known: use utf8-bytes or hf")
        if kind == "hf" and tokenizer_json is None:
            raise UserError("an hf text tokenizer needs its tokenizer.json")
        self.kind, self.max_len, self.pad_id, self.tokenizer_json = kind, int(max_len), int(pad_id), tokenizer_json
        self._compiled = None

    @classmethod
    def utf8(cls, max_len: int) -> "TextTokenizer":
        return cls("utf8-bytes", max_len)

    @classmethod
    def from_hf_file(cls, path: str | Path, max_len: int, pad_id: int = 0) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist: a Hugging Face text encoder needs its tokenizer.json (fast tokenizer)")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise UserError(f"{path} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB: is it a tokenizer.json?")
        tok = cls("hf", max_len, pad_id, path.read_text(encoding="utf-8"))
        tok._tokenizer()  # refuse a broken file now, not in the first batch
        return tok

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _compiled=None)

    def _tokenizer(self):
        if self._compiled is None:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_str(self.tokenizer_json)
            except Exception as e:  # the Rust parser raises its own exception type
                raise UserError(f"tokenizer.json could not be read ({str(e)[:200]}): use the tokenizer.json of a fast tokenizer") from None
            tok.enable_truncation(max_length=self.max_len)
            tok.enable_padding(length=self.max_len, pad_id=self.pad_id, pad_token=tok.id_to_token(self.pad_id) or "[PAD]")
            self._compiled = tok
        return self._compiled

    def encode(self, texts) -> np.ndarray:
        texts = ["" if t is None else str(t) for t in texts]
        if self.kind == "utf8-bytes":
            return tokenize_bytes(texts, self.max_len)
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int64)
        for i, enc in enumerate(self._tokenizer().encode_batch(texts)):
            out[i, : len(enc.ids)] = enc.ids[: self.max_len]
        return out

    def spec(self) -> dict:
        """How the card describes this tokenizer (without the file's hash; see `save`)."""
        if self.kind == "utf8-bytes":
            return {"kind": "utf8-bytes", "max_len": self.max_len}
        return {"kind": "hf", "file": TOKENIZER_FILE, "pad_id": self.pad_id, "max_len": self.max_len}

    def save(self, folder: str | Path) -> dict:
        """Write what the tokenizer needs into a model folder; return its card entry."""
        spec = self.spec()
        if self.kind == "hf":
            path = Path(folder) / TOKENIZER_FILE
            path.write_text(self.tokenizer_json, encoding="utf-8")
            spec["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return spec

    @classmethod
    def from_card(cls, text_input: dict, folder: str | Path) -> "TextTokenizer":
        """The tokenizer a card's `inputs.text` names; an old card (no tokenizer object) means UTF-8 bytes."""
        spec = text_input.get("tokenizer") or "utf8-bytes"
        if isinstance(spec, str):
            spec = {"kind": spec}
        max_len = int(spec.get("max_len") or text_input["max_len"])
        if spec.get("kind") == "utf8-bytes":
            return cls.utf8(max_len)
        if spec.get("kind") != "hf":
            raise UserError(f"the model card names text tokenizer {spec.get('kind')!r}: this indai knows utf8-bytes and hf")
        name = spec.get("file")
        if name != TOKENIZER_FILE:
            raise UserError(f"the model card names tokenizer file {name!r}: only {TOKENIZER_FILE} in the model folder is accepted")
        path = Path(folder) / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != spec.get("sha256"):
            raise UserError(f"{path} is missing or does not match the hash in its card: refusing to load it")
        return cls.from_hf_file(path, max_len, int(spec.get("pad_id", 0)))


def image_to_array(img, size: int) -> np.ndarray:
    """A PIL image -> uint8 [size, size, 3] (RGB, resized)."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _image_header(b64: str) -> tuple[bytes, int, int]:
    """A request's base64 image -> (file bytes, width, height), read from the header only: refuses
    what is not base64, not PNG/JPEG, or larger than MAX_IMAGE_PIXELS before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(b64) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UserError(f"image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB: send a smaller image")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image is not valid base64: send the PNG or JPEG file bytes base64-encoded") from None
    try:  # the header only: the size is checked before any pixel is decoded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
        with img:
            # phone cameras write MPO: a JPEG whose MPF block lists extra frames (depth, preview); its
            # first frame is the photo, and ingest (connectors.images) takes it as JPEG too
            if img.format not in ("PNG", "JPEG", "MPO"):
                raise UserError(f"image format {img.format} is not accepted: send PNG or JPEG")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise UserError(f"image of {img.width}x{img.height} pixels is too large: at most {MAX_IMAGE_PIXELS} pixels")
            return raw, img.width, img.height
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours: the header declares a giant
        raise UserError(f"image declares far more than {MAX_IMAGE_PIXELS} pixels (a decompression bomb?): "
                        "send at most 4096x4096 pixels") from None
    except (UnidentifiedImageError, OSError):
        raise UserError("image could not be decoded: send a PNG or JPEG file, base64-encoded") from None


def check_request_pixels(images, limit: int = MAX_REQUEST_PIXELS, size: int | None = None) -> int:
    """Refuse a request whose images declare more than `limit` pixels in all, from their headers
    alone (nothing is decoded); return the total. `images` are the request's base64 images (None
    for an instance without one); `size` is the side the model reads, named in the refusal."""
    total = 0
    for b64 in images:
        if not isinstance(b64, str):
            continue  # no image, or not a string: prepare() refuses that with its own message
        _, width, height = _image_header(b64)
        total += width * height
        if total > limit:
            smaller = f"downscale them to {size}x{size} pixels (what the model reads)" if size else "downscale them"
            raise UserError(f"the images of this request hold more than {limit:,} pixels in all (the limit per request): "
                            f"send fewer images per request, or {smaller} before sending")
    return total


def decode_image(b64: str, size: int) -> np.ndarray:
    """Base64 PNG/JPEG from a request -> uint8 [size, size, 3]; refuses what is not an image."""
    raw, _, _ = _image_header(b64)
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
