"""Training faults, injected for real (issue 9): a Ray Train worker process SIGKILLed mid-epoch,
and the whole `indai train` job SIGKILLed, then `indai train resume <run>`.

What is measured: the step each run resumed at against the step the killed attempt had reached
(lost work, at most one checkpoint interval: run.checkpoint_every_steps), that every step of the
uninterrupted schedule runs exactly once after the restart, the final test accuracy and loss
against an uninterrupted run on the same seed, and that the model is registered once.
"""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "trainers" / "recipes" / "cwru_sensor.yaml"
INDAI = [sys.executable, "-m", "indai.platform.cli"]
EVERY = 10  # run.checkpoint_every_steps of the killed runs: the most work a restart may lose
STEPS_PER_EPOCH = 49  # 6264 training windows / 2 Ray workers / 64 per batch (the trained_model fixture's run)
# the killed run against the uninterrupted one (the trained_model fixture), same seed and data
# order: after the restart only dropout's random stream differs, so the models differ by training
# noise. Measured: test accuracy 0.9954 against 0.9954 (218 windows), test loss 0.0456 against 0.0452.
ACCURACY_TOLERANCE = 0.01  # at most 2 of the 218 test windows worse
LOSS_TOLERANCE = 0.01  # test cross-entropy, absolute (about a fifth of its value)

PROGRESS = re.compile(r"^\[indai\] progress (\{.*\})")  # the driver's, from rank 0 through its board (trainers.relay)
WORKER = re.compile(r"\(ip=[^,]+, pid=(\d+)\) world_rank=(\d+)")
RESUMED = re.compile(r"resumed run (\S+) from (\S+) \(epoch (\d+), step (\d+)")


