"""The consortium KPI report: what members declare, what the platform measured, and the report.

Members declare the hours their processes ran (`set_hours`, `import_hours`) and may record
outcome indicators before and after the AI (`record_outcome`). `compute` turns the platform
database, the model registry and the object store into one plain dict of numbers for an
industry and a period; `render` writes that dict as a self-contained HTML page (inline SVG
charts, English text with Korean labels) and as JSON. The two are separate so the numbers
can be checked without a browser.

KPIs, each judged against a target (`Targets`, loadable from YAML):
1. fine-tuned models in production per process: models a member owns for a process
   (`model_access`) that the platform promoted under a `champion` or `production` alias
   (platform/promotion.py; the registry's own aliases are labels any job may move) and that the
   registry still holds;
2. AI operating-time share per process: distinct UTC clock hours with at least one
   successful call of the member for the process, over the declared operating hours;
3. satisfaction per member: the mean feedback rating in the period, one rating per call (the
   latest, so a feedback retried or sent again counts once) and only for calls answered 200;
4. industry-common datasets: committed dataset versions of stage "common" of the industry;
5. outcome indicators (before, after, change), shown without a target.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

from pydantic import Field
from sqlalchemy import distinct, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from indai.platform.config import Strict, load_config
from indai.platform.db import Call, Feedback, Member, ModelAccess, ModelAlias, OperatingHours, Outcome, utcnow
from indai.platform.errors import UserError
from indai.platform.tenancy import check_process

PRODUCTION_ALIASES = ("champion", "production")
# which direction of an indicator is an improvement
INDICATORS = {"defect_rate": "lower", "labour": "lower", "operating_cost": "lower", "uptime": "higher"}
PHASES = ("before", "after")
HOURS_COLUMNS = ("member", "process", "day", "hours")
MAX_PERIOD_DAYS = 366
MAX_CSV_BYTES = 20_000_000
UNIT_RE = re.compile(r"^[^\x00-\x1f\x7f]{0,32}$")
REGISTRY_TIMEOUT_S = 5


class Targets(Strict):
    """What each KPI must reach to count as met."""

    models_in_production: int = Field(1, ge=0, description="fine-tuned models in production per process (at least)")
    ai_time_share: float = Field(0.5, ge=0, le=1, description="AI operating-time share per process, 0-1 (at least)")
    satisfaction: float = Field(80, ge=0, le=100, description="mean feedback rating per member, 0-100 (at least)")
    common_datasets: int = Field(1, ge=0, description="industry-common dataset versions per industry (at least)")


def load_targets(path: str | Path | None = None) -> Targets:
    return load_config(Targets, path)


# ---- periods and inputs -------------------------------------------------------------------------

@dataclass(frozen=True)
class Period:
    """Whole UTC days from `start` to `end`, both included."""

    start: date
    end: date

    def __post_init__(self):
        if self.end < self.start:
            raise UserError(f"period {self}: the end is before the start; write it as <from>..<to>, e.g. 2026-11-01..2026-11-30")
        if self.days > MAX_PERIOD_DAYS:
            raise UserError(f"period {self} spans {self.days} days; at most {MAX_PERIOD_DAYS} are allowed: split it")

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def bounds(self) -> tuple[datetime, datetime]:
        """[first instant, first instant after the period), in UTC."""
        return (datetime.combine(self.start, time(0), timezone.utc),
                datetime.combine(self.end + timedelta(days=1), time(0), timezone.utc))

    def __str__(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"


def parse_day(text: str, what: str = "day") -> date:
    try:
        return date.fromisoformat(str(text).strip())
    except ValueError:
        raise UserError(f"{what} {text!r} is not a date: write it as YYYY-MM-DD, e.g. 2026-11-01") from None


def parse_period(text: str) -> Period:
    """`2026-11-01..2026-11-30` (both days included)."""
    if not isinstance(text, str) or text.count("..") != 1:
        raise UserError(f"period {text!r} must look like <from>..<to>, e.g. 2026-11-01..2026-11-30")
    a, b = text.split("..")
    return Period(parse_day(a, "period start"), parse_day(b, "period end"))


def check_hours(value, what: str = "hours") -> float:
    try:
        hours = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} {value!r} is not a number: give the hours the process ran that day, from 0 to 24") from None
    if not math.isfinite(hours) or not 0 <= hours <= 24:
        raise UserError(f"{what} {value!r} is outside 0-24: give the hours the process ran that day")
    return hours


def _known_members(s: Session) -> dict[str, Member]:
    return {m.id: m for m in s.scalars(select(Member))}


def _require_member(s: Session, member: str) -> Member:
    m = s.get(Member, member) if isinstance(member, str) else None
    if m is None:
        raise UserError(f"member {member!r} does not exist: `indai member ls` lists them, `indai member add` adds one")
    return m


def _upsert_hours(s: Session, rows: list[tuple[str, str, date, float]]) -> None:
    """Set the hours of each (member, process, day), replacing what was declared before."""
    if not rows:
        return
    days = [r[2] for r in rows]
    existing = {(o.member_id, o.process, o.day): o for o in s.scalars(select(OperatingHours).where(
        OperatingHours.member_id.in_({r[0] for r in rows}), OperatingHours.day >= min(days), OperatingHours.day <= max(days)))}
    for member, process, day, hours in rows:
        found = existing.get((member, process, day))
        if found is None:
            s.add(OperatingHours(member_id=member, process=process, day=day, hours=hours))
        else:
            found.hours = hours
    s.flush()


def set_hours(eng: Engine, member: str, process: str, start: date, end: date, hours_per_day: float) -> int:
    """Declare the same operating hours for every day from start to end; return the number of days."""
    check_process(process)
    hours = check_hours(hours_per_day, "--hours-per-day")
    period = Period(start, end)
    with Session(eng) as s, s.begin():
        _require_member(s, member)
        _upsert_hours(s, [(member, process, period.start + timedelta(days=i), hours) for i in range(period.days)])
    return period.days


def import_hours(eng: Engine, path: str | Path) -> int:
    """Declare operating hours from a CSV with columns member,process,day,hours. Every row is
    checked first; one bad row refuses the whole file (nothing is written). Returns the rows."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hours file {str(path)!r} does not exist or is not a file: check the path")
    if p.stat().st_size > MAX_CSV_BYTES:
        raise UserError(f"hours file {str(path)!r} is larger than {MAX_CSV_BYTES} bytes: split it")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"hours file {str(path)!r} is not UTF-8 text: save it as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != list(HOURS_COLUMNS):
        raise UserError(f"hours file {str(path)!r}: the first line must be the header {','.join(HOURS_COLUMNS)}, not {','.join(header or [])!r}")
    with Session(eng) as s, s.begin():
        members = _known_members(s)
        rows: list[tuple[str, str, date, float]] = []
        seen: dict[tuple[str, str, date], int] = {}
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            where = f"hours file {str(path)!r}, line {line} ({','.join(cells)[:120]})"
            if len(cells) != len(HOURS_COLUMNS):
                raise UserError(f"{where}: has {len(cells)} column(s), expected {len(HOURS_COLUMNS)}: {','.join(HOURS_COLUMNS)}")
            member, process, day, hours = (c.strip() for c in cells)
            try:
                if member not in members:
                    raise UserError(f"member {member!r} does not exist: `indai member ls` lists them")
                row = (member, check_process(process), parse_day(day), check_hours(hours))
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            if row[:3] in seen:
                raise UserError(f"{where}: repeats line {seen[row[:3]]} (same member, process and day): keep one")
            seen[row[:3]] = line
            rows.append(row)
        if not rows:
            raise UserError(f"hours file {str(path)!r} has a header but no rows")
        _upsert_hours(s, rows)
    return len(rows)


