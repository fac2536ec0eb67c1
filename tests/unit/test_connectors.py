"""Connectors for images, CAD drawings and documents, on real files: the ELPV solar-cell images
shipped with the environment, and files written here with PIL, tifffile, ezdxf, matplotlib,
python-docx and pypdf. Bad input must come back as a UserError naming the file."""
import importlib.util
import io
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from indai.platform.connectors import cad, documents, images
from indai.platform.connectors.cad import TitleBlockRule, read_dxf
from indai.platform.connectors.documents import chunk_text, read_document
from indai.platform.connectors.images import read_image, strip_metadata
from indai.platform.errors import UserError

_ELPV_SPEC = importlib.util.find_spec("elpv_dataset")
ELPV = Path(_ELPV_SPEC.origin).parent / "data" / "images" if _ELPV_SPEC else Path("/nonexistent")
needs_elpv = pytest.mark.skipif(not (ELPV / "cell0001.png").is_file(), reason="elpv_dataset is not installed")


def expected_8bit(a: np.ndarray) -> np.ndarray:
    # v / 257 is never exactly k + 0.5 (257 is odd), so rint's tie rule does not matter.
    return np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Images


@needs_elpv
def test_elpv_png_shapes_statistic_and_repeatability():
    path = ELPV / "cell0001.png"
    rgb = read_image(path)
    assert rgb.pixels.shape == (300, 300, 3) and rgb.pixels.dtype == np.uint8
    assert rgb.source_mode == "L" and rgb.bit_depth == 8
    grey = read_image(path, mode="L")
    assert grey.pixels.shape == (300, 300, 1)
    assert int(grey.pixels.sum()) == 6522270  # the file's own pixel sum, min 4, max 98
    assert (grey.pixels.min(), grey.pixels.max()) == (4, 98)
    assert np.array_equal(rgb.pixels[..., 0], grey.pixels[..., 0]) and np.array_equal(rgb.pixels[..., 1], rgb.pixels[..., 2])
    assert np.array_equal(read_image(path).pixels, rgb.pixels)  # deterministic
    # ELPV files carry ImageMagick text chunks and a timestamp: names reported, values not.
    assert {"PNG text:comment", "PNG text:date:create", "PNG:tIME"} <= set(rgb.removed_metadata)
    small = read_image(path, size=64, mode="L")
    assert small.pixels.shape == (64, 64, 1)
    assert abs(float(small.pixels.mean()) - 6522270 / 90000) < 1.0
    assert read_image(ELPV / "cell0002.png", size=(30, 50)).pixels.shape == (30, 50, 3)


def _jpeg_with_exif() -> bytes:
    im = Image.new("RGB", (40, 20), (220, 30, 30))
    im.paste((30, 30, 220), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[ExifTags.Base.Artist] = "Kim Chulsoo"
    exif[ExifTags.Base.Software] = "LineCam 2.1"
    exif[ExifTags.Base.Orientation] = 6  # display rotated 90 degrees clockwise
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (37.0, 33.0, 12.0)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=95, exif=exif, icc_profile=b"\0" * 128, comment=b"line 3, Ulsan plant")
    return out.getvalue()


def test_jpeg_exif_gps_names_removed_orientation_applied(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg_with_exif())
    rec = read_image(path)
    names = set(rec.removed_metadata)
    assert {"EXIF:Artist", "EXIF:Software", "EXIF:Orientation", "EXIF:GPSInfo", "GPS:GPSLatitude",
            "GPS:GPSLatitudeRef", "ICCProfile", "JPEG:Comment"} <= names
    assert not any("Kim" in n or "Ulsan" in n for n in names)  # names, never values
    px = rec.pixels.astype(int)
    assert px.shape == (40, 20, 3)  # rotated upright
    top, bottom = px[:16].mean(axis=(0, 1)), px[24:].mean(axis=(0, 1))
    assert top[0] > 180 and top[2] < 80  # the red left half is now on top
    assert bottom[2] > 180 and bottom[0] < 80


@needs_elpv
def test_strip_metadata_jpeg_and_png():
    clean, names = strip_metadata(_jpeg_with_exif())
    assert "EXIF:Artist" in names
    im = Image.open(io.BytesIO(clean))
    assert im.format == "JPEG" and im.size == (20, 40)  # orientation applied to the pixels
    assert len(im.getexif()) == 0 and "exif" not in im.info and "icc_profile" not in im.info
    assert "comment" not in im.info and [m for m, _ in im.applist] == ["APP0"]
    assert b"Kim Chulsoo" not in clean and b"Ulsan" not in clean

    png, names = strip_metadata((ELPV / "cell0001.png").read_bytes())
    assert "PNG text:comment" in names
    im = Image.open(io.BytesIO(png))
    im.load()
    assert im.format == "PNG" and not getattr(im, "text", {}) and b"tIME" not in png and b"tEXt" not in png
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(ELPV / "cell0001.png")))  # lossless


