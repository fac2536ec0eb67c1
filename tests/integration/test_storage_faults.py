"""Faults of the object store and of the registry, injected for real (issue 9).

- MinIO stopped and started again on the same port and data folder while a store call waits,
  and while a training run (the plain launch, `python -m indai.trainers.loop`: no Ray, which this
  fault does not involve) writes its checkpoints to it: the store retries (S3Store._call) and the
  run completes with every checkpoint committed and readable, nothing partial visible.
- 5xx answers are retried, 403/404 and bad keys are not: counted at a loopback S3 endpoint that
  answers the status codes on demand (MinIO cannot be made to answer 503 at will).
- The MLflow tracking server (platform.services.start_mlflow: SQLite backend) SIGKILLed and
  started again on the same port and database while `indai train` logs metrics, and again while
  its driver logs and registers the model: every logged step is in MLflow once, the model is
  registered once.

Loopback only; every wait has a deadline; each test is bounded by pytest-timeout.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minio_server import MinioServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "trainers/recipes/cwru_sensor.yaml"
INDAI = [sys.executable, "-m", "indai.platform.cli"]
EPOCHS = 4
STORE_LOG = "indai.platform.storage"


def wait_for(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
             every: float = 0.1) -> None:
    """Poll ``ready()`` every ``every`` s until it is true; fail after ``timeout`` s, or at once
    if ``proc`` ended."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(every)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL a run this test started (its own session) if it is still there."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small_spec(tmp_path_factory) -> Path:
    """The shipped CWRU subset with training windows that do not overlap (hop 1024, not 128):
    about 12 steps an epoch, so that a run of several epochs takes seconds."""
    folder = tmp_path_factory.mktemp("cwru-faults")
    for source in (REPO / "examples/cwru-0hp").glob("*.npz"):
        shutil.copy(source, folder / source.name)
    text = (REPO / "examples/cwru-0hp/dataset.yaml").read_text()
    text, names = re.subn(r"(?m)^name: cwru-0hp$", "name: cwru-faults", text)
    text, hops = re.subn(r"(?m)^(\s*)hop: 128\b", r"\1hop: 1024", text)
    assert (names, hops) == (1, 1), "examples/cwru-0hp/dataset.yaml changed: adapt this fixture"
    (folder / "dataset.yaml").write_text(text)
    return folder / "dataset.yaml"


# ---------------------------------------------------------------------------------------------
# MinIO
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minio_server():
    """A MinIO of this module's own: the tests stop and start it."""
    with MinioServer() as server:
        yield server


def s3_store(server: MinioServer, uri: str | None = None, **overrides):
    from indai.platform.storage import S3Store

    settings = dict(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
                    secure=False, retry_deadline_s=60)
    return S3Store(uri or f"s3://faults-{uuid.uuid4().hex[:10]}", **{**settings, **overrides})


def retry_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STORE_LOG]


@pytest.mark.timeout(120)
def test_a_store_call_during_a_minio_restart_succeeds_once_it_is_back(minio_server, caplog):
    store = s3_store(minio_server)
    store.put_bytes("ckpt/a", b"first")
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    caplog.clear()  # a MinIO just started may have answered 503 XMinioServerNotInitialized (retried too)
    minio_server.stop()
    restart = threading.Timer(2.0, minio_server.start)  # back on the same port, with the same data
    restart.start()
    try:
        store.put_bytes("ckpt/b", b"written while the server was down")
        store.commit("ckpt", {"files": 2})
    finally:
        restart.join(timeout=90)
        if not minio_server.running:
            minio_server.start()
    retried = retry_records(caplog)
    assert retried, "the write during the outage was not retried"
    # one line per retry, each naming the call and what failed
    assert all("write of 'ckpt/b'" in line for line in retried), retried
    assert any("Connection refused" in line for line in retried), retried
    assert store.list() == ["ckpt/_COMMITTED", "ckpt/a", "ckpt/b"]
    assert store.get_bytes("ckpt/b") == b"written while the server was down"
    assert store.read_commit("ckpt")["files"] == 2