def record_outcome(eng: Engine, member: str, process: str, indicator: str, phase: str, value: float, unit: str = "") -> None:
    """Record one outcome indicator; the newest record of each phase is the one reported."""
    check_process(process)
    if indicator not in INDICATORS:
        raise UserError(f"indicator {indicator!r} is not one of {', '.join(INDICATORS)}")
    if phase not in PHASES:
        raise UserError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    if not isinstance(unit, str) or not UNIT_RE.fullmatch(unit):
        raise UserError(f"unit {unit!r} is not valid: at most 32 printable characters, e.g. % or KRW/month")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"value {value!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"value {value!r} is not a finite number")
    if unit == "%" and not 0 <= value <= 100:
        raise UserError(f"value {value} is not a percentage: give 0-100 with --unit %")
    with Session(eng) as s, s.begin():
        _require_member(s, member)
        s.add(Outcome(member_id=member, process=process, indicator=indicator, phase=phase, value=value, unit=unit, recorded_at=utcnow()))


# ---- computing the report -------------------------------------------------------------------

def _judge(value, target, missing: str) -> dict:
    if value is None:
        return {"target": target, "met": None, "status": missing}
    met = value >= target
    return {"target": target, "met": met, "status": "met" if met else "not met"}


def _hour_bucket(dialect: str, column):
    """An SQL expression naming the UTC clock hour of a timestamp."""
    if dialect == "sqlite":  # timestamps are stored as UTC text; strftime also folds a "+HH:MM" suffix to UTC
        return func.strftime("%Y-%m-%d %H", column)
    if dialect == "postgresql":
        return func.date_trunc("hour", func.timezone("UTC", column))
    raise UserError(f"database {dialect} is not supported for the KPI report: use SQLite or PostgreSQL")