def test_16bit_grey_png_scaled_by_full_range(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    rec = read_image(path, mode="L")
    assert rec.bit_depth == 16 and rec.source_mode.startswith("I")
    assert np.array_equal(rec.pixels[..., 0], expected_8bit(ramp))
    assert rec.pixels[0, 0, 0] == 0 and rec.pixels[-1, -1, 0] == 255 and rec.pixels[0, 1, 0] == 0
    assert rec.pixels.flat[257 * 100] == 100  # v * 257 -> v exactly


def test_16bit_rgb_png_reported_as_16bit(tmp_path):
    import struct
    import zlib

    rgb = np.array([[[0, 65535, 257], [32896, 65278, 514]]], dtype=">u2")  # 1 x 2, exact multiples/ends

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)  # 16-bit truecolour, which Pillow reads as 8 bit
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" + rgb.tobytes())) + chunk(b"IEND", b"")
    (tmp_path / "rgb16.png").write_bytes(png)
    rec = read_image(tmp_path / "rgb16.png")
    assert rec.bit_depth == 16 and rec.source_mode == "RGB;16"
    assert rec.pixels[0].tolist() == [[0, 255, 1], [128, 254, 2]]


def test_16bit_rgb_tiff_via_tifffile(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, size=(48, 64, 3), dtype=np.uint16)
    rgb[0, :3] = [[0, 65535, 257], [128, 129, 32896], [385, 386, 65407]]
    path = tmp_path / "scan16.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", software="InspectPro 5", datetime=True,
                     extratags=[(315, "s", 0, "Park Younghee", True), (316, "s", 0, "QA-PC-07", True)])
    rec = read_image(path)
    assert rec.bit_depth == 16 and rec.source_mode == "RGB;16"
    assert np.array_equal(rec.pixels, expected_8bit(rgb))
    assert rec.pixels[0, 0].tolist() == [0, 255, 1] and rec.pixels[0, 1].tolist() == [0, 1, 128]
    assert rec.pixels[0, 2].tolist() == [1, 2, 255]
    assert {"TIFF:Artist", "TIFF:Software", "TIFF:DateTime", "TIFF:HostComputer", "TIFF:ImageDescription"} <= set(rec.removed_metadata)

    clean, _ = strip_metadata(path.read_bytes())
    with tifffile.TiffFile(io.BytesIO(clean)) as tif:
        names = {t.name for t in tif.pages[0].tags.values()}
        back = tif.pages[0].asarray()
    assert not names & {"Artist", "Software", "DateTime", "HostComputer", "ImageDescription"}
    assert np.array_equal(back, rgb)  # 16 bit kept, lossless


def test_8bit_tiff_via_pillow_with_tags(tmp_path):
    import tifffile

    rgb = np.random.default_rng(5).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = tmp_path / "cam8.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", extratags=[(315, "s", 0, "Choi", True)])
    rec = read_image(path)
    assert rec.bit_depth == 8 and np.array_equal(rec.pixels, rgb) and "TIFF:Artist" in rec.removed_metadata
    clean, _ = strip_metadata(path.read_bytes())
    assert b"Choi" not in clean and np.array_equal(np.asarray(Image.open(io.BytesIO(clean))), rgb)


def test_16bit_grey_tiff(tmp_path):
    import tifffile

    grey = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    path = tmp_path / "grey16.tiff"
    tifffile.imwrite(path, grey)
    rec = read_image(path, mode="L")
    assert rec.source_mode == "L;16" and np.array_equal(rec.pixels[..., 0], expected_8bit(grey))


@needs_elpv
def test_bad_images_are_user_errors(tmp_path, monkeypatch):
    png = (ELPV / "cell0003.png").read_bytes()
    cases = {
        "cut.png": png[: len(png) // 2],
        "cut.jpg": _jpeg_with_exif()[:700],
        "notes.png": b"this is a text file, not an image\n" * 20,
        "empty.png": b"",
    }
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, "GIF")
    cases["anim.gif"] = gif.getvalue()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=re.escape(name)):
            read_image(tmp_path / name)
    with pytest.raises(UserError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="GIF is not supported"):
        read_image(tmp_path / "anim.gif")
    with pytest.raises(UserError, match="mode"):
        read_image(ELPV / "cell0001.png", mode="CMYK")
    with pytest.raises(UserError):
        strip_metadata(b"not an image")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 299)
    with pytest.raises(UserError, match="decompression bomb"):
        read_image(ELPV / "cell0001.png")


