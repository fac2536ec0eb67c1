"""Run a training recipe end to end: dataset -> Ray Train (DeepSpeed) -> MLflow model -> registry.

The driver resolves the dataset version, opens (or re-opens, on resume) the MLflow run and
logs the parameters and the dataset as the run's input; the workers run `train_loop`; the
driver then turns the final weights into an exported program, logs it as an MLflow model
with a signature over all modalities, registers it once per run and optionally moves an alias.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from indai.platform import datasets, registry
from indai.platform.errors import UserError
from indai.platform.model_format import mlflow_signature, write_card
from indai.platform.settings import Settings
from indai.platform.storage import open_store
from indai.trainers import checkpoint, relay, tasks
from indai.trainers.config import TrainConfig
from indai.trainers.loop import train_loop
from indai.trainers.profiling import log_traces


@dataclass
class TrainResult:
    run_id: str
    dataset: str
    test_accuracy: float | None
    model_name: str | None = None
    model_version: int | None = None
    alias: str | None = None
    resumed_from: str | None = None
    confusion: list = field(default_factory=list)
    task: str = "classification"
    test_metrics: dict = field(default_factory=dict)  # the test split's scalar metrics (trainers.tasks)


def store_dataset_source(uri: str):
    """An MLflow dataset source that names where a dataset version lies in the object store."""
    from mlflow.data.dataset_source import DatasetSource

    class StoreDatasetSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "indai-store"

        def load(self, dst_path=None):
            raise NotImplementedError("read dataset versions with indai.platform.datasets")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(str(raw_source))

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["uri"])

    return StoreDatasetSource(uri)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


@contextmanager
def completing_from(manifest: dict):
    """Around the assignments of what a dataset decides: the configs validate each assignment, and
    a value the model cannot take (a window too short for the sensor encoder) becomes a UserError
    that names the dataset, before a job starts."""
    try:
        yield
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        problem = first["msg"].removeprefix("Value error, ")
        raise UserError(f"dataset {manifest.get('name')}@{manifest.get('version')} does not fit the model config"
                        + (f" (field {where})" if where else "") + f": {problem}") from None


def complete_from_manifest(cfg: TrainConfig, manifest: dict) -> TrainConfig:
    """Fields the dataset decides: classes, channels, window length, normalisation."""
    with completing_from(manifest):
        return _complete_from_manifest(cfg, manifest)


def _complete_from_manifest(cfg: TrainConfig, manifest: dict) -> TrainConfig:
    m = cfg.model.model_copy(deep=True)
    if m.task == "regression" and manifest.get("label_type", "classification") != "regression":
        raise UserError(f"task regression needs a dataset ingested with labels.type: regression; "
                        f"{manifest.get('name')} has {manifest.get('label_type', 'classification')} labels")
    if m.task != "regression":
        if len(manifest.get("classes") or []) < 2:
            raise UserError(f"task {m.task} needs at least two classes; dataset {manifest.get('name')} has "
                            f"{manifest.get('classes')}")
        m.num_classes = len(manifest["classes"])
    sensor = manifest.get("modalities", {}).get("sensor")
    if sensor and "sensor" in m.modalities:
        m.sensor.channels = len(sensor["channels"])
        m.sensor.length = sensor["window"]
        m.sensor_mean, m.sensor_std = sensor["norm"]["mean"], sensor["norm"]["std"]
    image = manifest.get("modalities", {}).get("image")
    if image and "image" in m.modalities:
        m.image.size = cfg.data.image_size or image["size"]  # data.image_size: resized at load (trainers.data)
    return cfg.model_copy(update={"model": m})


def _open_run(cfg: TrainConfig, store, manifest: dict, ref: datasets.DatasetRef, parent_run_id: str | None = None):
    """The run's MLflow run: reopened on resume, else new (nested under `parent_run_id` when given).
    The run's resolved config is saved next to its checkpoints (`indai train resume` reads it)."""
    import mlflow

    checkpoint.claim_run(store, cfg.run.name)  # another member's run name: refused before its MLflow run is reopened
    if not cfg.run.resume:  # a fresh run under a name that has checkpoints: refused before anything starts
        checkpoint.refuse_existing(store, cfg.run.name)
    found = checkpoint.latest(store, cfg.run.name) if cfg.run.resume else None
    saved = checkpoint.read_run_config(store, cfg.run.name) if cfg.run.resume else None
    # killed before its first checkpoint: the MLflow run it had opened is reopened all the same
    run_id = found[1].get("mlflow_run_id") if found else (saved or {}).get("mlflow_run_id")
    if run_id:
        check_same_dataset(cfg.run.name, (saved or {}).get("data", {}).get("dataset"), ref)
    if found:  # the workers check again (torchrun reaches them without this driver)
        checkpoint.check_resumable(cfg.run.name, *found, cfg.run.workers if cfg.run.launcher == "ray" else 1,
                                   cfg.optim.batch_size)
    with registry.refusals_named(mlflow.get_tracking_uri(), f"opening a run in experiment {cfg.run.experiment}"):
        mlflow.set_experiment(cfg.run.experiment)
        if run_id:
            save_run_config(store, cfg, run_id)
            return mlflow.start_run(run_id=run_id), found[0] if found else None
        tags = {"indai.recipe": cfg.recipe, "indai.dataset": str(ref), "indai.member": manifest.get("member", "")}
        if parent_run_id:  # MLflow's own tag: the UI shows the run under its parent (trainers.compare)
            tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.start_run(run_name=cfg.run.name, tags=tags)
    mlflow.log_params(_flatten(cfg.model_dump(mode="json", exclude={"store_uri", "mlflow_uri", "mlflow_run_id"})))
    source = store_dataset_source(f"{store.uri.rstrip('/')}/datasets/{ref.name}/{ref.version}")
    dataset = mlflow.data.meta_dataset.MetaDataset(source=source, name=ref.name, digest=ref.version)
    mlflow.log_input(dataset, context="training")
    mlflow.log_dict(manifest, "dataset/manifest.json")
    save_run_config(store, cfg, run.info.run_id)
    return run, None


