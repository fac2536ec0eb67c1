"""Decompression bombs: images that are small on disk but declare a huge pixel count are refused
from their header, before any pixel is decoded, on every path that decodes a user's image:
ingest (connectors.images.read_image, what `indai data ingest` calls for image files and table
image columns), the release's re-encoding (strip_metadata) and the serving request decoder
(modalities.decode_image, which IndaiModel.prepare and the report writer call for a base64 image).

Two kinds of bomb: a header declaring 50000x50000 (2.5 G pixels; Pillow's own guard fires too) and a
complete 9000x9000 image of compressed zeros (81 M pixels: above indai's limits, 80 M for ingest and
4096x4096 for serving, but below Pillow's error level, so only indai's guard stands in the way).
Peak memory is measured as the growth of this process's resident set (VmHWM after resetting it
through /proc/self/clear_refs); a control decodes the same bomb with the guards lifted, to show the
meter sees it. Also: oversized and malformed base64 images in a predict body, at the decoder.
"""
from __future__ import annotations

import base64
import gc
import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from indai.platform import datasets
from indai.platform.connectors import images
from indai.platform.errors import UserError
from indai.platform.ingest import ingest
from indai.platform.modalities import decode_image
from indai.platform.storage import open_store

MB = 1024 * 1024
BOUND = 50 * MB  # what a refused bomb may add to the peak resident memory


# ---- measuring -----------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