def _registry_aliases(mlflow_uri: str | None, names: list[str]) -> tuple[dict[str, dict | None], str | None]:
    """{model: {alias: version}} as the registry labels it (None for a model the registry does not
    hold: only that is used, for "registered"), and an error text when the registry could not be
    asked at all."""
    if not names:
        return {}, None
    if not mlflow_uri:
        return {}, "no MLflow server is configured: run `indai up` (embedded default) or set INDAI_MLFLOW_URI"
    if mlflow_uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(mlflow_uri.rstrip("/") + "/health", timeout=REGISTRY_TIMEOUT_S).raise_for_status()
        except requests.RequestException as e:
            return {}, f"the MLflow registry at {mlflow_uri} did not answer ({type(e).__name__}): models in production are not counted"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    out: dict[str, dict | None] = {}
    for name in names:
        try:
            out[name] = {str(k): str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower():
                out[name] = None
            else:
                return {}, f"the MLflow registry at {mlflow_uri} failed: {str(e).splitlines()[0][:200]}"
        except Exception as e:  # noqa: BLE001 - a broken connection must not end the report
            return {}, f"the MLflow registry at {mlflow_uri} failed ({type(e).__name__}): models in production are not counted"
    return out, None


def _common_datasets(store, industry: str) -> tuple[list[str], str | None]:
    if store is None:
        return [], "no object store given"
    from indai.platform import datasets

    try:
        found = []
        for name, version in datasets.list_versions(store):
            m = datasets.read_manifest(store, datasets.DatasetRef(name, version))
            if datasets.stage_of(m) == "common" and m.get("industry") == industry:
                found.append(f"{name}@{version}")
        return found, None
    except UserError as e:
        return [], f"the object store {getattr(store, 'uri', '')} could not be read: {str(e).splitlines()[0][:200]}"


def _outcomes(s: Session, member_ids: list[str]) -> dict[str, list[dict]]:
    newest: dict[tuple, Outcome] = {}
    for o in s.scalars(select(Outcome).where(Outcome.member_id.in_(member_ids)).order_by(Outcome.recorded_at, Outcome.id)):
        newest[(o.member_id, o.process, o.indicator, o.phase)] = o
    out: dict[str, list[dict]] = {}
    for member, process, indicator in sorted({k[:3] for k in newest}):
        before, after = newest.get((member, process, indicator, "before")), newest.get((member, process, indicator, "after"))
        row = {"process": process, "indicator": indicator, "unit": (after or before).unit,
               "before": before.value if before else None, "after": after.value if after else None,
               "change": None, "change_pct": None, "better": INDICATORS.get(indicator, "higher"), "improved": None}
        if before and after:
            row["change"] = after.value - before.value
            row["change_pct"] = (row["change"] / before.value * 100) if before.value else None
            row["improved"] = (row["change"] < 0) if row["better"] == "lower" else (row["change"] > 0)
        out.setdefault(member, []).append(row)
    return out


def compute(eng: Engine, industry: str, period: Period, *, member: str | None = None, targets: Targets | None = None,
            mlflow_uri: str | None = None, store=None, now: datetime | None = None) -> dict:
    """The KPI numbers of an industry's members (or one member) for a period, as a plain dict."""
    targets = targets or Targets()
    start, end = period.bounds()
    dialect = eng.dialect.name
    with Session(eng) as s:
        members = list(s.scalars(select(Member).where(Member.industry == industry).order_by(Member.id)))
        if member is not None:
            members = [m for m in members if m.id == member]
            if not members:
                other = s.get(Member, member)
                raise UserError(f"member {member!r} is not a member of industry {industry!r}"
                                + (f" (it is {other.industry})" if other else "") + ": `indai member ls` lists them")
        if not members:
            raise UserError(f"industry {industry!r} has no members: `indai member add <id> --industry {industry} ...` adds one")
        ids = [m.id for m in members]

        access = list(s.scalars(select(ModelAccess).where(ModelAccess.owner_member_id.in_(ids)).order_by(ModelAccess.model)))
        declared = {(mid, proc): float(h) for mid, proc, h in s.execute(
            select(OperatingHours.member_id, OperatingHours.process, func.sum(OperatingHours.hours))
            .where(OperatingHours.member_id.in_(ids), OperatingHours.day >= period.start, OperatingHours.day <= period.end)
            .group_by(OperatingHours.member_id, OperatingHours.process))}
        active = {(mid, proc): int(n) for mid, proc, n in s.execute(
            select(Call.member_id, Call.process, func.count(distinct(_hour_bucket(dialect, Call.at))))
            .where(Call.member_id.in_(ids), Call.status == 200, Call.process != "", Call.at >= start, Call.at < end)
            .group_by(Call.member_id, Call.process))}
        latest = (select(func.max(Feedback.id))
                  .join(Call, (Call.request_id == Feedback.request_id) & (Call.member_id == Feedback.member_id))
                  .where(Feedback.member_id.in_(ids), Feedback.at >= start, Feedback.at < end, Call.status == 200)
                  .group_by(Feedback.member_id, Feedback.request_id))
        ratings = {mid: (float(avg), int(n)) for mid, avg, n in s.execute(
            select(Feedback.member_id, func.avg(Feedback.rating), func.count(Feedback.id))
            .where(Feedback.id.in_(latest))
            .group_by(Feedback.member_id))}
        outcomes = _outcomes(s, ids)
        promoted: dict[str, dict[str, int]] = {}
        for pin in s.scalars(select(ModelAlias).where(ModelAlias.model.in_([a.model for a in access]))):
            promoted.setdefault(pin.model, {})[pin.alias] = pin.version

    aliases, registry_error = _registry_aliases(mlflow_uri, sorted({a.model for a in access if a.process}))
    common, store_error = _common_datasets(store, industry)

    report_members = []
    for m in members:
        processes = sorted({a.process for a in access if a.owner_member_id == m.id and a.process}
                           | {p for (mid, p) in declared if mid == m.id} | {p for (mid, p) in active if mid == m.id}
                           | {o["process"] for o in outcomes.get(m.id, [])})
        rows = []
        for proc in processes:
            models = []
            for a in access:
                if a.owner_member_id == m.id and a.process == proc:
                    registered = None if registry_error else aliases.get(a.model) is not None
                    al = promoted.get(a.model, {})
                    prod = sorted(set(al) & set(PRODUCTION_ALIASES))
                    models.append({"model": a.model, "registered": registered, "aliases": al, "production_aliases": prod,
                                   "in_production": bool(prod) and registered is not False})
            # (the registry only says whether a promoted model is still there: while it is away, promotions count)
            n_prod = sum(1 for x in models if x["in_production"])
            hours = declared.get((m.id, proc)) or 0.0
            with_ai = active.get((m.id, proc), 0)
            share = min(1.0, with_ai / hours) if hours > 0 else None
            rows.append({
                "process": proc,
                "models_in_production": {"value": n_prod, "models": models,
                                         **_judge(n_prod, targets.models_in_production, "not measured")},
                "ai_time_share": {"value": share, "hours_with_ai": with_ai, "declared_hours": hours,
                                  "capped": hours > 0 and with_ai > hours,
                                  **_judge(share, targets.ai_time_share, "no hours declared")},
            })
        mean, count = ratings.get(m.id, (None, 0))
        report_members.append({
            "member": m.id, "company": m.company, "disabled": bool(m.disabled),
            "processes": rows,
            "models_without_process": [a.model for a in access if a.owner_member_id == m.id and not a.process],
            "satisfaction": {"value": mean, "count": count, **_judge(mean, targets.satisfaction, "no feedback")},
            "outcomes": outcomes.get(m.id, []),
        })

    n_common = None if store_error else len(common)
    kpis = [r[k] for mm in report_members for r in mm["processes"] for k in ("models_in_production", "ai_time_share")]
    kpis += [mm["satisfaction"] for mm in report_members]
    common_kpi = {"value": n_common, "versions": common, **_judge(n_common, targets.common_datasets, "object store unreadable")}
    kpis.append(common_kpi)
    return {
        "report": "indai consortium KPI report",
        "industry": industry,
        "member": member,
        "period": {"from": period.start.isoformat(), "to": period.end.isoformat(), "days": period.days},
        "generated_at": (now or utcnow()).astimezone(timezone.utc).isoformat(timespec="seconds"),
        "targets": targets.model_dump(),
        "sources": {"mlflow": {"uri": mlflow_uri, "error": registry_error},
                    "store": {"uri": getattr(store, "uri", None), "error": store_error},
                    "production_aliases": list(PRODUCTION_ALIASES)},
        "industry_kpis": {"common_datasets": common_kpi},
        "members": report_members,
        "summary": {"kpis": len(kpis), "met": sum(k["met"] is True for k in kpis),
                    "not_met": sum(k["met"] is False for k in kpis), "not_measured": sum(k["met"] is None for k in kpis)},
    }


# ---- rendering --------------------------------------------------------------------------------

LABELS = {
    "title": "Consortium KPI report (컨소시엄 KPI 보고서)",
    "summary": "Summary (요약)",
    "share": "AI operating-time share (AI 활용률)",
    "satisfaction": "Satisfaction (만족도)",
    "models": "Fine-tuned models in production (현장 적용 모델 수)",
    "common": "Industry-common datasets (업종 공통 데이터셋)",
    "outcomes": "Outcome indicators (성과 지표)",
    "table": "All numbers (전체 수치)",
    "targets": "Targets (목표)",
}
COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.{digits}f}"
    return f"{int(x)}" if float(x).is_integer() else f"{x}"