def check_same_dataset(run_name: str, trained_on: str | None, ref: datasets.DatasetRef) -> None:
    """A resumed run goes on with the dataset version it started with. A submission that names
    the dataset by name or @latest resolves again, and once a newer version is committed it would
    continue the old weights, optimizer state and position on other data (classes, normalisation
    and split sizes may all differ), and the registered model would name a version it was only
    partly trained on. A UserError then, which names both versions and the two ways on."""
    if not trained_on or trained_on == str(ref):
        return
    raise UserError(f"run {run_name} trained on dataset {trained_on}, and this submission resolves data.dataset to "
                    f"{ref}: a run resumes on the version it started with. Resume it with data.dataset={trained_on} "
                    f"(`indai train resume {run_name}` does), or train {ref} under a new run.name")


RUN_CONFIG_SECRET_FIELDS = {"store_uri", "mlflow_uri"}  # may hold credentials (user:password@host); the launcher fills them


def save_run_config(store, cfg: TrainConfig, run_id: str) -> None:
    """The validated config this run trains with (dataset pinned to its version, no URIs), and its
    MLflow run, under checkpoints/<run>/config.json: what `indai train resume <run>` starts from."""
    config = cfg.model_dump(mode="json", exclude=RUN_CONFIG_SECRET_FIELDS) | {"mlflow_run_id": run_id}
    checkpoint.save_run_config(store, cfg.run.name, config)


def choose_loader(cfg: TrainConfig, manifest: dict) -> str:
    """stream (Ray Data from the object store) or memory; streaming needs the Ray launcher."""
    from indai.trainers.streaming import train_bytes

    if cfg.run.launcher == "local" or cfg.data.loader == "memory":
        return "memory"
    image = manifest.get("modalities", {}).get("image") or {}
    task = getattr(cfg.model, "task", "classification")
    in_memory = (f"task {task}" if task != "classification" else None) or (  # trainers.tasks reshape whole splits
        "data.image_size" if cfg.data.image_size and cfg.data.image_size != image.get("size", cfg.data.image_size) else None)
    if in_memory:
        if cfg.data.loader == "stream":
            raise UserError(f"{in_memory} loads the splits into memory: set data.loader: memory (or auto)")
        return "memory"
    if cfg.data.loader == "stream" or train_bytes(manifest) > cfg.data.stream_above_mb * 2**20:
        if cfg.run.checkpoint_every_steps:
            raise UserError(f"run.checkpoint_every_steps needs the memory loader, and the train split of {cfg.data.dataset} "
                            f"{'is set to stream' if cfg.data.loader == 'stream' else 'streams (over data.stream_above_mb)'}: "
                            "set data.loader: memory, or checkpoint at epoch ends (run.checkpoint_every)")
        refuse_streamed_windows(cfg, manifest)
        return "stream"
    return "memory"


