"""De-identification: every kind in Korean and English, pseudonyms, report, config errors, and the
measured numbers on the constructed evaluation set (the same function as bench/deid_eval.py)."""
import datetime as dt
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from indai.platform.config import load_config, validate
from indai.platform.deid import KINDS, DeidConfig, Deidentifier, scan
from indai.platform.errors import UserError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import deid_eval  # noqa: E402

SECRET = b"member-a-secret-0123456789abcdef"
CFG = DeidConfig(member_names=["한빛제강", "Hanbit Steel"], customer_names=["동해조선", "Seyoung Motors"],
                 person_names=["Jamie Doe"], serial_patterns=[r"\bHB\d{2}[A-Z]\d{5}\b"],
                 part_patterns=[r"\bHB-[A-Z]{2}\d{4}(?:-[A-Z0-9]{1,3})?\b"])


def kinds_of(text: str, config: DeidConfig = CFG) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in scan(text, config):
        out.setdefault(f.kind, []).append(text[f.start:f.end])
    return out


@pytest.mark.parametrize("kind,text,value", [
    ("person", "야간조 김민수 과장이 롤 베어링 이상음 확인", "김민수"),
    ("person", "작업자: 박지훈, 이영희 / 특이사항 없음", "이영희"),
    ("person", "남궁민 대리님께 보고", "남궁민"),
    ("person", "Reported by technician Sarah Johnson on the night shift.", "Sarah Johnson"),
    ("person", "Dear Mr. Miller, the PPAP is attached.", "Miller"),
    ("person", "Inspector Kim Min-su requested rework.", "Kim Min-su"),
    ("person", "Approved by Jamie Doe.", "Jamie Doe"),
    ("person", "Visitor log: Tomasz L. Reed, arrived 09:10", "Tomasz L. Reed"),
    ("person", "Work order: Visitor log: Tomasz L. Reed, arrived 09:10", "Tomasz L. Reed"),  # nested headings
    ("phone", "연락처 010-1234-5678 로 회신", "010-1234-5678"),
    ("phone", "휴대폰 01098765432", "01098765432"),
    ("phone", "방재센터 031-123-4567", "031-123-4567"),
    ("phone", "서울 사무소 02-1234-5678", "02-1234-5678"),
    ("phone", "A/S 1588-1234 접수", "1588-1234"),
    ("phone", "call +82-10-1234-5678 tonight", "+82-10-1234-5678"),
    ("phone", "Stuttgart office +49 711 1234 5678", "+49 711 1234 5678"),
    ("phone", "VoIP 070-1234-5678", "070-1234-5678"),
    ("email", "메일 minsu.kim@hanbit.co.kr 로 송부", "minsu.kim@hanbit.co.kr"),
    ("email", "Send the CoA to qa.lead@supplier-chem.com today.", "qa.lead@supplier-chem.com"),
    ("rrn", "주민등록번호 900101-1234567 전달", "900101-1234567"),
    ("rrn", "RRN 051231-4123456 on file", "051231-4123456"),
    ("brn", "사업자등록번호 123-45-67890", "123-45-67890"),
    ("brn", "business registration no. 2208112345", "2208112345"),
    ("company", "(주)대한정밀에서 납품한 베어링", "(주)대한정밀"),
    ("company", "세진테크 주식회사 방문", "세진테크 주식회사"),
    ("company", "㈜동양금속 품질팀", "㈜동양금속"),
    ("company", "고객사 동해조선 클레임", "동해조선"),
    ("company", "Shipped by Daesung Precision Co., Ltd. yesterday.", "Daesung Precision Co., Ltd."),
    ("company", "Nordwerk GmbH confirmed the order.", "Nordwerk GmbH"),
    ("company", "Keystone Coatings Inc. will quote.", "Keystone Coatings Inc."),
    ("company", "audit for Hanbit Steel next week", "Hanbit Steel"),
    ("address", "경상남도 창원시 성산구 공단로 123번길 45 소재 공장", "경상남도 창원시 성산구 공단로 123번길 45"),
    ("address", "충청남도 아산시 둔포면 석곡리 123-4번지 창고", "충청남도 아산시 둔포면 석곡리 123-4번지"),
    ("address", "Ship to 4500 Industrial Pkwy, Suite 200, Troy, MI 48083 by Friday", "4500 Industrial Pkwy, Suite 200, Troy, MI 48083"),
    ("address", "plant at 45 Gongdan-ro, Seongsan-gu, Changwon-si today", "45 Gongdan-ro, Seongsan-gu, Changwon-si"),
    ("serial", "프레스 S/N: KX230915-044 누유", "KX230915-044"),
    ("serial", "gearbox serial no. 7G4K2201 returned", "7G4K2201"),
    ("serial", "spindle HB23K00412 vibration", "HB23K00412"),
    ("part", "품번 45-AB123 치수 불량", "45-AB123"),
    ("part", "sensors HB-BR2231-A returned", "HB-BR2231-A"),
])
def test_each_kind_detected(kind, text, value):
    found = kinds_of(text)
    assert value in found.get(kind, []), found
    out = Deidentifier(CFG, SECRET).text(text, "t")
    assert value not in out and f"[{kind.upper()}_" in out


