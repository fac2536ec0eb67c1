"""Images (PNG, JPEG, TIFF; grey or colour; 8 or 16 bit) into uint8 pixel arrays, metadata dropped.

Only pixels leave this module: EXIF (with GPS position, camera serial, owner), ICC profiles,
XMP, IPTC, PNG text chunks and descriptive TIFF tags can identify a member, a site or a person,
so they never reach a dataset. Their *names* are returned so that the dataset manifest can say
what was removed without repeating it.

Decisions worth knowing:
- EXIF/TIFF orientation is applied before the tag is dropped, so a photo taken upright stays
  upright once the tag that said so is gone.
- 16-bit samples are scaled to 8 bit over the full range, round(v / 257): 0 -> 0, 65535 -> 255,
  v * 257 -> v. No auto-contrast, because a per-image stretch would hide real intensity
  differences (a dark defect image would look like a bright one). 16-bit TIFFs (grey or RGB)
  are decoded with tifffile, because Pillow keeps only the high byte of 16-bit colour samples;
  a 16-bit colour PNG is reduced by Pillow (high byte), at most 1 off round(v / 257).
- Colour conversion and resizing are Pillow's convert() and bilinear resize, the same as
  `indai.platform.modalities.image_to_array` uses when a model is served, so trained and served
  models see the same numbers. Like there, an alpha channel is dropped, not composited.
- The pixel limit guards against decompression bombs: a small file can declare a huge image.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from indai.platform.errors import UserError

MAX_PIXELS = 80_000_000  # e.g. a 16k x 5k line-scan image; below Pillow's own warning level
FORMATS = ("PNG", "JPEG", "TIFF")

_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
_ORIENTATION = 0x0112
# TIFF tags that describe how pixels are stored, not who or where: they are not reported.
_TIFF_STRUCTURE = {
    "NewSubfileType", "SubfileType", "ImageWidth", "ImageLength", "BitsPerSample", "Compression",
    "PhotometricInterpretation", "Threshholding", "CellWidth", "CellLength", "FillOrder",
    "StripOffsets", "SamplesPerPixel", "RowsPerStrip", "StripByteCounts", "MinSampleValue",
    "MaxSampleValue", "XResolution", "YResolution", "PlanarConfiguration", "ResolutionUnit",
    "Predictor", "ColorMap", "TileWidth", "TileLength", "TileOffsets", "TileByteCounts",
    "ExtraSamples", "SampleFormat", "SMinSampleValue", "SMaxSampleValue", "JPEGTables",
    "YCbCrCoefficients", "YCbCrSubSampling", "YCbCrPositioning", "ReferenceBlackWhite",
    "WhitePoint", "PrimaryChromaticities", "TransferFunction", "GrayResponseUnit",
    "GrayResponseCurve", "SubIFDs", "PageNumber", "InkSet", "NumberOfInks", "DotRange",
    "JPEGProc", "JPEGInterchangeFormat", "JPEGInterchangeFormatLength", "JPEGRestartInterval",
    "JPEGQTables", "JPEGDCTables", "JPEGACTables", "JPEGLosslessPredictors", "JPEGPointTransforms",
}
_TIFF_RENAME = {"InterColorProfile": "ICCProfile", "XMP": "XMP", "IPTCNAA": "IPTC", "Photoshop": "Photoshop"}
# PNG chunks that carry pixels or how to display them; every other chunk is reported.
_PNG_STRUCTURE = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT",
                  b"pHYs", b"bKGD", b"hIST", b"acTL", b"fcTL", b"fdAT"}
_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
              6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


@dataclass
class ImageRecord:
    """Pixels of one image and the names (never the values) of the metadata dropped from it."""

    pixels: np.ndarray  # uint8 [H, W, 3] for RGB, [H, W, 1] for L (channel-last)
    removed_metadata: list[str] = field(default_factory=list)  # e.g. "EXIF:Artist", "GPS:GPSLatitude", "XMP"
    source_mode: str = ""  # Pillow mode of the file ("L", "RGB", "P", "I;16", ...) or "RGB;16"/"L;16" for 16-bit TIFF
    bit_depth: int = 8  # bits per sample in the file: 1, 8 or 16


@dataclass
class _Decoded:
    image: object  # PIL.Image.Image, oriented, 8-bit (or 16-bit grey for strip_metadata)
    removed: list[str]
    source_mode: str
    bit_depth: int
    fmt: str
    array16: np.ndarray | None = None  # oriented 16-bit samples of a TIFF decoded by tifffile


def read_image(path: Path, size: int | tuple[int, int] | None = None, mode: Literal["L", "RGB"] = "RGB") -> ImageRecord:
    """Read one PNG/JPEG/TIFF file into uint8 pixels, channel-last, metadata dropped.

    `size` resizes to size x size, or to (height, width) — the order of the returned array's
    shape; None keeps the file's size. `mode` "L" gives [H, W, 1], "RGB" gives [H, W, 3].
    """
    path = Path(path)
    return decode_image_bytes(_read_bytes(path), path.name, size, mode)


def decode_image_bytes(data: bytes, name: str, size: int | tuple[int, int] | None = None,
                       mode: Literal["L", "RGB"] = "RGB") -> ImageRecord:
    """The same decoding for bytes from anywhere (a file at ingest, a request at serving), so a
    served image gets the numbers its training copy got: EXIF orientation applied, 16-bit
    scaled by the full range, metadata dropped. `name` only labels errors."""
    if mode not in ("L", "RGB"):
        raise UserError(f"{name}: image mode {mode!r} is not supported: use 'L' (grey) or 'RGB'")
    hw = _check_size(name, size)
    dec = _decode(data, name, keep_16bit=False)
    from PIL import Image

    img = dec.image
    try:
        img = img.convert(mode)
        if hw is not None and (img.height, img.width) != hw:
            img = img.resize((hw[1], hw[0]), Image.BILINEAR)
        px = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # a decoder error that surfaced only on conversion
        raise UserError(f"{name}: the image data could not be decoded ({_why(e)}): export the image again as PNG") from None
    if px.ndim == 2:
        px = px[..., None]
    return ImageRecord(pixels=np.ascontiguousarray(px), removed_metadata=dec.removed,
                       source_mode=dec.source_mode, bit_depth=dec.bit_depth)


def strip_metadata(data: bytes, name: str = "image") -> tuple[bytes, list[str]]:
    """Re-encode an image file in its own format with pixels only; return (bytes, removed names).

    For an image that is shared as a file rather than as an array. Orientation is applied to the
    pixels (the tag goes). PNG and TIFF are lossless and keep 16-bit samples (except 16-bit
    colour PNG, which Pillow only reads as 8 bit); JPEG is re-encoded
    with the file's own quantisation tables (quality "keep") when it needs no rotation, else at
    quality 95. `name` only labels error messages.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UserError(f"{name}: expected the bytes of an image file, got {type(data).__name__}")
    dec = _decode(bytes(data), name, keep_16bit=True)
    out = io.BytesIO()
    try:
        if dec.fmt == "TIFF":
            _write_tiff(out, dec)
        elif dec.fmt == "PNG":
            clean = _without_info(dec.image)
            clean.save(out, format="PNG", optimize=False)
        else:  # JPEG
            img = dec.image
            if getattr(img, "format", None) == "JPEG" and img.mode in ("L", "RGB", "CMYK"):
                img.info = {}  # the encoder copies a comment from info
                img.save(out, format="JPEG", quality="keep", subsampling="keep")
            else:
                clean = _without_info(img)
                if clean.mode not in ("L", "RGB", "CMYK"):
                    clean = clean.convert("RGB")
                clean.save(out, format="JPEG", quality=95)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{name}: the image could not be re-encoded ({_why(e)}): export it again as PNG") from None
    return out.getvalue(), dec.removed