# ----------------------------------------------------------------------------------------------
# CAD

SHEET = (0.0, 0.0, 297.0, 210.0)  # A4 sheet frame on a layer that is not title block
TITLE_AREA = (200.0, 5.0, 292.0, 45.0)


def _drawing(path: Path) -> Path:
    import ezdxf

    doc = ezdxf.new("R2018", setup=True)
    for name in ("SHEET", "OUTLINE", "NOTES", "DIM", "TITLEBLOCK"):
        doc.layers.add(name)
    msp = doc.modelspace()
    x0, y0, x1, y1 = SHEET
    msp.add_lwpolyline([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], close=True, dxfattribs={"layer": "SHEET"})
    msp.add_lwpolyline([(40, 80), (140, 80), (140, 160), (40, 160)], close=True, dxfattribs={"layer": "OUTLINE"})
    for cx in (65, 115):
        msp.add_circle((cx, 120), 8, dxfattribs={"layer": "OUTLINE"})
    msp.add_linear_dim(base=(90, 65), p1=(40, 80), p2=(140, 80), dimstyle="EZDXF", text="<> H7",
                       override={"dimtxt": 3, "dimasz": 2, "dimlfac": 1}, dxfattribs={"layer": "DIM"}).render()
    msp.add_text("M8 TAP 4 PLCS", height=3.5, dxfattribs={"layer": "NOTES"}).set_placement((150, 130))
    msp.add_mtext("GENERAL NOTES:\\PDEBURR ALL EDGES", dxfattribs={"layer": "NOTES", "char_height": 3.5, "insert": (20, 195)})
    msp.add_text("재질: SM45C", height=3.5, dxfattribs={"layer": "NOTES"}).set_placement((150, 195))
    balloon = doc.blocks.new("BALLOON")
    balloon.add_circle((0, 0), 4)
    balloon.add_attdef("ITEM", (-1.5, -1.5), dxfattribs={"height": 3})
    msp.add_blockref("BALLOON", (160, 100)).add_auto_attribs({"ITEM": "3"})
    # Title block: frame and texts on layer TITLEBLOCK, plus a TITLE block reference with attributes.
    tb = {"layer": "TITLEBLOCK"}
    tx0, ty0, tx1, ty1 = TITLE_AREA
    msp.add_lwpolyline([(tx0, ty0), (tx1, ty0), (tx1, ty1), (tx0, ty1)], close=True, dxfattribs=tb)
    msp.add_line((tx0, 25), (tx1, 25), dxfattribs=tb)
    msp.add_text("(주)한국정밀", height=5, dxfattribs=tb).set_placement((205, 32))
    msp.add_text("DRAWN 김철수", height=3.5, dxfattribs=tb).set_placement((205, 12))
    title = doc.blocks.new("TITLE")
    title.add_attdef("CHECKED", (0, 0), dxfattribs={"height": 3})
    msp.add_blockref("TITLE", (250, 12)).add_auto_attribs({"CHECKED": "이영희"})
    doc.header["$LASTSAVEDBY"] = "kimcs"
    doc.header["$PROJECTNAME"] = "HK-GEARBOX-2024"
    doc.header.custom_vars.append("Customer", "Hyundai Heavy")
    doc.saveas(path)
    return path


