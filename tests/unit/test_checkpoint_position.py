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
    # written inside an accumulation window: where the window began
    assert checkpoint.resume_position({"epoch": 1, "step": 98, "resume_at": {"epoch": 1, "batch": 47, "step": 96}}) == (1, 96, 47)


def test_a_resumed_epoch_starts_its_sums_from_the_checkpoints_once():
    """The sums a checkpoint recorded (every rank's, summed) start the resumed epoch on rank 0 only,
    so the epoch's all-reduce counts them once; later epochs start from zero. A checkpoint written
    before sums were recorded counts the epoch from the resume point, as before."""
    import torch

    start = checkpoint.Start(epoch=1, step=11, batch=4, sums=[2.5, 30.0])
    assert (start.skip(1), start.skip(2)) == (4, 0)
    on = {rank: torch.zeros(2, dtype=torch.float64) for rank in (0, 1)}
    assert [start.open_epoch(1, on[rank], rank) for rank in (0, 1)] == [0, 0]
    assert on[0].tolist() == [2.5, 30.0] and on[1].tolist() == [0.0, 0.0]
    later = torch.zeros(2, dtype=torch.float64)
    assert start.open_epoch(2, later, 0) == 0 and later.tolist() == [0.0, 0.0]
    scalar = torch.zeros((), dtype=torch.float64)  # the classifier loop's loss sum
    assert checkpoint.Start(epoch=0, step=4, batch=4, sums=[1.25]).open_epoch(0, scalar, 0) == 0 and float(scalar) == 1.25
    older = torch.zeros(2, dtype=torch.float64)
    assert checkpoint.Start(epoch=1, step=11, batch=4).open_epoch(1, older, 0) == 4 and older.tolist() == [0.0, 0.0]
    assert checkpoint.Start().open_epoch(0, older, 0) == 0  # a fresh run


def test_window_start_is_kept_where_an_epoch_ends_inside_a_window():
    """7 batches an epoch, grad_accum 4, 3 epochs (21 micro-batches, windows 1-4, 5-8, ..., 17-20,
    and 21 alone, never closed). Epoch 1 ends at 7, inside the window that began after batch 4;
    epoch 2 ends at 14, inside the one that began after batch 12 (batch 5 of epoch 2); epoch 3
    ends at 21, in the window the run never closes: its checkpoint needs no rewind."""
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    window = checkpoint.WindowStart(4, 7, 21, module, 0, 0, 0)
    seen, step = {}, 0
    for epoch in range(3):
        for batch in range(1, 8):
            step += 1
            module[1].running_mean.fill_(step)  # what each micro-batch's forward moves
            window.after(epoch, batch, step)
            if batch == 7:  # the epoch's end, where the loop checkpoints
                seen[epoch] = window.open_at(step), window.point
                if epoch == 0:
                    with window.buffers_at_start():  # a save sees the buffers of the window's start
                        assert module[1].running_mean.tolist() == [4.0, 4.0]
                    assert module[1].running_mean.tolist() == [7.0, 7.0]  # training goes on with its own
    assert seen[0] == (True, {"epoch": 0, "batch": 4, "step": 4})
    assert seen[1] == (True, {"epoch": 1, "batch": 5, "step": 12})
    assert seen[2][0] is False  # 21 lies in the window that began at 20 and never closes
    assert not checkpoint.WindowStart(1, 7, 21, module, 0, 0, 0).open_at(7)  # no accumulation, no window