# ----------------------------------------------------------------------------------------------
# Decoding


def _check_size(name: str, size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise UserError(f"{name}: image size {size!r} is not valid: give an int (square) or (height, width)")
    if min(hw) < 1 or max(hw) > 16384:
        raise UserError(f"{name}: image size {size!r} is out of range: each side must be 1..16384 pixels")
    return hw


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path.name}: image file not found at {path}: check the path in the dataset spec") from None
    except IsADirectoryError:
        raise UserError(f"{path.name}: is a folder, not an image file: point to the image itself") from None
    except OSError as e:
        raise UserError(f"{path.name}: cannot read the image file ({e.strerror}): check its permissions") from None
    return data


def _why(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


def _too_large(name: str, w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise UserError(f"{name}: image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS:,} pixels "
                        "(a guard against decompression bombs): split or downscale it before ingest")


def _decode(data: bytes, name: str, keep_16bit: bool) -> _Decoded:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(f"{name}: the file is empty: export the image again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UserError(f"{name}: the image declares more than {MAX_PIXELS:,} pixels (a guard against "
                        "decompression bombs): split or downscale it before ingest") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file (or not PNG, JPEG or TIFF): check the file, "
                        "or convert it to PNG") from None
    except Exception as e:
        raise UserError(f"{name}: the image header is damaged ({_why(e)}): export the image again") from None
    fmt = "JPEG" if img.format == "MPO" else img.format  # phones write MPO: JPEG with extra frames
    if fmt not in FORMATS:
        raise UserError(f"{name}: image format {img.format} is not supported: convert it to PNG "
                        f"(supported: {', '.join(FORMATS)})")
    _too_large(name, img.width, img.height)
    try:
        if fmt == "TIFF":
            dec = _decode_tiff(data, img, name, keep_16bit)
            if dec is not None:
                return dec
        img.load()  # decode now: truncation and bad CRCs surface here, inside the except below
        removed = _png_names(data, img) if fmt == "PNG" else _jpeg_names(img) if fmt == "JPEG" else _tiff_names(data)
        source_mode, bits = img.mode, _bits(img)
        if fmt == "PNG" and bits == 8 and data[12:16] == b"IHDR" and data[24] == 16:
            source_mode, bits = f"{img.mode};16", 16  # 16-bit colour that Pillow already reduced to 8 bit
        orientation = _orientation_of(img)
        if orientation != 1:
            img = img.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
        if img.mode.startswith("I") and not keep_16bit:
            img = _to_8bit(img)
        return _Decoded(img, removed, source_mode, bits, fmt)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{name}: the {fmt} data is truncated or damaged ({_why(e)}): "
                        "copy or export the image again") from None


def _bits(img) -> int:
    if img.mode == "1":
        return 1
    if img.mode.startswith("I;16") or img.mode == "I":
        return 16
    return 8


def _to_8bit(img):
    """16-bit grey (Pillow 'I;16*' or 'I') -> 8-bit 'L' by round(v / 257)."""
    from PIL import Image

    return Image.fromarray(_scale16(np.asarray(img)), mode="L")


def _scale16(a: np.ndarray) -> np.ndarray:
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a + 128) // 257).astype(np.uint8)


