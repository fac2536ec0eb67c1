"""Writes the constructed example drawings of examples/drawings/ (run once; the DXF files are
committed). Three part families (flange, bracket, shaft), four sizes each, every drawing with
dimensions, manufacturing notes and a title block on layer TITLEBLOCK that names an invented
company and drafter - which ingest must remove before anything is rendered or read.

    python examples/drawings/make_drawings.py
"""
from __future__ import annotations

from pathlib import Path

import ezdxf

HERE = Path(__file__).resolve().parent


def title_block(msp, x: float, y: float, number: str) -> None:
    msp.add_lwpolyline([(x, y), (x + 180, y), (x + 180, y + 40), (x, y + 40)], close=True, dxfattribs={"layer": "TITLEBLOCK"})
    for i, line in enumerate(["(주)한빛정밀 / Hanbit Precision Co., Ltd.", "설계: 김민수  검도: 이서연", f"DWG No. {number}", "SCALE 1:1  A3"]):
        msp.add_text(line, height=4, dxfattribs={"layer": "TITLEBLOCK"}).set_placement((x + 5, y + 32 - 9 * i))


def flange(msp, d: float) -> None:
    msp.add_circle((0, 0), d / 2)
    msp.add_circle((0, 0), d / 5)
    for k in range(6):
        import math

        a = 2 * math.pi * k / 6
        msp.add_circle((0.35 * d * math.cos(a), 0.35 * d * math.sin(a)), d / 20)
    msp.add_text(f"6x M{int(d / 12)} THRU EQ SP", height=3).set_placement((d / 2 + 5, 0))
    msp.add_text(f"OD {d:g} h7", height=3).set_placement((d / 2 + 5, -8))


def bracket(msp, w: float) -> None:
    msp.add_lwpolyline([(0, 0), (w, 0), (w, w / 6), (w / 6, w / 6), (w / 6, w), (0, w)], close=True)
    msp.add_circle((w * 0.7, w / 12), w / 30)
    msp.add_circle((w / 12, w * 0.7), w / 30)
    msp.add_text("2x M8 TAP", height=3).set_placement((w + 5, w / 12))
    msp.add_text(f"BEND R{w / 20:g} MIN", height=3).set_placement((w + 5, w / 3))


def shaft(msp, length: float) -> None:
    x = 0.0
    for seg_len, dia in ((length * 0.3, length / 10), (length * 0.5, length / 7), (length * 0.2, length / 12)):
        msp.add_lwpolyline([(x, -dia / 2), (x + seg_len, -dia / 2), (x + seg_len, dia / 2), (x, dia / 2)], close=True)
        x += seg_len
    msp.add_line((-5, 0), (length + 5, 0), dxfattribs={"linetype": "CENTER"})
    msp.add_text("KEYWAY 8x7 DIN 6885", height=3).set_placement((length * 0.4, length / 10))
    msp.add_text("HARDEN 45-50 HRC", height=3).set_placement((length * 0.4, length / 10 + 6))


def main() -> None:
    for family, draw, sizes in (("flange", flange, (80, 120, 160, 200)), ("bracket", bracket, (60, 90, 120, 150)),
                                ("shaft", shaft, (150, 200, 250, 300))):
        (HERE / family).mkdir(exist_ok=True)
        for size in sizes:
            doc = ezdxf.new("R2018", setup=True)
            doc.header["$LASTSAVEDBY"] = "kim.minsu"
            doc.header["$PROJECTNAME"] = "HANBIT-2024-017"
            msp = doc.modelspace()
            draw(msp, size)
            title_block(msp, size + 40, -size / 2 - 20, f"HB-{family[:2].upper()}{size:04d}-A")
            doc.saveas(HERE / family / f"{family}-{size}.dxf")


if __name__ == "__main__":
    main()