@pytest.mark.timeout(60)
def test_missing_keys_refused_credentials_and_bad_keys_fail_at_once(minio_server, caplog):
    from indai.platform.storage import StoreError

    store = s3_store(minio_server)
    store.put_bytes("k", b"v")
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    caplog.clear()
    with pytest.raises(StoreError, match="is not in"):  # 404 NoSuchKey
        store.get_bytes("missing")
    assert store.exists("missing") is False  # 404 to a HEAD
    wrong = s3_store(minio_server, store.uri, secret_key="not-the-secret-key")
    for call in (lambda: wrong.get_bytes("k"), lambda: wrong.put_bytes("k2", b"v"), lambda: wrong.list()):
        with pytest.raises(StoreError, match="refused the credentials"):  # 403
            call()
    with pytest.raises(StoreError, match="invalid object key"):
        store.get_bytes("../k")
    assert retry_records(caplog) == []


class _StatusReplay(BaseHTTPRequestHandler):
    """An S3 endpoint on loopback that answers each object's requests with a given list of
    statuses (the last one repeated), and counts them. 200 answers carry the object's name."""

    def _answer(self) -> None:
        server = self.server
        with server.lock:
            seen = server.counts.get(self.path, 0)
            server.counts[self.path] = seen + 1
        plan = server.plans.get(self.path, [404])
        status = plan[min(seen, len(plan) - 1)]
        if status == 200:
            body, kind = self.path.encode(), "application/octet-stream"
        elif status == 502:  # what a proxy in front of the store says: not S3's XML
            body, kind = b"<html><body>502 Bad Gateway</body></html>", "text/html"
        else:
            code = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}[status]
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message>'
                    f"<Resource>{self.path}</Resource><RequestId>r{seen}</RequestId></Error>").encode()
            kind = "application/xml"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def status_replay():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusReplay)
    server.lock, server.counts, server.plans = threading.Lock(), {}, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.timeout(60)
def test_5xx_answers_are_retried_and_4xx_answers_are_not(status_replay, caplog):
    from indai.platform.storage import S3Store, StoreError, StoreUnavailable

    status_replay.plans.update({"/bucket/flaky": [503, 500, 502, 200], "/bucket/denied": [403],
                                "/bucket/gone": [404], "/bucket/down": [503]})
    store = S3Store("s3://bucket", endpoint=f"127.0.0.1:{status_replay.server_port}", access_key="ak",
                    secret_key="secretkey", secure=False, region="us-east-1", retry_deadline_s=30)
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    assert store.get_bytes("flaky") == b"/bucket/flaky"
    # one request per try: the HTTP pool under the store retries nothing itself
    assert status_replay.counts["/bucket/flaky"] == 4
    retried = retry_records(caplog)
    assert len(retried) == 3 and all("read of 'flaky'" in line for line in retried), retried
    assert [re.search(r"failed \((HTTP \d+)", line).group(1) for line in retried] == ["HTTP 503", "HTTP 500", "HTTP 502"]

    with pytest.raises(StoreError, match="refused the credentials"):
        store.get_bytes("denied")
    with pytest.raises(StoreError, match="is not in"):
        store.get_bytes("gone")
    assert status_replay.counts["/bucket/denied"] == 1 and status_replay.counts["/bucket/gone"] == 1
    assert len(retry_records(caplog)) == 3

    impatient = S3Store(store.uri, endpoint=store.endpoint, access_key="ak", secret_key="secretkey", secure=False,
                        region="us-east-1", retry_deadline_s=0.5)
    with pytest.raises(StoreUnavailable, match=r"HTTP 503 SlowDown.*gave up after \d+ tries"):
        impatient.get_bytes("down")
    assert status_replay.counts["/bucket/down"] >= 2


def test_the_retry_deadline_comes_from_the_environment_and_is_checked(monkeypatch):
    from indai.platform.storage import S3Store, StoreError

    def store():
        return S3Store("s3://bucket", endpoint="127.0.0.1:9", access_key="ak", secret_key="secretkey", secure=False)

    monkeypatch.delenv("INDAI_S3_RETRY_DEADLINE_S", raising=False)
    assert store().retry_deadline_s == 60
    monkeypatch.setenv("INDAI_S3_RETRY_DEADLINE_S", "7.5")
    assert store().retry_deadline_s == 7.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("INDAI_S3_RETRY_DEADLINE_S", bad)
        with pytest.raises(StoreError, match=f"INDAI_S3_RETRY_DEADLINE_S is '{bad}'; set it to the seconds"):
            store()


