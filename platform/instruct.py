"""Instruction data for the report writer, built from a member's ingested dataset versions.

The report writer learns to answer "summarise the likely fault and the next maintenance step"
from what members already have: work orders with a labelled failure mode (and system, part,
action columns), sensor recordings with a fault label, drawings and inspection images with
their notes and class. This module turns such versions into (instruction, input, response)
records, with the sensor window or image of the record kept beside the text, in each language
of the request. The wording is data (`instruct_templates.yaml`, per industry, task and
language), so a new phrasing or industry is a YAML edit.

The records are written as an ordinary dataset version (VersionWriter), so everything datasets
guarantee holds: immutable, content-addressed, lineage in the manifest (its sources and the
templates' sha256), and the access rule (same member and stage as the sources: raw work orders
stay private to their member). No training code is imported here.
"""
from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from indai.platform import datasets
from indai.platform.config import Strict, read_yaml, validate
from indai.platform.errors import UserError
from indai.platform.progress import bar

TEMPLATES = Path(__file__).with_name("instruct_templates.yaml")
TASKS = ("work_order", "sensor_anomaly", "work_procedure", "inspection")
LANGUAGES = ("en", "ko")
PLACEHOLDERS = {"site", "text", "fault", "where", "action", "next_step", "channels", "rate", "seconds", "family", "notes",
                "notes_part"}
MISSING = {"", "na", "nan", "none", "null", "-"}
SHARD_RECORDS = 4096
TEXT_ARRAYS = ("instruction", "input", "response", "language", "task")


# ---- the templates file -------------------------------------------------------------------------

class TaskTemplate(Strict):
    instructions: list[str] = Field(min_length=1, description="instruction variants; one is picked per record")
    input: str = Field(description="the input text of a record")
    response: str = Field(description="the expected answer")
    action: str = Field(default="", description="piece for a recorded action (work orders)")
    nowhere: str = Field(default="", description="`where` of a record without system and part")
    notes: str = Field(default="", description="piece for notes (inspection images)")


class Meaning(Strict):
    means: str = Field(description="what the label means, in words")
    next: str = Field(description="the next maintenance step, or the work procedure")


class LabelRule(Strict):
    match: list[str] = Field(min_length=1, description="lower-case keywords; a keyword matches where a word of the label starts")
    en: Meaning
    ko: Meaning


class Industry(Strict):
    site: dict[str, str] = Field(description="the industry's site phrase per language")
    instructions: dict[str, dict[str, list[str]]] = Field(default_factory=dict, description="task -> language -> own instruction variants")