def refuse_streamed_windows(cfg: TrainConfig, manifest: dict) -> None:
    """A UserError when an epoch-end checkpoint of a streamed run would fall inside an accumulation
    window that began in the middle of an epoch: a resume goes on from the window's start
    (trainers.checkpoint.WindowStart), and a streamed epoch has no position to go on from."""
    from math import gcd

    from indai.trainers.streaming import split_size

    ga = cfg.optim.grad_accum
    n = max(1, split_size(manifest, "train") // (cfg.optim.batch_size * cfg.run.workers))  # as the workers count
    bad = checkpoint.streamed_window_starts(n, ga, cfg.optim.epochs, cfg.run.checkpoint_every)
    if not bad:
        return
    divisor = max(k for k in range(1, ga + 1) if n % k == 0)
    raise UserError(f"the streamed train split of {cfg.data.dataset} gives {n} batches an epoch ({cfg.run.workers} "
                    f"worker(s), optim.batch_size {cfg.optim.batch_size}), which optim.grad_accum {ga} does not divide: "
                    f"the checkpoint after epoch {', '.join(str(e + 1) for e in bad[:5])} would fall inside an "
                    "accumulation window that began in the middle of an epoch, and a resume goes on from that window's "
                    "start, which a streamed epoch has no position for. Set optim.grad_accum to a divisor of "
                    f"{n} (e.g. {divisor}), run.checkpoint_every to a multiple of {ga // gcd(n, ga)} epochs, or "
                    "data.loader: memory")


def run_workers(cfg: TrainConfig, settings: Settings, manifest: dict | None = None, loop=None) -> None:
    """`loop` (default train_loop) on Ray Train workers, or in this process with the local launcher."""
    loop = loop or train_loop
    loader = choose_loader(cfg, manifest) if manifest else "memory"
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"loader": loader})})
    config = cfg.model_dump(mode="json")
    if cfg.run.launcher == "local":
        loop(config)
        return
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        from indai.platform.services import use_ray_auth

        use_ray_auth()
        ray.init(address=settings.require_ray(), log_to_driver=True, logging_level="WARNING")
    try:
        _fit(cfg, settings, manifest, loop, loader, config)
    finally:
        # the workers' lines are relayed while training; a connection left open went on relaying
        # whatever this process started next (`indai demo`: every Serve request's log line)
        if connected_here:
            ray.shutdown()


def _fit(cfg: TrainConfig, settings: Settings, manifest: dict | None, loop, loader: str, config: dict) -> None:
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    streams = {}
    if loader == "stream":
        from indai.trainers.streaming import split_stream

        name = cfg.data.dataset.split("@")[0]
        window = manifest.get("modalities", {}).get("sensor", {}).get("window")
        from indai.trainers.models.multimodal.text_hf import model_tokenizer

        tokenizer = model_tokenizer(cfg.model, open_store(cfg.store_uri)) if "text" in cfg.model.modalities else None
        streams["train"] = split_stream(cfg.store_uri, name, manifest, "train", window, cfg.model.text.max_len, cfg.model.modalities,
                                        tokenizer)
        print(f"streaming the train split of {cfg.data.dataset} through Ray Data ({len(datasets.shards(manifest, 'train'))} shards)",
              file=sys.stderr)
    # rank 0's progress and lines, shown here: a bar on a terminal (unless run.progress is off), else lines
    with relay.board(relay.Show(terminal=None if cfg.run.progress else False)) as board_env:
        trainer = TorchTrainer(
            loop,
            train_loop_config=config,
            datasets=streams or None,
            scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.run.use_gpu,
                                         resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
            run_config=RunConfig(name=cfg.run.name, storage_path=str(settings.home / "ray_results"),
                                 failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                                 # Ray Train's INFO lines (resources requested, each report as a dict) would fill the
                                 # user's output between indai's own progress and lines
                                 logging_config=LoggingConfig(log_level=cfg.run.ray_log_level),
                                 # Ray Train's print patch both prints a worker's stderr line and logs it,
                                 # and Ray relays both: every line of the loop reached the user twice
                                 worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **board_env}}),
        )
        # indai's loop checkpoints on its own schedule and reads no preemption notice, so Ray Train's
        # preemption watcher would only poll for node drains; its actor also logs an ERROR line from
        # Ray's core worker in every run. The controller takes the setting from this process.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        trainer.fit()


def _already_registered(name: str, run_id: str, step: int):
    """The version this run already registered for these final weights (a re-run registers once)."""
    c = registry.client_for_current()
    versions = registry.while_server_away(lambda: c.search_model_versions(f"name='{name}'"), f"the versions of model {name}")
    for mv in versions:
        if mv.run_id == run_id and (mv.tags or {}).get("indai.step") == str(step):
            return mv
    return None