def test_streamed_runs_refuse_epoch_ends_that_would_go_on_from_inside_an_epoch():
    from indai.trainers.launch import choose_loader

    assert checkpoint.streamed_window_starts(7, 4, 3, 1) == [0, 1]  # as above: from batch 4 of epoch 1, 5 of epoch 2
    assert checkpoint.streamed_window_starts(8, 4, 5, 1) == []  # every epoch ends on a window's end
    assert checkpoint.streamed_window_starts(7, 1, 5, 1) == []
    assert checkpoint.streamed_window_starts(6, 4, 5, 2) == []  # every 2nd epoch: 12, 24 end windows
    assert checkpoint.streamed_window_starts(6, 4, 5, 1) == [0, 2]  # 6 and 18 fall inside windows begun at 4 and 16
    cfg = TrainConfig.model_validate({**_cfg(launcher="ray", workers=2), "data": {"dataset": "d", "loader": "stream"},
                                      "optim": {"epochs": 5, "batch_size": 8, "grad_accum": 4}})
    manifest = {"modalities": {}, "shards": {}, "split": {"windows": {"train": 96}}}  # 96 / (8 x 2) = 6 batches an epoch
    with pytest.raises(UserError) as e:
        choose_loader(cfg, manifest)
    assert str(e.value) == (
        "the streamed train split of d gives 6 batches an epoch (2 worker(s), optim.batch_size 8), which optim.grad_accum "
        "4 does not divide: the checkpoint after epoch 1, 3 would fall inside an accumulation window that began in the "
        "middle of an epoch, and a resume goes on from that window's start, which a streamed epoch has no position for. "
        "Set optim.grad_accum to a divisor of 6 (e.g. 3), run.checkpoint_every to a multiple of 2 epochs, or "
        "data.loader: memory")
    ok = cfg.model_copy(update={"run": cfg.run.model_copy(update={"checkpoint_every": 2})})
    assert choose_loader(ok, manifest) == "stream"


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


# ---- run.resume false on a name that has checkpoints -------------------------------------------------

def _train_cfg(store, ref: str, name: str, **run) -> dict:
    return {"recipe": "t", "data": {"dataset": ref},
            "model": {"flavour": "debug", "modalities": ["sensor"], "num_classes": 4, "sensor": {"channels": 2, "length": 128}},
            "optim": {"epochs": 1, "batch_size": 32},
            "run": {"name": name, "launcher": "local", "progress": False, **run}, "store_uri": store.uri}


def test_a_fresh_run_under_a_name_with_checkpoints_is_refused_before_training(tmp_path):
    """Its checkpoints would mix with the old run's: pruning by progress would delete the new run's
    early ones at once and a later resume would load the old run's weights. Refused, and nothing of
    the old run is touched."""
    from indai.trainers.loop import train_loop
    from indai.trainers.synthetic import write_dataset

    store = open_store(tmp_path / "store")
    ref, _ = write_dataset(store, "taken", {"train": 64, "test": 32}, classes=4, sensor=(2, 128))
    _commit(store, "taken", "epoch-00002", epoch=2, step=60, mlflow_run_id="old-run")
    _commit(store, "taken", "epoch-00003", epoch=3, step=80, mlflow_run_id="old-run")
    before = {k: store.get_bytes(k) for k in store.list("checkpoints/taken")}
    with pytest.raises(UserError) as e:
        train_loop(_train_cfg(store, ref, "taken", resume=False))
    assert str(e.value) == ("run taken already has checkpoints up to epoch-00003: resume it (run.resume=true, or "
                            "`indai train resume taken`) or choose a new run.name")
    assert {k: store.get_bytes(k) for k in store.list("checkpoints/taken")} == before  # nothing trained, nothing written
    out = train_loop(_train_cfg(store, ref, "taken-anew", resume=False))  # a new name trains
    assert out["step"] == 2 and store.committed_children("checkpoints/taken-anew") == ["epoch-00000", "final"]


def test_the_driver_refuses_before_it_opens_an_mlflow_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from indai.trainers.launch import _open_run

    uri, before = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        store = open_store(tmp_path / "store")
        _commit(store, "taken", "final", step=80, mlflow_run_id="old-run")  # finished, its epoch checkpoints pruned away
        cfg = TrainConfig.model_validate({**_cfg(name="taken", resume=False), "data": {"dataset": "d@v1"}})
        with pytest.raises(UserError, match=r"^run taken already has checkpoints up to final: resume it"):
            _open_run(cfg, store, {"member": "m"}, None)
        assert MlflowClient(uri).search_experiments(filter_string="name = 'indai'") == []  # no MLflow run was opened
        assert store.read_commit("checkpoints/taken/final")["mlflow_run_id"] == "old-run"
    finally:
        mlflow.set_tracking_uri(before)


