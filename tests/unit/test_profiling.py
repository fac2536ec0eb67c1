"""run.profile_steps (trainers.profiling): the recorded window is the steps asked for, after the
warm-up and never past the epoch's end; each step is a named range in the trace the store keeps;
the summary reaches the run's result and log."""
import gzip
import json

import pytest

from indai.platform.storage import open_store
from indai.trainers.loop import train_loop
from indai.trainers.profiling import _union
from indai.trainers.synthetic import write_dataset


def test_busy_time_counts_overlapping_kernels_once():
    assert _union([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert _union([(3, 4)]) == 1 and _union([]) == 0


@pytest.fixture(scope="module")
def store_and_ref(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("profile-store"))
    ref, _ = write_dataset(store, "profile-syn", {"train": 256, "test": 64}, classes=4, sensor=(2, 128))
    return store, ref


def config(store, ref: str, name: str, skip: int, steps: int) -> dict:
    return {"recipe": "test_profiling", "data": {"dataset": ref},
            "model": {"flavour": "debug", "modalities": ["sensor"], "num_classes": 4, "sensor": {"channels": 2, "length": 128}},
            "optim": {"epochs": 2, "batch_size": 32, "lr": 1e-3},  # 8 steps an epoch
            "run": {"name": name, "launcher": "local", "progress": False, "resume": False, "timing_skip": skip,
                    "profile_steps": steps},
            "store_uri": store.uri}


def step_ranges(store, run: str) -> list[str]:
    trace = json.loads(gzip.decompress(store.get_bytes(f"checkpoints/{run}/profile/rank-0.trace.json.gz")))
    return sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("indai step ")})


@pytest.mark.parametrize("skip, steps, recorded", [(2, 3, [2, 3, 4]),  # steps 2-4 of the first epoch
                                                   (6, 5, [6, 7])])   # cut at the first epoch's end
def test_the_window_holds_the_steps_asked_for_and_ends_with_the_epoch(store_and_ref, capfd, skip, steps, recorded):
    store, ref = store_and_ref
    run = f"profiled-{skip}"
    out = train_loop(config(store, ref, run, skip, steps))
    assert out["step"] == 16  # profiling changes nothing about the training
    profile = out["profile"]
    assert profile["first_step"] == skip and profile["steps"] == len(recorded)
    assert profile["device_busy"] is None and profile["wall_ms_per_step"] > 0  # no GPU here
    assert profile["top"] and all(t["ms_per_step"] > 0 for t in profile["top"])
    assert any(t["op"].startswith("aten::") for t in profile["top"])
    assert not any(t["op"].startswith("indai step") for t in profile["top"])  # the step ranges are not operators
    assert profile["trace"] == f"checkpoints/{run}/profile/rank-0.trace.json.gz"
    assert step_ranges(store, run) == sorted(f"indai step {n}" for n in recorded)
    assert f"[indai] profile: {len(recorded)} step(s) from step {skip}:" in capfd.readouterr().err


def test_no_profile_unless_asked(store_and_ref):
    store, ref = store_and_ref
    out = train_loop(config(store, ref, "not-profiled", 2, 0))
    assert "profile" not in out and not store.list("checkpoints/not-profiled/profile")


def test_a_trace_that_cannot_be_saved_costs_the_run_nothing(store_and_ref, capfd):
    """The store refuses the trace (a file stands where its folder must go): the run still
    writes its final weights, and says what was not saved."""
    store, ref = store_and_ref
    blocker = store.root / "checkpoints" / "profiled-blocked" / "profile"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    out = train_loop(config(store, ref, "profiled-blocked", 2, 2))
    assert out["profile"]["steps"] == 2 and out["profile"]["trace"] is None
    assert store.is_committed("checkpoints/profiled-blocked/final")
    err = capfd.readouterr().err
    assert "[indai] profile: the trace of rank 0 was not saved to checkpoints/profiled-blocked/profile/rank-0.trace.json.gz" in err