class Lines:
    """A child's merged stdout and stderr, read on a thread, so the test can wait for a line
    with a deadline while the child runs."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.seen, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def until(self, done, deadline: float) -> bool:
        """Read lines until `done()` holds (True) or the child ends or the deadline passes (False)."""
        while time.time() < deadline:
            if done():
                return True
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return done()
            self.seen.append(line)
        return done()

    def rest(self, timeout: float) -> int:
        self.proc.wait(timeout=timeout)
        self.until(lambda: False, time.time() + 10)
        return self.proc.returncode


def _env(home: Path) -> dict:
    # RAY_DEDUP_LOGS=0: every worker line reaches the driver, none folded into "[repeated ...]"
    return dict(os.environ, INDAI_HOME=str(home), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")


def _progress(lines: list[str]) -> list[tuple[int, int]]:
    """(attempt, step) of the progress events rank 0 sent, in order, each once (the epoch's end
    repeats its last step). The driver prints what reaches its board in the order it arrived,
    and a restarted worker group says `resumed run ...` there before its first event: attempt 0
    is the first worker group, 1 the group after the first restart."""
    out, attempt = [], 0
    for line in lines:
        if RESUMED.search(line):
            attempt += 1
        elif m := PROGRESS.search(line):
            out.append((attempt, json.loads(m.group(1))["step"]))
    return list(dict.fromkeys(out))


def _worker_groups(lines: list[str]) -> list[dict[int, int]]:
    """The Ray Train worker groups started, in order: {world rank: pid}."""
    groups, current = [], None
    for line in lines:
        if "Started training worker group" in line:
            current = {}
            groups.append(current)
        elif current is not None and (m := WORKER.search(line)):
            current[int(m.group(2))] = int(m.group(1))
    return [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]  # a line relayed twice is one group


def _kill_train_worker(pid: int) -> None:
    """SIGKILL a Ray Train worker, after checking that the pid is one (never a reused pid)."""
    import psutil

    title = " ".join(psutil.Process(pid).cmdline())
    assert "RayTrainWorker" in title, title
    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(480)  # includes the session's services and trained_model fixtures when it runs first
def test_killed_ray_train_worker_restarts_from_the_last_checkpoint(services, cwru_dataset, trained_model):
    """SIGKILL rank 1 mid-epoch: FailureConfig restarts the group from the last committed
    (mid-epoch) checkpoint; the lost steps are at most one interval; the model is as good."""
    from mlflow.tracking import MlflowClient

    from indai.platform.storage import open_store
    from indai.trainers import checkpoint

    base_cfg, base = trained_model  # the uninterrupted run: the same recipe, epochs, workers and seed
    name, version, _ = cwru_dataset
    store = open_store(services.store_uri)
    run = "fault-worker"
    args = ["train", RECIPE, "--launcher", "ray", f"data.dataset={name}@{version}", f"optim.epochs={base_cfg.optim.epochs}",
            f"run.name={run}", f"run.register_as={run}", "run.progress=false", "run.log_every=1",
            "run.ray_log_level=INFO",  # Ray Train says which pids its worker groups have (_worker_groups)
            "run.max_failures=1",
            f"run.checkpoint_every_steps={EVERY}", "run.keep_checkpoints=3"]
    proc = subprocess.Popen([*INDAI, *map(str, args)], env=_env(services.home), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out = Lines(proc)
    try:
        # kill inside the second epoch, a few steps past a committed mid-epoch checkpoint
        target = STEPS_PER_EPOCH + 2 * EVERY + 3
        reached = out.until(lambda: any(step >= target for _, step in _progress(out.seen)), time.time() + 300)
        assert reached, "\n".join(out.seen[-40:])
        committed = checkpoint.latest(store, run)
        victim = _worker_groups(out.seen)[0][1]
        _kill_train_worker(victim)
        seen_at_kill = max(step for _, step in _progress(out.seen))
        assert out.rest(timeout=300) == 0, "\n".join(out.seen[-60:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = out.seen
    groups = _worker_groups(lines)
    assert len(groups) == 2 and victim not in groups[1].values(), groups  # one restart, with new processes

    # lost work: the steps the first group completed after the checkpoint the second resumed from
    steps_first = [s for attempt, s in _progress(lines) if attempt == 0]
    steps_second = [s for attempt, s in _progress(lines) if attempt == 1]
    resumed = list(dict.fromkeys(m.groups() for m in map(RESUMED.search, lines) if m and m.group(1) == run))
    assert len(resumed) == 1, resumed
    _, tag, _, resumed_step = resumed[0]
    resumed_step = int(resumed_step)
    assert committed and committed[1]["step"] <= resumed_step, (committed, resumed)  # the newest checkpoint at the kill, or later
    assert resumed_step % EVERY == 0 or resumed_step % STEPS_PER_EPOCH == 0, resumed_step
    lost = max(steps_first) - resumed_step
    print(f"killed rank 1 (pid {victim}) at step >= {seen_at_kill}; the group had completed step {max(steps_first)}; "
          f"resumed from {tag} (step {resumed_step}): {lost} steps lost, checkpoint interval {EVERY}")
    assert 0 <= lost <= EVERY, (max(steps_first), resumed_step)
    assert max(steps_first) >= seen_at_kill >= STEPS_PER_EPOCH  # killed inside the second epoch
    # the restarted group runs exactly the steps after the checkpoint, each once, to the same end
    total = base_cfg.optim.epochs * STEPS_PER_EPOCH
    assert steps_second == list(range(resumed_step + 1, total + 1)), steps_second[:5]
    assert steps_first == list(range(1, max(steps_first) + 1))

    # as good as the uninterrupted run
    result = json.loads(next(ln for ln in lines if ln.startswith("[indai] result "))[len("[indai] result "):])
    acc, loss = result["test_accuracy"], result["test_metrics"]["loss"]
    print(f"test accuracy {acc:.4f} (uninterrupted {base.test_accuracy:.4f}), test loss {loss:.4f} "
          f"(uninterrupted {base.test_metrics['loss']:.4f})")
    assert acc >= base.test_accuracy - ACCURACY_TOLERANCE
    assert abs(loss - base.test_metrics["loss"]) <= LOSS_TOLERANCE

    # registered once, from the one MLflow run
    versions = MlflowClient(services.mlflow_uri).search_model_versions(f"name='{run}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", result["run_id"])]
    assert "final" in store.committed_children(f"checkpoints/{run}")


def _indai(*args, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*INDAI, *map(str, args)], capture_output=True, text=True, env=_env(home), timeout=timeout, cwd=REPO)


def _error_line(done: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert done.returncode == 2 and lines and lines[-1].startswith("indai: error: "), (done.returncode, done.stderr[-2000:])
    return lines[-1]


@pytest.mark.timeout(480)  # two training processes and four CLI calls; 204 s measured on 2 cores at load 20
@pytest.mark.parametrize("launcher, workers, steps", [("local", 1, 98), ("ray", 2, STEPS_PER_EPOCH)])
def test_killed_job_continues_with_indai_train_resume(services, cwru_dataset, launcher, workers, steps):
    """SIGKILL the whole `indai train` process group after a mid-epoch checkpoint; `indai train
    resume <run>` continues it with the saved config, in the same MLflow run, registered once.
    Under the Ray launcher the killed process is Ray Train's driver: Ray ends the worker actors
    it owned, and the resumed run starts a new worker group on the same cluster."""
    from mlflow.tracking import MlflowClient

    from indai.platform.storage import open_store
    from indai.trainers import checkpoint

    name, version, _ = cwru_dataset
    store = open_store(services.store_uri)
    run = f"fault-job-{launcher}"
    args = ["train", RECIPE, "--launcher", launcher, f"data.dataset={name}", "optim.epochs=1", f"run.name={run}",
            f"run.register_as={run}", "run.progress=false", "run.checkpoint_every_steps=20", f"run.workers={workers}"]
    proc = subprocess.Popen([*INDAI, *map(str, args)], env=_env(services.home), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None and not checkpoint.latest(store, run):
            time.sleep(0.1)
        assert proc.poll() is None, f"indai train ended by itself with {proc.returncode} before it was killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = checkpoint.latest(store, run)
    assert before and checkpoint.progress(before[0])[1] != float("inf"), before  # a mid-epoch checkpoint
    assert "final" not in store.committed_children(f"checkpoints/{run}")

    saved = json.loads(store.get_bytes(f"checkpoints/{run}/config.json"))
    assert saved["data"]["dataset"] == f"{name}@{version}"  # pinned: the resume trains on the same version
    assert saved["run"]["checkpoint_every_steps"] == 20 and saved["mlflow_run_id"] == before[1]["mlflow_run_id"]
    assert "store_uri" not in saved and "mlflow_uri" not in saved and services.mlflow_uri not in json.dumps(saved)

    assert "is not valid" in _error_line(_indai("train", "resume", f"../{run}", home=services.home))
    assert f"no run named '{run}s'" in _error_line(_indai("train", "resume", f"{run}s", home=services.home))

    done = _indai("train", "resume", run, home=services.home)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming run {run} (MLflow run {saved['mlflow_run_id']}) from checkpoint {before[0]}" in done.stderr
    step = before[1]["step"]
    assert f"(epoch 0, step {step}, batch {step} of the epoch)" in done.stderr  # a step is a batch on each worker
    assert f"registered {run} version 1" in done.stdout
    result = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("[indai] result "))[len("[indai] result "):])
    assert result["run_id"] == saved["mlflow_run_id"] and result["test_accuracy"] >= 0.9
    if launcher == "ray":  # Ray Train's INFO lines stay in Ray's session logs (run.ray_log_level), not in the output
        said = done.stdout + done.stderr
        assert "Reporting training result" not in said and "Requesting resources" not in said, said[-3000:]
        assert "PreemptionWatcher" not in said and "core_worker.cc" not in said, said[-3000:]  # nor its ERROR line
    final = store.read_commit(f"checkpoints/{run}/final")
    assert final["step"] == steps  # 6264 windows in batches of 64 per worker: the epoch's steps, none twice

    again = _error_line(_indai("train", "resume", run, home=services.home))
    assert f"run '{run}' already finished: registered {run} version 1" in again
    versions = MlflowClient(services.mlflow_uri).search_model_versions(f"name='{run}'")
    assert [v.version for v in versions] == ["1"]


@pytest.mark.timeout(240)
def test_mid_epoch_resume_trains_the_same_model_as_an_uninterrupted_run(tmp_path):
    """The run is deterministic on CPU, dropout included: resumed from its mid-epoch checkpoint, it
    must end with the uninterrupted run's weights. Resuming at the wrong sample position, without
    the optimizer and schedule state, or without the random generators' state (other dropout
    masks) would not."""
    from safetensors.torch import load_file

    from indai.platform.config import load_config
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import complete_from_manifest

    store = open_store(tmp_path / "store")
    name, version, manifest = ingest(REPO / "examples/cwru-0hp/dataset.yaml", store, progress=False)

    def run(run_name: str) -> dict:
        cfg = load_config(TrainConfig, RECIPE, [f"data.dataset={name}@{version}", "optim.epochs=1", "model.dropout=0.3",
                                                f"run.name={run_name}", "run.checkpoint_every_steps=20",
                                                "run.keep_checkpoints=10", "run.progress=false", "run.launcher=local"])
        cfg = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})
        path = tmp_path / f"{run_name}.json"
        path.write_text(cfg.model_dump_json())
        done = subprocess.run([sys.executable, "-m", "indai.trainers.loop", str(path)], capture_output=True, text=True,
                              timeout=200, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        return {"stderr": done.stderr, **json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])}

    whole = run("whole")
    tags = store.committed_children("checkpoints/whole")
    assert tags == ["epoch-00000-batch-000020", "epoch-00000-batch-000040", "epoch-00000-batch-000060",
                    "epoch-00000-batch-000080", "epoch-00000", "final"], tags
    # the same run killed after its checkpoint at step 40: its store holds what the killed run's would
    mid = "epoch-00000-batch-000040"
    store.upload_dir(f"checkpoints/part/{mid}", store.download_dir(f"checkpoints/whole/{mid}", tmp_path / "mid"))
    store.commit(f"checkpoints/part/{mid}", {k: v for k, v in store.read_commit(f"checkpoints/whole/{mid}").items()
                                             if k != "committed_at"})
    part = run("part")
    assert f"resumed run part from {mid} (epoch 0, step 40, batch 40 of the epoch)" in part["stderr"]
    assert part["step"] == whole["step"] == 98

    a = load_file(str(store.download_dir("checkpoints/whole/final", tmp_path / "a") / "model.safetensors"))
    b = load_file(str(store.download_dir("checkpoints/part/final", tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed against uninterrupted: largest weight difference {worst:.2e}")
    assert worst <= 1e-5
    assert part["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-9)