def _orientation_of(img) -> int:
    try:
        o = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:
        return 1
    return o if o in _TRANSPOSE else 1


def _without_info(img):
    """A copy that carries no info dict (encoders copy ICC, comments and EXIF from it)."""
    clean = img.copy()
    keep = {k: img.info[k] for k in ("transparency",) if k in img.info}
    clean.info = keep
    return clean


# ----------------------------------------------------------------------------------------------
# Metadata names


def _exif_names(exif) -> list[str]:
    from PIL import ExifTags

    names: list[str] = []
    for tag in list(exif.keys()):
        names.append("EXIF:" + ExifTags.TAGS.get(tag, f"0x{tag:04X}"))
    for ifd_tag, prefix, table in ((_EXIF_IFD, "EXIF", ExifTags.TAGS), (_GPS_IFD, "GPS", ExifTags.GPSTAGS),
                                   (_INTEROP_IFD, "EXIF", ExifTags.TAGS)):
        if ifd_tag not in exif:
            continue
        try:
            sub = exif.get_ifd(ifd_tag)
        except Exception:
            continue
        names += [f"{prefix}:" + table.get(t, f"0x{t:04X}") for t in sub]
    return names


def _png_names(data: bytes, img) -> list[str]:
    names: list[str] = []
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"IEND":
            break
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            body = data[pos + 8:pos + 8 + min(length, 80)]
            key = body.split(b"\0", 1)[0].decode("latin-1", "replace")
            names.append("XMP" if key == "XML:com.adobe.xmp" else f"PNG text:{key}")
        elif ctype == b"iCCP":
            names.append("ICCProfile")
        elif ctype == b"eXIf":
            names.append("EXIF")
        elif ctype not in _PNG_STRUCTURE:
            names.append("PNG:" + ctype.decode("latin-1", "replace"))
        pos += 12 + length
    if "EXIF" in names:
        names.remove("EXIF")
        names += _exif_names(img.getexif()) or ["EXIF"]
    return sorted(set(names))