@pytest.mark.timeout(600)
def test_training_on_s3_rides_out_a_minio_restart(minio_server, small_spec, tmp_path):
    """MinIO is stopped as the run ends its first epoch (the line it prints before writing the
    epoch's checkpoint) and started again once the run has logged a retry, so the outage always
    lands on the first checkpoint's writes (the first of which may be the store's bucket check)."""
    from safetensors.torch import load_file

    from indai.platform.config import load_config
    from indai.platform.ingest import ingest
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import complete_from_manifest

    store = s3_store(minio_server, "s3://faults-train/consortium")
    name, version, manifest = ingest(small_spec, store, progress=False)
    cfg = load_config(TrainConfig, RECIPE, [f"data.dataset={name}@{version}", f"optim.epochs={EPOCHS}", "run.name=s3-fault",
                                            "run.launcher=local", "run.progress=false", "run.checkpoint_every=1",
                                            f"run.keep_checkpoints={EPOCHS + 1}"])
    cfg = complete_from_manifest(cfg, manifest).model_copy(update={"store_uri": store.uri})
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    env = dict(os.environ, INDAI_S3_ENDPOINT=minio_server.endpoint, INDAI_S3_ACCESS_KEY=minio_server.access_key,
               INDAI_S3_SECRET_KEY=minio_server.secret_key, INDAI_S3_SECURE="0", INDAI_S3_RETRY_DEADLINE_S="180",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "run.log"
    with open(log, "wb") as out, open(tmp_path / "run.out", "wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "indai.trainers.loop", str(tmp_path / "cfg.json")], env=env, cwd=REPO,
                                stdout=stdout, stderr=out, start_new_session=True)
    try:
        wait_for("the first epoch's end", lambda: f"epoch 1/{EPOCHS}:" in log.read_text(errors="replace"), 300, proc, log)
        minio_server.stop()
        try:
            wait_for("retry of a store call", lambda: re.search(r"(?m)^S3 .* failed \(", log.read_text(errors="replace")),
                     240, proc, log)
        finally:
            minio_server.start()
        assert proc.wait(timeout=300) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        stop_group(proc)

    # Every retried call belongs to a checkpoint write: the epoch's files, or the bucket check the
    # store makes before its first write in this process (which the first checkpoint is).
    retried = re.findall(r"S3 (.+?) of '([^']*)' in \S+ at \S+ failed \(", log.read_text(errors="replace"))
    assert retried, log.read_text(errors="replace")[-3000:]
    assert all("checkpoints/s3-fault/" in key or (action, key) == ("create bucket", "faults-train")
               for action, key in retried), retried
    tags = [f"epoch-{e:05d}" for e in range(EPOCHS)] + ["final"]
    assert store.committed_children("checkpoints/s3-fault") == tags
    assert store.children("checkpoints/s3-fault") == tags  # nothing uncommitted beside them
    result = json.loads(store.get_bytes("checkpoints/s3-fault/final/result.json"))
    per_epoch = result["step"] // EPOCHS
    assert result["step"] == per_epoch * EPOCHS and per_epoch > 0
    for epoch, tag in enumerate(tags[:-1]):
        commit = store.read_commit(f"checkpoints/s3-fault/{tag}")
        assert (commit["epoch"], commit["step"]) == (epoch, per_epoch * (epoch + 1))
        folder = store.download_dir(f"checkpoints/s3-fault/{tag}", tmp_path / tag)
        written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert written == [k.split(f"{tag}/", 1)[1] for k in store.list(f"checkpoints/s3-fault/{tag}")]
        assert any(p.endswith(".pt") for p in written), written  # DeepSpeed's model and optimizer states
    weights = load_file(store.download_dir("checkpoints/s3-fault/final", tmp_path / "final") / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    assert json.loads((tmp_path / "run.out").read_text().strip().splitlines()[-1])["step"] == result["step"]


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


class Tracking:
    """The platform's MLflow server (services.start_mlflow) on a port and SQLite database of
    this module's own, which the tests kill and start again."""

    def __init__(self, root: Path):
        from indai.platform.services import pick_port

        self.root, self.store_root = root, root / "store"
        self.port = pick_port(0)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow" / "server.log"
        self.pid: int | None = None

    def start(self) -> None:
        from indai.platform.services import start_mlflow

        os.environ["PYTHONUNBUFFERED"] = "1"  # its access log reaches the file line by line
        try:
            self.pid = start_mlflow(self.root, self.port, self.store_root)["mlflow_pid"]
        finally:
            os.environ.pop("PYTHONUNBUFFERED", None)

    def listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The server and its job runners (its own session), gone at once: nothing listens on
        the port any more (its closed connections may linger in TIME_WAIT; the server binds with
        SO_REUSEADDR, so it can start there again)."""
        os.killpg(self.pid, sig)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)
        wait_for(f"port {self.port} to be closed", lambda: not self.listening(), 30)
        self.pid = None

    def close(self) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, small_spec):
    """(the server, the dataset reference) with the small dataset in the server's local store."""
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store

    server = Tracking(tmp_path_factory.mktemp("tracking"))
    try:
        server.start()
        name, version, _ = ingest(small_spec, open_store(str(server.store_root)), progress=False)
        yield server, f"{name}@{version}"
    finally:
        server.close()


def run_train(server: Tracking, dataset: str, run: str, tmp_path: Path, epochs: int, **env) -> tuple[subprocess.Popen, Path, Path]:
    args = ["train", RECIPE, "--launcher", "local", f"data.dataset={dataset}", f"optim.epochs={epochs}", "run.log_every=2",
            f"run.name={run}", f"run.register_as={run}", "run.experiment=faults", "run.progress=false"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    env = dict(base, INDAI_HOME=str(tmp_path / "home"), INDAI_STORE_URI=str(server.store_root), INDAI_MLFLOW_URI=server.uri,
               PYTHONUNBUFFERED="1", **env)
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([*INDAI, *map(str, args)], env=env, cwd=REPO, stdout=stdout, stderr=stderr,
                                start_new_session=True)
    return proc, out, err


def registered_once(client, name: str, run_id: str) -> None:
    versions = client.search_model_versions(f"name='{name}'")
    assert [(v.version, v.run_id, v.status) for v in versions] == [("1", run_id, "READY")]


def only_run(client, name: str):
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.mark.timeout(600)
def test_metrics_logged_across_a_tracking_server_restart_are_all_kept(tracking, tmp_path):
    """The server is SIGKILLed once the first epoch has ended, and stays away until a send has
    failed and the run has finished another epoch after that failure: training goes on while
    MLflow is away (the metrics are sent by a background thread, trainers.tracking). MLflow's own
    retries are made short here (one retry, backoff factor 1) so that the outage outlasts them and
    the sender's path is what is tested: keep the metrics, send them again. While the server
    starts again (seconds to half a minute on a busy machine) the run is paused (SIGSTOP), so that
    it cannot reach its end, whose last try would meet the server still away."""
    from mlflow.tracking import MlflowClient

    from indai.platform.storage import open_store

    server, dataset = tracking
    store = open_store(str(server.store_root))
    epochs = EPOCHS + 4  # room to pause the run after the outage has lasted an epoch (epochs take 0.2-5 s here)
    proc, out, err = run_train(server, dataset, "metrics-fault", tmp_path, epochs,
                               MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")

    def trained_on_while_away() -> bool:
        text = err.read_text(errors="replace")
        failed = text.find("MLflow did not take")
        return failed >= 0 and re.search(rf"(?m)^epoch \d+/{epochs}:", text[failed:]) is not None

    try:
        wait_for("the first epoch's end", lambda: f"epoch 1/{epochs}:" in err.read_text(errors="replace"), 300, proc, err)
        server.kill()
        try:
            wait_for("a failed send, then an epoch's end", trained_on_while_away, 240, proc, err, every=0.05)
            os.killpg(proc.pid, signal.SIGSTOP)
        finally:
            try:
                server.start()
            finally:
                os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, err.read_text(errors="replace")[-3000:]
    finally:
        stop_group(proc)

    said = err.read_text(errors="replace")
    failed = [line for line in said.splitlines() if line.startswith("MLflow did not take")]
    assert failed and all("kept, training goes on, sending again in" in line for line in failed), failed
    assert "MLflow is back: the metrics kept for" in said and "lost (the server is still away)" not in said, said[-3000:]
    assert "registered metrics-fault version 1" in out.read_text()
    client = MlflowClient(server.uri, registry_uri=server.uri)  # not a global registry an earlier test set
    run = only_run(client, "metrics-fault")
    total = json.loads(store.get_bytes("checkpoints/metrics-fault/final/result.json"))["step"]
    per_epoch = total // epochs
    steps = lambda key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))  # noqa: E731
    # every step the loop logged, each once (a resent batch that had arrived is not doubled)
    assert steps("train_loss") == steps("lr") == list(range(2, total + 1, 2))
    ends = [per_epoch * (e + 1) for e in range(epochs)]
    assert steps("epoch_train_loss") == steps("val_accuracy") == steps("samples_per_s") == ends
    assert steps("test_accuracy") == [total]
    registered_once(client, "metrics-fault", run.info.run_id)


@pytest.mark.timeout(600)
def test_training_goes_on_while_the_tracking_server_hangs(tracking, tmp_path):
    """The server is frozen (SIGSTOP: the kernel still opens connections, nothing answers) once
    the first epoch has ended. A send now waits for MLflow's request timeout (set to 600 s here),
    but it waits in the sender's thread: the run ends two more epochs while the server hangs
    (with the sends in the loop, the second epoch's end would have waited the 600 s). Thawed,
    the server answers the request it held and takes the rest: every metric once."""
    from mlflow.tracking import MlflowClient

    from indai.platform.storage import open_store

    server, dataset = tracking
    store = open_store(str(server.store_root))
    proc, out, err = run_train(server, dataset, "metrics-hang", tmp_path, EPOCHS, MLFLOW_HTTP_REQUEST_TIMEOUT="600")
    try:
        wait_for("the first epoch's end", lambda: f"epoch 1/{EPOCHS}:" in err.read_text(errors="replace"), 300, proc, err)
        os.killpg(server.pid, signal.SIGSTOP)
        try:
            wait_for("two epochs' ends while the server hangs", lambda: f"epoch 3/{EPOCHS}:" in err.read_text(errors="replace"),
                     240, proc, err)
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, err.read_text(errors="replace")[-3000:]
    finally:
        stop_group(proc)

    assert "registered metrics-hang version 1" in out.read_text()
    client = MlflowClient(server.uri, registry_uri=server.uri)
    run = only_run(client, "metrics-hang")
    total = json.loads(store.get_bytes("checkpoints/metrics-hang/final/result.json"))["step"]
    steps = lambda key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))  # noqa: E731
    assert steps("train_loss") == list(range(2, total + 1, 2))
    assert steps("epoch_train_loss") == [total // EPOCHS * (e + 1) for e in range(EPOCHS)]
    registered_once(client, "metrics-hang", run.info.run_id)


@pytest.mark.timeout(600)
def test_the_driver_rides_out_a_tracking_server_restart_and_registers_once(tracking, tmp_path):
    """The server is SIGKILLed as soon as the driver asks whether its run is already registered
    (the request just before log_model, in the server's access log) and started again at once
    (seconds; up to a minute on a busy machine): log_model's uploads, the registration and the tags
    meet the dead server and go through MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    default 7, backoff factor 2: about 4 minutes), and the model is registered once."""
    from mlflow.tracking import MlflowClient

    server, dataset = tracking
    seen = server.log.stat().st_size
    proc, out, err = run_train(server, dataset, "driver-fault", tmp_path, 1)
    try:
        wait_for("the driver's registry lookup", lambda: b"GET /api/2.0/mlflow/model-versions/search?filter=name%3D%27driver-fault"
                 in server.log.read_bytes()[seen:], 300, proc, err, every=0.05)
        server.kill()
        killed_at = server.log.stat().st_size
        server.start()
        assert proc.wait(timeout=400) == 0, err.read_text(errors="replace")[-3000:]
    finally:
        stop_group(proc)

    before, after = server.log.read_bytes()[seen:killed_at], server.log.read_bytes()[killed_at:]
    registering = b"POST /api/2.0/mlflow/model-versions/create "
    assert registering not in before and after.count(registering) == 1  # after the restart, once
    assert after.count(b"PUT /api/2.0/mlflow-artifacts/artifacts/") >= 2  # the model's files, uploaded after it too
    assert "registered driver-fault version 1" in out.read_text()
    client = MlflowClient(server.uri, registry_uri=server.uri)  # not a global registry an earlier test set
    run = only_run(client, "driver-fault")
    registered_once(client, "driver-fault", run.info.run_id)
    version = client.get_model_version("driver-fault", "1")
    assert version.tags["indai.run"] == "driver-fault" and version.tags["indai.step"]
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1