def fetch_final(cfg: TrainConfig, store, into: Path) -> dict:
    """Download the run's committed `final` checkpoint into `into`; its result.json."""
    final = f"{checkpoint.prefix(cfg.run.name)}/{checkpoint.FINAL}"
    if not store.is_committed(final):
        raise UserError(f"run {cfg.run.name} has no committed final weights: training did not finish")
    store.download_dir(final, into)
    return json.loads((into / "result.json").read_text())


def log_model_once(cfg: TrainConfig, run_id: str, step: int, pkg: Path, signature) -> int | None:
    """Log the artefact folder `pkg` as the run's MLflow model and register it under
    run.register_as, unless this run already registered these final weights (a re-run or a
    resume registers once); the registered version, or None when the recipe registers nothing."""
    import mlflow

    name = cfg.run.register_as
    existing = _already_registered(name, run_id, step) if name else None
    if existing is not None:
        return int(existing.version)
    # the "model from code" file, found without importing (importing it registers a model)
    pyfunc_file = importlib.util.find_spec("indai.platform.mlflow_pyfunc").origin
    with warnings.catch_warnings():
        # a UserWarning every run printed, about what indai chooses not to do: no input example is
        # stored (the signature is given), since one would copy a member's data into the model
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(name="model", python_model=str(pyfunc_file), artifacts={"indai_model": str(pkg)},
                                       signature=signature, pip_requirements=["indai"])
    if not name:
        return None
    # the tags that make a re-run find this version travel in the request that creates it: a
    # run stopped after the registration cannot leave a version that the re-run would not know
    version = mlflow.register_model(info.model_uri, name, tags={"indai.run": cfg.run.name, "indai.step": str(step)})
    return int(version.version)


def log_and_register(cfg: TrainConfig, store, manifest: dict, run_id: str) -> tuple[int | None, dict]:
    """Build the exported program from the final weights and log it as an MLflow model."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    from indai.trainers import finetune
    from indai.trainers.models import create_model
    from indai.trainers.models.multimodal import ModelConfig
    from indai.trainers.models.multimodal.export import card_inputs, export
    from indai.trainers.models.multimodal.text_hf import model_tokenizer

    with tempfile.TemporaryDirectory(prefix="indai-model-") as tmp:
        tmp = Path(tmp)
        result = fetch_final(cfg, store, tmp / "final")
        mcfg = ModelConfig.model_validate_json((tmp / "final" / "model_config.json").read_text())
        # the trained weights go over a randomly initialised model of the same shape (adapters
        # included), then LoRA adapters are merged: the exported program is a plain model
        model = create_model(mcfg, store=store, load_pretrained=False)
        mlflow.log_params(finetune.mlflow_params(finetune.apply_tuning(model, mcfg, log=False)))
        model.load_state_dict(load_file(str(tmp / "final" / "model.safetensors")))
        finetune.merge_for_export(model)
        pkg = tmp / "indai_model"
        pkg.mkdir()
        with torch.no_grad():
            export(model, pkg)
        tokenizer = model_tokenizer(mcfg, store).save(pkg) if "text" in mcfg.modalities else None
        card = {**task_card(mcfg, result, manifest), "modalities": mcfg.modalities,
                "inputs": card_inputs(mcfg, manifest.get("modalities", {}).get("sensor"), tokenizer),
                "dataset": f"{manifest['name']}@{manifest['version']}", "recipe": cfg.recipe,
                "run_id": run_id, "attribution": manifest.get("attribution", "")}
        write_card(pkg, card)
        name = cfg.run.register_as
        version = log_model_once(cfg, run_id, result["step"], pkg, mlflow_signature(card))
        if name and version:
            tag_registered(cfg, manifest, name, version, card["dataset"], result["step"])
    return version, result


def tag_registered(cfg: TrainConfig, manifest: dict, name: str, version: int, dataset: str, step: int,
                   extra: dict[str, str] | None = None) -> None:
    """Tags of a registered version (dataset, recipe, run, step, `extra`) and of the model (owner, process)."""
    c = registry.client_for_current()
    for k, v in {"indai.dataset": dataset, "indai.recipe": cfg.recipe, "indai.run": cfg.run.name, "indai.step": str(step),
                 **(extra or {})}.items():
        c.set_model_version_tag(name, str(version), k, v)
    # the member whose job trained the model, and the process it serves: a hint for the admin.
    # The serving ingress never reads these for access (every job writes the registry with one
    # account, so another member's job could rewrite them): it serves the model to admins only
    # until `indai model share` records its owner in the platform database
    owner = os.environ.get("INDAI_JOB_MEMBER") or manifest.get("member")
    if owner:
        c.set_registered_model_tag(name, "indai.member", owner)
    if cfg.run.process:
        c.set_registered_model_tag(name, "indai.process", cfg.run.process)


def target_unit(manifest: dict) -> str:
    """The unit the dataset spec gives its regression target column (empty when none)."""
    for src in (manifest.get("spec") or {}).get("sources", []):
        column = src.get("label") or src.get("target")
        if column:
            return ((src.get("columns") or {}).get(column) or {}).get("unit", "")
    return ""


def task_card(mcfg, result: dict, manifest: dict) -> dict:
    """What the model card says about the task: serving answers by it (platform.model_format)."""
    if mcfg.task == "regression":
        return {"task": "regression", "classes": [],
                "target": {"mean": mcfg.target_mean, "std": mcfg.target_std, "unit": target_unit(manifest)}}
    if mcfg.task == "anomaly":
        test = result.get("test") or {}
        if "threshold" not in test:
            raise UserError("task anomaly: the run has no calibrated threshold (it needs val and test splits)")
        return {"task": "anomaly", "classes": [],
                "anomaly": {"threshold": test["threshold"], "normal_class": mcfg.anomaly.normal_class,
                            "target_false_alarm_rate": test["target_false_alarm_rate"],
                            "calibration_normals": test["calibration_normals"],
                            "score": "Mahalanobis distance of the fused embedding to the training normals (trainers.tasks)"}}
    return {"task": "classification", "classes": manifest["classes"]}


def log_reports(task: str, result: dict, classes: list[str], unit: str = "") -> None:
    """The test split's plots, metrics JSON and per-class metrics in the active MLflow run."""
    import mlflow

    from indai.trainers import reports

    test = result.get("test") or {}
    with tempfile.TemporaryDirectory(prefix="indai-reports-") as tmp:
        for path in reports.write_test_reports(task, test, classes, Path(tmp), unit):
            mlflow.log_artifact(str(path))
    if task == "classification":
        mlflow.log_metrics(reports.class_metrics(test, classes), step=int(result.get("step", 0)))


