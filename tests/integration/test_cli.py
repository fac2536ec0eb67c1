"""The CLI as a user meets it: --help everywhere, one-line errors, nothing half-written,
and a training job killed mid-run that `indai train` resumes."""
import json
import os
import signal
import subprocess
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INDAI = [sys.executable, "-m", "indai.platform.cli"]


def indai(*args, home: Path | str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, INDAI_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.run([*INDAI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO, **kw)


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert lines[-1].startswith("indai: error: "), done.stderr[-2000:]
    assert sum(ln.startswith("indai: error") for ln in lines) == 1
    return lines[-1]


@pytest.mark.parametrize("cmd", [[], ["up"], ["down"], ["data", "ingest"], ["train"], ["model", "promote"], ["model", "demote"], ["serve"], ["predict"], ["demo"],
                                 ["member", "add"], ["member", "user-add"], ["token", "create"], ["token", "revoke"]])
def test_every_command_has_help(cmd, tmp_path):
    done = indai(*cmd, "--help", home=tmp_path, timeout=60)
    assert done.returncode == 0 and "usage: indai" in done.stdout


@pytest.mark.parametrize("flag, value", [("--replicas", "0"), ("--ingress-replicas", "65"), ("--replicas", "two"),
                                         ("--ingress-replicas", "-1")])
def test_serve_replica_counts_are_checked_before_anything_runs(flag, value, tmp_path):
    done = indai("serve", "--model", "m@champion", flag, value, home=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"argument {flag}: '{value}' is not a replica count: give a whole number from 1 to 64" in done.stderr


def test_ingest_errors_are_one_line_and_leave_nothing(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nsensor: [unclosed\n")
    assert "not valid YAML at line" in error_line(indai("data", "ingest", tmp_path / "bad.yaml", home=tmp_path))
    assert "does not exist" in error_line(indai("data", "ingest", tmp_path / "missing.yaml", home=tmp_path))
    spec = (REPO / "examples/cwru-0hp/dataset.yaml").read_text().replace("path: 1797_B_7_DE12.npz", "path: ../../etc/passwd")
    (tmp_path / "trav.yaml").write_text(spec)
    assert "may not contain '..'" in error_line(indai("data", "ingest", tmp_path / "trav.yaml", home=tmp_path))
    store = tmp_path / "store"
    assert not store.exists() or not any(store.rglob("*"))


def test_errors_that_need_services(services, trained_model, tmp_path):
    home = services.home
    assert "not in the registry" in error_line(indai("model", "promote", "no-such/1", home=home))
    assert "not in the registry" in error_line(indai("model", "promote", "it-cwru/99", home=home))
    assert "model name '..' is not valid" in error_line(indai("serve", "--model", "../../etc", home=home))
    assert "must be name@alias" in error_line(indai("serve", "--model", "justaname", home=home))
    assert "not valid" in error_line(indai("model", "promote", "it-cwru/1", "--alias", "Bad Alias", home=home))
    assert "has no committed version" in error_line(indai("train", REPO / "trainers/recipes/cwru_sensor.yaml", "data.dataset=nothing-here", home=home))
    body = tmp_path / "req.json"
    body.write_text('{"instances": [{"sensor": [[1, 2], [3, 4]]}]}')
    done = indai("predict", "--input", body, "--url", "http://127.0.0.1:9", home=home)
    assert "did not answer" in error_line(done)
    body.write_text("{nope")
    assert "not valid JSON" in error_line(indai("predict", "--input", body, home=home))


def test_model_promote_records_the_version_and_moves_the_alias(services, trained_model):
    """`indai model promote` records the version's files' sha256 and the alias in the platform
    database (what serving follows) and labels the registry; `--adopt-registry-aliases` promotes,
    once, the registry's aliases the platform has no promotion for."""
    from mlflow.tracking import MlflowClient

    from indai.platform import db, promotion, registry

    done = indai("model", "promote", "it-cwru/1", "--alias", "staging", home=services.home)
    assert done.returncode == 0, done.stderr[-2000:]
    eng = db.engine()
    digest = promotion.version_digest(eng, "it-cwru", 1)
    assert re.fullmatch(r"it-cwru@staging -> version 1; files sha256 [0-9a-f]{16}\.\.\. \(\d+ files, \d+ bytes\)\n",
                        done.stdout) and digest[:16] in done.stdout
    with tempfile.TemporaryDirectory() as tmp:
        folder, _ = registry.download(services.mlflow_uri, registry.ModelRef("it-cwru", version=1), Path(tmp))
        assert promotion.files_digest(folder).sha256 == digest
    assert promotion.alias_version(eng, "it-cwru", "staging") == 1
    assert MlflowClient(services.mlflow_uri).get_model_version_by_alias("it-cwru", "staging").version == "1"
    listed = {m["name"]: m for m in json.loads(indai("model", "ls", home=services.home).stdout)}
    assert listed["it-cwru"]["promoted"]["staging"] == 1 and listed["it-cwru"]["registry_aliases"]["staging"] == "1"

    # a registry alias set by a job (trained_model's run.alias champion) is adopted once, on request
    assert "champion" not in promotion.promoted_aliases(eng).get("it-cwru", {})  # a label only, so far
    adopted = indai("model", "promote", "--adopt-registry-aliases", home=services.home)
    assert adopted.returncode == 0, adopted.stderr[-2000:]
    listed = {m["name"]: m for m in json.loads(indai("model", "ls", home=services.home).stdout)}
    for name, m in listed.items():
        assert {a: int(v) for a, v in m["registry_aliases"].items()} == m["promoted"], name
    assert re.search(r"^it-cwru@champion -> version 1 \(files sha256 [0-9a-f]{16}\.\.\., \d+ files\)$", adopted.stdout, re.M)
    assert promotion.alias_version(eng, "it-cwru", "champion") == 1
    again = indai("model", "promote", "--adopt-registry-aliases", home=services.home)
    assert again.returncode == 0 and again.stdout == "" and "0 registry alias(es) promoted" in again.stderr
    assert "takes no model" in error_line(indai("model", "promote", "it-cwru/1", "--adopt-registry-aliases", home=services.home))
    assert "name the version to promote" in error_line(indai("model", "promote", home=services.home))

    # demoted: no longer served under that alias, nor labelled in the registry; the version's record stays
    done = indai("model", "demote", "it-cwru@staging", home=services.home)
    assert (done.returncode, done.stdout) == (0, "it-cwru@staging is no longer served (it pointed at version 1)\n"), done.stderr
    assert promotion.alias_version(eng, "it-cwru", "staging") is None and promotion.version_digest(eng, "it-cwru", 1) == digest
    assert "staging" not in MlflowClient(services.mlflow_uri).get_registered_model("it-cwru").aliases
    assert error_line(indai("model", "demote", "it-cwru@staging", home=services.home)) == (
        "indai: error: it-cwru@staging is not promoted: `indai model ls` shows each model's promoted aliases")
    assert "demote takes name@alias" in error_line(indai("model", "demote", "it-cwru/1", home=services.home))


def test_model_ls_names_who_may_call_each_model(services):
    """A newly registered model is `unassigned` (admins only) until `indai model share` records its
    owner; the registry's tag is shown as the hint it is."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(services.mlflow_uri)
    c.create_registered_model("cli-fresh", tags={"indai.member": "cwru-demo"})
    try:
        listed = indai("model", "ls", home=services.home)
        assert listed.returncode == 0, listed.stderr[-2000:]
        (model,) = [m for m in json.loads(listed.stdout) if m["name"] == "cli-fresh"]
        assert model["access"] == {"owner": None, "visibility": "unassigned"} and model["member_tag"] == "cwru-demo"
        assert "served to admins only until an owner is recorded" in listed.stderr
        assert "cli-fresh (tagged 'cwru-demo' by its job)" in listed.stderr
        for args in (["member", "add", "cli-owner", "--company", "CLI Owner", "--industry", "other", "--role", "demand"],
                     ["model", "share", "cli-fresh", "--owner", "cli-owner", "--process", "line-1"]):
            done = indai(*args, home=services.home)
            assert done.returncode == 0, done.stderr[-2000:]
        listed = indai("model", "ls", home=services.home)
        (model,) = [m for m in json.loads(listed.stdout) if m["name"] == "cli-fresh"]
        assert model["access"] == {"owner": "cli-owner", "visibility": "private", "process": "line-1", "shared_with": []}
        assert "cli-fresh" not in listed.stderr
    finally:
        c.delete_registered_model("cli-fresh")


def test_killed_training_resumes_from_its_last_checkpoint(services, cwru_dataset, tmp_path):
    """Kill `indai train` (SIGKILL, no clean-up) once its first checkpoint is committed; run it again."""
    from indai.platform.storage import open_store

    name, version, _ = cwru_dataset
    store = open_store(services.store_uri)
    args = ["train", REPO / "trainers/recipes/cwru_sensor.yaml", "--launcher", "local", f"data.dataset={name}@{version}",
            "optim.epochs=8", "run.name=killed-run", "run.register_as=killed-model", "run.progress=false"]
    env = dict(os.environ, INDAI_HOME=str(services.home))
    proc = subprocess.Popen([*INDAI, *map(str, args)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not store.committed_children("checkpoints/killed-run"):
        time.sleep(0.1)
    assert proc.poll() is None, f"indai train ended by itself with {proc.returncode} before it was killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = store.committed_children("checkpoints/killed-run")
    assert done_before and "final" not in done_before, done_before
    again = indai(*args, home=services.home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming run killed-run" in again.stderr and f"from checkpoint {done_before[-1]}" in again.stderr
    assert "registered killed-model version 1" in again.stdout
    assert "final" in store.committed_children("checkpoints/killed-run")


def _job_runs(state: dict) -> str:
    """Submit a tiny job to a home's Ray job API with its token and wait for the end state."""
    from indai.platform.services import ray_auth_env

    env = dict(os.environ, **ray_auth_env(state))
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", state["ray_dashboard"],
                           "--", "python", "-c", "print('agent answers')"],
                          capture_output=True, text=True, env=env, timeout=180)
    return done.stdout + done.stderr


def test_up_and_down_stop_exactly_their_processes(services, tmp_path):
    """A second home beside the session's running one: its own processes, its own Ray agent ports
    (with Ray's fixed defaults its job API answered "No available agent to submit job")."""
    import psutil

    from indai.platform.services import ray_temp_dir
    from indai.platform.settings import read_services

    env_home = tmp_path / "own-home"
    done = indai("up", "--cpus", "2", home=env_home, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MLflow UI" in done.stdout
    tag = ray_temp_dir(env_home.resolve()).name

    def ours() -> list[int]:
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.environ().get("INDAI_RAY_TAG") == tag:
                    found.append(p.pid)
            except (psutil.Error, OSError):
                continue
        return found

    assert ours()
    theirs = read_services(env_home.resolve())
    mine = read_services(Path(os.environ["INDAI_HOME"]))
    assert set(theirs["ray_agent_ports"].values()).isdisjoint(mine["ray_agent_ports"].values())
    out = _job_runs(theirs)
    assert "agent answers" in out and "succeeded" in out.lower(), out[-2000:]
    assert "agent answers" in _job_runs(mine), "the session's own Ray stopped taking jobs"
    status = indai("status", home=env_home)
    assert '"running": true' in status.stdout
    assert indai("down", home=env_home).returncode == 0
    time.sleep(1)
    assert ours() == []
    assert '"running": false' in indai("status", home=env_home).stdout


def test_members_and_tokens_through_the_cli(tmp_path):
    assert indai("member", "add", "steel-a", "--company", "Steel A", "--industry", "steel", "--role", "demand", home=tmp_path).returncode == 0
    assert "already exists" in error_line(indai("member", "add", "steel-a", "--company", "S", "--industry", "steel",
                                                "--role", "demand", home=tmp_path))
    assert indai("member", "user-add", "kim", "--member", "steel-a", "--role", "researcher", home=tmp_path).returncode == 0
    created = indai("token", "create", "--user", "kim", home=tmp_path)
    token = created.stdout.strip()
    assert created.returncode == 0 and token.startswith("indai_") and token not in created.stderr
    token_id = token.split("_")[1]
    listed = indai("token", "ls", home=tmp_path).stdout
    assert token_id in listed and token.split("_", 2)[2] not in listed
    assert indai("token", "revoke", token_id, home=tmp_path).returncode == 0
    assert '"revoked": true' in indai("token", "ls", home=tmp_path).stdout
    assert "does not exist" in error_line(indai("token", "revoke", "nope", home=tmp_path))
    assert (tmp_path / "platform.db").is_file()