class Templates(Strict):
    version: int = 1
    languages: list[Literal["en", "ko"]]
    tasks: dict[Literal["work_order", "sensor_anomaly", "work_procedure", "inspection"], dict[str, TaskTemplate]]
    industries: dict[str, Industry]
    labels: list[LabelRule]
    default_label: dict[str, Meaning]
    glossary: dict[str, dict[str, str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self):
        if "generic" not in self.industries:
            raise ValueError("templates need a generic industry (the fallback)")
        for lang in self.languages:
            for task, per_lang in self.tasks.items():
                if lang not in per_lang:
                    raise ValueError(f"task {task} has no {lang} template")
            for name, ind in self.industries.items():
                if lang not in ind.site:
                    raise ValueError(f"industry {name} has no {lang} site phrase")
            if lang not in self.default_label:
                raise ValueError(f"default_label has no {lang} entry")
        for text in self._all_texts():
            _check_placeholders(text)
        return self

    def _all_texts(self):
        for per_lang in self.tasks.values():
            for t in per_lang.values():
                yield from (*t.instructions, t.input, t.response, t.action, t.nowhere, t.notes)
        for ind in self.industries.values():
            for per_lang in ind.instructions.values():
                for variants in per_lang.values():
                    yield from variants


def _check_placeholders(text: str) -> None:
    """Only plain names from PLACEHOLDERS: a template never reaches attributes or indexes."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(text) if f is not None or spec or conv]
    except ValueError as e:
        raise ValueError(f"template {text!r} is not a valid format string: {e}") from None
    for f in fields:
        if f not in PLACEHOLDERS:
            raise ValueError(f"template {text!r} uses {{{f}}}; allowed: {sorted(PLACEHOLDERS)}")


def load_templates(path: str | Path | None = None) -> tuple[Templates, str]:
    """The templates (shipped ones by default) and the sha256 of their file."""
    p = Path(path) if path else TEMPLATES
    data = read_yaml(p)
    return validate(Templates, data, str(p)), hashlib.sha256(p.read_bytes()).hexdigest()


def template_texts(templates: Templates) -> list[str]:
    """Every text of the templates (to train a tokenizer that knows them)."""
    out = list(templates._all_texts())
    for rule in [*templates.labels]:
        out += [rule.en.means, rule.en.next, rule.ko.means, rule.ko.next]
    for per_lang in templates.glossary.values():
        out += list(per_lang.values())
    return [t for t in out if t]


# ---- words ----------------------------------------------------------------------------------------

def _missing(value) -> bool:
    return value is None or str(value).strip().lower() in MISSING


def meaning(templates: Templates, label: str, lang: str) -> Meaning:
    """What a label (failure mode, fault class, part family) means and what to do next."""
    low = str(label).lower()
    for rule in templates.labels:
        if any(re.search(r"(^|[^a-z])" + re.escape(k), low) for k in rule.match):
            return getattr(rule, lang)
    return templates.default_label[lang]


def words(templates: Templates, value: str, lang: str) -> str:
    """A record field in the language: the whole value from the glossary, else each `_` part."""
    value = str(value).strip()
    table = templates.glossary.get(lang, {})
    if value in table:
        return table[value]
    return ", ".join(table.get(p.strip(), p.strip()) for p in value.split("_") if p.strip())


def _pick(options: list[str], *key) -> str:
    h = hashlib.sha256("\0".join(map(str, key)).encode()).digest()
    return options[int.from_bytes(h[:4], "big") % len(options)]


def _fill(text: str, values: dict) -> str:
    return text.format(**{k: values.get(k, "") for k in PLACEHOLDERS})


def record(templates: Templates, task: str, lang: str, industry: str, key: str, seed: int, values: dict) -> dict[str, str]:
    """One (instruction, input, response) record of a task in a language."""
    t = templates.tasks[task][lang]
    ind = templates.industries.get(industry) or templates.industries["generic"]
    values = dict(values, site=ind.site[lang])
    variants = ind.instructions.get(task, {}).get(lang) or t.instructions
    if task == "work_order":
        values["action"] = _fill(t.action, values) if values.get("action") else ""
        values["where"] = values.get("where") or t.nowhere
    if task == "inspection":
        values["notes_part"] = _fill(t.notes, values) if values.get("notes") else ""
    return {"instruction": _fill(_pick(variants, seed, key, lang, task), values), "input": _fill(t.input, values),
            "response": _fill(t.response, values), "language": lang, "task": task}


# ---- the build spec -----------------------------------------------------------------------------

class FieldMap(Strict):
    system: str | None = Field(default="MajorSystem", description="table column (ingested as a typed column) naming the system")
    part: str | None = Field(default="Part", description="table column naming the part")
    action: str | None = Field(default="Action", description="table column naming the action taken")


class InstructSpec(Strict):
    sources: list[str] = Field(min_length=1, max_length=16, description="dataset versions of one member: name, name@latest or name@<version>")
    name: str | None = Field(default=None, description="name of the instruction dataset (default <first source>-instruct)")
    industry: str = Field(default="generic", description="template set: steel, automotive, shipbuilding, electronics, chemicals, bio or generic")
    languages: list[Literal["en", "ko"]] = Field(default=["en", "ko"], min_length=1, description="one record per source record and language")
    templates: str | None = Field(default=None, description="templates YAML (default: the shipped instruct_templates.yaml)")
    fields: FieldMap = FieldMap()
    max_records: int | None = Field(default=None, ge=1, le=10_000_000, description="at most this many source records per split and source")
    windows_per_label: int = Field(default=20, ge=1, le=100_000, description="sensor windows taken per label and split of a recording dataset")
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return datasets.check_name(v) if v is not None else v

    @field_validator("industry")
    @classmethod
    def _industry(cls, v: str) -> str:
        return "generic" if v == "other" else v

    @field_validator("languages")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("languages must not repeat")
        return v


def load_spec(path: str | Path) -> InstructSpec:
    return validate(InstructSpec, read_yaml(path), str(path))


# ---- from source arrays to records ----------------------------------------------------------------

SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


def _subset(n: int, cap: int | None, seed: int, split: str) -> np.ndarray:
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, SPLIT_SEED[split]]).choice(n, size=cap, replace=False))


def _task_of(arrays: dict[str, np.ndarray]) -> str:
    if "sensor_signal" in arrays:
        return "sensor_anomaly"
    if "image" in arrays:
        return "work_procedure" if "text" in arrays and np.char.str_len(arrays["text"].astype(str)).max(initial=0) > 0 else "inspection"
    if "text" in arrays:
        return "work_order"
    raise UserError("source has neither sensor recordings, images nor text: nothing to build instructions from")


def _windows(arrays: dict, window: int, per_label: int, seed: int, split: str) -> np.ndarray:
    """Indices of the split's windows: at most `per_label` of each label, seeded."""
    labels = arrays["label"]
    rng = np.random.default_rng([seed, SPLIT_SEED[split], 7])
    picked = [np.sort(rng.permutation(np.flatnonzero(labels == c))[:per_label]) for c in np.unique(labels)]
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def source_records(templates: Templates, spec: InstructSpec, manifest: dict, arrays: dict[str, np.ndarray],
                   split: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Records of one split of one source, and the sensor windows / images beside them (one row per record)."""
    classes = manifest.get("classes") or []
    if manifest.get("label_type", "classification") != "classification" or not classes:
        raise UserError(f"dataset {manifest['name']} has no class labels: the response of an instruction record is built from "
                        "the labelled failure mode / fault / part family; ingest a labelled version")
    task = _task_of(arrays)
    sensor_meta = manifest.get("modalities", {}).get("sensor") or {}
    if task == "sensor_anomaly":
        window = int(sensor_meta["window"])
        rows = _windows(arrays, window, spec.windows_per_label, spec.seed, split)
        starts = arrays["sensor_starts"][rows]
        idx = starts[:, None] + np.arange(window)[None, :]
        side = {"sensor": np.ascontiguousarray(arrays["sensor_signal"][:, idx].transpose(1, 0, 2)).astype(np.float32)}
        keys = [f"{manifest['name']}:{split}:{int(s)}" for s in starts]
    else:
        rows = _subset(len(arrays["label"]), spec.max_records, spec.seed, split)
        rows = rows[arrays["label"][rows] >= 0]
        mask = arrays.get("mask", np.ones((len(arrays["label"]), 3), np.float32))[rows]
        side = {}
        if "sensor" in arrays and mask[:, 0].any():
            side["sensor"] = arrays["sensor"][rows]
            side["sensor_present"] = mask[:, 0]
        if "image" in arrays:
            side["image"] = arrays["image"][rows]
            side["image_present"] = mask[:, 1]
        keys = [str(arrays["key_event"][i]) if "key_event" in arrays else f"{manifest['name']}:{split}:{i}" for i in rows]
    tab = {role: arrays.get(f"tab_{col}") for role, col in spec.fields.model_dump().items() if col}
    out: list[dict] = []
    for j, i in enumerate(rows):
        label = classes[int(arrays["label"][i])]
        for lang in spec.languages:
            m = meaning(templates, label, lang)
            values = {"fault": m.means, "family": m.means, "next_step": m.next}
            if task == "sensor_anomaly":
                values.update(channels=", ".join(sensor_meta.get("channels", [])), rate=f"{sensor_meta.get('sampling_rate_hz', 0):g}",
                              seconds=f"{window / float(sensor_meta.get('sampling_rate_hz') or 1):.3f}")
            else:
                text = str(arrays["text"][i]).strip() if "text" in arrays else ""
                values.update(text=text, notes=" / ".join(line.strip() for line in text.splitlines() if line.strip()))
                where = [words(templates, tab[r][i], lang) for r in ("system", "part") if tab.get(r) is not None and not _missing(tab[r][i])]
                values["where"] = " - ".join(where)
                action = tab.get("action")
                values["action"] = words(templates, action[i], lang) if action is not None and not _missing(action[i]) else ""
            out.append(dict(record(templates, task, lang, spec.industry, keys[j], spec.seed, values), key=keys[j], row=j))
    return out, side


# ---- writing the version --------------------------------------------------------------------------

def _stage_and_owner(refs: list[datasets.DatasetRef], manifests: list[dict]) -> tuple[str, str | None]:
    members = {m.get("member") for m in manifests}
    if len(members) > 1:
        raise UserError(f"sources belong to different members {sorted(map(str, members))}: build the instruction data of one "
                        "member at a time (or from industry-common versions)")
    stages = [datasets.stage_of(m) for m in manifests]
    stage = "raw" if "raw" in stages else ("released" if "released" in stages else "common")
    return stage, members.pop()


def _modalities(manifests: list[dict], sides: list[dict]) -> dict:
    """Sensor and image of the records: one shape for all sources (else the records cannot batch)."""
    out: dict = {"text": {"max_chars": max((m.get("modalities", {}).get("text", {}).get("max_chars", 0) for m in manifests), default=0)}}
    for kind in ("sensor", "image"):
        metas = [(m["name"], m["modalities"][kind]) for m, s in zip(manifests, sides) if kind in s]
        if not metas:
            continue
        shapes = {(tuple(v["channels"]), v["window"], v["sampling_rate_hz"]) if kind == "sensor" else v["size"] for _, v in metas}
        if len(shapes) > 1:
            raise UserError(f"sources {[n for n, _ in metas]} have different {kind} shapes {sorted(map(str, shapes))}: "
                            "build one instruction dataset per shape")
        meta = dict(metas[0][1])
        if kind == "sensor":
            meta = {k: meta[k] for k in ("channels", "sampling_rate_hz", "window", "norm") if k in meta}
        out[kind] = meta
    return out


def _shard_arrays(recs: list[dict], sides: list[dict], src_of: list[int], modalities: dict) -> dict[str, np.ndarray]:
    n = len(recs)
    arrays = {k: np.array([r[k] for r in recs], dtype=str) for k in TEXT_ARRAYS}
    arrays["key_event"] = np.array([r["key"] for r in recs], dtype=str)
    arrays["key_source"] = np.array(src_of, dtype=np.int64)
    mask = np.zeros((n, 3), np.float32)
    mask[:, 2] = [bool(r["input"]) for r in recs]
    if "sensor" in modalities:
        s = modalities["sensor"]
        out = np.zeros((n, len(s["channels"]), s["window"]), np.float32)
        for i, (r, side) in enumerate(zip(recs, sides)):
            if "sensor" in side:
                out[i] = side["sensor"][r["row"]]
                mask[i, 0] = side.get("sensor_present", np.ones(len(side["sensor"])))[r["row"]]
        arrays["sensor"] = out
    if "image" in modalities:
        size = modalities["image"]["size"]
        out = np.zeros((n, size, size, 3), np.uint8)
        for i, (r, side) in enumerate(zip(recs, sides)):
            if "image" in side:
                out[i] = side["image"][r["row"]]
                mask[i, 1] = side.get("image_present", np.ones(len(side["image"])))[r["row"]]
        arrays["image"] = out
    arrays["mask"] = mask
    arrays["label"] = np.zeros(n, np.int64)  # kept for tools that count records by label; the response is the target
    return arrays


def build(store, spec: InstructSpec, progress: bool = True) -> tuple[str, str, dict]:
    """Write the instruction dataset the spec describes; return (name, version, manifest)."""
    templates, templates_sha = load_templates(spec.templates)
    missing = [lang for lang in spec.languages if lang not in templates.languages]
    if missing:
        raise UserError(f"templates have no {missing} texts: use {templates.languages}")
    if spec.industry not in templates.industries:
        raise UserError(f"industry {spec.industry!r} has no templates: use one of {sorted(templates.industries)}")
    opened = [datasets.open_for_job(store, datasets.parse_ref(s)) for s in spec.sources]
    refs, manifests = [r for r, _ in opened], [m for _, m in opened]
    stage, member = _stage_and_owner(refs, manifests)
    per_split: dict[str, list] = {s: [] for s in datasets.SPLIT_NAMES}
    for k, (ref, m) in enumerate(zip(refs, manifests)):
        for split in datasets.SPLIT_NAMES:
            if not datasets.shards(m, split):
                continue
            arrays = datasets.load_split(store, ref, split, m)
            recs, side = source_records(templates, spec, m, arrays, split)
            per_split[split].append((k, recs, side))
    src_sides = [{} for _ in manifests]
    for parts in per_split.values():
        for k, _, side in parts:
            src_sides[k] = src_sides[k] or side
    modalities = _modalities(manifests, src_sides)
    name = spec.name or f"{refs[0].name}-instruct"[:64]
    writer = datasets.VersionWriter(store, name)
    counts, tasks = {}, Counter()
    for split, parts in per_split.items():
        recs = [(k, r, side) for k, rs, side in parts for r in rs]
        for start in bar(range(0, len(recs), SHARD_RECORDS), desc=f"{name} {split}", enabled=progress):
            chunk = recs[start: start + SHARD_RECORDS]
            writer.put_shard(split, start // SHARD_RECORDS,
                             _shard_arrays([r for _, r, _ in chunk], [s for _, _, s in chunk], [k for k, _, _ in chunk], modalities))
        if recs:
            counts[split] = len(recs)
            tasks.update(r["task"] for _, r, _ in recs)
    if not counts.get("train"):
        raise UserError(f"no instruction records in the train split of {[str(r) for r in refs]}: the sources have no labelled train records")
    manifest = {
        "member": member, "stage": stage, "layout": "instruct", "label_type": "instruct", "classes": [],
        "description": f"instruction records ({spec.industry}; {', '.join(spec.languages)}) from " + ", ".join(map(str, refs)),
        "attribution": "; ".join(sorted({m.get("attribution", "") for m in manifests if m.get("attribution")})),
        "modalities": modalities,
        "split": {"by": "inherited", "records": counts},
        "inputs": [{"dataset": str(r), "member": m.get("member"), "stage": datasets.stage_of(m)} for r, m in zip(refs, manifests)],
        "instruct": {"industry": spec.industry, "languages": spec.languages, "tasks": dict(sorted(tasks.items())),
                     "templates_sha256": templates_sha, "templates_version": templates.version,
                     "spec": spec.model_dump(mode="json")},
    }
    if stage != "raw":
        manifest["deidentification"] = {"applied": True, "inherited_from": [str(r) for r in refs]}
    if member is None:
        industries = {m.get("industry") for m in manifests if m.get("industry")}
        manifest["industry"] = industries.pop() if len(industries) == 1 else None
    return (name, *writer.commit(manifest))


def read_records(store, ref: datasets.DatasetRef, split: str, manifest: dict | None = None) -> dict[str, np.ndarray]:
    """All arrays of one split of an instruction dataset (checked to be one)."""
    manifest = manifest or datasets.read_manifest(store, ref)
    if manifest.get("layout") != "instruct":
        raise UserError(f"dataset {ref} is not an instruction dataset (layout {manifest.get('layout')!r}): "
                        "build one with `indai data instruct`")
    return datasets.load_split(store, ref, split, manifest)