@pytest.mark.parametrize("checkpointed", [True, False], ids=["with checkpoints", "killed before its first"])
def test_a_resumed_run_goes_on_only_with_the_dataset_version_it_started_with(tmp_path, checkpointed):
    """A resubmission that names the dataset by @latest resolves again; once a newer version is
    committed, resuming would continue the old weights and position on other data. Refused, naming
    both versions, before the MLflow run is reopened; the version it started with resumes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from indai.platform.datasets import DatasetRef
    from indai.trainers.launch import _open_run, save_run_config

    uri, before = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        store = open_store(tmp_path / "store")
        old = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("indai")).info.run_id
        cfg = TrainConfig.model_validate({**_cfg(name="r"), "data": {"dataset": "d@v1"}})
        save_run_config(store, cfg, old)
        if checkpointed:
            _commit(store, "r", "epoch-00000", epoch=0, step=8, mlflow_run_id=old)
        resubmitted = TrainConfig.model_validate({**_cfg(name="r"), "data": {"dataset": "d@v2"}})  # @latest moved on
        with pytest.raises(UserError) as e:
            _open_run(resubmitted, store, {"member": "m"}, DatasetRef("d", "v2"))
        assert str(e.value) == ("run r trained on dataset d@v1, and this submission resolves data.dataset to d@v2: a run "
                                "resumes on the version it started with. Resume it with data.dataset=d@v1 (`indai train "
                                "resume r` does), or train d@v2 under a new run.name")
        assert MlflowClient(uri).get_run(old).info.status == "RUNNING"  # never reopened nor ended
        assert checkpoint.read_run_config(store, "r")["data"]["dataset"] == "d@v1"  # the saved config is untouched
        run, resumed = _open_run(cfg, store, {"member": "m"}, DatasetRef("d", "v1"))
        with run:
            assert run.info.run_id == old and resumed == ("epoch-00000" if checkpointed else None)
    finally:
        mlflow.set_tracking_uri(before)


def test_the_random_generators_state_round_trips_through_json():
    import torch

    torch.manual_seed(3)
    torch.rand(5)
    saved = json.loads(json.dumps(checkpoint.rng_state()))  # as it travels in a checkpoint's client state
    expected = torch.rand(1000)
    torch.manual_seed(99)  # a resumed run seeds anew, and draws differently
    assert not torch.equal(torch.rand(1000), expected)
    checkpoint.set_rng_state(saved)
    assert torch.equal(torch.rand(1000), expected)


def test_what_another_world_or_batch_size_may_resume():
    """Replicated state (ddp, zero0) resumes at an epoch's end with any number of workers; ZeRO
    partitions do not load into another number; a position inside an epoch is a position in
    shards that other workers or batch sizes cut differently."""
    ok = checkpoint.check_resumable
    ok("r", "epoch-00001", {"epoch": 1, "step": 98, "world": 2, "batch_size": 32, "strategy": "ddp"}, 4, 64)
    ok("r", "epoch-00001", {"epoch": 1, "step": 98, "world": 2, "batch_size": 32, "strategy": "zero0"}, 1, 32)
    ok("r", "epoch-00001", {"epoch": 1, "step": 98, "world": 2, "batch_size": 32, "strategy": "zero2"}, 2, 16)
    ok("r", "epoch-00001-batch-000010", {"epoch": 1, "batch": 10, "step": 59, "world": 2, "batch_size": 32,
                                         "strategy": "zero3"}, 2, 32)
    ok("r", "epoch-00001-batch-000010", {"epoch": 1, "batch": 10, "step": 59, "strategy": "ddp"}, 3, 8)  # written before the world was kept
    with pytest.raises(UserError) as e:
        ok("r", "epoch-00001", {"epoch": 1, "step": 98, "world": 4, "batch_size": 32, "strategy": "zero2"}, 2, 32)
    assert str(e.value) == ("checkpoint epoch-00001 of run r was written by 4 workers under zero2, which splits the optimizer "
                            "state into 4 partitions, and this job has 2: DeepSpeed loads it only with the same number. "
                            "Resume with run.workers=4")
    with pytest.raises(UserError) as e:
        ok("r", "epoch-00001-batch-000010", {"epoch": 1, "batch": 10, "step": 59, "world": 2, "batch_size": 32,
                                             "strategy": "ddp"}, 1, 32)
    assert str(e.value) == ("checkpoint epoch-00001-batch-000010 of run r stopped inside epoch 2, at a position in the "
                            "shards of 2 workers with batches of 32, and this job has 1 workers with batches of 32: their "
                            "shards differ, so some samples would be skipped and others repeated. Resume with "
                            "run.workers=2 and optim.batch_size=32")
    with pytest.raises(UserError, match=r"with batches of 32, and this job has 2 workers with batches of 64"):
        ok("r", "epoch-00001-batch-000010", {"epoch": 1, "batch": 10, "step": 59, "world": 2, "batch_size": 32,
                                             "strategy": "zero0"}, 2, 64)
    # an epoch's end inside an accumulation window goes on from the window's start: a position inside
    # an epoch when the window began in one, else the start of an epoch, which any shards have
    ok("r", "epoch-00001", {"epoch": 1, "step": 98, "world": 2, "batch_size": 32, "strategy": "ddp",
                            "resume_at": {"epoch": 2, "batch": 0, "step": 96}}, 1, 64)
    with pytest.raises(UserError, match=r"^checkpoint epoch-00001 of run r was written inside an accumulation window that "
                                        r"began in epoch 2, and goes on from there, at a position in the shards of 2 "
                                        r"workers with batches of 32; this job has 1 workers with batches of 32"):
        ok("r", "epoch-00001", {"epoch": 1, "step": 98, "world": 2, "batch_size": 32, "strategy": "ddp",
                                "resume_at": {"epoch": 1, "batch": 47, "step": 96}}, 1, 32)


def test_checkpoints_record_their_world_and_a_resume_in_another_is_refused_before_loading(tmp_path):
    from indai.trainers.loop import train_loop
    from indai.trainers.synthetic import write_dataset

    store = open_store(tmp_path / "store")
    ref, _ = write_dataset(store, "w", {"train": 64, "test": 32}, classes=4, sensor=(2, 128))
    train_loop(_train_cfg(store, ref, "one"))
    meta = store.read_commit("checkpoints/one/epoch-00000")
    assert (meta["world"], meta["batch_size"], meta["strategy"]) == (1, 32, "ddp")
    # written by two workers inside an epoch (the files are not even a checkpoint: nothing is loaded)
    _commit(store, "two", "epoch-00000-batch-000001", epoch=0, batch=1, step=1, world=2, batch_size=32, strategy="ddp")
    with pytest.raises(UserError, match=r"^checkpoint epoch-00000-batch-000001 of run two stopped inside epoch 1, at a "
                                        r"position in the shards of 2 workers"):
        train_loop(_train_cfg(store, ref, "two"))
    assert store.committed_children("checkpoints/two") == ["epoch-00000-batch-000001"]


def test_a_worker_restarted_inside_its_job_goes_on_from_its_own_checkpoints(tmp_path):
    """Ray Train restarts the workers of a job with the same config: with run.resume false the
    checkpoints they find are their own run's (the driver refused any other), and they go on from
    them; any other run's checkpoints are refused."""
    store = open_store(tmp_path / "store")
    cfg = TrainConfig.model_validate({**_cfg(name="r", resume=False), "mlflow_run_id": "this-run"})
    assert checkpoint.fresh_or_resumed(store, cfg) is cfg  # nothing there: a fresh start
    _commit(store, "r", "epoch-00000", epoch=0, step=8, mlflow_run_id="this-run")
    assert checkpoint.fresh_or_resumed(store, cfg).run.resume is True
    _commit(store, "r", "epoch-00001", epoch=1, step=16, mlflow_run_id="another-run")
    with pytest.raises(UserError, match="run r already has checkpoints up to epoch-00001"):
        checkpoint.fresh_or_resumed(store, cfg)
    plain = TrainConfig.model_validate(_cfg(name="r", resume=False))  # a plain launch has no MLflow run of its own
    with pytest.raises(UserError, match="already has checkpoints"):
        checkpoint.fresh_or_resumed(store, plain)
    assert checkpoint.fresh_or_resumed(store, TrainConfig.model_validate(_cfg(name="r"))).run.resume is True


