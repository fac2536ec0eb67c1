"""`indai train resume <run>`: continue a run whose job died, without its recipe or overrides.

The driver saves each run's validated config next to its checkpoints when the run starts
(trainers.launch.save_run_config: the dataset pinned to its version, no store or tracking
URIs). Resuming reloads that config and goes through the same `trainers.launch.train` path as
`indai train`: the latest committed checkpoint is loaded, the run's MLflow run is reopened and
the model is registered once. A run that already finished and registered its model is not
trained again: the user is told which version it registered.
"""
from __future__ import annotations

from dataclasses import dataclass

from indai.platform.config import validate
from indai.platform.errors import UserError
from indai.platform.storage import ObjectStore
from indai.trainers import checkpoint
from indai.trainers.config import RUN_NAME_RE, TrainConfig


@dataclass
class Finished:
    """A run whose final weights are committed: what it registered, if anything."""
    run: str
    model: str | None
    version: int | None


def check_run_name(name: str) -> str:
    if not RUN_NAME_RE.fullmatch(name or ""):
        raise UserError(f"run name {name!r} is not valid: lower-case letters, digits, '.', '_' or '-', at most 64, "
                        "starting with a letter or digit (the run.name the run was started with)")
    return name


def known_runs(store: ObjectStore) -> list[str]:
    """Runs with a saved config (started by this platform since configs were saved)."""
    return sorted(r for r in store.children("checkpoints") if store.exists(f"{checkpoint.prefix(r)}/{checkpoint.RUN_CONFIG}"))


def saved_config(store: ObjectStore, name: str, launcher: str | None = None) -> TrainConfig:
    """The run's saved config, validated again, set to resume (`launcher`: ray or local, if given)."""
    check_run_name(name)
    data = checkpoint.read_run_config(store, name)
    if data is None:
        runs = known_runs(store)
        listed = ", ".join(runs[:20]) + (" ..." if len(runs) > 20 else "") if runs else "none"
        raise UserError(f"no run named {name!r} in {store.uri} (no checkpoints/{name}/{checkpoint.RUN_CONFIG}): "
                        f"check the name (runs that can be resumed: {listed}) or start it with `indai train <recipe>`")
    data.pop("mlflow_run_id", None)  # the launcher reopens the run's MLflow run from the store
    data.setdefault("run", {})["resume"] = True
    if launcher:
        data["run"]["launcher"] = launcher
    cfg = validate(TrainConfig, data, f"checkpoints/{name}/{checkpoint.RUN_CONFIG}")
    if cfg.run.name != name:
        raise UserError(f"checkpoints/{name}/{checkpoint.RUN_CONFIG} belongs to run {cfg.run.name!r}, not {name!r}: "
                        "it was copied by hand; start the run again with `indai train <recipe>`")
    return cfg


def finished(store: ObjectStore, cfg: TrainConfig, settings) -> Finished | None:
    """The run's registered result when its final weights are committed and its model (if it
    registers one) is in the registry; None when there is still something to do."""
    from indai.platform import registry

    final = f"{checkpoint.prefix(cfg.run.name)}/{checkpoint.FINAL}"
    if not store.is_committed(final):
        return None
    if not cfg.run.register_as:
        return Finished(cfg.run.name, None, None)
    meta = store.read_commit(final)
    client = registry.client(settings.require_mlflow())
    for mv in client.search_model_versions(f"name='{cfg.run.register_as}'"):
        if mv.run_id == meta.get("mlflow_run_id") and (mv.tags or {}).get("indai.step") == str(meta.get("step")):
            return Finished(cfg.run.name, cfg.run.register_as, int(mv.version))
    return None  # trained, but registering failed: resuming registers it


def resume_config(store: ObjectStore, name: str, settings, launcher: str | None = None) -> TrainConfig:
    """The config `indai train resume <name>` trains with, or a UserError saying why not
    (`settings`: the platform's, for the registry)."""
    cfg = saved_config(store, name, launcher)
    done = finished(store, cfg, settings)
    if done is not None:
        what = f"registered {done.model} version {done.version}" if done.model else "it registers no model (run.register_as unset)"
        raise UserError(f"run {name!r} already finished: {what}; nothing to resume "
                        f"(to train again, start a new run with `indai train <recipe> run.name=<new-name>`)")
    return cfg
