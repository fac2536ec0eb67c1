"""The consortium KPI report: exact numbers from a known sequence of calls, feedback, declared
hours and outcomes (on SQLite and PostgreSQL), models in production from the real MLflow
registry, common datasets from an object store, the page as headless Chromium renders it,
and the `indai kpi` commands."""
import json
import os
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from chromium import chromium  # noqa: F401 - the session fixture
from indai.platform import db, kpi, tenancy
from indai.platform.datasets import VersionWriter
from indai.platform.errors import UserError
from indai.platform.storage import open_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PERIOD = kpi.parse_period("2026-11-01..2026-11-30")
NOW = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)


def utc(*a) -> datetime:
    return datetime(*a, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def eng(request, tmp_path):
    if request.param == "sqlite":
        e = db.engine(f"sqlite:///{tmp_path / 'platform.db'}")
    else:
        e = db.engine(request.getfixturevalue("postgres").new_database("k"))
    db.upgrade(e)
    yield e
    e.dispose()


@pytest.fixture
def sqlite_eng(tmp_path):
    e = db.engine(f"sqlite:///{tmp_path / 'platform.db'}")
    db.upgrade(e)
    yield e
    e.dispose()


def seed(e) -> None:
    """steel-a: rolling 7 AI hours / 14 declared, cutting 2 / 10; ratings 70 80 75 85.
    steel-b: calls but no declared hours; one rating of 100. auto-c: another industry."""
    tenancy.add_member(e, "steel-a", "Steel A Co.", "steel", "demand")
    tenancy.add_member(e, "steel-b", "Steel B Co.", "steel", "demand")
    tenancy.add_member(e, "auto-c", "Auto C Co.", "automotive", "demand")
    n = iter(range(1000))

    def call(member, process, at, status=200, model="it-cwru", request_id=None):
        return db.Call(request_id=request_id or f"r{next(n)}", member_id=member, model=model, model_version=1, process=process,
                       at=at, status=status, latency_ms=12.5, instances=1)

    with Session(e) as s, s.begin():
        s.add_all([
            db.ModelAccess(model="it-cwru", owner_member_id="steel-a", visibility="private", process="rolling", updated_at=NOW),
            db.ModelAccess(model="it-kpi-noalias", owner_member_id="steel-a", visibility="private", process="cutting", updated_at=NOW),
            db.ModelAccess(model="it-kpi-ghost", owner_member_id="steel-a", visibility="shared", shared_with="steel-b", process="cutting", updated_at=NOW),
            db.ModelAccess(model="it-kpi-noproc", owner_member_id="steel-a", visibility="consortium", process="", updated_at=NOW),
            db.ModelAccess(model="auto-press", owner_member_id="auto-c", visibility="private", process="press", updated_at=NOW),
            # what the platform promoted (`indai model promote`); it-kpi-ghost is no longer in the registry
            db.ModelAlias(model="it-cwru", alias="champion", version=1, set_by="test", set_at=NOW),
            db.ModelAlias(model="it-kpi-ghost", alias="production", version=1, set_by="test", set_at=NOW),
        ])
        s.add_all([db.OperatingHours(member_id="steel-a", process="rolling", day=d, hours=h)
                   for d, h in ((date(2026, 11, 2), 8), (date(2026, 11, 3), 6), (date(2026, 10, 31), 5), (date(2026, 12, 1), 10))])
        s.add(db.OperatingHours(member_id="steel-a", process="cutting", day=date(2026, 11, 5), hours=10))
        s.add(db.OperatingHours(member_id="auto-c", process="press", day=date(2026, 11, 5), hours=2))
        # steel-a / rolling, successful: hours 11-02 08, 09, 10 and 11-03 00, 13, 14, 23 -> 7 distinct
        s.add_all([call("steel-a", "rolling", at) for at in (
            utc(2026, 11, 2, 8, 5), utc(2026, 11, 2, 8, 40), utc(2026, 11, 2, 9, 10), utc(2026, 11, 2, 10, 0), utc(2026, 11, 2, 10, 59, 59),
            utc(2026, 11, 3, 0, 0, 0), utc(2026, 11, 3, 13, 30), utc(2026, 11, 3, 14, 15), utc(2026, 11, 3, 23, 59, 59))])
        s.add(call("steel-a", "rolling", utc(2026, 11, 2, 8, 6), model="it-kpi-noalias"))  # same hour, other model
        # not counted: failed, outside the period, without a process, another member, another industry
        s.add_all([call("steel-a", "rolling", utc(2026, 11, 2, 15, 0), status=500), call("steel-a", "rolling", utc(2026, 11, 2, 16, 0), status=429),
                   call("steel-a", "rolling", utc(2026, 10, 31, 23, 59, 59)), call("steel-a", "rolling", utc(2026, 12, 1, 0, 0, 0)),
                   call("steel-a", "", utc(2026, 11, 2, 20, 0)),
                   call("steel-b", "rolling", utc(2026, 11, 2, 17, 0)), call("steel-b", "rolling", utc(2026, 11, 2, 18, 30)),
                   call("auto-c", "press", utc(2026, 11, 5, 19, 0), model="auto-press")])
        # steel-a / cutting: 2 distinct hours of 10 declared
        s.add_all([call("steel-a", "cutting", at, model="it-kpi-noalias") for at in (utc(2026, 11, 5, 9, 0), utc(2026, 11, 5, 9, 30), utc(2026, 11, 5, 11, 0))])
        # the calls the ratings are about (answered, with no process: they count for satisfaction only)
        s.add_all([call(m, "", at, request_id=rid) for rid, m, at in (
            *((f"f{i}", "steel-a", utc(2026, 11, 10 + i, 11)) for i in range(4)), ("f-old", "steel-a", utc(2026, 10, 15, 11)),
            ("f-b", "steel-b", utc(2026, 11, 20, 7)), ("f-c", "auto-c", utc(2026, 11, 20, 7)))])
        s.add_all([db.Feedback(request_id=f"f{i}", member_id="steel-a", rating=r, at=utc(2026, 11, 10 + i, 12)) for i, r in enumerate((70, 80, 75, 85))])
        s.add_all([db.Feedback(request_id="f-old", member_id="steel-a", rating=10, at=utc(2026, 10, 15, 12)),
                   db.Feedback(request_id="f-b", member_id="steel-b", rating=100, at=utc(2026, 11, 20, 8)),
                   db.Feedback(request_id="f-c", member_id="auto-c", rating=50, at=utc(2026, 11, 20, 8))])
        s.add_all([
            db.Outcome(member_id="steel-a", process="rolling", indicator="defect_rate", phase="before", value=3.5, unit="%", recorded_at=utc(2026, 9, 1)),
            db.Outcome(member_id="steel-a", process="rolling", indicator="defect_rate", phase="before", value=3.2, unit="%", recorded_at=utc(2026, 10, 1)),
            db.Outcome(member_id="steel-a", process="rolling", indicator="defect_rate", phase="after", value=2.0, unit="%", recorded_at=utc(2026, 11, 30)),
            db.Outcome(member_id="steel-a", process="rolling", indicator="uptime", phase="before", value=90, unit="%", recorded_at=utc(2026, 10, 1)),
            db.Outcome(member_id="steel-a", process="rolling", indicator="uptime", phase="after", value=95.5, unit="%", recorded_at=utc(2026, 11, 30)),
            db.Outcome(member_id="steel-a", process="cutting", indicator="labour", phase="before", value=12, unit="h/day", recorded_at=utc(2026, 10, 1)),
        ])


def small_version(store, name: str, manifest: dict) -> str:
    w = VersionWriter(store, name)
    w.put_shard("train", 0, {"label": np.array([0, 1, 1], dtype=np.int64)})
    return w.commit(manifest)[0]


@pytest.fixture
def store(tmp_path):
    """One steel common version; an automotive common and a steel released one do not count."""
    st = open_store(tmp_path / "store")
    version = small_version(st, "steel-common", {"member": None, "stage": "common", "industry": "steel"})
    small_version(st, "automotive-common", {"member": None, "stage": "common", "industry": "automotive"})
    small_version(st, "plant-released", {"member": "steel-a", "stage": "released"})
    st.steel_common = f"steel-common@{version}"
    return st


@pytest.fixture(scope="module")
def registry(services, trained_model):
    """it-cwru carries the registry label `champion` (trained_model's run.alias; `seed` records the
    platform's promotion); it-kpi-noalias is registered without an alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=services.mlflow_uri, registry_uri=services.mlflow_uri)
    try:
        c.create_registered_model("it-kpi-noalias")
    except MlflowException:
        pass  # registered by an earlier parametrization
    assert "champion" in c.get_registered_model("it-cwru").aliases
    return services.mlflow_uri


def by(report: dict, member: str, process: str | None = None) -> dict:
    m = next(x for x in report["members"] if x["member"] == member)
    return m if process is None else next(p for p in m["processes"] if p["process"] == process)


def test_numbers(eng, store, registry):
    seed(eng)
    r = kpi.compute(eng, "steel", PERIOD, mlflow_uri=registry, store=store, now=NOW)
    assert r["period"] == {"from": "2026-11-01", "to": "2026-11-30", "days": 30} and r["generated_at"] == "2026-12-01T09:30:00+00:00"
    assert [m["member"] for m in r["members"]] == ["steel-a", "steel-b"]  # auto-c is automotive
    assert [p["process"] for p in by(r, "steel-a")["processes"]] == ["cutting", "rolling"]

    rolling = by(r, "steel-a", "rolling")
    assert rolling["ai_time_share"] == {"value": 0.5, "hours_with_ai": 7, "declared_hours": 14.0, "capped": False,
                                        "target": 0.5, "met": True, "status": "met"}
    mp = rolling["models_in_production"]
    assert (mp["value"], mp["met"], mp["status"]) == (1, True, "met")
    assert mp["models"][0]["model"] == "it-cwru" and mp["models"][0]["production_aliases"] == ["champion"]

    cutting = by(r, "steel-a", "cutting")
    assert (cutting["ai_time_share"]["value"], cutting["ai_time_share"]["hours_with_ai"], cutting["ai_time_share"]["declared_hours"]) == (0.2, 2, 10.0)
    assert cutting["ai_time_share"]["status"] == "not met"
    mp = cutting["models_in_production"]
    assert (mp["value"], mp["met"]) == (0, False)
    assert {x["model"]: (x["registered"], x["in_production"]) for x in mp["models"]} == {
        "it-kpi-ghost": (False, False), "it-kpi-noalias": (True, False)}

    a = by(r, "steel-a")
    assert a["satisfaction"] == {"value": 77.5, "count": 4, "target": 80.0, "met": False, "status": "not met"}
    assert a["models_without_process"] == ["it-kpi-noproc"]
    assert a["outcomes"] == [
        {"process": "cutting", "indicator": "labour", "unit": "h/day", "before": 12.0, "after": None, "change": None,
         "change_pct": None, "better": "lower", "improved": None},
        {"process": "rolling", "indicator": "defect_rate", "unit": "%", "before": 3.2, "after": 2.0, "change": pytest.approx(-1.2),
         "change_pct": pytest.approx(-37.5), "better": "lower", "improved": True},
        {"process": "rolling", "indicator": "uptime", "unit": "%", "before": 90.0, "after": 95.5, "change": 5.5,
         "change_pct": pytest.approx(6.111, abs=1e-3), "better": "higher", "improved": True},
    ]

    b = by(r, "steel-b", "rolling")
    assert b["ai_time_share"] == {"value": None, "hours_with_ai": 2, "declared_hours": 0.0, "capped": False,
                                  "target": 0.5, "met": None, "status": "no hours declared"}
    assert (b["models_in_production"]["value"], b["models_in_production"]["met"]) == (0, False)
    assert by(r, "steel-b")["satisfaction"] == {"value": 100.0, "count": 1, "target": 80.0, "met": True, "status": "met"}

    assert r["industry_kpis"]["common_datasets"] == {"value": 1, "versions": [store.steel_common], "target": 1, "met": True, "status": "met"}
    assert r["summary"] == {"kpis": 9, "met": 4, "not_met": 4, "not_measured": 1}
    assert r["sources"]["mlflow"] == {"uri": registry, "error": None}
    json.dumps(r)  # machine-readable as it is

    # the registry's alias is a label any job may set: without the platform's promotion it counts for nothing
    with Session(eng) as s, s.begin():
        s.execute(delete(db.ModelAlias).where(db.ModelAlias.model == "it-cwru"))
    unpromoted = kpi.compute(eng, "steel", PERIOD, member="steel-a", mlflow_uri=registry, store=store, now=NOW)
    mp = by(unpromoted, "steel-a", "rolling")["models_in_production"]
    assert (mp["value"], mp["met"], mp["models"][0]["registered"], mp["models"][0]["aliases"]) == (0, False, True, {})

    only_b = kpi.compute(eng, "steel", PERIOD, member="steel-b", mlflow_uri=registry, store=store, now=NOW)
    assert [m["member"] for m in only_b["members"]] == ["steel-b"] and only_b["member"] == "steel-b"
    with pytest.raises(UserError, match="'auto-c' is not a member of industry 'steel' \\(it is automotive\\)"):
        kpi.compute(eng, "steel", PERIOD, member="auto-c", mlflow_uri=registry, store=store)
    with pytest.raises(UserError, match="industry 'bio' has no members"):
        kpi.compute(eng, "bio", PERIOD, mlflow_uri=registry, store=store)


def test_share_is_capped_and_hours_are_upserted(sqlite_eng):
    seed(sqlite_eng)
    # steel-b declares 1 h on 11-02 (2 AI hours that day): capped at 100 %; declaring again replaces
    kpi.set_hours(sqlite_eng, "steel-b", "rolling", date(2026, 11, 2), date(2026, 11, 2), 4)
    kpi.set_hours(sqlite_eng, "steel-b", "rolling", date(2026, 11, 2), date(2026, 11, 2), 1)
    r = kpi.compute(sqlite_eng, "steel", PERIOD, member="steel-b", store=None)
    share = by(r, "steel-b", "rolling")["ai_time_share"]
    assert (share["value"], share["declared_hours"], share["capped"], share["met"]) == (1.0, 1.0, True, True)
    # no models to look up: the registry is not needed
    assert r["sources"]["mlflow"]["error"] is None and by(r, "steel-b", "rolling")["models_in_production"]["value"] == 0


def test_unreachable_registry_and_store_are_reported_not_fatal(sqlite_eng, tmp_path):
    seed(sqlite_eng)
    r = kpi.compute(sqlite_eng, "steel", PERIOD, mlflow_uri="http://127.0.0.1:9", store=None)
    # the promotions are the platform database's: still counted, with "registered" unknown
    mp = by(r, "steel-a", "rolling")["models_in_production"]
    assert (mp["value"], mp["met"], mp["status"]) == (1, True, "met")
    assert [(x["model"], x["registered"], x["aliases"]) for x in mp["models"]] == [("it-cwru", None, {"champion": 1})]
    assert "did not answer" in r["sources"]["mlflow"]["error"]
    assert by(r, "steel-a", "rolling")["ai_time_share"]["value"] == 0.5  # the rest is still measured
    assert r["industry_kpis"]["common_datasets"]["status"] == "object store unreadable"
    html_path, _ = kpi.render(r, tmp_path / "out")
    assert "did not answer" in html_path.read_text()
    r = kpi.compute(sqlite_eng, "steel", PERIOD, mlflow_uri=None, store=None)
    assert "no MLflow server is configured" in r["sources"]["mlflow"]["error"]


def test_targets_yaml(sqlite_eng, tmp_path):
    seed(sqlite_eng)
    (tmp_path / "t.yaml").write_text("# indai kpi report --targets t.yaml\nai_time_share: 0.2\nsatisfaction: 75\n")
    t = kpi.load_targets(tmp_path / "t.yaml")
    assert (t.models_in_production, t.ai_time_share, t.satisfaction, t.common_datasets) == (1, 0.2, 75, 1)
    r = kpi.compute(sqlite_eng, "steel", PERIOD, targets=t, store=None)
    assert by(r, "steel-a", "cutting")["ai_time_share"]["met"] is True and by(r, "steel-a")["satisfaction"]["met"] is True
    assert kpi.load_targets(None) == kpi.Targets()
    for body, msg in (("ai_time_share: 50\n", "field 'ai_time_share'"), ("satisfactoin: 80\n", "field 'satisfactoin'"),
                      ("- 1\n", "must hold a mapping")):
        (tmp_path / "bad.yaml").write_text(body)
        with pytest.raises(UserError, match=msg):
            kpi.load_targets(tmp_path / "bad.yaml")


@pytest.mark.parametrize("row, msg", [
    ("steel-a,rolling,2026-11-02,abc", "line 3 .*hours 'abc' is not a number"),
    ("steel-a,rolling,2026-11-02,25", "line 3 .*outside 0-24"),
    ("steel-a,rolling,2026-13-02,8", "line 3 .*day '2026-13-02' is not a date"),
    ("nobody,rolling,2026-11-02,8", "line 3 .*member 'nobody' does not exist"),
    ("steel-a,rolling,2026-11-02", "line 3 .*has 3 column"),
    ("steel-a,,2026-11-02,8", "line 3 .*process '' is not valid"),
    ("steel-a,rolling,2026-11-01,4", "line 3 .*repeats line 2"),
])
def test_import_hours_refuses_a_bad_file_whole(sqlite_eng, tmp_path, row, msg):
    seed(sqlite_eng)
    f = tmp_path / "hours.csv"
    f.write_text(f"member,process,day,hours\nsteel-a,rolling,2026-11-01,4\n{row}\nsteel-a,rolling,2026-11-04,4\n")
    with pytest.raises(UserError, match=msg):
        kpi.import_hours(sqlite_eng, f)
    with Session(sqlite_eng) as s:
        assert s.scalars(select(db.OperatingHours).where(db.OperatingHours.day == date(2026, 11, 1))).first() is None


def test_satisfaction_counts_one_rating_per_answered_call(sqlite_eng):
    """A rating sent again (a retried POST, a change of mind) replaces the earlier one; ratings of
    calls that were refused, of no call, or of another member's call do not count."""
    seed(sqlite_eng)
    with Session(sqlite_eng) as s, s.begin():
        for rid, status in (("g1", 200), ("g2", 429)):
            s.add(db.Call(request_id=rid, member_id="steel-b", model="it-cwru", model_version=1, process="",
                          at=utc(2026, 11, 21, 7), status=status, latency_ms=10.0, instances=1))
        s.add_all([db.Feedback(request_id=rid, member_id="steel-b", rating=rating, at=utc(2026, 11, 21, hour))
                   for rid, rating, hour in (("g1", 20, 8), ("g1", 60, 9),  # sent again: 60 replaces 20
                                             ("g2", 0, 8), ("no-such-call", 0, 8), ("f0", 0, 8))])  # f0 is steel-a's call
    r = kpi.compute(sqlite_eng, "steel", PERIOD, member="steel-b", store=None)
    # f-b's 100 and g1's 60 (before: 100, 20, 60, 0, 0, 0 -> 30.0 over 6)
    assert by(r, "steel-b")["satisfaction"] == {"value": 80.0, "count": 2, "target": 80.0, "met": True, "status": "met"}


def test_process_names_follow_the_model_access_rule(sqlite_eng):
    """Hours declared as "Hot-Rolling" or "열연" could never meet a call (calls carry the access
    rule's process, which must be lower-case ASCII): one rule refuses them everywhere."""
    seed(sqlite_eng)
    for bad in ("Hot-Rolling", "hot rolling", "열연", "-rolling", ""):
        with pytest.raises(UserError, match="is not valid: 1-64 lower-case letters"):
            kpi.set_hours(sqlite_eng, "steel-a", bad, date(2026, 11, 2), date(2026, 11, 2), 8)
        with pytest.raises(UserError, match="is not valid"):
            kpi.record_outcome(sqlite_eng, "steel-a", bad, "uptime", "after", 99, "%")
        if bad:
            with pytest.raises(UserError, match="is not valid: 1-64 lower-case letters"):
                tenancy.set_model_access(sqlite_eng, "it-cwru", "steel-a", "private", process=bad)
    assert kpi.set_hours(sqlite_eng, "steel-a", "hot-rolling_2", date(2026, 11, 2), date(2026, 11, 2), 8) == 1


def test_period_and_outcome_checks(sqlite_eng):
    seed(sqlite_eng)
    for bad, msg in (("2026-11-01", "must look like"), ("2026-11-30..2026-11-01", "end is before the start"),
                     ("2026-01-01..2027-12-31", "at most 366"), ("2026-11-01..nope", "period end 'nope' is not a date")):
        with pytest.raises(UserError, match=msg):
            kpi.parse_period(bad)
    with pytest.raises(UserError, match="not a percentage"):
        kpi.record_outcome(sqlite_eng, "steel-a", "rolling", "uptime", "after", 120, "%")
    with pytest.raises(UserError, match="member 'nobody' does not exist"):
        kpi.record_outcome(sqlite_eng, "nobody", "rolling", "uptime", "after", 99, "%")
    with pytest.raises(UserError, match="indicator 'speed' is not one of"):
        kpi.record_outcome(sqlite_eng, "steel-a", "rolling", "speed", "after", 1)


def test_report_in_chromium(sqlite_eng, store, registry, chromium, tmp_path):  # noqa: F811
    seed(sqlite_eng)
    r = kpi.compute(sqlite_eng, "steel", PERIOD, mlflow_uri=registry, store=store, now=NOW)
    html_path, json_path = kpi.render(r, tmp_path / "reports")
    assert html_path.name == "kpi-steel-2026-11-01-2026-11-30.html" and json_path.name == "kpi-steel-2026-11-01-2026-11-30.json"
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(r))
    page = html_path.read_text()
    assert "<script" not in page and "src=" not in page and "href=" not in page  # one self-contained file

    dom = chromium.dump_dom(html_path)
    for needle in ('data-kpi="share">50.0 %</td>', 'data-kpi="hours-with-ai">7</td>', 'data-kpi="declared-hours">14</td>',
                   'data-kpi="share">20.0 %</td>', 'data-kpi="satisfaction">77.5</td>', 'data-kpi="satisfaction">100</td>',
                   'data-kpi="common-datasets">1</td>', "no hours declared", "AI 활용률", "만족도", "현장 적용 모델 수",
                   "2026-11-01 .. 2026-11-30", "2026-12-01T09:30:00+00:00", "4 of 9 KPIs met", "target 50 %", "target 80",
                   "+5.5 %", "-37.5 %", "-1.2 %", "12 h/day"):
        assert needle in dom, needle
    assert dom.count("<svg") == 3

    png = chromium.screenshot(html_path, tmp_path / "kpi-report.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours and len(colours) > 50  # text and charts, not a blank page
        greens = sum(n for n, c in colours if c == (0x2E, 0x7D, 0x32))
        assert greens > 2000  # the bars of the met KPIs are drawn
    print(f"\nKPI report screenshot: {png}")


# ---- the commands ---------------------------------------------------------------------------

def indai(*args, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indai.platform.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-1000:], done.stderr[-2000:])
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("indai: error: ") and sum(ln.startswith("indai: error") for ln in lines) == 1, done.stderr
    return lines[-1]