def test_save_uncommits_and_empties_the_tag_before_writing_into_it(tmp_path):
    """A run restarted from an earlier checkpoint saves a tag that is still committed: while the
    new files go in, the old marker must not vouch for the mix, and no old file (another world
    size's shard) may stay."""
    import json as _json

    import torch

    from indai.platform.storage import LocalStore
    from indai.trainers.engine import TorchEngine

    class Watched(LocalStore):
        """Records, for each file written, whether the tag was committed at that moment."""

        writes: list[tuple[str, bool]]

        def put_file(self, key, local_path):
            self.writes.append((key, self.is_committed("checkpoints/r/epoch-00000")))
            super().put_file(key, local_path)

    store = Watched(tmp_path / "store")
    store.writes = []
    store.put_bytes("checkpoints/r/epoch-00000/zero_pp_rank_3_mp_rank_00_optim_states.pt", b"old run, world 4")
    store.commit("checkpoints/r/epoch-00000", {"epoch": 0, "step": 99, "mlflow_run_id": "old-run"})
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    engine = TorchEngine(model, opt, None, device=torch.device("cpu"), world=1, rank=0)
    checkpoint.save(engine, store, "r", "epoch-00000", {"epoch": 0, "step": 8, "mlflow_run_id": "new-run"}, rank=0)
    assert store.writes and all(not committed for _, committed in store.writes), store.writes
    assert sorted(k.rsplit("/", 1)[-1] for k in store.list("checkpoints/r/epoch-00000")) == [
        "_COMMITTED", "engine.json", "model.safetensors", "optimizer.safetensors"]
    meta = store.read_commit("checkpoints/r/epoch-00000")
    assert (meta["step"], meta["mlflow_run_id"]) == (8, "new-run")
    assert _json.loads(store.get_bytes("checkpoints/r/epoch-00000/engine.json"))["client_state"]["step"] == 8


