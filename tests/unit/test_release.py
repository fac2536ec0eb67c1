"""Release, share and diff on a work-order table with planted identifiers: nothing planted
reaches a released version, pseudonyms are consistent within a member, raw data stays with
its member, industry-common versions record their inputs."""
import json
from pathlib import Path

import numpy as np
import pytest

from indai.platform import datasets, release
from indai.platform.config import load_config
from indai.platform.deid import DeidConfig, Deidentifier
from indai.platform.errors import UserError
from indai.platform.ingest import ingest
from indai.platform.storage import open_store

REPO = Path(__file__).resolve().parents[2]
EVAL = [json.loads(line) for line in (REPO / "bench/data/deid_eval.jsonl").read_text().splitlines()]
SECRET_A, SECRET_B = b"a" * 32, b"b" * 32


def work_orders(folder: Path, member: str, n: int = 240, labels=("leak", "wear", "crack"), extra: str = "") -> Path:
    """A CSV of work orders whose text is taken from the constructed evaluation set (with its
    planted identifiers), plus an asset column and dates."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "orders.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["order", "asset", "date", "note", "technician", "mode"])
        for i in range(n):
            e = EVAL[i % len(EVAL)]
            w.writerow([f"WO-{i:05d}", f"HB23K{i % 6:05d}", f"2024-{1 + i % 12:02d}-{1 + i % 27:02d} 08:00", e["text"],
                        "김민수 대리" if i % 2 else "Technician John Carter", labels[i % len(labels)]])
    (folder / "dataset.yaml").write_text(f"""# indai data ingest dataset.yaml