def test_cli(registry, store, tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, INDAI_HOME=str(home), INDAI_DB_URL=f"sqlite:///{tmp_path / 'platform.db'}",
               INDAI_STORE_URI=store.uri, INDAI_MLFLOW_URI=registry, PYTHONUNBUFFERED="1")
    for m in ("steel-a", "steel-b"):
        assert indai("member", "add", m, "--company", f"{m} Co.", "--industry", "steel", "--role", "demand", env=env).returncode == 0

    done = indai("kpi", "hours", "--member", "steel-a", "--process", "rolling", "--from", "2026-11-01", "--to", "2026-11-30",
                 "--hours-per-day", "16", env=env)
    assert done.returncode == 0 and "on 30 day(s)" in done.stdout, done.stderr
    assert indai("kpi", "hours", "--member", "steel-a", "--process", "rolling", "--from", "2026-11-10", "--to", "2026-11-11",
                 "--hours-per-day", "8", env=env).returncode == 0  # replaces two days: 28 * 16 + 2 * 8 = 464
    assert "member 'nobody' does not exist" in error_line(indai("kpi", "hours", "--member", "nobody", "--process", "rolling",
                                                                "--from", "2026-11-01", "--to", "2026-11-02", "--hours-per-day", "8", env=env))
    assert "outside 0-24" in error_line(indai("kpi", "hours", "--member", "steel-a", "--process", "rolling",
                                              "--from", "2026-11-01", "--to", "2026-11-02", "--hours-per-day", "30", env=env))

    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("member,process,day,hours\nsteel-b,rolling,2026-11-02,10\nsteel-a,cutting,2026-11-03,7.5\n")
    done = indai("kpi", "import-hours", good, env=env)
    assert done.returncode == 0 and "2 member/process/day row(s)" in done.stdout, done.stderr
    bad.write_text("member,process,day,hours\nsteel-b,cutting,2026-11-02,10\nsteel-a,cutting,2026-11-04,lots\n")
    line = error_line(indai("kpi", "import-hours", bad, env=env))
    assert line.startswith("indai: error: ") and "line 3 (steel-a,cutting,2026-11-04,lots)" in line and "'lots' is not a number" in line

    assert indai("kpi", "outcome", "--member", "steel-a", "--process", "rolling", "--indicator", "defect_rate", "--phase", "before",
                 "--value", "3.2", "--unit", "%", env=env).returncode == 0
    assert indai("kpi", "outcome", "--member", "steel-a", "--process", "rolling", "--indicator", "defect_rate", "--phase", "after",
                 "--value", "2.4", "--unit", "%", env=env).returncode == 0
    assert indai("kpi", "outcome", "--member", "steel-a", "--process", "rolling", "--indicator", "speed", "--phase", "after",
                 "--value", "1", env=env).returncode == 2  # argparse names the choices

    out = tmp_path / "out"
    done = indai("kpi", "report", "--industry", "steel", "--period", "2026-11-01..2026-11-30", "--out", out, env=env)
    assert done.returncode == 0, done.stderr
    paths = [Path(p) for p in done.stdout.split()]
    assert paths == [out / "kpi-steel-2026-11-01-2026-11-30.html", out / "kpi-steel-2026-11-01-2026-11-30.json"]
    r = json.loads(paths[1].read_text())
    assert by(r, "steel-a", "rolling")["ai_time_share"]["declared_hours"] == 464.0
    assert by(r, "steel-a", "cutting")["ai_time_share"]["declared_hours"] == 7.5  # the bad file added nothing
    assert by(r, "steel-b", "rolling")["ai_time_share"]["declared_hours"] == 10.0
    assert by(r, "steel-a")["outcomes"][0]["change"] == pytest.approx(-0.8)
    assert r["industry_kpis"]["common_datasets"]["value"] == 1 and r["sources"]["mlflow"]["error"] is None

    (tmp_path / "targets.yaml").write_text("satisfaction: 60\n")
    done = indai("kpi", "report", "--industry", "steel", "--member", "steel-b", "--period", "2026-11-01..2026-11-30",
                 "--targets", tmp_path / "targets.yaml", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == str(home / "reports" / "kpi-steel-steel-b-2026-11-01-2026-11-30.html")
    assert json.loads(Path(done.stdout.split()[1]).read_text())["targets"]["satisfaction"] == 60
    assert "must look like <from>..<to>" in error_line(indai("kpi", "report", "--industry", "steel", "--period", "2026-11", env=env))
    (tmp_path / "targets.yaml").write_text("satisfaction: lots\n")
    assert "field 'satisfaction'" in error_line(indai("kpi", "report", "--industry", "steel", "--period", "2026-11-01..2026-11-30",
                                                      "--targets", tmp_path / "targets.yaml", env=env))