def test_compare_refuses_a_taken_scratch_name_before_either_run_trains(tmp_path):
    """`--compare-scratch` trains the recipe, then its twin `<name>-scratch`: a taken twin name is
    refused before the first run trains, not after."""
    from types import SimpleNamespace

    from indai.trainers.compare import compare
    from indai.trainers.synthetic import write_dataset

    store = open_store(tmp_path / "store")
    ref, _ = write_dataset(store, "cmp", {"train": 8, "test": 4}, classes=2, image=32)
    _commit(store, "cmp-scratch", "epoch-00001", epoch=1, step=4, mlflow_run_id="old-run")
    cfg = TrainConfig.model_validate({
        "recipe": "t", "data": {"dataset": ref}, "run": {"name": "cmp", "resume": False},
        "model": {"flavour": "debug", "modalities": ["image"],
                  "image": {"timm_name": "efficientnet_lite0", "pretrained": "efficientnet-lite0"}}})
    import mlflow

    def train_fn(variant_cfg, *args, **kwargs):
        raise AssertionError(f"run {variant_cfg.run.name} started training")

    settings = SimpleNamespace(store_uri=store.uri, require_mlflow=lambda: f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        with pytest.raises(UserError, match=r"^run cmp-scratch already has checkpoints up to epoch-00001: resume it"):
            compare(cfg, settings, train_fn=train_fn)
    finally:  # the registry client sets both on the way (old behaviour); leave them as they were
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def _as_job(monkeypatch, member: str | None, role: str = "researcher") -> None:
    """The identity the job gateway gives a job (INDAI_JOB_MEMBER, INDAI_JOB_ROLE); None: outside a gateway job (the admin)."""
    for name, value in (("INDAI_JOB_MEMBER", member), ("INDAI_JOB_ROLE", role if member else None)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_a_run_name_belongs_to_the_member_whose_job_took_it_first(tmp_path, monkeypatch):
    """run.resume is on by default, so without owners a member's run that took another member's run
    name would go on from that member's weights and log into that member's MLflow run. The first job
    records its member; another member's job is refused in the driver and in every worker before
    anything of the run is read; the owner and the admin go on."""
    store = open_store(tmp_path / "store")
    _as_job(monkeypatch, "steel-a")
    cfg = TrainConfig.model_validate({**_cfg(name="line-3"), "mlflow_run_id": "a-run"})
    assert checkpoint.fresh_or_resumed(store, cfg) is cfg
    assert json.loads(store.get_bytes("checkpoints/line-3/owner.json")) == {"member": "steel-a"}
    _commit(store, "line-3", "epoch-00000", epoch=0, step=8, mlflow_run_id="a-run")
    store.put_bytes("checkpoints/line-3/config.json", b"{}")
    before = {k: store.get_bytes(k) for k in store.list("checkpoints/line-3")}

    _as_job(monkeypatch, "auto-b")
    with pytest.raises(UserError) as e:
        checkpoint.fresh_or_resumed(store, cfg)
    assert str(e.value) == "run line-3 belongs to member steel-a; this job runs for member auto-b: choose another run.name"
    with pytest.raises(UserError, match="^run line-3 belongs to member steel-a"):  # the driver too, before any MLflow run
        checkpoint.claim_run(store, "line-3")
    assert {k: store.get_bytes(k) for k in store.list("checkpoints/line-3")} == before  # nothing of steel-a's changed

    _as_job(monkeypatch, "steel-a")  # the owner goes on
    assert checkpoint.fresh_or_resumed(store, cfg).run.resume is True
    _as_job(monkeypatch, "auto-b", role="admin")  # an admin's token may open any run
    checkpoint.claim_run(store, "line-3")
    _as_job(monkeypatch, None)  # and so may a process outside a gateway job (the admin's shell, the demo)
    checkpoint.claim_run(store, "line-3")
    assert json.loads(store.get_bytes("checkpoints/line-3/owner.json")) == {"member": "steel-a"}


def test_a_run_from_before_owners_belongs_to_no_member(tmp_path, monkeypatch):
    """Its checkpoints or saved config exist without an owner record: a researcher's job is refused,
    the admin goes on, and nothing is written (the run is left as it was)."""
    store = open_store(tmp_path / "store")
    _commit(store, "old", "epoch-00001", epoch=1, step=16, mlflow_run_id="old-run")
    store.put_bytes("checkpoints/config-only/config.json", b"{}")  # killed before its first checkpoint
    for run in ("old", "config-only"):
        _as_job(monkeypatch, "steel-a")
        with pytest.raises(UserError, match=f"^run {run} belongs to no member .*before runs had owners.*: choose another run.name$"):
            checkpoint.claim_run(store, run)
        _as_job(monkeypatch, None)
        checkpoint.claim_run(store, run)
        assert not store.exists(f"checkpoints/{run}/owner.json")
    store.put_bytes("checkpoints/broken/owner.json", b"{not json")
    with pytest.raises(UserError, match="owner record 'checkpoints/broken/owner.json' .* is damaged"):
        checkpoint.claim_run(store, "broken")