class PeakRss:
    """Growth of this process's peak resident memory inside the block, in bytes (`.growth`).

    Linux keeps the peak in VmHWM; writing 5 to /proc/self/clear_refs resets it to the current RSS.
    Where that is not allowed, a thread samples VmRSS every millisecond instead."""

    def __enter__(self) -> "PeakRss":
        gc.collect()
        self._sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._peak, self._stop = 0, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.start = _status_kib("VmRSS")
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _status_kib("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._sampler.join(timeout=5)
            peak = max(self._peak, _status_kib("VmRSS"))
        self.growth = peak - self.start


# ---- building bombs --------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A grey 8-bit PNG of zeros declaring width x height; `rows` limits the rows actually written
    (None: all of them, compressed about 1000:1)."""
    comp = zlib.compressobj(9)
    line = bytes(width + 1)  # filter byte + samples
    idat, left = [], height if rows is None else rows
    while left:
        n = min(left, 256)
        idat.append(comp.compress(line * n))
        left -= n
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b"")


def tiff_bomb(width: int, height: int, bits: int = 16, complete: bool = True) -> bytes:
    """A deflate-compressed grey TIFF (16 bit: the tifffile path) declaring width x height. Complete:
    one row per strip, every strip pointing at the same compressed row of zeros (the whole image
    decodes, yet the file is tiny); else one strip holding a single row (header-only bomb)."""
    row = zlib.compress(bytes(width * bits // 8), 9)
    strips = height if complete else 1
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (259, 3, 1, 8), (262, 3, 1, 1),
            (273, 4, strips, None), (277, 3, 1, 1), (278, 4, 1, 1 if complete else height), (279, 4, strips, None)]
    ifd_size = 2 + 12 * len(tags) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    out = [b"II*\x00", struct.pack("<I", 8), struct.pack("<H", len(tags))]
    for tag, kind, count, value in tags:
        if tag in (273, 279):  # one strip: the value itself; several: where the array of them starts
            value = (data_at if tag == 273 else len(row)) if strips == 1 else (offsets_at if tag == 273 else counts_at)
        out.append(struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)))
    out.append(struct.pack("<I", 0))
    out.append(struct.pack(f"<{strips}I", *([data_at] * strips)))
    out.append(struct.pack(f"<{strips}I", *([len(row)] * strips)))
    out.append(row)
    return b"".join(out)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is edited to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def small_png(side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(side * side * 3) % 251).astype(np.uint8).reshape(side, side, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    made = {"png-50000x50000": png_bomb(50000, 50000, rows=64),
            "png-9000x9000": png_bomb(9000, 9000),
            "tiff16-50000x50000": tiff_bomb(50000, 50000, complete=False),
            "tiff16-9000x9000": tiff_bomb(9000, 9000),
            "tiff8-9000x9000": tiff_bomb(9000, 9000, bits=8),
            "jpeg-60000x60000": jpeg_declaring(60000, 60000),
            "jpeg-9000x9000": jpeg_declaring(9000, 9000)}
    paths = {}
    for name, data in made.items():
        assert len(data) < 400_000, (name, len(data))  # tiny on disk
        paths[name] = folder / (name + (".png" if name.startswith("png") else ".tif" if name.startswith("tiff") else ".jpg"))
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module", autouse=True)
def warm_decoders():
    """Import and run every decoder once, so the measured blocks do not count first-use imports."""
    data = small_png()
    images.decode_image_bytes(data, "warm", 16)
    images.strip_metadata(data)
    decode_image(base64.b64encode(data).decode(), 16)
    buf = io.BytesIO()
    import tifffile

    tifffile.imwrite(buf, np.zeros((8, 8), np.uint16))
    images.decode_image_bytes(buf.getvalue(), "warm", 16)


# the paths that decode a user's image: (name, call(path) -> anything, what its refusal says)
PATHS = {
    "ingest read_image": lambda p: images.read_image(p, size=64),
    "ingest grey": lambda p: images.read_image(p, size=(32, 48), mode="L"),
    "release strip_metadata": lambda p: images.strip_metadata(p.read_bytes(), p.name),
    "serving decode_image": lambda p: decode_image(base64.b64encode(p.read_bytes()).decode(), 64),
}


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("bomb", ["png-50000x50000", "png-9000x9000", "tiff16-50000x50000", "tiff16-9000x9000",
                                  "tiff8-9000x9000", "jpeg-60000x60000", "jpeg-9000x9000"])
def test_bombs_are_refused_from_the_header_with_bounded_memory(bombs, path_name, bomb):
    decode = PATHS[path_name]
    with PeakRss() as rss, pytest.raises(UserError) as refused:
        decode(bombs[bomb])
    message = str(refused.value)
    assert "\n" not in message
    if path_name.startswith("serving") and bomb in ("tiff16-9000x9000", "tiff8-9000x9000"):
        assert "format TIFF is not accepted" in message  # serving takes PNG and JPEG only
    else:  # (the 50000x50000 TIFF trips Pillow's guard while opening, before the format is looked at)
        assert "pixels" in message, message
        assert "decompression bomb" in message or "too large" in message, message
    assert rss.growth < BOUND, f"{path_name} on {bomb}: peak resident memory grew {rss.growth / MB:.0f} MB"


def test_the_bomb_builders_make_real_images():
    """Built small, the same files decode to zeros: a bomb is refused for its size, not as damaged."""
    for data, bits in ((png_bomb(300, 200), 8), (tiff_bomb(300, 200), 16), (tiff_bomb(300, 200, bits=8), 8)):
        rec = images.decode_image_bytes(data, "small", None, "L")
        assert rec.pixels.shape == (200, 300, 1) and int(rec.pixels.max()) == 0 and rec.bit_depth == bits
    with Image.open(io.BytesIO(jpeg_declaring(300, 200))) as img:
        assert img.size == (300, 200) and img.format == "JPEG"


def test_the_meter_sees_a_bomb_decoded_without_the_guards(bombs, monkeypatch):
    """Control: with indai's limit and Pillow's lifted, the same 9000x9000 PNG really costs memory
    (81 MB of grey pixels), so the bound above is a measurement, not a formality."""
    monkeypatch.setattr(images, "MAX_PIXELS", 10**10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with PeakRss() as rss:
        rec = images.read_image(bombs["png-9000x9000"], size=16, mode="L")
    assert rec.pixels.shape == (16, 16, 1) and int(rec.pixels.max()) == 0
    assert rss.growth > 75 * MB, f"only {rss.growth / MB:.0f} MB"


def test_indai_guard_does_not_rely_on_pillows(bombs, monkeypatch):
    """A library that switches Pillow's guard off (Image.MAX_IMAGE_PIXELS = None) leaves indai's."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    for name in ("png-50000x50000", "tiff16-50000x50000", "jpeg-60000x60000"):
        with PeakRss() as rss, pytest.raises(UserError, match="exceeds the limit of 80,000,000 pixels"):
            images.read_image(bombs[name], size=64)
        assert rss.growth < BOUND
    for name in ("png-50000x50000", "jpeg-60000x60000"):  # serving takes no TIFF at all
        with PeakRss() as rss, pytest.raises(UserError, match="too large: at most 16777216 pixels"):
            decode_image(base64.b64encode(bombs[name].read_bytes()).decode(), 64)
        assert rss.growth < BOUND


def test_ingest_of_image_files_names_the_bomb_and_writes_no_version(tmp_path, bombs):
    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(6):
        (folder / f"ok{i}.png").write_bytes(small_png(20 + i))
    spec = tmp_path / "spec.yaml"
    spec.write_text("# indai data ingest spec.yaml\n" + yaml.safe_dump(
        {"name": "bombs", "member": "m1", "image": {"size": 32}, "split": {"by": "random", "seed": 0},
         "sources": [{"kind": "files", "glob": "img/*", "modality": "image", "label": "x"}]}))
    store = open_store(tmp_path / "store")
    name, version, _ = ingest(spec, store, progress=False)  # the clean set ingests (and warms every import)
    (folder / "zz-bomb.png").write_bytes(bombs["png-9000x9000"].read_bytes())
    with PeakRss() as rss, pytest.raises(UserError, match=r"zz-bomb\.png: image of 9000x9000 pixels exceeds the limit"):
        ingest(spec, store, progress=False)
    assert rss.growth < BOUND, f"ingest grew {rss.growth / MB:.0f} MB"
    assert [v for n, v in datasets.list_versions(store)] == [version]  # nothing new is readable


# ---- base64 images in a predict body, at the decoder ---------------------------------------------

@pytest.mark.parametrize("body, says", [
    ("A" * (8 * MB * 4 // 3 + 8), "larger than 8 MiB"),
    ("", "could not be decoded"),
    ("not base64!", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(small_png()).decode(), "not valid base64"),
    (base64.encodebytes(small_png()).decode(), "not valid base64"),  # line breaks every 76 characters
    (base64.b64encode(small_png()).decode()[:-2], "not valid base64"),  # bad padding
    (base64.urlsafe_b64encode(bytes(range(256)) * 4).decode(), "not valid base64"),
    (base64.b64encode(os.urandom(3000)).decode(), "could not be decoded"),
    (base64.b64encode(small_png(64)[:400]).decode(), "could not be decoded"),  # truncated
    (base64.b64encode(b"GIF89a" + bytes(40)).decode(), "could not be decoded"),
])
def test_malformed_and_oversized_base64_images_are_refused(body, says):
    with PeakRss() as rss, pytest.raises(UserError, match=says) as refused:
        decode_image(body, 64)
    assert "\n" not in str(refused.value)
    assert rss.growth < BOUND


def test_other_formats_are_refused_by_name_and_a_good_image_passes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    with pytest.raises(UserError, match="format BMP is not accepted"):
        decode_image(base64.b64encode(buf.getvalue()).decode(), 32)
    out = decode_image(base64.b64encode(small_png(40)).decode(), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.std() > 10


def test_a_phone_jpeg_with_an_mpf_block_is_taken_as_jpeg():
    """Phone cameras write JPEGs with an MPF block (extra frames: a depth map, a preview), which
    Pillow names MPO. Ingest takes them as JPEG; a request's image must be taken the same way, as
    the same pixels: those of its first frame (before: refused as "format MPO is not accepted")."""
    photo = Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3))
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (64, 48), (200, 10, 10))])
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert (img.format, img.n_frames) == ("MPO", 2)
    plain = io.BytesIO()
    photo.save(plain, format="JPEG")  # the first frame alone, encoded alike
    served = decode_image(base64.b64encode(buf.getvalue()).decode(), 32)
    assert served.shape == (32, 32, 3) and served.dtype == np.uint8
    assert np.array_equal(served, decode_image(base64.b64encode(plain.getvalue()).decode(), 32))
    assert np.array_equal(served, images.decode_image_bytes(buf.getvalue(), "photo.jpg", 32).pixels)  # what ingest makes of it