def prepare(cfg: TrainConfig, settings: Settings, complete=None):
    """What every family's driver starts from: the store, the dataset version it may read (the
    access rule), the config completed from the manifest (`complete`, default this family's) with
    the dataset pinned, and the tracking URI with the registry client set on it."""
    store = open_store(settings.store_uri)
    ref, manifest = datasets.open_for_job(store, datasets.parse_ref(cfg.data.dataset))
    cfg = (complete or complete_from_manifest)(cfg, manifest)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": str(ref)})})
    tracking = settings.require_mlflow()
    registry.client(tracking)
    return store, ref, manifest, cfg, tracking


def train(cfg: TrainConfig, settings: Settings, parent_run_id: str | None = None) -> TrainResult:
    """Train `cfg` end to end; `parent_run_id`: an MLflow run this one is nested under."""
    if cfg.model.family == "report_writer":  # the LM family has its own driver (same run, registry and tags)
        from indai.trainers.models.report_writer.train import train as train_report_writer

        return train_report_writer(cfg, settings, parent_run_id)
    store, ref, manifest, cfg, tracking = prepare(cfg, settings)
    run, resumed = _open_run(cfg, store, manifest, ref, parent_run_id)
    with run:
        run_id = run.info.run_id
        cfg = cfg.model_copy(update={"store_uri": settings.store_uri, "mlflow_uri": tracking, "mlflow_run_id": run_id})
        if resumed:
            print(f"resuming run {cfg.run.name} (MLflow run {run_id}) from checkpoint {resumed}", file=sys.stderr)
        run_workers(cfg, settings, manifest)
        log_traces(cfg, store)  # run.profile_steps: the workers' traces beside the run's plots
        version, result = log_and_register(cfg, store, manifest, run_id)
        test = result.get("test") or {}
        if test:
            log_reports(cfg.model.task, result, manifest["classes"], target_unit(manifest))
    out = TrainResult(run_id=run_id, dataset=str(ref), test_accuracy=test.get("accuracy"), model_name=cfg.run.register_as,
                      model_version=version, resumed_from=resumed, confusion=test.get("confusion", []),
                      task=cfg.model.task, test_metrics=tasks.scalars(test))
    if version and cfg.run.alias:
        registry.label_alias(tracking, cfg.run.register_as, version, cfg.run.alias)  # a label: `indai model promote` serves it
        out.alias = cfg.run.alias
    return out