def _jpeg_names(img) -> list[str]:
    names: list[str] = []
    for marker, body in getattr(img, "applist", []):
        if marker == "APP0" and body[:5] in (b"JFIF\0", b"JFXX\0"):
            continue
        if marker == "APP1" and body[:6] == b"Exif\0\0":
            names += _exif_names(img.getexif()) or ["EXIF"]
        elif marker == "APP1" and body[:4] == b"http":
            names.append("XMP")
        elif marker == "APP2" and body[:12] == b"ICC_PROFILE\0":
            names.append("ICCProfile")
        elif marker == "APP2" and body[:4] == b"MPF\0":
            continue  # multi-picture index of phone JPEGs: offsets only
        elif marker == "APP13":
            names.append("IPTC")
        elif marker == "APP14" and body[:5] == b"Adobe":
            continue  # colour transform flag, needed to decode
        elif marker == "COM":
            names.append("JPEG:Comment")
        else:
            names.append(f"JPEG:{marker}")
    if "comment" in img.info:
        names.append("JPEG:Comment")
    return sorted(set(names))


def _tiff_names(data: bytes) -> list[str]:
    import tifffile

    names: list[str] = []
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for page in tif.pages[:1]:
            for tag in page.tags.values():
                n = tag.name
                if n in _TIFF_STRUCTURE:
                    continue
                names.append(_TIFF_RENAME.get(n, f"TIFF:{n}"))
                if n in ("ExifTag", "GPSTag") and isinstance(tag.value, dict):
                    prefix = "GPS" if n == "GPSTag" else "EXIF"
                    names += [f"{prefix}:{k}" for k in tag.value]
        if len(tif.pages) > 1:
            names.append("TIFF:further pages")
    return sorted(set(names))


# ----------------------------------------------------------------------------------------------
# TIFF: 16-bit samples through tifffile


def _decode_tiff(data: bytes, pil_img, name: str, keep_16bit: bool) -> _Decoded | None:
    """16-bit TIFFs via tifffile (Pillow keeps only the high byte of colour); None: let Pillow do it."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        dtype = np.dtype(page.dtype) if page.dtype is not None else None
        if dtype is None or dtype in (np.dtype(np.uint8), np.dtype(bool)):
            return None
        if dtype != np.dtype(np.uint16):
            raise UserError(f"{name}: TIFF samples of type {dtype} are not supported: export it as 8- or 16-bit unsigned integer")
        _too_large(name, page.imagewidth, page.imagelength)
        photometric = int(page.photometric)
        arr = page.asarray()
        axes = page.axes
        orientation = int(page.tags["Orientation"].value) if "Orientation" in page.tags else 1
    if axes.startswith("S") and arr.ndim == 3:  # planar configuration "separate"
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise UserError(f"{name}: TIFF page of shape {list(arr.shape)} is not a 2-D image: save one image per file")
    samples = arr.shape[2]
    if photometric in (0, 1) and samples in (1, 2):  # MINISWHITE / MINISBLACK, maybe + alpha
        arr = arr[..., :1]
        if photometric == 0:
            arr = 65535 - arr
        src = "L;16" if samples == 1 else "LA;16"
    elif photometric == 2 and samples in (3, 4):  # RGB, maybe + alpha
        arr = arr[..., :3]
        src = "RGB;16" if samples == 3 else "RGBA;16"
    else:
        raise UserError(f"{name}: 16-bit TIFF with photometric interpretation {photometric} and {samples} samples "
                        "is not supported: export it as grey or RGB")
    arr = _orient_array(arr, orientation)
    a8 = _scale16(arr)
    img = Image.fromarray(a8[..., 0] if a8.shape[2] == 1 else a8, mode="L" if a8.shape[2] == 1 else "RGB")
    return _Decoded(img, _tiff_names(data), src, 16, "TIFF", array16=np.ascontiguousarray(arr) if keep_16bit else None)


def _orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """TIFF orientation (1..8, same meaning as EXIF) applied to [H, W, C]."""
    if orientation in (5, 6, 7, 8):
        a = np.swapaxes(a, 0, 1)  # transpose: rows become columns
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        a = a[:, ::-1]
    if orientation in (3, 4):
        a = a[::-1]
    return a


def _write_tiff(out: io.BytesIO, dec: _Decoded) -> None:
    import tifffile

    if dec.array16 is not None:
        arr = dec.array16
        grey = arr.shape[2] == 1
        tifffile.imwrite(out, arr[..., 0] if grey else arr, photometric="minisblack" if grey else "rgb",
                         metadata=None, software=False, compression="zlib")
        return
    clean = _without_info(dec.image)
    clean.save(out, format="TIFF", compression="tiff_deflate")