def _px(x: float, y: float, size: int) -> tuple[int, int]:
    """(row, col) of drawing point (x, y) when the sheet frame sets the extents."""
    x0, y0, x1, y1 = SHEET
    half = max(x1 - x0, y1 - y0) / 2 * (1 + 2 * cad.MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int((cy + half - y) / (2 * half) * size), int((x - (cx - half)) / (2 * half) * size)


def test_dxf_title_block_removed_text_and_render(tmp_path):
    path = _drawing(tmp_path / "bracket.dxf")
    size = 256
    rec = read_dxf(path, size=size)
    assert rec.image.shape == (size, size, 1) and rec.image.dtype == np.uint8
    for gone in ("한국정밀", "김철수", "이영희", "DRAWN"):
        assert gone not in rec.text
    lines = rec.text.split("\n")
    # Top to bottom; the MTEXT (x=20) and the TEXT (x=150) share a row, left first, and the
    # MTEXT's two lines stay together. The balloon's attribute "3" is kept, the dimension shows 100.
    assert lines == ["GENERAL NOTES:", "DEBURR ALL EDGES", "재질: SM45C", "M8 TAP 4 PLCS", "3", "100 H7"]

    r = rec.removed
    assert r["title_block_entities"] == 5  # frame, line, two texts, the TITLE insert
    assert r["title_block_layers"] == ["TITLEBLOCK"] and r["title_block_blocks"] == ["TITLE"]
    assert {"$LASTSAVEDBY", "$PROJECTNAME", "$FINGERPRINTGUID", "$TDCREATE"} <= set(r["header_variables"])
    assert r["custom_properties"] == ["Customer"]
    assert not re.search("kimcs|GEARBOX|Hyundai", repr(r))

    img = rec.image[..., 0]
    row, col = _px(40, 120, size)  # left edge of the part outline
    assert img[row - 2:row + 3, col - 2:col + 3].min() < 100
    row, col = _px(90, 80, size)  # bottom edge
    assert img[row - 2:row + 3, col - 2:col + 3].min() < 100
    (r0, c0), (r1, c1) = _px(TITLE_AREA[0], TITLE_AREA[3], size), _px(TITLE_AREA[2], TITLE_AREA[1], size)
    assert img[r0 - 1:r1 + 2, c0 - 1:c1 + 2].min() == 255  # title block area is blank

    kept = read_dxf(path, size=size, title_block=TitleBlockRule(layers=[], blocks=[]))
    assert "(주)한국정밀" in kept.text and "이영희" in kept.text and kept.removed["title_block_entities"] == 0
    assert kept.image[r0 - 1:r1 + 2, c0 - 1:c1 + 2, 0].min() < 100  # control: it is drawn when kept

    assert np.array_equal(read_dxf(path, size=size).image, rec.image)  # deterministic


def test_dxf_region_rule_and_pattern_validation(tmp_path):
    path = _drawing(tmp_path / "plate.dxf")
    rec = read_dxf(path, size=128, title_block=TitleBlockRule(layers=[], blocks=[], region=(195, 0, 295, 50)))
    assert "한국정밀" not in rec.text and "이영희" not in rec.text and "M8 TAP 4 PLCS" in rec.text
    assert rec.removed["title_block_region_entities"] == 5
    rec = read_dxf(path, size=128, title_block=TitleBlockRule(layers=["title.*"], blocks=["TIT.*"]))
    assert "한국정밀" not in rec.text
    with pytest.raises(UserError, match="regular expression"):
        TitleBlockRule(layers=["TITLE("])
    with pytest.raises(UserError, match="region"):
        TitleBlockRule(region=(10, 0, 5, 5))


def test_bad_dxf_files_are_user_errors(tmp_path):
    import ezdxf

    good = _drawing(tmp_path / "good.dxf").read_bytes()
    rng = np.random.default_rng(1)
    cases = {
        "noise.dxf": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes() + b"\n0\nEOF\n",
        "cut.dxf": good[: len(good) // 2],
        "readme.dxf": b"This drawing will follow.\n",
        "old.dxf": b"AC1032" + bytes(200),
        "empty.dxf": b"",
    }
    empty = ezdxf.new("R2018")
    empty.saveas(tmp_path / "blank.dxf")
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "blank.dxf"]:
        with pytest.raises(UserError, match=re.escape(name)):
            read_dxf(tmp_path / name)
    with pytest.raises(UserError, match="DWG"):
        read_dxf(tmp_path / "old.dxf")
    with pytest.raises(UserError, match="empty"):
        read_dxf(tmp_path / "blank.dxf")
    only_title = ezdxf.new("R2018")
    only_title.modelspace().add_line((0, 0), (1, 1), dxfattribs={"layer": "BORDER"})
    only_title.saveas(tmp_path / "border.dxf")
    with pytest.raises(UserError, match="nothing is left"):
        read_dxf(tmp_path / "border.dxf")


# ----------------------------------------------------------------------------------------------
# Documents


def _pdf(path: Path, text: str | None) -> Path:
    from matplotlib.backends.backend_pdf import FigureCanvasPdf
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    FigureCanvasPdf(fig)
    if text:
        fig.text(0.05, 0.6, text)
        fig.text(0.05, 0.4, "Replace the bearing before the next shift.")
    else:
        fig.figimage(np.random.default_rng(4).random((100, 150)), cmap="gray")  # a picture of a page: a scan
    fig.savefig(path, format="pdf")
    return path


def test_pdf_text_scanned_encrypted_damaged(tmp_path):
    from pypdf import PdfReader, PdfWriter

    pdf = _pdf(tmp_path / "report.pdf", "Pump P-101: vibration 7.1 mm/s exceeded the limit.")
    text = read_document(pdf)
    assert "Pump P-101: vibration 7.1 mm/s exceeded the limit." in text and "Replace the bearing" in text

    with pytest.raises(UserError, match="scan.*OCR"):
        read_document(_pdf(tmp_path / "scan.pdf", None))

    writer = PdfWriter(clone_from=PdfReader(pdf))
    writer.encrypt(user_password="s3cret", owner_password="owner", algorithm="RC4-128")
    with open(tmp_path / "locked.pdf", "wb") as f:
        writer.write(f)
    with pytest.raises(UserError, match="locked.pdf.*password"):
        read_document(tmp_path / "locked.pdf")

    (tmp_path / "cut.pdf").write_bytes(pdf.read_bytes()[:300])
    (tmp_path / "fake.pdf").write_bytes(b"hello")
    for name in ("cut.pdf", "fake.pdf"):
        with pytest.raises(UserError, match=re.escape(name)):
            read_document(tmp_path / name)


def test_docx_paragraphs_and_tables_in_order(tmp_path):
    from docx import Document

    doc = Document()
    doc.add_heading("작업 표준서", level=1)
    doc.add_paragraph("설비 점검은 매일 08:00에 실시한다.")
    table = doc.add_table(rows=2, cols=3)
    for r, row in enumerate([["항목", "기준", "주기"], ["진동", "7.1 mm/s 이하", "매일"]]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    doc.add_paragraph("Torque the M8 bolts to 25 N·m.")
    doc.sections[0].header.paragraphs[0].text = "(주)한국정밀 - 대외비"
    doc.save(tmp_path / "sop.docx")
    text = read_document(tmp_path / "sop.docx")
    assert text.split("\n\n") == ["작업 표준서", "설비 점검은 매일 08:00에 실시한다.", "항목 | 기준 | 주기",
                                  "진동 | 7.1 mm/s 이하 | 매일", "Torque the M8 bolts to 25 N·m."]
    (tmp_path / "old.docx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500))  # OLE .doc renamed
    with pytest.raises(UserError, match="old.docx.*not a DOCX"):
        read_document(tmp_path / "old.docx")


def test_markdown_markup_dropped(tmp_path):
    md = ("# 점검 절차\n\nCheck the **main** bearing, see [the manual](https://example.com/m.pdf) and `config_v2`.\n\n"
          "- item _one_\n- item two\n\n> note: snake_case_name stays\n\n```\nG01 X10.0 Y*2\n```\n")
    (tmp_path / "proc.md").write_text(md, encoding="utf-8")
    text = read_document(tmp_path / "proc.md")
    assert text == ("점검 절차\n\nCheck the main bearing, see the manual and config_v2.\n\nitem one\nitem two\n\n"
                    "note: snake_case_name stays\n\nG01 X10.0 Y*2")


def test_txt_encodings_and_binary(tmp_path):
    korean = "설비 진동 이상: 베어링 교체 필요.\n다음 점검은 3월 2일."
    (tmp_path / "cp949.txt").write_bytes(korean.encode("cp949"))
    assert read_document(tmp_path / "cp949.txt") == korean
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + korean.encode("utf-8"))
    assert read_document(tmp_path / "bom.txt") == korean
    (tmp_path / "notepad.txt").write_bytes(korean.encode("utf-16"))  # with BOM
    assert read_document(tmp_path / "notepad.txt") == korean
    nfd = unicodedata.normalize("NFD", "한국 \u00a0 정밀\r\n\r\n\r\n\r\n끝\t\t")  # macOS jamo, CRLF, NBSP
    (tmp_path / "mac.txt").write_bytes(nfd.encode("utf-8"))
    assert read_document(tmp_path / "mac.txt") == "한국 정밀\n\n끝"
    (tmp_path / "data.txt").write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="data.txt: wrong encoding.*UTF-8"):
        read_document(tmp_path / "data.txt")
    with pytest.raises(UserError, match="not supported"):
        read_document(tmp_path / "x.rtf")


def test_chunk_text_cuts_at_paragraphs_then_sentences():
    para1 = "베어링 온도가 상승했다. " * 8  # ~104 chars
    para2 = "The pump was stopped. Then the seal was replaced. " * 3
    text = para1.strip() + "\n\n" + para2.strip()
    chunks = chunk_text(text, max_chars=120, overlap=0)
    assert chunks[0] == para1.strip()  # paragraph break preferred
    assert all(c.endswith((".", "다.")) for c in chunks)  # then sentence ends
    with_overlap = chunk_text(text, max_chars=120, overlap=30)
    assert all(len(c) <= 120 for c in with_overlap)
    tail = with_overlap[0][-30:]
    assert with_overlap[1].startswith(tail.split(" ", 1)[1])  # next chunk repeats whole words of the tail
    for bad in [(text, 10, 0), (text, 100, 100), (text, 100, -1), (text, 100.0, 0)]:
        with pytest.raises(UserError):
            chunk_text(*bad)
    assert chunk_text("", 100, 10) == [] and chunk_text("   \n ", 100, 10) == []
    assert chunk_text("x" * 250, 100, 0) == ["x" * 100, "x" * 100, "x" * 50]  # a word too long is cut hard


_WORD = st.text(alphabet="abcXYZ가나다라마바0123.,?!", min_size=1, max_size=12)
_SEP = st.sampled_from([" ", " ", " ", "\n", "\n\n", ". ", "다. "])


def _words(s: str) -> list[str]:
    return s.split()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.tuples(_WORD, _SEP), min_size=0, max_size=120),
       max_chars=st.integers(16, 120), overlap=st.integers(0, 60))