def _pct(x) -> str:
    return "–" if x is None else f"{x * 100:.1f} %"


def _status(k: dict) -> str:
    cls = {True: "met", False: "notmet", None: "none"}[k["met"]]
    return f'<span class="st {cls}">{_e(k["status"])}</span>'


def _bar_chart(title: str, items: list[tuple[str, float | None, bool | None, str]], vmax: float, target: float,
               target_label: str) -> str:
    """A horizontal bar chart as inline SVG: one bar per (label, value, met, value text), with a
    dashed line at the target."""
    left, width, bar_h, gap, top = 300, 560, 20, 10, 44
    height = top + len(items) * (bar_h + gap) + 30
    vmax = vmax or 1
    x = lambda v: left + width * min(max(v, 0), vmax) / vmax  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{left + width + 120}" height="{height}" '
             f'viewBox="0 0 {left + width + 120} {height}" aria-label="{_e(title)}">',
             f'<text x="0" y="18" class="ct">{_e(title)}</text>']
    for i in range(5):  # grid and axis ticks
        v = vmax * i / 4
        parts.append(f'<line x1="{x(v):.1f}" y1="{top - 6}" x2="{x(v):.1f}" y2="{height - 24}" stroke="#e0e0e0"/>'
                     f'<text x="{x(v):.1f}" y="{height - 8}" class="tick" text-anchor="middle">{_e(_num(v) if vmax > 1.5 else f"{v * 100:.0f} %")}</text>')
    values = []  # drawn last, over the target line, with a white halo
    for i, (label, value, met, text) in enumerate(items):
        y = top + i * (bar_h + gap)
        parts.append(f'<text x="{left - 8}" y="{y + bar_h - 5}" text-anchor="end" class="lbl">{_e(label)}</text>')
        if value is None:
            values.append(f'<text x="{left + 6}" y="{y + bar_h - 5}" class="na">{_e(text)}</text>')
        else:
            parts.append(f'<rect x="{left}" y="{y}" width="{max(x(value) - left, 1.5):.1f}" height="{bar_h}" fill="{COLOURS[met]}" rx="2"/>')
            values.append(f'<rect x="{x(value) + 3:.1f}" y="{y + 2}" width="{len(text) * 8 + 6}" height="{bar_h - 4}" fill="#fff" fill-opacity="0.9"/>'
                          f'<text x="{x(value) + 6:.1f}" y="{y + bar_h - 5}" class="val">{_e(text)}</text>')
    tx = x(target)
    parts.append(f'<line x1="{tx:.1f}" y1="{top - 10}" x2="{tx:.1f}" y2="{height - 24}" stroke="#1565c0" stroke-width="2" stroke-dasharray="6 4"/>'
                 f'<text x="{tx + 4:.1f}" y="{top - 14}" class="tgt">{_e(target_label)}</text>')
    parts += [*values, "</svg>"]
    return "".join(parts)


