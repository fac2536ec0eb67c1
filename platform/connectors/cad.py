"""CAD drawings (DXF) into a raster image and the drawing's text, title block removed.

A drawing's title block names the company, the drafter, the checker and the customer; header
variables and document properties name the last user, the project and carry GUIDs that link
files. None of that may reach a shared dataset, and none of it helps a model, so it is removed
*before* rendering and text extraction. What was removed is reported by name and count, never
by value, because the report goes into a shared manifest.

Title block: entities (model space and inside block definitions) on layers whose name matches
a pattern, INSERTs of blocks whose name matches a pattern, and optionally model-space entities
lying wholly inside a rectangle. Patterns are regular expressions matched case-insensitively
against the whole name, so the default "TITLE" matches the layer TITLE but not SUBTITLE; write
"TITLE.*" for more. Only model space is rendered and read: paper-space layouts, where many
title blocks live, are ignored altogether.

Rendering uses ezdxf's drawing add-on with matplotlib's Agg canvas (no display), black on
white, one constant line width (a fraction of the canvas, not the plotted lineweight, so thin
and thick drawings look alike at any size), the drawing fitted by its extents into a square.
The same file gives the same pixels.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indai.platform.errors import UserError

MAX_DXF_BYTES = 256 * 1024 * 1024
MAX_PATTERN_CHARS = 200
DEFAULT_TITLE_PATTERNS = ["TITLE", "TITLEBLOCK", "TITLE_BLOCK", "BORDER", "FRAME", "도곽", "표제란"]
# Header variables that name people, projects or moments, or link copies of one file by GUID.
PRIVATE_HEADER_VARS = ("$LASTSAVEDBY", "$PROJECTNAME", "$FINGERPRINTGUID", "$VERSIONGUID", "$TDCREATE",
                       "$TDUCREATE", "$TDUPDATE", "$TDUUPDATE", "$TDINDWG", "$TDUSRTIMER", "$HYPERLINKBASE",
                       "$STYLESHEET", "$MENU")
# Root dictionary entries holding document properties (title, author, keywords) or the writer's trail.
PRIVATE_OBJECTS = ("DWGPROPS", "EZDXF_META")
LINE_PX = 1.2  # line width in pixels, whatever the canvas size
MARGIN = 0.02  # blank border around the fitted drawing, as a fraction of its larger side
MAX_BLOCK_DEPTH = 8


@dataclass
class TitleBlockRule:
    """What counts as title block: layer-name and block-name patterns (regex, case-insensitive,
    whole name) and an optional model-space rectangle (x0, y0, x1, y1) in drawing units."""

    layers: list[str] = field(default_factory=lambda: list(DEFAULT_TITLE_PATTERNS))
    blocks: list[str] = field(default_factory=lambda: list(DEFAULT_TITLE_PATTERNS))
    region: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        self._layer_res = _compile("layers", self.layers)
        self._block_res = _compile("blocks", self.blocks)
        if self.region is not None:
            try:
                x0, y0, x1, y1 = (float(v) for v in self.region)
            except (TypeError, ValueError):
                raise UserError(f"title block region {self.region!r} is not valid: give four numbers x0, y0, x1, y1") from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x0 >= x1 or y0 >= y1:
                raise UserError(f"title block region {self.region!r} is not valid: need finite x0 < x1 and y0 < y1")
            self.region = (x0, y0, x1, y1)

    def layer_matches(self, name: str) -> bool:
        return any(r.fullmatch(name) for r in self._layer_res)

    def block_matches(self, name: str) -> bool:
        return any(r.fullmatch(name) for r in self._block_res)


def _compile(what: str, patterns) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise UserError(f"title block {what} must be a list of patterns (strings), got {patterns!r}")
    out = []
    for p in patterns:
        if not p.strip() or len(p) > MAX_PATTERN_CHARS:
            raise UserError(f"title block {what} pattern {p!r} is empty or longer than {MAX_PATTERN_CHARS} characters")
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise UserError(f"title block {what} pattern {p!r} is not a valid regular expression ({e}): fix or escape it") from None
    return out


@dataclass
class CadRecord:
    """One drawing: its rendered image, its remaining text and what was removed (names/counts only)."""

    image: np.ndarray  # uint8 [size, size, 1], white (255) background, black lines
    text: str  # one text item per line, top-to-bottom then left-to-right
    removed: dict = field(default_factory=dict)


def read_dxf(path: Path, size: int = 512, title_block: TitleBlockRule | None = None) -> CadRecord:
    """Read one DXF file: remove title block and private metadata, render model space, read its text.

    `title_block` None uses the default layer/block patterns; pass TitleBlockRule(layers=[],
    blocks=[]) to remove nothing.
    """
    path = Path(path)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= int(size) <= 8192:
        raise UserError(f"{path.name}: drawing size {size!r} is not valid: give an int of 16..8192 pixels")
    rule = title_block if title_block is not None else TitleBlockRule()
    doc = _load(path)
    msp = doc.modelspace()
    if len(msp) == 0:
        raise UserError(f"{path.name}: the model space of this drawing is empty: export the drawing with its geometry "
                        "in model space (indai does not read paper-space layouts)")
    removed = _remove_title_block(doc, rule)
    removed.update(_clear_metadata(doc))
    if len(msp) == 0:
        raise UserError(f"{path.name}: nothing is left once the title block is removed: check the title block "
                        "layer/block patterns of the dataset spec")
    text = _extract_text(doc)
    try:
        image = _render(doc, int(size))
    except UserError as e:
        raise UserError(f"{path.name}: {e}") from None
    except Exception as e:
        raise UserError(f"{path.name}: the drawing could not be rendered ({type(e).__name__}: {str(e)[:150]}): "
                        "open it in a CAD program, run audit/purge and export it again as DXF") from None
    return CadRecord(image=image, text=text, removed=removed)


# ----------------------------------------------------------------------------------------------
# Loading


def _load(path: Path):
    import ezdxf
    from ezdxf import recover

    try:
        nbytes = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(32)
            f.seek(max(0, nbytes - 64))
            tail = f.read()
    except FileNotFoundError:
        raise UserError(f"{path.name}: DXF file not found at {path}: check the path in the dataset spec") from None
    except IsADirectoryError:
        raise UserError(f"{path.name}: is a folder, not a DXF file: point to the drawing itself") from None
    except OSError as e:
        raise UserError(f"{path.name}: cannot read the DXF file ({e.strerror}): check its permissions") from None
    if nbytes == 0:
        raise UserError(f"{path.name}: the file is empty: export the drawing again as DXF")
    if nbytes > MAX_DXF_BYTES:
        raise UserError(f"{path.name}: {nbytes / 2**20:.0f} MiB is larger than the limit of {MAX_DXF_BYTES // 2**20} MiB: "
                        "purge unused blocks/layers or split the drawing")
    if head.startswith(b"AC10"):
        raise UserError(f"{path.name}: this is a DWG file, not DXF: save it as DXF (File > Save As > DXF) in your CAD program")
    binary = head.startswith(b"AutoCAD Binary DXF")
    if not binary and not tail.rstrip(b" \t\r\n\x00\x1a").upper().endswith(b"EOF"):  # DOS tools pad with ^Z/NUL
        raise UserError(f"{path.name}: not a complete DXF file (it does not end with EOF; truncated, or not DXF at all): "
                        "copy or export the drawing again")
    try:
        doc, auditor = recover.readfile(str(path))
    except ezdxf.DXFStructureError as e:
        raise UserError(f"{path.name}: not a DXF file or damaged beyond repair ({str(e)[:150]}): export the drawing again as DXF") from None
    except Exception as e:
        raise UserError(f"{path.name}: the DXF could not be read ({type(e).__name__}: {str(e)[:150]}): export the drawing again as DXF") from None
    return doc


# ----------------------------------------------------------------------------------------------
# Title block and metadata


def _remove_title_block(doc, rule: TitleBlockRule) -> dict:
    """Delete title-block entities in model space and in block definitions; counts and names only."""
    layers: set[str] = set()
    blocks: set[str] = set()
    count = 0
    region_count = 0

    def matches(e) -> bool:
        layer = e.dxf.get("layer", "0")
        if rule.layer_matches(layer):
            layers.add(layer)
            return True
        if e.dxftype() == "INSERT" and rule.block_matches(e.dxf.name):
            blocks.add(e.dxf.name)
            return True
        return False

    msp = doc.modelspace()
    for e in list(msp):
        if matches(e):
            msp.delete_entity(e)
            count += 1
        elif rule.region is not None and _inside(e, rule.region):
            msp.delete_entity(e)
            count += 1
            region_count += 1
    for block in doc.blocks:
        if block.is_any_layout:
            continue
        for e in list(block):
            if matches(e):
                block.delete_entity(e)
                count += 1
    for name in [b.name for b in doc.blocks if not b.is_any_layout and rule.block_matches(b.name)]:
        blocks.add(name)
    return {"title_block_entities": count, "title_block_region_entities": region_count,
            "title_block_layers": sorted(layers), "title_block_blocks": sorted(blocks)}


def _inside(e, region) -> bool:
    from ezdxf import bbox

    try:
        box = bbox.extents([e], fast=True)
    except Exception:
        return False
    if not box.has_data:
        return False
    x0, y0, x1, y1 = region
    return x0 <= box.extmin.x and box.extmax.x <= x1 and y0 <= box.extmin.y and box.extmax.y <= y1


def _has_value(v) -> bool:
    if isinstance(v, str):
        return bool(v.strip())
    try:
        return float(v) != 0.0
    except (TypeError, ValueError):
        return v is not None


def _clear_metadata(doc) -> dict:
    header = doc.header
    present = [k for k in PRIVATE_HEADER_VARS if k in header]
    cleared = [k for k in present if _has_value(header[k])]  # empty defaults are not worth reporting
    for k in present:
        del header[k]
    custom = [tag for tag, _ in header.custom_vars]
    header.custom_vars.clear()
    props = []
    root = doc.rootdict
    for key in PRIVATE_OBJECTS:
        if key in root:
            props.append(key)
            try:
                root.remove(key)
            except Exception:
                root.discard(key)
    return {"header_variables": cleared, "custom_properties": sorted(set(custom)), "document_properties": props}


# ----------------------------------------------------------------------------------------------
# Text


def _extract_text(doc) -> str:
    """Text items in reading order; a multi-line MTEXT stays one item (its lines together)."""
    items: list[tuple[float, float, float, str]] = []  # (x, y, height, text)
    _collect(doc, doc.modelspace(), items, depth=0)
    return "\n".join(t for *_, t in _reading_order(items))


def _visible(doc, e) -> bool:
    layer = doc.layers.get(e.dxf.get("layer", "0")) if doc.layers.has_entry(e.dxf.get("layer", "0")) else None
    return layer is None or not (layer.is_off() or layer.is_frozen())


def _clean(s: str) -> str:
    s = unicodedata.normalize("NFC", s)
    return "\n".join(" ".join(line.split()) for line in s.splitlines() if line.strip())


def _collect(doc, entities, items: list, depth: int) -> None:
    for e in entities:
        kind = e.dxftype()
        if not _visible(doc, e):
            continue
        try:
            if kind == "TEXT":
                _add(items, e.dxf.insert, e.dxf.get("height", 1.0), e.plain_text())
            elif kind == "MTEXT":
                _add(items, e.dxf.insert, e.dxf.get("char_height", 1.0), e.plain_text(split=False))
            elif kind == "DIMENSION":
                override = e.dxf.get("text", "")
                if override and override.strip() and override.strip() != "<>":
                    _add_dimension_text(e, override, items)
            elif kind == "INSERT":
                for a in e.attribs:
                    if not a.is_invisible and _visible(doc, a):
                        _add(items, a.dxf.insert, a.dxf.get("height", 1.0), a.dxf.get("text", ""))
                if depth < MAX_BLOCK_DEPTH:
                    inner = [v for v in e.virtual_entities() if v.dxftype() in ("TEXT", "MTEXT", "INSERT", "DIMENSION")]
                    _collect(doc, inner, items, depth + 1)
        except Exception:  # one odd entity must not lose the drawing's other text
            continue


def _add_dimension_text(dim, override: str, items: list) -> None:
    """An overridden dimension text as displayed: the text of the dimension's rendered block
    (scale factor and rounding applied), else the override with "<>" as the raw measurement."""
    from ezdxf.tools.text import plain_mtext

    shown = []
    try:
        for v in dim.virtual_entities():
            if v.dxftype() == "MTEXT":
                shown.append((v.dxf.insert, v.dxf.get("char_height", 1.0), v.plain_text(split=False)))
            elif v.dxftype() == "TEXT":
                shown.append((v.dxf.insert, v.dxf.get("height", 1.0), v.plain_text()))
    except Exception:
        shown = []
    if shown:
        for where, height, text in shown:
            _add(items, where, height, text)
        return
    if "<>" in override:
        try:
            m = dim.get_measurement()
            m = float(m.magnitude) if hasattr(m, "magnitude") else float(m)
            override = override.replace("<>", f"{m:.4f}".rstrip("0").rstrip("."))
        except Exception:
            override = override.replace("<>", "")
    where = dim.dxf.get("text_midpoint", None) or dim.dxf.get("defpoint")
    _add(items, where, 1.0, plain_mtext(override))


def _add(items: list, where, height, text: str) -> None:
    text = _clean(text or "")
    if text and where is not None:
        items.append((float(where[0]), float(where[1]), abs(float(height or 1.0)) or 1.0, text))


def _reading_order(items: list) -> list:
    """Rows top-to-bottom (items within half a text height share a row), each row left-to-right."""
    rows: list[list] = []
    for it in sorted(items, key=lambda t: (-t[1], t[0])):
        if rows:
            top = rows[-1][0]
            if top[1] - it[1] <= 0.5 * max(top[2], it[2]):
                rows[-1].append(it)
                continue
        rows.append([it])
    return [it for row in rows for it in sorted(row, key=lambda t: t[0])]


# ----------------------------------------------------------------------------------------------
# Rendering


def _render(doc, size: int) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ezdxf.addons.drawing import Frontend, RenderContext
    from ezdxf.addons.drawing.config import BackgroundPolicy, ColorPolicy, Configuration
    from ezdxf.addons.drawing.matplotlib import MatplotlibBackend

    dpi = 100
    fig = Figure(figsize=(size / dpi, size / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    config = Configuration(background_policy=BackgroundPolicy.WHITE, color_policy=ColorPolicy.BLACK,
                           lineweight_scaling=0, min_lineweight=LINE_PX * 72.0 / dpi)
    backend = MatplotlibBackend(ax, adjust_figure=False)
    Frontend(RenderContext(doc), backend, config=config).draw_layout(doc.modelspace(), finalize=True)
    x0, y0, x1, y1 = _extents(doc, ax.dataLim)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0, 1e-9) / 2 * (1 + 2 * MARGIN)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlim(cx - half, cx + half)
    ax.set_ylim(cy - half, cy + half)
    ax.set_position((0, 0, 1, 1))
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    if rgba.shape[:2] != (size, size):  # figure inches * dpi rounding; never expected
        from PIL import Image

        rgba = np.asarray(Image.fromarray(rgba).resize((size, size), Image.BILINEAR))
    grey = np.rint(rgba[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    return np.clip(grey, 0, 255).astype(np.uint8)[..., None]


def _extents(doc, data_lim) -> tuple[float, float, float, float]:
    """Union of ezdxf's extents (which see into dimensions and blocks) and what matplotlib drew."""
    from ezdxf import bbox

    xs: list[float] = []
    ys: list[float] = []
    try:
        box = bbox.extents(doc.modelspace(), fast=True)
        if box.has_data:
            xs += [box.extmin.x, box.extmax.x]
            ys += [box.extmin.y, box.extmax.y]
    except Exception:
        pass
    lim = (data_lim.x0, data_lim.y0, data_lim.x1, data_lim.y1)
    if all(np.isfinite(v) for v in lim) and data_lim.width >= 0 and data_lim.height >= 0:
        xs += [lim[0], lim[2]]
        ys += [lim[1], lim[3]]
    xs = [v for v in xs if math.isfinite(v)]
    ys = [v for v in ys if math.isfinite(v)]
    if not xs or not ys:
        raise UserError("the model space has nothing that can be drawn: export the drawing with its geometry in model space")
    return min(xs), min(ys), max(xs), max(ys)
