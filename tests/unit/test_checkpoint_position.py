"""Mid-epoch checkpoints (run.checkpoint_every_steps) and the saved run config of
`indai train resume`: tags ordered by progress, the sampler resumed at its position, and
the config checks that keep a checkpoint on a clean boundary."""
import json

import pytest

from indai.platform.errors import UserError
from indai.platform.storage import open_store
from indai.trainers import checkpoint, resume
from indai.trainers.config import TrainConfig
from indai.trainers.data import ShardSampler


def _commit(store, run: str, tag: str, **meta) -> None:
    store.put_bytes(f"checkpoints/{run}/{tag}/shard.bin", b"x")
    store.commit(f"checkpoints/{run}/{tag}", meta)


def test_tags_are_ordered_by_progress_not_by_name(tmp_path):
    store = open_store(tmp_path / "store")
    # committed in this order; by name "epoch-00001" sorts before its own mid-epoch tags
    _commit(store, "r", "epoch-00000", epoch=0, step=49)
    _commit(store, "r", "epoch-00001-batch-000010", epoch=1, batch=10, step=59)
    _commit(store, "r", "epoch-00001-batch-000020", epoch=1, batch=20, step=69)
    _commit(store, "r", "epoch-00001", epoch=1, step=98)
    _commit(store, "r", "final", step=98)
    store.put_bytes("checkpoints/r/epoch-00002-batch-000010/shard.bin", b"half-written, never committed")
    assert checkpoint.latest(store, "r")[0] == "epoch-00001"
    assert checkpoint.progress("epoch-00001-batch-000020") < checkpoint.progress("epoch-00001")
    assert checkpoint.progress("final") is None and checkpoint.progress("config.json") is None
    checkpoint.prune(store, "r", keep=2)
    assert set(store.committed_children("checkpoints/r")) == {"epoch-00001-batch-000020", "epoch-00001", "final"}
    store.delete_prefix("checkpoints/r/epoch-00001")
    assert checkpoint.latest(store, "r")[0] == "epoch-00001-batch-000020"


def test_resume_position_after_an_epoch_and_inside_one():
    assert checkpoint.resume_position({"epoch": 1, "step": 98}) == (2, 98, 0)
    assert checkpoint.resume_position({"epoch": 1, "batch": 20, "step": 69}) == (1, 69, 20)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_resumed_mid_epoch_skips_and_repeats_nothing(world):
    n, batch, done = 1000, 64, 5
    for rank in range(world):
        sampler = ShardSampler(n, rank, world, shuffle=True, seed=7)
        sampler.set_epoch(3)
        whole = list(sampler)
        resumed = ShardSampler(n, rank, world, shuffle=True, seed=7)
        resumed.set_epoch(3, start=done * batch)
        rest = list(resumed)
        assert len(resumed) == len(whole) - done * batch == len(rest)
        assert whole[: done * batch] + rest == whole  # the same epoch order, picked up after `done` batches
        resumed.set_epoch(4)  # the next epoch starts at its beginning again
        assert len(list(resumed)) == len(whole)
    with pytest.raises(ValueError, match="outside"):
        ShardSampler(n, 0, 1, shuffle=True).set_epoch(0, start=n + 1)


def _cfg(**run) -> dict:
    return {"recipe": "t", "data": {"dataset": "d"}, "run": {"name": "r", **run}}


def test_step_checkpoints_must_fall_on_accumulation_boundaries():
    from indai.platform.config import validate

    assert validate(TrainConfig, _cfg(checkpoint_every_steps=20), "t").run.checkpoint_every_steps == 20
    with pytest.raises(UserError, match="multiple of optim.grad_accum"):
        validate(TrainConfig, {**_cfg(checkpoint_every_steps=10), "optim": {"grad_accum": 4}}, "t")
    with pytest.raises(UserError, match="checkpoint_every_steps"):
        validate(TrainConfig, _cfg(checkpoint_every_steps=0), "t")
    with pytest.raises(UserError, match="report writer checkpoints at epoch ends"):
        validate(TrainConfig, {**_cfg(checkpoint_every_steps=10), "model": {"family": "report_writer", "lm": "tiny-lm"}}, "t")


def test_streamed_split_refuses_step_checkpoints():
    from indai.trainers.launch import choose_loader

    cfg = TrainConfig.model_validate({**_cfg(checkpoint_every_steps=10), "data": {"dataset": "d", "loader": "stream"}})
    with pytest.raises(UserError, match="needs the memory loader"):
        choose_loader(cfg, {"modalities": {}, "shards": {}})


def test_saved_run_config_round_trips_without_uris(tmp_path):
    from indai.trainers.launch import save_run_config

    store = open_store(tmp_path / "store")
    cfg = TrainConfig.model_validate({**_cfg(launcher="local", resume=False), "store_uri": "s3://key:secret@bucket/x",
                                      "mlflow_uri": "http://user:pw@mlflow:5000"})
    save_run_config(store, cfg, "abc123")
    text = store.get_bytes("checkpoints/r/config.json").decode()
    assert "secret" not in text and "pw@" not in text and json.loads(text)["mlflow_run_id"] == "abc123"
    again = resume.saved_config(store, "r", launcher="ray")
    assert again.run.resume is True and again.run.launcher == "ray" and again.store_uri is None
    assert again.mlflow_run_id is None  # the launcher reopens the MLflow run from the store
    uris = {"run", "store_uri", "mlflow_uri"}
    assert again.model_dump(exclude=uris) == cfg.model_dump(exclude=uris)
    assert again.run.model_dump(exclude={"resume", "launcher"}) == cfg.run.model_dump(exclude={"resume", "launcher"})
    assert checkpoint.latest(store, "r") is None  # the config is not a checkpoint


@pytest.mark.parametrize("name", ["../r", "R", "", "a/b", "r?x", "%2e%2e", "x" * 65])
def test_resume_refuses_bad_names(tmp_path, name):
    with pytest.raises(UserError, match="is not valid"):
        resume.saved_config(open_store(tmp_path / "store"), name)


def test_resume_refuses_an_unknown_run_and_lists_the_known_ones(tmp_path):
    from indai.trainers.launch import save_run_config

    store = open_store(tmp_path / "store")
    save_run_config(store, TrainConfig.model_validate(_cfg()), "id1")
    with pytest.raises(UserError, match=r"no run named 'other'.*can be resumed: r\)"):
        resume.saved_config(store, "other")
    store.put_bytes("checkpoints/copied/config.json", store.get_bytes("checkpoints/r/config.json"))
    with pytest.raises(UserError, match="belongs to run 'r'"):
        resume.saved_config(store, "copied")