STYLE = """
body{font-family:"DejaVu Sans","NanumGothic","Noto Sans CJK KR","Malgun Gothic",sans-serif;margin:24px 32px;color:#212121;max-width:1200px}
h1{font-size:24px;margin:0 0 6px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ccc;padding-bottom:4px}
.meta{color:#555;font-size:14px}table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f3f3f3}
.st{padding:1px 6px;border-radius:3px;color:#fff;font-size:12px;white-space:nowrap}.met{background:#2e7d32}.notmet{background:#c62828}.none{background:#757575}
.note{color:#8a4b00;font-size:13px}svg text{font-family:inherit}.ct{font-size:15px;font-weight:bold}.lbl,.val{font-size:13px}
.val,.na{paint-order:stroke;stroke:#fff;stroke-width:4px;stroke-linejoin:round}.tick{font-size:11px;fill:#555}.na{font-size:12px;fill:#757575;font-style:italic}.tgt{font-size:12px;fill:#1565c0;font-weight:bold}
"""


def render_html(r: dict) -> str:
    t, per = r["targets"], r["period"]
    scope = f"industry {r['industry']}" + (f", member {r['member']}" if r.get("member") else "")
    rows = [(m, p) for m in r["members"] for p in m["processes"]]
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(LABELS["title"])}: {_e(scope)}, {_e(per["from"])}..{_e(per["to"])}</title>',
           f"<style>{STYLE}</style></head><body>",
           f'<h1>{_e(LABELS["title"])}</h1>',
           f'<p class="meta">{_e(scope)} · period (기간) <b id="period">{_e(per["from"])} .. {_e(per["to"])}</b> ({per["days"]} days, UTC)'
           f' · generated (생성 시각) <span id="generated">{_e(r["generated_at"])}</span></p>']
    for what, src in (("registry", r["sources"]["mlflow"]), ("object store", r["sources"]["store"])):
        if src.get("error"):
            out.append(f'<p class="note">Note: {_e(src["error"])}</p>')
    sm = r["summary"]
    out.append(f'<h2>{_e(LABELS["summary"])}</h2><p id="summary">{sm["met"]} of {sm["kpis"]} KPIs met, {sm["not_met"]} not met, '
               f'{sm["not_measured"]} not measured.</p>')

    share_items = [(f'{m["member"]} / {p["process"]}', p["ai_time_share"]["value"], p["ai_time_share"]["met"],
                    _pct(p["ai_time_share"]["value"]) if p["ai_time_share"]["value"] is not None else p["ai_time_share"]["status"])
                   for m, p in rows]
    out.append(f'<h2>{_e(LABELS["share"])}</h2>')
    out.append(_bar_chart("AI operating-time share per member / process", share_items, 1.0, t["ai_time_share"],
                          f'target {t["ai_time_share"] * 100:g} %') if share_items else "<p>No processes.</p>")
    sat_items = [(m["member"], m["satisfaction"]["value"], m["satisfaction"]["met"],
                  f'{_num(m["satisfaction"]["value"])} (n={m["satisfaction"]["count"]})' if m["satisfaction"]["value"] is not None
                  else m["satisfaction"]["status"]) for m in r["members"]]
    out.append(f'<h2>{_e(LABELS["satisfaction"])}</h2>')
    out.append(_bar_chart("Mean feedback rating per member", sat_items, 100, t["satisfaction"], f'target {_num(float(t["satisfaction"]))}'))
    model_items = [(f'{m["member"]} / {p["process"]}', p["models_in_production"]["value"], p["models_in_production"]["met"],
                    _num(p["models_in_production"]["value"]) if p["models_in_production"]["value"] is not None else p["models_in_production"]["status"])
                   for m, p in rows]
    top = max([x[1] for x in model_items if x[1] is not None] + [t["models_in_production"], 1])
    out.append(f'<h2>{_e(LABELS["models"])}</h2>')
    out.append(_bar_chart("Fine-tuned models in production per member / process", model_items, top + 1, t["models_in_production"],
                          f'target {t["models_in_production"]}') if model_items else "<p>No processes.</p>")

    out.append(f'<h2>{_e(LABELS["table"])}</h2><table id="per-process"><tr><th>member</th><th>process</th>'
               "<th>models in production</th><th>target</th><th>status</th><th>hours with AI</th><th>declared hours</th>"
               "<th>AI share</th><th>target</th><th>status</th><th>models (aliases)</th></tr>")
    for m, p in rows:
        mp, sh = p["models_in_production"], p["ai_time_share"]
        models = "; ".join(f'{x["model"]} ({", ".join(f"{k}→v{v}" for k, v in x["aliases"].items()) or ("not registered" if x["registered"] is False else "no alias")})'
                           for x in mp["models"]) or "–"
        out.append(f'<tr data-member="{_e(m["member"])}" data-process="{_e(p["process"])}"><td>{_e(m["member"])}</td><td>{_e(p["process"])}</td>'
                   f'<td class="n" data-kpi="models">{_num(mp["value"])}</td><td class="n">≥ {_num(mp["target"])}</td><td>{_status(mp)}</td>'
                   f'<td class="n" data-kpi="hours-with-ai">{sh["hours_with_ai"]}</td><td class="n" data-kpi="declared-hours">{_num(sh["declared_hours"])}</td>'
                   f'<td class="n" data-kpi="share">{_pct(sh["value"])}</td><td class="n">≥ {_pct(sh["target"])}</td><td>{_status(sh)}</td>'
                   f"<td>{_e(models)}</td></tr>")
    out.append('</table><table id="per-member"><tr><th>member</th><th>company</th><th>mean rating</th><th>ratings</th><th>target</th><th>status</th></tr>')
    for m in r["members"]:
        sa = m["satisfaction"]
        out.append(f'<tr data-member="{_e(m["member"])}"><td>{_e(m["member"])}</td><td>{_e(m["company"])}</td>'
                   f'<td class="n" data-kpi="satisfaction">{_num(sa["value"])}</td><td class="n">{sa["count"]}</td>'
                   f'<td class="n">≥ {_num(float(sa["target"]))}</td><td>{_status(sa)}</td></tr>')
    out.append("</table>")

    c = r["industry_kpis"]["common_datasets"]
    out.append(f'<h2>{_e(LABELS["common"])}</h2><table id="common"><tr><th>industry</th><th>common dataset versions</th><th>target</th><th>status</th><th>versions</th></tr>'
               f'<tr><td>{_e(r["industry"])}</td><td class="n" data-kpi="common-datasets">{_num(c["value"])}</td><td class="n">≥ {c["target"]}</td>'
               f'<td>{_status(c)}</td><td>{_e(", ".join(c["versions"]) or "–")}</td></tr></table>')

    out.append(f'<h2>{_e(LABELS["outcomes"])}</h2>')
    outcome_rows = [(m["member"], o) for m in r["members"] for o in m["outcomes"]]
    if outcome_rows:
        out.append('<table id="outcomes"><tr><th>member</th><th>process</th><th>indicator</th><th>before</th><th>after</th>'
                   "<th>change</th><th>change %</th><th>better when</th><th>result</th></tr>")
        for member, o in outcome_rows:
            res = {True: "improved", False: "not improved", None: "–"}[o["improved"]]
            unit = f' {o["unit"]}' if o["unit"] else ""
            before, after, change = ("–" if v is None else format(v, fmt) + unit
                                     for v, fmt in ((o["before"], "g"), (o["after"], "g"), (o["change"], "+g")))
            change_pct = "–" if o["change_pct"] is None else format(o["change_pct"], "+.1f") + " %"
            out.append(f"<tr><td>{_e(member)}</td><td>{_e(o['process'])}</td><td>{_e(o['indicator'])}</td>"
                       f'<td class="n">{_e(before)}</td><td class="n">{_e(after)}</td>'
                       f'<td class="n">{_e(change)}</td><td class="n">{_e(change_pct)}</td>'
                       f"<td>{_e(o['better'])}</td><td>{_e(res)}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No outcome indicators recorded (`indai kpi outcome`).</p>")

    out.append(f'<h2>{_e(LABELS["targets"])}</h2><table id="targets"><tr><th>KPI</th><th>target</th></tr>'
               f'<tr><td>fine-tuned models in production per process</td><td class="n">≥ {t["models_in_production"]}</td></tr>'
               f'<tr><td>AI operating-time share per process</td><td class="n">≥ {_pct(t["ai_time_share"])}</td></tr>'
               f'<tr><td>satisfaction (mean rating) per member</td><td class="n">≥ {_num(float(t["satisfaction"]))}</td></tr>'
               f'<tr><td>industry-common datasets per industry</td><td class="n">≥ {t["common_datasets"]}</td></tr></table>'
               '<p class="meta">A model is in production when the registry holds an alias '
               f'{" or ".join(r["sources"]["production_aliases"])} on it. AI operating-time share: distinct UTC clock hours with at least one '
               "successful call, over the declared operating hours, capped at 100 %.</p></body></html>")
    return "\n".join(out)