name: {member}-orders
member: {member}
description: work orders of {member}
split: {{by: time}}
sources:
  - kind: table
    path: orders.csv
    event: order
    asset: asset
    time: date
    text: [note]
    label: mode
    columns:
      date: {{type: datetime, tz: Asia/Seoul}}
      technician: {{type: str}}
{extra}""")
    return folder / "dataset.yaml"


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store")


@pytest.fixture
def cfg():
    return load_config(DeidConfig, REPO / "bench/data/deid_eval_config.yaml").model_copy(update={"time_shift_days": 17})


def all_released_strings(store, name, manifest) -> str:
    out = [json.dumps(manifest, ensure_ascii=False)]
    for split in datasets.SPLIT_NAMES:
        for shard in datasets.shards(manifest, split):
            arrays = datasets.load_shard(store, name, shard)
            out += [str(v) for k, a in arrays.items() if a.dtype.kind == "U" for v in a]
    return "\n".join(out)


def test_no_planted_identifier_reaches_a_released_dataset(tmp_path, store, cfg):
    name, version, raw = ingest(work_orders(tmp_path / "a", "steel-a"), store, progress=False)
    raw_text = all_released_strings(store, name, raw)
    planted = {s["value"] for e in EVAL[:240] for s in e["spans"]} | {"김민수", "John Carter", "HB23K00003"}
    assert sum(v in raw_text for v in planted) > 100  # the raw version really holds them
    rel, rv, body = release.release(store, datasets.DatasetRef(name, version), SECRET_A, cfg, progress=False)
    assert rel == "steel-a-orders-released" and body["stage"] == "released" and body["parent"] == f"{name}@{version}"
    text = all_released_strings(store, rel, body)
    leaked = sorted(v for v in planted if v in text)
    assert leaked == [], leaked
    report = body["deidentification"]["report"]
    for kind in ("person", "phone", "email", "rrn", "brn", "company", "address", "serial", "part"):
        assert report["by_kind"].get(kind, 0) > 0, kind
    assert "spec" not in body and body["split"] == raw["split"] and body["classes"] == raw["classes"]


def test_pseudonyms_are_consistent_and_times_shifted(tmp_path, store, cfg):
    name, version, raw = ingest(work_orders(tmp_path / "a", "steel-a"), store, progress=False)
    ref = datasets.DatasetRef(name, version)
    rel, rv, body = release.release(store, ref, SECRET_A, cfg, progress=False)
    assert release.release(store, ref, SECRET_A, cfg, progress=False)[1] == rv  # deterministic: same version
    before = datasets.load_split(store, ref, "train")
    after = datasets.load_split(store, datasets.DatasetRef(rel, rv), "train")
    mapping = {}
    for a, b in zip(before["key_asset"], after["key_asset"]):
        assert mapping.setdefault(a, b) == b  # the same asset stays the same asset
    assert len(set(mapping.values())) == len(mapping) == 6 and all(v.startswith("[ASSET_") for v in mapping.values())
    assert np.all(after["key_time"] - before["key_time"] == 17 * 86_400 * 10**9)
    assert np.array_equal(before["label"], after["label"])
    other = release.release(store, ref, SECRET_B, cfg, name="steel-a-orders-b", progress=False)[2]
    other_assets = set(datasets.load_split(store, datasets.DatasetRef("steel-a-orders-b", other["version"]), "train")["key_asset"])
    assert other_assets.isdisjoint(mapping.values())  # another secret, other pseudonyms


def test_reading_rule_raw_released_common(tmp_path, store, cfg):
    name, version, raw = ingest(work_orders(tmp_path / "a", "steel-a"), store, progress=False)
    ref = datasets.DatasetRef(name, version)
    assert datasets.may_read(raw, "steel-a", "researcher") and datasets.may_read(raw, None, "admin")
    assert not datasets.may_read(raw, "auto-b", "researcher")
    with pytest.raises(UserError, match="raw data of member 'steel-a'"):
        datasets.check_read(store, ref, "auto-b", "researcher")
    rel, rv, body = release.release(store, ref, SECRET_A, cfg, progress=False)
    assert datasets.may_read(body, "auto-b", "researcher")
    with pytest.raises(UserError, match="already released"):
        release.release(store, datasets.DatasetRef(rel, rv), SECRET_A, cfg, progress=False)


def test_industry_common_dataset_records_its_inputs(tmp_path, store, cfg):
    a = ingest(work_orders(tmp_path / "a", "steel-a", labels=("leak", "wear")), store, progress=False)
    b = ingest(work_orders(tmp_path / "b", "steel-c", n=120, labels=("wear", "crack")), store, progress=False)
    with pytest.raises(UserError, match="only released versions can be shared"):
        release.share(store, "steel", "steel-common", [datasets.DatasetRef(a[0], a[1])], progress=False)
    ra = release.release(store, datasets.DatasetRef(a[0], a[1]), SECRET_A, cfg, progress=False)
    rb = release.release(store, datasets.DatasetRef(b[0], b[1]), SECRET_B, cfg, progress=False)
    name, version, common = release.share(store, "steel", "steel-common",
                                          [datasets.DatasetRef(ra[0], ra[1]), datasets.DatasetRef(rb[0], rb[1])], progress=False)
    assert common["stage"] == "common" and common["industry"] == "steel" and common["classes"] == ["leak", "wear", "crack"]
    assert [i["dataset"] for i in common["inputs"]] == [f"{ra[0]}@{ra[1]}", f"{rb[0]}@{rb[1]}"]
    assert {i["member"] for i in common["inputs"]} == {"steel-a", "steel-c"}
    train = datasets.load_split(store, datasets.DatasetRef(name, version), "train")
    total = ra[2]["split"]["records"]["train"] + rb[2]["split"]["records"]["train"]
    assert len(train["label"]) == total
    # steel-c's "wear" (its class 0) became the common class 1, its "crack" class 2
    assert np.bincount(train["label"], minlength=3).tolist() == [sum(x) for x in zip(*[
        [ra[2]["split"]["per_class"]["train"][0], ra[2]["split"]["per_class"]["train"][1], 0],
        [0, rb[2]["split"]["per_class"]["train"][0], rb[2]["split"]["per_class"]["train"][1]]])]
    d = release.diff(ra[2], common)
    assert d["stage"] == ["released", "common"] and d["classes"]["only_b"] == ["crack"] and not d["same_content"]
    assert release.diff(common, common)["same_content"]


# ---- every string array, key copies, source labels, missing labels --------------------------------

def released_splits(store, ref: datasets.DatasetRef, rel: str, body: dict):
    """(split, raw arrays, released arrays) for every split the released version has."""
    out = []
    for split in datasets.SPLIT_NAMES:
        if datasets.shards(body, split):
            out.append((split, datasets.load_split(store, ref, split), datasets.load_split(store, datasets.DatasetRef(rel, body["version"]), split)))
    return out


def test_an_instruction_dataset_is_released_with_every_text_array_deidentified(tmp_path, store, cfg):
    from indai.platform import instruct

    name, version, _ = ingest(work_orders(tmp_path / "a", "steel-a"), store, progress=False)
    iname, iversion, imanifest = instruct.build(store, instruct.InstructSpec(sources=[f"{name}@{version}"], industry="steel"),
                                                progress=False)
    assert imanifest["stage"] == "raw" and imanifest["member"] == "steel-a"
    ref = datasets.DatasetRef(iname, iversion)
    planted = {s["value"] for e in EVAL[:240] for s in e["spans"]}
    raw_inputs = "\n".join(datasets.load_split(store, ref, "train")["input"])
    assert sum(v in raw_inputs for v in planted) > 50  # the instruction records really carry them
    rel, rv, body = release.release(store, ref, SECRET_A, cfg, progress=False)
    text = all_released_strings(store, rel, body)
    leaked = sorted(v for v in planted if v in text)
    assert leaked == []
    report = body["deidentification"]["report"]
    assert report["total"] > 100 and report["by_kind"]["phone"] > 0 and report["by_kind"]["person"] > 0
    assert any(w.endswith("/input") for places in report["where"].values() for w in places)
    arrays = body["deidentification"]["arrays"]
    assert arrays["input"] == arrays["instruction"] == arrays["response"] == "free text"
    assert arrays["key_event"] == "pseudonymised (event)" and arrays["language"] == arrays["task"] == "kept: fixed vocabulary"
    splits = released_splits(store, ref, rel, body)
    assert [s for s, _, _ in splits] == ["train", "val", "test"]
    for split, before, after in splits:
        assert set(after) == set(before)
        assert np.array_equal(after["language"], before["language"]) and set(after["language"]) == {"en", "ko"}
        assert np.array_equal(after["task"], before["task"]) and set(after["task"]) == {"work_order"}
        assert np.array_equal(after["key_source"], before["key_source"]) and np.array_equal(after["label"], before["label"])
        assert all(v.startswith("[EVENT_") for v in after["key_event"])
        # each text array went through the very de-identification free text gets
        fresh = Deidentifier(cfg, SECRET_A)
        for key in ("instruction", "input", "response"):
            assert after[key].tolist() == [fresh.text(str(v), "x") for v in before[key]], key
        assert (after["input"] != before["input"]).sum() > len(before["input"]) // 4


def test_string_arrays_release_does_not_know_are_treated_as_free_text(store, cfg):
    """Default deny: an array release has no rule for is de-identified as free text, and the
    fixed-vocabulary arrays are kept only while they hold only their fixed values."""
    n = 4
    arrays = {"comment": np.array(["call 김민수 대리 010-1234-5678 today"] * n),
              "language": np.array(["en", "ko", "en", "ko 010-2222-3333"]), "task": np.array(["work_order"] * n),
              "label": np.zeros(n, np.int64)}
    manifest = {"member": "steel-a", "stage": "raw", "layout": "records", "classes": ["x"], "label_type": "classification",
                "modalities": {}, "split": {"records": {"train": n, "test": n}}}
    version, _ = datasets.write_version(store, "notes", manifest, {"train": arrays, "test": arrays})
    rel, rv, body = release.release(store, datasets.DatasetRef("notes", version), SECRET_A, cfg, progress=False)
    after = datasets.load_split(store, datasets.DatasetRef(rel, rv), "train")
    assert all("김민수" not in c and "010-1234-5678" not in c and c.startswith("call ") for c in after["comment"])
    assert after["language"][:3].tolist() == ["en", "ko", "en"] and "010-2222-3333" not in after["language"][3]
    assert after["task"].tolist() == ["work_order"] * n
    assert body["deidentification"]["arrays"]["comment"] == "free text"
    assert body["deidentification"]["arrays"]["language"] == "free text (values outside the fixed vocabulary)"
    assert body["deidentification"]["report"]["by_kind"]["phone"] == 2 * (n + 1)  # every comment and the odd language value


def plant_orders(folder: Path, asset_type: str = "int", time_type: str = "str", n: int = 60) -> Path:
    """Work orders whose event, asset, group and time columns are also declared as typed columns."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "orders.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["order", "asset_no", "line", "date", "note", "mode"])
        for i in range(n):
            asset = str(700000 + i % 6) if asset_type == "int" else f"PRESS-{i % 6:02d}"
            date = f"2024-{1 + i % 12:02d}-{1 + i % 27:02d} 08:00" if time_type == "str" else f"2024{1 + i % 12:02d}{1 + i % 27:02d}"
            w.writerow([f"WO-{i:05d}", asset, f"LINE-{i % 3}", date, "bearing noise on the drive side", ("leak", "wear")[i % 2]])
    (folder / "dataset.yaml").write_text(f"""name: plant-orders
member: steel-a
split: {{by: time}}
sources:
  - kind: table
    path: orders.csv
    event: order
    asset: asset_no
    group: line
    time: date
    text: [note]
    label: mode
    columns:
      order: {{type: str}}
      asset_no: {{type: {asset_type}}}
      line: {{type: category}}
      date: {{type: {time_type}}}
""")
    return folder / "dataset.yaml"


