"""The report writer's instruction builder: templates per industry in Korean and English, records
that say what their source records say, sensor windows and images kept beside the text, and the
dataset rules (one member, stage kept, lineage)."""
import numpy as np
import pytest

from indai.platform import datasets, instruct
from indai.platform.errors import UserError
from indai.platform.storage import open_store


@pytest.fixture()
def store(tmp_path):
    return open_store(tmp_path.joinpath("store").as_uri())


def work_orders(store, name="orders", member="steel-a", stage="raw"):
    """Four labelled work orders (two train, one val, one test) with system, part and action columns."""
    classes = ["Leak", "Structural Integrity", "Missing / Loose"]

    def split(texts, labels, systems, parts, actions, events):
        n = len(texts)
        return {"text": np.array(texts), "label": np.array(labels, np.int64), "mask": np.tile(np.float32([0, 0, 1]), (n, 1)),
                "key_event": np.array(events), "tab_MajorSystem": np.array(systems), "tab_Part": np.array(parts),
                "tab_Action": np.array(actions)}

    splits = {"train": split(["L/H BUCKET CYL LEAKING", "CRACK IN BOOM"], [0, 1], ["Bucket_Hydraulic Cylinders", "Superstructure"],
                             ["Cylinder_Tilt", "NA"], ["Replace", "NA"], ["e1", "e2"]),
              "val": split(["BOLT MISSING"], [2], ["Engine"], ["NA"], ["Repair"], ["e3"]),
              "test": split(["HOSE LEAK"], [0], ["NA"], ["NA"], ["NA"], ["e4"])}
    manifest = {"member": member, "stage": stage, "layout": "records", "classes": classes, "label_type": "classification",
                "modalities": {"text": {"max_chars": 256}}, "split": {"records": {"train": 2, "val": 1, "test": 1}}}
    version, _ = datasets.write_version(store, name, manifest, splits)
    return f"{name}@{version}"