@pytest.mark.parametrize("text", [
    "판 두께 010 mm 규격 확인, 토크 35-45 Nm 기준 체결",
    "에러코드 E-1023 발생 후 리셋, 재발 시 정비팀장에게 보고",
    "도장 반장 지시로 건조로 온도 180℃ 유지, 오전 반장과 교대",
    "Spindle speed 1600-1800 rpm; PM done 2024-03-15; bracket BK-2231-A in stock.",
    "Checked by the QA team; no findings on Line 3.",
    "Work order: Main Pump (line 3) leaking; Status: Open Valve (pending)",
])
def test_look_alikes_are_not_identifiers(text):
    assert scan(text, CFG) == []


def test_pseudonyms_consistent_within_member_and_differ_across_secrets():
    a1, a2 = Deidentifier(CFG, SECRET), Deidentifier(CFG, SECRET)
    b = Deidentifier(CFG, b"member-b-secret-fedcba9876543210")
    t1 = a1.text("김민수 과장 010-1234-5678, (주)대한정밀", "x")
    t2 = a2.text("(주) 대한정밀 납품, 담당 김민수 과장 010 1234 5678", "y")
    toks1 = re.findall(r"\[[A-Z]+_[0-9a-f]{8}\]", t1)
    assert len(toks1) == 3 and all(t in t2 for t in toks1)  # same value (spelled differently) -> same pseudonym
    assert a1.pseudonym("company", "대한정밀(주)") == a1.pseudonym("company", "주식회사 대한정밀")
    assert a1.pseudonym("person", "김민수") != a1.pseudonym("person", "김민지")
    assert a1.pseudonym("person", "김민수") != a1.pseudonym("company", "김민수")  # kind is part of the key
    tb = b.text("김민수 과장 010-1234-5678, (주)대한정밀", "x")
    assert not set(toks1) & set(re.findall(r"\[[A-Z]+_[0-9a-f]{8}\]", tb))


def test_remove_mode():
    d = Deidentifier(CFG.model_copy(update={"mode": "remove"}), SECRET)
    out = d.text("Contact Mr. John Smith at john.smith@acme.com or +1 (248) 555-0142.", "r")
    assert out == "Contact Mr. [PERSON] at [EMAIL] or [PHONE]."


def test_disabled_kind_is_kept():
    cfg = CFG.model_copy(update={"kinds": ["phone"]})
    assert Deidentifier(cfg, SECRET).text("김민수 과장 010-1234-5678", "k").startswith("김민수 과장 [PHONE_")


def test_time_shift():
    d = Deidentifier(CFG.model_copy(update={"time_shift_days": -30}), SECRET)
    assert d.shift_time(dt.datetime(2024, 3, 15, 8, 30)) == dt.datetime(2024, 2, 14, 8, 30)
    assert d.shift_time(dt.date(2024, 3, 15)) == dt.date(2024, 2, 14)
    assert d.shift_time(np.datetime64("2024-03-15T08:30")) == np.datetime64("2024-02-14T08:30")
    arr = d.shift_time(np.array(["2024-03-15", "2024-04-01"], dtype="datetime64[D]"))
    assert list(arr.astype(str)) == ["2024-02-14", "2024-03-02"]
    assert d.shift_time("2024-03-15") == "2024-02-14"
    assert d.shift_time("2024-03-15T08:30:00+09:00") == "2024-02-14T08:30:00+09:00"
    assert d.shift_time("2024-03-15T08:30:00Z") == "2024-02-14T08:30:00Z"
    with pytest.raises(UserError, match="ISO 8601"):
        d.shift_time("15/03/2024")
    with pytest.raises(UserError, match="cannot shift"):
        d.shift_time(1710460800)


def test_report_counts_and_places_without_values():
    d = Deidentifier(CFG.model_copy(update={"max_report_locations": 2}), SECRET)
    values = ["김민수", "010-1234-5678", "minsu@hanbit.co.kr", "900101-1234567"]
    for i in range(5):
        d.text(f"담당 김민수 과장 {values[1]} / {values[2]} / 주민번호 {values[3]}", f"train/record {i}/text")
    d.text("no identifiers here", "train/record 9/text")
    d.text("x", "record of 박지훈 과장")   # a `where` that itself holds a name
    d.shift_time("2024-03-15")
    rep = d.report()
    assert rep["by_kind"]["person"] == 5 and rep["by_kind"]["phone"] == 5 and rep["by_kind"]["rrn"] == 5
    assert rep["total"] == 20 and rep["texts"] == 7 and rep["texts_with_findings"] == 5
    assert rep["where"]["phone"] == ["train/record 0/text", "train/record 1/text"]  # bounded
    assert rep["where_not_listed"]["phone"] == 3
    assert rep["timestamps_shifted"] == 1 and "time_shift_days" not in json.dumps(rep)
    dumped = json.dumps(rep, ensure_ascii=False)
    assert not any(v in dumped for v in values + ["박지훈"])