@pytest.mark.parametrize("asset_type", ["int", "str"])
def test_typed_copies_of_key_columns_get_the_key_pseudonym_and_times_shift(tmp_path, store, cfg, asset_type):
    import pandas as pd

    name, version, raw = ingest(plant_orders(tmp_path / "a", asset_type), store, progress=False)
    ref = datasets.DatasetRef(name, version)
    assert datasets.load_split(store, ref, "train")["tab_asset_no"].dtype.kind == ("f" if asset_type == "int" else "U")
    rel, rv, body = release.release(store, ref, SECRET_A, cfg, progress=False)
    raw_ids = [700000 + k for k in range(6)] if asset_type == "int" else [f"PRESS-{k:02d}" for k in range(6)]
    for split, before, after in released_splits(store, ref, rel, body):
        assert set(after) == set(before)
        # the typed copy carries exactly the pseudonym of its key, so the two still join
        assert after["tab_asset_no"].dtype.kind == "U" and np.array_equal(after["tab_asset_no"], after["key_asset"])
        assert all(v.startswith("[ASSET_") for v in after["tab_asset_no"]) and len(set(after["tab_asset_no"])) <= 6
        assert np.array_equal(after["tab_order"], after["key_event"]) and all(v.startswith("[EVENT_") for v in after["tab_order"])
        assert np.array_equal(after["tab_line"], after["key_group"]) and all(v.startswith("[GROUP_") for v in after["tab_line"])
        # the text copy of the time moved like the key time: 17 days, and to the very instant of the released key
        moved = pd.to_datetime(after["tab_date"]) - pd.to_datetime(before["tab_date"])
        assert (moved == pd.Timedelta(days=17)).all() and not np.any(after["tab_date"] == before["tab_date"])
        assert np.array_equal(pd.to_datetime(after["tab_date"]).tz_localize("UTC").as_unit("ns").asi8, after["key_time"])
        for a in after.values():
            if a.dtype.kind == "f":
                assert not np.isin(a, [float(x) for x in raw_ids if isinstance(x, int)]).any()
    text = all_released_strings(store, rel, body)
    leaked = [str(v) for v in raw_ids if str(v) in text] + [v for v in ("WO-000", "LINE-") if v in text]
    assert leaked == [], leaked
    summary = body["deidentification"]["arrays"]
    assert summary["tab_asset_no"] == summary["key_asset"] == "pseudonymised (asset)"
    assert summary["tab_order"] == "pseudonymised (event)" and summary["tab_line"] == "pseudonymised (group)"
    assert summary["tab_date"] == summary["key_time"] == "shifted 17 days" and summary["text"] == "free text"
    n = sum(raw["split"]["records"].values())
    assert body["deidentification"]["report"]["timestamps_shifted"] == 2 * n  # key_time and tab_date, every record