def test_chunk_text_properties(parts, max_chars, overlap):
    overlap = min(overlap, max_chars - 1)
    text = "".join(w + s for w, s in parts)
    chunks = chunk_text(text, max_chars, overlap)
    assert all(0 < len(c) <= max_chars and c == c.strip() for c in chunks)
    words = _words(text)
    # Every chunk is a run of whole words of the text (words are at most 15 chars, so none is cut);
    # runs start in order, each begins inside or right after the previous one, and the last ends
    # at the end: together they cover every word in order. Repeated words make a run's position
    # ambiguous, so all positions consistent with the chunks so far are tracked.
    states = {(-1, 0)}  # (start, end) of the previous chunk's run in `words`
    for c in chunks:
        cw = _words(c)
        states = {(s, s + len(cw)) for ps, pe in states for s in range(ps + 1, pe + 1)
                  if words[s:s + len(cw)] == cw}
        assert states, f"chunk {c!r} is not the continuation of the previous one"
    assert any(e == len(words) for _, e in states) if words else chunks == []
    # Chunks are slices of the text; a chunk re-reads at most `overlap` characters of the previous one.
    spans = documents._chunk_spans(text, max_chars, overlap)
    assert [text[s:e] for s, e in spans] == chunks
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 < e1 and e0 - s1 <= overlap
    if overlap == 0:
        # Without overlap every word appears exactly once over all chunks.
        assert sum(len(_words(c)) for c in chunks) == len(words)