def recordings(store, name="bearings", member="steel-a"):
    """Two labelled recordings cut into windows of 64 samples (CWRU's layout)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 6), ("test", 4)):
        signal = rng.normal(size=(2, 64 * n)).astype(np.float32)
        splits[split] = {"sensor_signal": signal, "sensor_starts": np.arange(n, dtype=np.int64) * 64,
                         "label": np.array([0, 1] * (n // 2), np.int64)}
    manifest = {"member": member, "stage": "raw", "layout": "recordings", "classes": ["normal", "ir_007"],
                "modalities": {"sensor": {"channels": ["DE", "FE"], "sampling_rate_hz": 12000.0, "window": 64,
                                          "norm": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}},
                "split": {"windows": {"train": 6, "test": 4}}}
    version, _ = datasets.write_version(store, name, manifest, splits)
    return f"{name}@{version}", splits


def read(store, name, version, split):
    return instruct.read_records(store, datasets.DatasetRef(name, version), split)


def test_shipped_templates_cover_every_task_industry_and_language():
    templates, sha = instruct.load_templates()
    assert len(sha) == 64 and set(templates.languages) == {"en", "ko"}
    assert set(templates.tasks) == set(instruct.TASKS)
    assert {"generic", "steel", "automotive", "shipbuilding", "electronics", "chemicals", "bio"} <= set(templates.industries)
    for lang in ("en", "ko"):
        for name in templates.industries:
            rec = instruct.record(templates, "work_order", lang, name, "k", 0,
                                  {"fault": "F", "where": "W", "next_step": "N", "text": "T", "action": ""})
            assert rec["response"].count("F") == 1 and "N" in rec["response"] and "T" in rec["input"]
    ko = instruct.record(templates, "work_order", "ko", "steel", "k", 0, {"fault": "F", "next_step": "N", "text": "T"})
    assert "압연" in ko["instruction"] and "설비" in ko["response"]  # the steel wording, and `nowhere` for a record without a place


def test_templates_refuse_placeholders_that_are_not_plain_names(tmp_path):
    import yaml

    data = yaml.safe_load(instruct.TEMPLATES.read_text(encoding="utf-8"))
    data["tasks"]["work_order"]["en"]["response"] = "{fault.__class__}"
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError, match="fault.__class__"):
        instruct.load_templates(bad)
    del data["tasks"]["work_order"]["ko"]
    data["tasks"]["work_order"]["en"]["response"] = "{fault}"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError, match="no ko template"):
        instruct.load_templates(bad)


def test_work_orders_become_records_in_both_languages(store):
    ref = work_orders(store)
    name, version, manifest = instruct.build(store, instruct.InstructSpec(sources=[ref], industry="steel"), progress=False)
    assert name == "orders-instruct" and manifest["split"]["records"] == {"train": 4, "val": 2, "test": 2}
    assert manifest["member"] == "steel-a" and manifest["stage"] == "raw" and manifest["layout"] == "instruct"
    assert manifest["inputs"] == [{"dataset": ref, "member": "steel-a", "stage": "raw"}]
    assert manifest["instruct"]["templates_sha256"] == instruct.load_templates()[1]
    assert manifest["instruct"]["tasks"] == {"work_order": 8} and set(manifest["modalities"]) == {"text"}
    train = read(store, name, version, "train")
    rows = {(str(e), str(lang)): i for i, (e, lang) in enumerate(zip(train["key_event"], train["language"]))}
    en, ko = rows[("e1", "en")], rows[("e1", "ko")]
    assert train["input"][en] == "Work order: L/H BUCKET CYL LEAKING" and train["input"][ko] == "작업지시서: L/H BUCKET CYL LEAKING"
    assert train["response"][en].startswith("Likely fault: a leak at Bucket, Hydraulic Cylinders - Cylinder, Tilt.")
    assert "Recorded action: Replace." in train["response"][en] and "replace the seal or hose" in train["response"][en]
    assert train["response"][ko].startswith("예상 고장: 버킷, 유압 실린더 - 틸트 실린더의 누설.")
    assert "기록된 조치: 교체." in train["response"][ko] and "씰이나 호스를 교체" in train["response"][ko]
    crack_en = train["response"][rows[("e2", "en")]]
    assert crack_en.startswith("Likely fault: structural damage at Superstructure.") and "Recorded action" not in crack_en
    assert train["instruction"][en] == "Summarise the likely fault of this rolling-mill work order and the next maintenance step."
    assert train["instruction"][ko] == "압연 설비 작업지시서의 예상 고장과 다음 정비 조치를 요약하세요."
    test = read(store, name, version, "test")
    assert set(test["key_event"]) == {"e4"}  # records stay in their source's split
    assert "at the equipment" in test["response"][list(test["language"]).index("en")]
    assert (train["mask"][:, 2] == 1).all() and "sensor" not in train and "image" not in train


def test_instruction_variant_is_seeded_and_industry_specific(store):
    ref = work_orders(store)
    _, v1, _ = instruct.build(store, instruct.InstructSpec(sources=[ref], industry="steel", languages=["en"]), progress=False)
    _, v2, _ = instruct.build(store, instruct.InstructSpec(sources=[ref], industry="steel", languages=["en"]), progress=False)
    assert v1 == v2  # same content, same version
    t = read(store, "orders-instruct", v1, "train")
    assert set(t["instruction"]) == {"Summarise the likely fault of this rolling-mill work order and the next maintenance step."}
    _, v3, _ = instruct.build(store, instruct.InstructSpec(sources=[ref], industry="generic", languages=["en"], seed=1),
                              progress=False)
    generic = instruct.load_templates()[0].tasks["work_order"]["en"].instructions
    assert set(read(store, "orders-instruct", v3, "train")["instruction"]) <= {i.replace("{site}", "the plant") for i in generic}


def test_sensor_recordings_become_anomaly_records_with_their_windows(store):
    ref, source = recordings(store)
    name, version, manifest = instruct.build(store, instruct.InstructSpec(sources=[ref], windows_per_label=2), progress=False)
    assert manifest["split"]["records"] == {"train": 8, "test": 8}  # 2 labels x 2 windows x 2 languages
    assert manifest["modalities"]["sensor"]["channels"] == ["DE", "FE"] and manifest["instruct"]["tasks"] == {"sensor_anomaly": 16}
    train = read(store, name, version, "train")
    assert train["sensor"].shape == (8, 2, 64) and (train["mask"][:, 0] == 1).all()
    signal = source["train"]["sensor_signal"]
    for i, key in enumerate(train["key_event"]):
        start = int(str(key).rsplit(":", 1)[1])
        np.testing.assert_array_equal(train["sensor"][i], signal[:, start: start + 64])
        label = source["train"]["label"][start // 64]
        en = train["language"][i] == "en"
        want = ("inner-race bearing defect" if en else "베어링 내륜 결함") if label == 1 else ("no fault" if en else "고장 없음")
        assert want in train["response"][i]
    assert "DE, FE, 12000 Hz, 0.005 s" in train["input"][list(train["language"]).index("en")]


def test_sources_of_two_members_and_unlabelled_sources_are_refused(store):
    a = work_orders(store, "orders-a", member="steel-a")
    b = work_orders(store, "orders-b", member="auto-b")
    with pytest.raises(UserError, match="different members"):
        instruct.build(store, instruct.InstructSpec(sources=[a, b]), progress=False)
    manifest = {"member": "steel-a", "stage": "raw", "layout": "records", "classes": [], "label_type": "none",
                "modalities": {"text": {}}, "split": {"records": {"train": 1, "test": 1}}}
    texts = {s: {"text": np.array(["x"]), "label": np.array([-1], np.int64)} for s in ("train", "test")}
    v, _ = datasets.write_version(store, "notes", manifest, texts)
    with pytest.raises(UserError, match="no class labels"):
        instruct.build(store, instruct.InstructSpec(sources=[f"notes@{v}"]), progress=False)
    with pytest.raises(UserError, match="not an instruction dataset"):
        instruct.read_records(store, datasets.DatasetRef("notes", v), "train")


def test_a_released_source_gives_a_released_instruction_dataset(store):
    ref = work_orders(store, stage="released")
    _, _, manifest = instruct.build(store, instruct.InstructSpec(sources=[ref]), progress=False)
    assert manifest["stage"] == "released" and manifest["deidentification"]["inherited_from"] == [ref]


def test_cli_builds_from_a_spec_file_and_from_arguments(store, tmp_path, monkeypatch, capsys):
    from indai.platform import cli

    monkeypatch.setenv("INDAI_STORE_URI", store.uri)
    ref = work_orders(store)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"sources: [{ref}]\nindustry: shipbuilding\nlanguages: [ko]\nname: orders-ko\n", encoding="utf-8")
    assert cli.main(["data", "instruct", str(spec), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("instruction dataset orders-ko@") and "records train 2, val 1, test 1; work_order 4" in line
    version = line.split("@")[1].split()[0]
    t = read(store, "orders-ko", version, "train")
    assert set(t["language"]) == {"ko"} and all("조선소" in i for i in t["instruction"])
    assert cli.main(["data", "instruct", ref, "--lang", "en", "--industry", "bio", "--quiet"]) == 0
    assert "orders-instruct@" in capsys.readouterr().out
    assert cli.main(["data", "instruct", ref, "--industry", "mining", "--quiet"]) == 2
    assert "industry 'mining' has no templates" in capsys.readouterr().err
    assert cli.main(["data", "instruct", ref, "--lang", "fr", "--quiet"]) == 2
    assert "field 'languages.0'" in capsys.readouterr().err
