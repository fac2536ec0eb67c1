"""Fine-tuned against from scratch: does the pretrained encoder earn its keep on this data?

`indai train <recipe> --compare-scratch` (or `compare: {scratch: true}` in the recipe) trains the
recipe as given and once more from scratch, and puts the two side by side. The answer is only
worth something if nothing else differs, so both runs get the same dataset version (a
`name@latest` reference is resolved once, before either run starts), hence the same split, and
the same seed, optimiser and schedule. The from-scratch variant is derived, never written by
hand: every encoder's `pretrained` becomes null (a Hugging Face text encoder keeps its
architecture through `config_from`, randomly initialised) and every tune policy becomes `full`
(nothing frozen, no adapters, no learning-rate multipliers); `compare.scratch_overrides` then
applies on top, e.g. `model.text.kind=byte_transformer` to compare MiniLM with the byte
transformer the platform trains from scratch.

Both runs are children of one parent MLflow run, which holds the comparison table
(comparison.json), a bar chart (comparison.png) and the metrics of both variants.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from indai.platform import datasets, registry
from indai.platform.config import apply_overrides, validate
from indai.platform.errors import UserError
from indai.platform.settings import Settings
from indai.platform.storage import open_store
from indai.trainers import checkpoint, reports, tasks
from indai.trainers.config import TrainConfig

ENCODERS = ("sensor", "image", "text")
COMPARISON_JSON = "comparison.json"


def has_pretrained(cfg: TrainConfig) -> bool:
    return any(getattr(getattr(cfg.model, e), "pretrained", None) for e in ENCODERS)


def describe(cfg: TrainConfig) -> str:
    """Each encoder of the model in a few words: its weights and its tune policy."""
    parts = []
    for e in cfg.model.modalities:
        enc = getattr(cfg.model, e)
        kind = {"image": getattr(enc, "timm_name", ""), "text": getattr(enc, "kind", ""), "sensor": getattr(enc, "kind", "")}[e]
        weights = getattr(enc, "pretrained", None) or "scratch"
        parts.append(f"{e}: {kind} ({weights}, {enc.tune.policy})")
    return "; ".join(parts)


def _scratch_name(name: str) -> str:
    return f"{name[:56]}-scratch"


def scratch_config(cfg: TrainConfig) -> TrainConfig:
    """The from-scratch twin of `cfg` (see the module doc); it registers no model."""
    if cfg.model.family != "multimodal":
        raise UserError(f"--compare-scratch compares multimodal recipes; {cfg.recipe} is a {cfg.model.family} recipe")
    data = cfg.model_dump(mode="json", exclude={"store_uri", "mlflow_uri", "mlflow_run_id"})
    model = data["model"]
    for e in ENCODERS:
        enc = model[e]
        if enc.get("pretrained"):
            if e == "text" and enc.get("kind") == "hf":
                enc["config_from"] = enc["pretrained"]  # the same architecture and tokenizer, random weights
            enc["pretrained"] = None
        enc["tune"] = {"policy": "full"}
    data["run"].update(name=_scratch_name(cfg.run.name), register_as=None, alias=None)
    data["compare"] = {"scratch": False, "scratch_overrides": []}
    data = apply_overrides(data, cfg.compare.scratch_overrides)
    if data["model"]["text"].get("kind") == "byte_transformer":
        data["model"]["text"]["config_from"] = None
        data["model"]["text"]["pretrained"] = None
    scratch = validate(TrainConfig, data, f"{cfg.recipe} from scratch (compare.scratch_overrides)")
    if scratch.model == cfg.model:
        raise UserError(f"recipe {cfg.recipe} has no pretrained encoder and no compare.scratch_overrides: its from-scratch "
                        "run would be the same run; name a mirror entry in model.<encoder>.pretrained")
    return scratch


def comparison_table(cfg: TrainConfig, rows: list[dict]) -> dict:
    return {"recipe": cfg.recipe, "dataset": cfg.data.dataset, "task": cfg.model.task, "seed": cfg.run.seed,
            "metrics": tasks.COMPARED[cfg.model.task], "lower_is_better": sorted(tasks.LOWER_IS_BETTER), "rows": rows}


def format_table(table: dict) -> str:
    """The comparison as aligned text for the terminal."""
    metrics = table["metrics"]
    head = ["variant", *metrics, "train s", "encoders"]
    lines = [[r["variant"], *[_num(r["metrics"].get(m)) for m in metrics], f"{r['train_seconds']:.0f}", r["encoders"]]
             for r in table["rows"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    title = f"{table['recipe']} on {table['dataset']} (task {table['task']}, seed {table['seed']}), test split:"
    return "\n".join([title, fmt(head), *map(fmt, lines)])


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def compare(cfg: TrainConfig, settings: Settings, train_fn=None) -> dict:
    """Train `cfg` and its from-scratch twin under one parent MLflow run; the comparison table."""
    from indai.trainers.launch import train

    train_fn = train_fn or train
    store = open_store(settings.store_uri)
    ref = datasets.resolve(store, datasets.parse_ref(cfg.data.dataset))  # one version, one split for both
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": str(ref)}),
                                 "compare": cfg.compare.model_copy(update={"scratch": False})})
    variants = [("fine-tuned" if has_pretrained(cfg) else "as given", cfg), ("from scratch", scratch_config(cfg))]
    for _, variant_cfg in variants:  # both names checked before either run trains (run.resume false)
        if not variant_cfg.run.resume:
            checkpoint.refuse_existing(store, variant_cfg.run.name)
    tracking = settings.require_mlflow()
    client = registry.client(tracking)
    import mlflow

    with registry.refusals_named(tracking, f"opening the comparison's run in experiment {cfg.run.experiment}"):
        experiment = mlflow.set_experiment(cfg.run.experiment)
        parent = client.create_run(experiment.experiment_id, run_name=f"{cfg.run.name[:56]}-compare",
                                   tags={"indai.recipe": cfg.recipe, "indai.dataset": str(ref), "indai.compare": "scratch"})
    parent_id = parent.info.run_id
    rows, status = [], "FAILED"
    try:
        for variant, variant_cfg in variants:
            t0 = time.perf_counter()
            result = train_fn(variant_cfg, settings, parent_run_id=parent_id)
            rows.append({"variant": variant, "run_name": variant_cfg.run.name, "run_id": result.run_id,
                         "encoders": describe(variant_cfg), "train_seconds": time.perf_counter() - t0,
                         "model": result.model_name, "model_version": result.model_version,
                         "metrics": {m: result.test_metrics.get(m) for m in tasks.COMPARED[cfg.model.task]}})
        table = comparison_table(cfg, rows)
        _log_table(client, parent_id, table)
        status = "FINISHED"
        return table
    finally:
        client.set_terminated(parent_id, status=status)


def _log_table(client, run_id: str, table: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"{reports.metric_name(r['variant'])}.test_{m}", float(v), now, 0)
               for r in table["rows"] for m, v in r["metrics"].items() if v is not None and math.isfinite(v)]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="indai-compare-") as tmp:
        reports.write_json(table, Path(tmp) / COMPARISON_JSON)
        reports.comparison_png(table["rows"], table["metrics"], Path(tmp) / reports.COMPARISON_PNG,
                               f"{table['recipe']}: test {', '.join(table['metrics'])}")
        (Path(tmp) / "comparison.txt").write_text(format_table(table) + "\n")
        client.log_artifacts(run_id, tmp)