def report_name(r: dict) -> str:
    """`kpi-<industry>[-<member>]-<from>-<to>`: one plain file name in the report folder, because the
    industry and member are checked as where they are created (indai.platform.tenancy) and the days parsed."""
    from indai.platform.tenancy import INDUSTRIES, check_id

    if r["industry"] not in INDUSTRIES:
        raise UserError(f"industry {r['industry']!r} is not one of {', '.join(INDUSTRIES)}")
    who = f"-{check_id('member', r['member'])}" if r.get("member") else ""
    days = [parse_day(r["period"][k], f"period {k}").isoformat() for k in ("from", "to")]
    return f"kpi-{r['industry']}{who}-{days[0]}-{days[1]}"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the report as `<name>.html` (self-contained) and `<name>.json`; return both paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {str(out)!r}: {e.strerror}; pass another one with --out") from None
    name = report_name(report)
    html_path, json_path = out / f"{name}.html", out / f"{name}.json"
    _write(html_path, render_html(report))
    _write(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return html_path, json_path


def usage(eng: Engine, period: Period, member: str | None = None, max_rows: int = 100_000) -> list[dict]:
    """Metering per member, model and UTC hour: calls, errors (status >= 400), instances and
    latency percentiles, from the calls the serving ingress recorded."""
    import numpy as np

    from indai.platform.db import Call

    lo, hi = period.bounds()
    q = select(Call.member_id, Call.model, Call.at, Call.status, Call.latency_ms, Call.instances) \
        .where(Call.at >= lo, Call.at < hi).order_by(Call.at).limit(max_rows)
    if member:
        q = q.where(Call.member_id == member)
    groups: dict[tuple, list] = {}
    with Session(eng) as s:
        for m, model, at, status, latency, n in s.execute(q):
            at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
            hour = at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:00")
            groups.setdefault((m, model, hour), []).append((status, latency, n))
    out = []
    for (m, model, hour), rows in sorted(groups.items()):
        lat = np.array([r[1] for r in rows])
        out.append({"member": m, "model": model, "hour": hour, "calls": len(rows), "errors": sum(r[0] >= 400 for r in rows),
                    "instances": sum(r[2] for r in rows), "p50_ms": round(float(np.percentile(lat, 50)), 1),
                    "p99_ms": round(float(np.percentile(lat, 99)), 1)})
    return out