def test_a_numeric_copy_of_the_key_time_is_dropped_and_the_report_says_so(tmp_path, store, cfg):
    name, version, raw = ingest(plant_orders(tmp_path / "a", time_type="int"), store, progress=False)
    ref = datasets.DatasetRef(name, version)
    assert datasets.load_split(store, ref, "train")["tab_date"][0] >= 20240101  # yyyymmdd, as the member typed it
    rel, rv, body = release.release(store, ref, SECRET_A, cfg, progress=False)
    for split, before, after in released_splits(store, ref, rel, body):
        assert set(before) - set(after) == {"tab_date"}
        assert np.all(after["key_time"] - before["key_time"] == 17 * 86_400 * 10**9)
    dropped = body["deidentification"]["dropped_arrays"]
    assert list(dropped) == ["tab_date"] and "time column" in dropped["tab_date"] and "int" in dropped["tab_date"]
    assert "tab_date" not in body["deidentification"]["arrays"]
    # without a time shift there is nothing to hide the time from: the column stays
    kept = release.release(store, ref, SECRET_A, cfg.model_copy(update={"time_shift_days": 0}), name="plant-orders-kept",
                           progress=False)[2]
    assert "tab_date" in datasets.load_split(store, datasets.DatasetRef("plant-orders-kept", kept["version"]), "train")
    assert kept["deidentification"]["dropped_arrays"] == {}


