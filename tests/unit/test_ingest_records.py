"""Ingest of records (tables, image/drawing/document files) and of sensor files other than
NPZ: typed columns and time zones, splits that keep units whole, bounded shards, a resume
after the ingest process is killed, and clear errors for bad files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.ingest import ingest
from indai.platform.storage import open_store

REPO = Path(__file__).resolve().parents[2]


def spec(folder: Path, body: dict, name: str = "t") -> Path:
    doc = {"name": name, "member": "m1", **body}
    (folder / "spec.yaml").write_text("# indai data ingest spec.yaml\n" + yaml.safe_dump(doc, allow_unicode=True))
    return folder / "spec.yaml"


def orders(folder: Path, n: int = 400, encoding: str = "utf-8") -> None:
    rows = ["주문번호,설비,일시,내용,비용,고장"]
    for i in range(n):
        rows.append(f"WO{i:05d},EX{i % 8},2023-{1 + i % 12:02d}-{1 + i % 28:02d} 09:30,유압 호스 누유 점검 {i},{100 + i},{['누유', '마모', '균열'][i % 3]}")
    (folder / "orders.csv").write_bytes("\n".join(rows).encode(encoding))


TABLE = {"kind": "table", "path": "orders.csv", "event": "주문번호", "asset": "설비", "time": "일시", "text": ["내용"], "label": "고장",
         "columns": {"일시": {"type": "datetime", "tz": "Asia/Seoul"}, "비용": {"type": "float", "unit": "KRW"}}}


def all_split(store, name, version):
    ref = datasets.DatasetRef(name, version)
    return {s: datasets.load_split(store, ref, s) for s in ("train", "val", "test")}


def test_cp949_table_typed_columns_time_zone_and_time_split(tmp_path):
    orders(tmp_path, encoding="cp949")
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, {"split": {"by": "time"}, "sources": [TABLE]}), store, progress=False)
    assert m["classes"] == ["누유", "마모", "균열"] and sum(m["split"]["records"].values()) == 400
    assert m["sources"][0]["columns"]["비용"] == {"type": "float", "unit": "KRW", "invalid": "error"}
    s = all_split(store, name, version)
    # 09:30 in Seoul is 00:30 UTC
    t0 = np.datetime64(int(s["train"]["key_time"][0]), "ns")
    assert str(t0).endswith("T00:30:00.000000000")
    assert s["train"]["key_time"].max() <= s["val"]["key_time"].min() and s["val"]["key_time"].max() <= s["test"]["key_time"].min()
    assert s["train"]["text"][0].startswith("유압 호스") and s["train"]["mask"][:, 2].all() and not s["train"]["mask"][:, :2].any()
    assert s["train"]["tab_비용"].dtype == np.float64


@pytest.mark.parametrize("by", ["asset", "random"])
def test_splits_keep_units_whole_and_are_deterministic(tmp_path, by):
    orders(tmp_path)
    store = open_store(tmp_path / "store")
    sp = spec(tmp_path, {"split": {"by": by}, "sources": [TABLE], "shard_rows": 64})
    name, v1, m = ingest(sp, store, progress=False)
    assert ingest(sp, open_store(tmp_path / "other"), progress=False)[1] == v1
    s = all_split(store, name, v1)
    key = "key_asset" if by == "asset" else "key_event"
    sets = [set(s[k][key]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(datasets.shards(m, "train")) >= 3  # streamed in shards of at most 64 rows
    assert all(len(datasets.load_shard(store, name, sh)["label"]) <= 64 for sh in datasets.shards(m, "train"))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json"])
def test_parquet_and_json_tables(tmp_path, fmt):
    import pandas as pd

    frame = pd.DataFrame({"id": [f"e{i}" for i in range(90)], "asset": [f"a{i % 5}" for i in range(90)],
                          "note": [f"bearing noise {i}" for i in range(90)], "mode": [["wear", "leak"][i % 2] for i in range(90)],
                          "temp": [20.5 + i for i in range(90)]})
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        path.write_text(json.dumps({"records": frame.to_dict(orient="records")}))
    src = {"kind": "table", "path": path.name, "event": "id", "asset": "asset", "text": ["note"], "label": "mode",
           "columns": {"temp": {"type": "float", "unit": "degC"}}}
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, {"split": {"by": "asset"}, "sources": [src]}), store, progress=False)
    assert sum(m["split"]["records"].values()) == 90 and m["classes"] == ["wear", "leak"]
    temps = np.concatenate([a["tab_temp"] for a in all_split(store, name, version).values()])
    assert sorted(temps) == [20.5 + i for i in range(90)]


def test_wav_and_csv_sensor_recordings(tmp_path):
    from scipy.io import wavfile

    t = np.arange(8000) / 8000
    for i, f in enumerate((50, 120)):
        wavfile.write(tmp_path / f"r{i}.wav", 8000, (np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], 1) * 20000).astype(np.int16))
    lines = ["time,ax,ay"] + [f"{k / 8000:.6f},{np.sin(k / 5):.5f},{np.cos(k / 5):.5f}" for k in range(8000)]
    (tmp_path / "wide.csv").write_text("\n".join(lines))
    long = ["t,ch,v"] + [f"{k / 8000:.6f},{c},{np.sin(k / (3 + j)):.5f}" for k in range(8000) for j, c in enumerate(("ax", "ay"))]
    (tmp_path / "long.csv").write_text("\n".join(long))
    sensor = {"channels": ["ax", "ay"], "sampling_rate_hz": 8000, "window": 256}
    sources = [{"path": "r0.wav", "label": "a", "sampling_rate_hz": 8000, "columns": {"ax": 0, "ay": 1}},
               {"path": "r1.wav", "label": "b", "sampling_rate_hz": 8000, "columns": {"ax": 0, "ay": 1}},
               {"path": "wide.csv", "label": "c", "sampling_rate_hz": 8000, "time_column": "time"},
               {"path": "long.csv", "label": "d", "sampling_rate_hz": 8000, "format": "csv_long", "time_column": "t",
                "columns": {"channel": "ch", "value": "v"}}]
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, {"sensor": sensor, "sources": sources}), store, progress=False)
    assert [s["samples"] for s in m["sources"]] == [8000] * 4 and m["layout"] == "recordings"
    train = datasets.load_split(store, datasets.DatasetRef(name, version), "train")
    assert train["sensor_signal"].shape[0] == 2 and abs(train["sensor_signal"][0, :8000 * 7 // 10].max() - 20000 / 32768) < 1e-3
    # the file says 8 kHz: a spec that declares 16 kHz is refused, naming both
    sources[0]["sampling_rate_hz"] = 16000
    with pytest.raises(UserError, match="mismatched sampling rate.*16000 Hz.*8000 Hz"):
        ingest(spec(tmp_path, {"sensor": sensor, "sources": sources}), store, progress=False)
    sources[0]["sampling_rate_hz"] = 8000
    sources[2]["sampling_rate_hz"] = 4000
    with pytest.raises(UserError, match="wide.csv: mismatched sampling rate"):
        ingest(spec(tmp_path, {"sensor": sensor, "sources": sources}), store, progress=False)


def elpv_images(folder: Path, n: int = 12) -> None:
    import csv

    from importlib import metadata

    root = Path(metadata.distribution("elpv-dataset").locate_file("elpv_dataset/data"))
    rows = list(csv.reader((root / "labels.csv").read_text().splitlines(), delimiter=" ", skipinitialspace=True))
    for cls in ("functional", "defective"):
        (folder / cls).mkdir(parents=True)
    picked = {"functional": 0, "defective": 0}
    for path, prob, _ in rows:
        cls = "defective" if float(prob) >= 0.5 else "functional"
        if picked[cls] < n:
            shutil.copy(root / path, folder / cls / Path(path).name)
            picked[cls] += 1


def test_real_images_by_folder_with_metadata_stripped(tmp_path):
    from PIL import Image

    elpv_images(tmp_path / "img")
    # one JPEG with EXIF (camera, GPS) among them: only its pixels may reach the dataset
    im = Image.open(next((tmp_path / "img" / "defective").glob("*.png"))).convert("RGB")
    exif = Image.Exif()
    exif[0x013B] = "Kim Minsu"  # Artist
    exif.get_ifd(0x8825)[2] = (37.0, 33.0, 0.0)  # GPSLatitude
    im.save(tmp_path / "img" / "defective" / "camera.jpg", exif=exif.tobytes())
    src = {"kind": "files", "glob": "img/*/*", "modality": "image", "label_from": "folder"}
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, {"image": {"size": 64, "mode": "L"}, "split": {"by": "random", "seed": 1}, "sources": [src]}),
                              store, progress=False)
    assert sorted(m["classes"]) == ["defective", "functional"] and sum(m["split"]["records"].values()) == 25
    assert m["deidentification"]["metadata_removed"].get("EXIF:Artist") == 1
    s = all_split(store, name, version)
    imgs = np.concatenate([a["image"] for a in s.values()])
    assert imgs.shape[1:] == (64, 64, 3) and imgs.dtype == np.uint8 and 40 < imgs.mean() < 220
    assert all(a["mask"][:, 1].all() for a in s.values())


def test_drawings_render_without_title_block(tmp_path):
    shutil.copytree(REPO / "examples" / "drawings", tmp_path / "d", ignore=shutil.ignore_patterns("*.py", "*.yaml"))
    src = {"kind": "files", "glob": "d/*/*.dxf", "modality": "cad", "label_from": "folder"}
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, {"image": {"size": 96}, "split": {"by": "random", "train": 0.5, "val": 0.25, "test": 0.25},
                                              "sources": [src]}), store, progress=False)
    removed = m["deidentification"]
    assert removed["cad_title_blocks_removed"]["drawings"] == 12 and removed["cad_title_blocks_removed"]["entities"] >= 12 * 5
    assert removed["metadata_removed"]["DXF:$LASTSAVEDBY"] == 12
    text = "\n".join(t for a in all_split(store, name, version).values() for t in a["text"])
    assert "M8 TAP" in text and "KEYWAY" in text
    for secret in ("한빛정밀", "Hanbit", "김민수", "DWG No", "HB-"):
        assert secret not in text


def test_documents_are_chunked_and_stay_in_one_split(tmp_path):
    store = open_store(tmp_path / "store")
    name, version, m = ingest(REPO / "examples" / "manuals" / "dataset.yaml", store, progress=False)
    s = all_split(store, name, version)
    owners = {k: set(a["key_group"]) for k, a in s.items()}
    assert sum(len(v) for v in owners.values()) == 3  # three documents, each in exactly one split
    chunks = [t for a in s.values() for t in a["text"]]
    assert len(chunks) > 3 and max(len(c) for c in chunks) <= 400
    assert any("압축기" in c for c in chunks)  # the CP949 text file was decoded


@pytest.mark.parametrize("make,message", [
    (lambda d: (d / "orders.csv").write_bytes(b"a,b\n\xff\xfe\xfa,1\n"), "wrong encoding"),
    (lambda d: (d / "orders.csv").write_text("주문번호,설비\nA,B\n"), r"missing column\(s\) \['일시'"),
    (lambda d: orders(d) or (d / "orders.csv").write_text((d / "orders.csv").read_text().replace(",101,", ",one hundred,")),
     "column '비용' row 3 is not a number"),
])
def test_bad_tables_get_one_clear_line(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        ingest(spec(tmp_path, {"split": {"by": "time"}, "sources": [TABLE]}), open_store(tmp_path / "store"), progress=False)
    assert "\n" not in str(e.value) and "orders.csv" in str(e.value)


def test_truncated_image_and_broken_drawing_name_the_file(tmp_path):
    elpv_images(tmp_path / "img", n=2)
    victim = next((tmp_path / "img" / "functional").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:400])
    src = {"kind": "files", "glob": "img/*/*", "modality": "image", "label_from": "folder"}
    with pytest.raises(UserError, match=victim.name):
        ingest(spec(tmp_path, {"split": {"by": "random"}, "sources": [src]}), open_store(tmp_path / "s1"), progress=False)
    (tmp_path / "dwg").mkdir()
    (tmp_path / "dwg" / "broken.dxf").write_text("0\nSECTION\n2\nENTITIES\n0\nLINE\n8\n")
    src = {"kind": "files", "glob": "dwg/*.dxf", "modality": "cad", "label": "x"}
    with pytest.raises(UserError, match="broken.dxf"):
        ingest(spec(tmp_path, {"split": {"by": "random"}, "sources": [src]}), open_store(tmp_path / "s2"), progress=False)


def test_spec_errors_are_caught_before_work(tmp_path):
    orders(tmp_path)
    bad = [({"split": {"by": "time"}, "sources": [{**TABLE, "time": None}]}, "needs a time: column"),
           ({"sources": [{"kind": "files", "glob": "*.png", "modality": "image", "label": "x"}]}, "files sources carry no time"),
           ({"sources": [{**TABLE, "path": "../etc/passwd"}]}, "may not contain '..'"),
           ({"sources": [{**TABLE, "columns": {"일시": {"type": "datetime", "tz": "Mars/Olympus"}}}]}, "unknown time zone"),
           ({"sources": [TABLE, {"path": "r.npz", "label": "x", "sampling_rate_hz": 1}]}, "cannot be mixed")]
    for body, message in bad:
        with pytest.raises(UserError, match=message):
            ingest(spec(tmp_path, body), open_store(tmp_path / "store"), progress=False)


def test_killed_ingest_resumes_to_the_same_version(tmp_path):
    """SIGKILL the ingest process once some chunks are in the journal; the next run says it
    resumes, skips them, and ends with exactly the version an uninterrupted run gives."""
    n = 120_000
    lines = ["id,asset,day,note,mode"] + [f"e{i},a{i % 50},2020-01-{1 + i % 28:02d},pump seal leak {i % 977} at line {i % 13},m{i % 4}"
                                         for i in range(n)]
    (tmp_path / "big.csv").write_text("\n".join(lines))
    src = {"kind": "table", "path": "big.csv", "event": "id", "asset": "asset", "time": "day", "text": ["note"], "label": "mode",
           "columns": {"day": {"type": "datetime"}}}
    sp = spec(tmp_path, {"split": {"by": "time"}, "sources": [src], "shard_rows": 2000}, name="big")
    store_dir = tmp_path / "store"
    code = ("import sys; from indai.platform.ingest import ingest; from indai.platform.storage import open_store; "
            f"ingest({str(sp)!r}, open_store({str(store_dir)!r}), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    journal = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list((store_dir / "datasets" / "big" / "journal").glob("*/state.json")) if store_dir.exists() else []
        if found:
            try:
                done = json.loads(found[0].read_text())["chunks"]
            except ValueError:
                done = {}
            if len(done) >= 5:
                journal = found[0]
                break
        time.sleep(0.05)
    assert journal is not None and proc.poll() is None, "the ingest finished before it could be killed: make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(store_dir)
    assert datasets.list_versions(store) == []  # nothing readable from the killed run
    killed_at = len(json.loads(journal.read_text())["chunks"])
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        name, version, m = ingest(sp, store, progress=True)
    assert f"resuming ingest of big: {killed_at} chunk(s) already written" in out.getvalue()
    assert ingest(sp, open_store(tmp_path / "clean"), progress=False)[1] == version
    assert not journal.exists()  # a finished ingest leaves no journal
    assert sum(m["split"]["records"].values()) == n


def test_events_take_their_window_from_the_assets_log(tmp_path):
    """QA events (asset + time) aligned with each asset's continuous vibration log: the window
    starts before_s before the event; events outside the log keep no sensor and are counted."""
    rate = 1000
    (tmp_path / "logs").mkdir()
    start = np.datetime64("2024-05-02T08:00:00")
    for a, freq in (("P1", 30.0), ("P2", 90.0)):
        k = np.arange(20 * rate)
        stamps = start + (k * 1_000_000).astype("timedelta64[ns]")
        value = np.sin(2 * np.pi * freq * k / rate) + k / 1e6
        lines = ["ts,vib"] + [f"{str(t)},{v:.6f}" for t, v in zip(stamps, value)]
        (tmp_path / "logs" / f"{a}.csv").write_text("\n".join(lines))
    events = ["id,pump,at,result"]
    for i in range(40):
        events.append(f"q{i},{'P1' if i % 2 else 'P2'},2024-05-02 08:00:{1 + i // 3:02d},{'ok' if i % 2 else 'bad'}")
    events.append("late,P1,2024-05-02 09:00:00,ok")  # an hour after the log ends
    (tmp_path / "qa.csv").write_text("\n".join(events))
    src = {"kind": "table", "path": "qa.csv", "event": "id", "asset": "pump", "time": "at", "label": "result",
           "sensor_align": {"path": "logs/{asset}.csv", "time_column": "ts", "sampling_rate_hz": rate, "before_s": 0.5}}
    body = {"sensor": {"channels": ["vib"], "sampling_rate_hz": rate, "window": 256}, "split": {"by": "time"}, "sources": [src]}
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, body), store, progress=False)
    assert m["dropped"]["unaligned_sensor"] == 1 and m["modalities"]["sensor"]["window"] == 256
    arrays = all_split(store, name, version)
    got = {e: (x, mk) for a in arrays.values() for e, x, mk in zip(a["key_event"], a["sensor"], a["mask"][:, 0])}
    assert got["late"][1] == 0 and not got["late"][0].any()
    x, present = got["q7"]  # P1 at 08:00:03 -> the log from 2.5 s on, i.e. sample 2500
    k = np.arange(2500, 2756)
    assert present == 1 and np.allclose(x[0], np.sin(2 * np.pi * 30.0 * k / rate) + k / 1e6, atol=1e-4)
    bad = json.loads(json.dumps(body))
    bad["sources"][0]["sensor_align"]["sampling_rate_hz"] = 2000
    with pytest.raises(UserError, match=r"P[12].csv: mismatched sampling rate"):
        ingest(spec(tmp_path, bad), open_store(tmp_path / "s2"), progress=False)


def test_a_typed_column_with_a_slash_is_refused_before_work(tmp_path):
    """MES exports name columns `P/N` or `L/min`; typed, such a column would be the array
    `tab_P/N`, which readers split into the wrong path parts: refuse it at the spec, naming it."""
    (tmp_path / "mes.csv").write_text("id,P/N,flow,result\n" + "\n".join(f"e{i},PN-{i},{i / 10},{'ok' if i % 2 else 'ng'}"
                                                                          for i in range(40)))
    src = {"kind": "table", "path": "mes.csv", "event": "id", "label": "result", "text": ["P/N"],
           "columns": {"P/N": {"type": "str"}, "flow": {"type": "float", "unit": "L/min"}}}
    store = open_store(tmp_path / "store")
    with pytest.raises(UserError, match=r"array name 'tab_P/N' \(from the typed column 'P/N'\) cannot be stored: .* "
                                        r"rename the column in the source file") as e:
        ingest(spec(tmp_path, {"split": {"by": "random"}, "sources": [src]}), store, progress=False)
    assert "\n" not in str(e.value) and store.list("") == []
    # untyped, the same column is fine as text; a unit with a slash is fine too
    src["columns"] = {"flow": {"type": "float", "unit": "L/min"}}
    name, version, _ = ingest(spec(tmp_path, {"split": {"by": "random"}, "sources": [src]}), store, progress=False)
    got = all_split(store, name, version)
    assert sorted(got["train"]["text"].tolist() + got["val"]["text"].tolist() + got["test"]["text"].tolist()) == \
        sorted(f"PN-{i}" for i in range(40))


def test_long_texts_are_cut_between_words_and_never_through_an_identifier(tmp_path):
    """Text is cut to max_chars at ingest and de-identified only at release: a cut through a phone
    number, or between a name and the number that gives it away, would let both escape release."""
    from indai.platform.deid import scan

    notes = {"n0": "pump leak, call 김민수 010-1234-5678 today",  # 40 chars: a hard cut at 30 leaves '... 010-1234-5'
             "n1": "bearing noise on the discharge side after restart",
             "n2": "short note"}
    rows = ["id,note,result"] + [f'{k}{i},"{notes[k]}",{"ok" if i % 2 else "ng"}' for i in range(30) for k in notes]
    (tmp_path / "wo.csv").write_text("\n".join(rows))
    src = {"kind": "table", "path": "wo.csv", "event": "id", "label": "result", "text": ["note"]}
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, {"split": {"by": "random"}, "text": {"max_chars": 30}, "sources": [src]}),
                              store, progress=False)
    got = {}
    for a in all_split(store, name, version).values():
        got.update({str(e)[:2]: (str(t), mk) for e, t, mk in zip(a["key_event"], a["text"], a["mask"][:, 2])})
    assert got["n0"] == ("pump leak, call", 1) and scan(got["n0"][0]) == []
    assert got["n1"] == ("bearing noise on the discharge", 1)
    assert got["n2"] == ("short note", 1)
    assert m["modalities"]["text"] == {"max_chars": 30, "cut": 60}


def _log(folder: Path, name: str, seconds: list[tuple[float, float]], rate: int = 1000) -> None:
    """A log whose value is its own time in seconds, recorded over the given (from, to) stretches:
    a window shows exactly which time it was cut from."""
    start = np.datetime64("2024-05-02T08:00:00")
    lines = ["ts,vib"]
    for a, b in seconds:
        for k in range(int(a * rate), int(b * rate)):
            lines.append(f"{str(start + np.timedelta64(k * 1_000_000, 'ns'))},{k / rate:.3f}")
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "logs" / name).write_text("\n".join(lines))


def test_records_after_a_logger_outage_get_the_window_of_their_own_time(tmp_path):
    _log(tmp_path, "P1.csv", [(0, 10), (20, 40)])  # the logger was down from 10 s to 20 s
    events = ["id,pump,at,result"] + [f"q{s},P1,2024-05-02 08:00:{s:02d},{'ok' if s % 2 else 'bad'}" for s in (2, 5, 10, 15, 25, 30, 33, 36)]
    (tmp_path / "qa.csv").write_text("\n".join(events))
    src = {"kind": "table", "path": "qa.csv", "event": "id", "asset": "pump", "time": "at", "label": "result",
           "sensor_align": {"path": "logs/{asset}.csv", "time_column": "ts", "sampling_rate_hz": 1000, "before_s": 0.1}}
    body = {"sensor": {"channels": ["vib"], "sampling_rate_hz": 1000, "window": 256}, "split": {"by": "time"}, "sources": [src]}
    store = open_store(tmp_path / "store")
    name, version, m = ingest(spec(tmp_path, body), store, progress=False)
    got = {str(e): (x[0], mk) for a in all_split(store, name, version).values() for e, x, mk in zip(a["key_event"], a["sensor"], a["mask"][:, 0])}
    # q10's window (9.9 s .. 10.155 s) spans the outage, q15's falls in it: neither gets one
    assert m["dropped"]["unaligned_sensor"] == 2 and got["q10"][1] == 0 and got["q15"][1] == 0 and not got["q15"][0].any()
    for s in (2, 5, 25, 30, 33, 36):
        x, present = got[f"q{s}"]
        assert present == 1 and np.allclose(x, s - 0.1 + np.arange(256) / 1000, atol=1e-4), (s, x[:3])


@pytest.mark.parametrize("swap,message", [(("08:00:00.003", "08:00:00.001"), r"does not increase at row 5 \(goes back\)"),
                                          (("08:00:00.003", "08:00:00.002"), r"does not increase at row 5 \(repeats\)")])
def test_a_log_whose_time_does_not_increase_is_refused(tmp_path, swap, message):
    _log(tmp_path, "P1.csv", [(0, 5)])
    path = tmp_path / "logs" / "P1.csv"
    path.write_text(path.read_text().replace(swap[0], swap[1], 1))
    (tmp_path / "qa.csv").write_text("id,pump,at,result\n" + "\n".join(f"q{s},P1,2024-05-02 08:00:0{s},ok" for s in range(1, 4)))
    src = {"kind": "table", "path": "qa.csv", "event": "id", "asset": "pump", "time": "at", "label": "result",
           "sensor_align": {"path": "logs/{asset}.csv", "time_column": "ts", "sampling_rate_hz": 1000}}
    body = {"sensor": {"channels": ["vib"], "sampling_rate_hz": 1000, "window": 256}, "split": {"by": "time"}, "sources": [src]}
    with pytest.raises(UserError, match=f"P1.csv: the time column 'ts' {message}: sort the log by time"):
        ingest(spec(tmp_path, body), open_store(tmp_path / "store"), progress=False)