def test_chunk_spans_are_slices_with_bounded_overlap():
    rng = np.random.default_rng(3)
    vocab = ["설비", "점검", "bearing", "seal", "교체했다.", "replaced.", "온도", "pump", "요.", "M8"]
    text = " ".join(rng.choice(vocab, 2000))
    spans = documents._chunk_spans(text, 300, 60)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 < e1  # progress
        assert 0 < e0 - s1 <= 60  # overlaps by at most `overlap` characters, and does overlap
        assert text[s1 - 1] == " "  # at a word start
    assert spans[0][0] == 0 and spans[-1][1] == len(text)


def test_serving_decodes_an_image_as_ingest_does(tmp_path):
    """A phone photo with an EXIF orientation tag: the request decoder (serving) and the file
    reader (ingest) give the same pixels, rotated upright."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from indai.platform.connectors.images import read_image
    from indai.platform.modalities import decode_image

    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20] = 255  # a white band on the left of a landscape picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", exif=exif.tobytes())
    (tmp_path / "photo.png").write_bytes(buf.getvalue())
    served = decode_image(base64.b64encode(buf.getvalue()).decode(), 32)
    ingested = read_image(tmp_path / "photo.png", size=32, mode="RGB").pixels
    assert served.shape == ingested.shape == (32, 32, 3) and np.array_equal(served, ingested)
    assert served[:4].mean() > 200 and served[-4:].mean() < 50  # upright: the band is now at the top