@pytest.mark.parametrize("field,value,msg", [
    ("serial_patterns", ["HB(\\d+"], "not a valid regular expression"),
    ("part_patterns", ["[A-Z]*"], "empty string"),
    ("part_patterns", ["(?:PN)?"], "empty string"),
    ("kinds", ["person", "licence_plate"], "kinds"),
    ("kinds", [], "at least one kind"),
    ("time_shift_days", 100000, "time_shift_days"),
    ("member_names", ["A"], "shorter than 2"),
    ("colour", "red", "colour"),
])
def test_bad_config_is_a_clear_error(field, value, msg):
    with pytest.raises(ValidationError):
        DeidConfig.model_validate({field: value})
    with pytest.raises(UserError, match=re.escape(msg)):
        validate(DeidConfig, {field: value}, "deid.yaml")


def test_short_secret_is_refused():
    with pytest.raises(UserError, match="at least 16 bytes"):
        Deidentifier(CFG, b"short")


@pytest.fixture(scope="module")
def eval_set():
    return deid_eval.load_set(), deid_eval.eval_config()


def test_evaluation_set_is_large_balanced_and_constructed(eval_set):
    records, _ = eval_set
    assert len(records) >= 300
    langs = [r["lang"] for r in records]
    assert abs(langs.count("ko") - langs.count("en")) <= len(records) * 0.1
    assert 0.15 <= sum(1 for r in records if not r["spans"]) / len(records) <= 0.3
    assert {s["kind"] for r in records for s in r["spans"]} == set(KINDS)
    for r in records:
        for s in r["spans"]:
            assert r["text"][s["start"]:s["end"]] == s["value"]
    assert "constructed" in (REPO / "bench" / "data" / "README.md").read_text().lower()


def test_evaluation_recall_and_nothing_planted_survives(eval_set):
    """The release gate at the text level: a planted identifier of any kind in the output fails."""
    records, config = eval_set
    res = deid_eval.evaluate(records, config)
    assert res["overall"]["recall"] >= 0.98, res["overall"]
    assert res["overall"]["precision"] >= 0.9, res["overall"]
    leaks = {k: m["leaked"] for k, m in res["per_kind"].items() if m["leaked"]}
    assert not leaks, f"planted identifiers survive de-identification: {leaks}"
    d = Deidentifier(config, deid_eval.EVAL_SECRET)
    for r in records:
        out = d.text(r["text"], r["id"])
        assert not [s["value"] for s in r["spans"] if s["value"] in out], r["id"]


def test_held_out_seed_recall(eval_set):
    from make_deid_eval import build, load_config as load_eval_config

    _, config = eval_set
    res = deid_eval.evaluate(build(1, load_eval_config()), config)
    assert res["overall"]["recall"] >= 0.98, res["overall"]


def test_eval_config_file_loads():
    cfg = load_config(DeidConfig, REPO / "bench" / "data" / "deid_eval_config.yaml")
    assert cfg.serial_patterns and cfg.part_patterns and cfg.member_names


_pieces = st.sampled_from(["김민수", " 과장", "님", "(주)", "대한정밀", " ", ", ", "010-1234-5678", "02-123-4567", "a@b.co",
                           "Mr. ", "John", " Smith", " Co., Ltd.", "123 Main Street", "경기도 화성시 팔탄로 12", "S/N: ",
                           "AB1234", "900101-1234567", "123-45-67890", "by ", "담당자: ", "[PERSON_abcdef12]", "[PHONE]", "\n"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=12).map("".join))
def test_text_never_raises_and_is_idempotent(s):
    d = Deidentifier(CFG, SECRET)
    once = d.text(s, "h")
    tokens = re.findall(r"\[[A-Z]+(?:_[0-9a-f]{6,32})?\]", once)
    twice = d.text(once, "h")
    assert twice == once
    assert re.findall(r"\[[A-Z]+(?:_[0-9a-f]{6,32})?\]", twice) == tokens


def test_real_shop_floor_text_is_left_alone():
    """Precision on real text nobody constructed: 5,485 NIST excavator work orders and 1,076
    MaintIE notes hold no names, phones or companies; only a few real part numbers
    ("Material No. 60176281") may be found. PLC is the controller, not a company."""
    import csv
    import json
    from collections import Counter
    from importlib import metadata
    from pathlib import Path

    from indai.platform.deid import scan

    root = Path(metadata.distribution("nist-nestor").locate_file("nestor/datasets"))
    texts = [r["OriginalShorttext"] for r in csv.DictReader((root / "excavators-cleaned.csv").open(encoding="utf-8"))]
    texts += [d["text"] for d in json.loads((Path(__file__).resolve().parents[2] / "examples/maintie/gold_release.json").read_text())]
    found = Counter(f.kind for t in texts for f in scan(t))
    assert len(texts) == 6561 and set(found) <= {"part"} and found["part"] <= 5, found
