"""Release, share and diff on a work-order table with planted identifiers: nothing planted
reaches a released version, pseudonyms are consistent within a member, raw data stays with
its member, industry-common versions record their inputs."""
import json
from pathlib import Path

import numpy as np
import pytest

from indai.platform import datasets, release
from indai.platform.config import load_config
from indai.platform.deid import DeidConfig
from indai.platform.errors import UserError
from indai.platform.ingest import ingest
from indai.platform.storage import open_store

REPO = Path(__file__).resolve().parents[2]
EVAL = [json.loads(line) for line in (REPO / "bench/data/deid_eval.jsonl").read_text().splitlines()]
SECRET_A, SECRET_B = b"a" * 32, b"b" * 32


def work_orders(folder: Path, member: str, n: int = 240, labels=("leak", "wear", "crack")) -> Path:
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
""")
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