def test_source_labels_of_a_recordings_dataset_are_deidentified_like_the_classes(tmp_path, store, cfg):
    rng = np.random.default_rng(0)
    labels = ["동해조선 010-9876-5432 inner race", "normal"]
    for i in range(2):
        np.save(tmp_path / f"rec{i}.npy", rng.normal(size=(4000, 2)).astype(np.float32))
    (tmp_path / "dataset.yaml").write_text(f"""name: bearings
member: steel-a
modality: sensor
sensor: {{channels: [DE, FE], sampling_rate_hz: 1000, window: 100}}
split: {{by: time}}
sources:
  - {{path: rec0.npy, label: "{labels[0]}", sampling_rate_hz: 1000}}
  - {{path: rec1.npy, label: "{labels[1]}", sampling_rate_hz: 1000}}
""", encoding="utf-8")
    name, version, raw = ingest(tmp_path / "dataset.yaml", store, progress=False)
    assert [s["label"] for s in raw["sources"]] == raw["classes"] == labels
    rel, rv, body = release.release(store, datasets.DatasetRef(name, version), SECRET_A, cfg, progress=False)
    released = json.dumps(body, ensure_ascii=False)
    assert "동해조선" not in released and "9876" not in released
    assert [s["label"] for s in body["sources"]] == body["classes"]
    assert body["classes"][1] == "normal" and body["classes"][0].endswith(" inner race") and "[PHONE_" in body["classes"][0]
    assert any(w.startswith("manifest/sources/0/label") for places in body["deidentification"]["report"]["where"].values()
               for w in places)


def test_share_keeps_missing_labels_missing(tmp_path, store, cfg):
    a = ingest(work_orders(tmp_path / "a", "steel-a", labels=("leak", "", "wear"), extra="labels: {drop_missing: false}\n"),
               store, progress=False)
    b = ingest(work_orders(tmp_path / "b", "steel-c", n=120, labels=("wear", "crack")), store, progress=False)
    raw_a = datasets.load_split(store, datasets.DatasetRef(a[0], a[1]), "train")
    missing = int((raw_a["label"] == -1).sum())
    assert a[2]["classes"] == ["leak", "wear"] and missing > 0
    ra = release.release(store, datasets.DatasetRef(a[0], a[1]), SECRET_A, cfg, progress=False)
    rb = release.release(store, datasets.DatasetRef(b[0], b[1]), SECRET_B, cfg, progress=False)
    name, version, common = release.share(store, "steel", "steel-common",
                                          [datasets.DatasetRef(ra[0], ra[1]), datasets.DatasetRef(rb[0], rb[1])], progress=False)
    assert common["classes"] == ["leak", "wear", "crack"]
    train = datasets.load_split(store, datasets.DatasetRef(name, version), "train")
    assert int((train["label"] == -1).sum()) == missing  # still missing, not steel-a's last class ("wear")
    per_class = common["split"]["per_class"]["train"]
    assert per_class == np.bincount(train["label"][train["label"] >= 0], minlength=3).tolist()
    pa, pb = ra[2]["split"]["per_class"]["train"], rb[2]["split"]["per_class"]["train"]
    assert per_class == [pa[0], pa[1] + pb[0], pb[1]]
    assert sum(per_class) == len(train["label"]) - missing and common["split"]["records"]["train"] == len(train["label"])


def test_only_the_admin_builds_an_industry_common_dataset(tmp_path, store, cfg, monkeypatch):
    """A member's job could otherwise commit its own choice of data as `<industry>-common@latest`."""
    a = ingest(work_orders(tmp_path / "a", "steel-a"), store, progress=False)
    ra = release.release(store, datasets.DatasetRef(a[0], a[1]), SECRET_A, cfg, progress=False)
    monkeypatch.setenv("INDAI_JOB_MEMBER", "steel-a")
    monkeypatch.setenv("INDAI_JOB_ROLE", "researcher")
    with pytest.raises(UserError, match="only the platform admin builds industry-common datasets"):
        release.share(store, "steel", "steel-common", [datasets.DatasetRef(ra[0], ra[1])], progress=False)
    assert not store.committed_children("datasets/steel-common")
    monkeypatch.delenv("INDAI_JOB_MEMBER")
    monkeypatch.delenv("INDAI_JOB_ROLE")  # the admin's shell
    name, version, _ = release.share(store, "steel", "steel-common", [datasets.DatasetRef(ra[0], ra[1])], progress=False)
    assert datasets.resolve(store, datasets.parse_ref(name)).version == version
