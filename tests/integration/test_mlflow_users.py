"""MLflow with basic auth as the chart runs it (the image's `mlflow/start-server.sh` and
`mlflow/basic_auth.ini`, here on SQLite, with `default_permission = NO_PERMISSIONS` so that every
access below comes from the platform's own grants): the accounts of platform/mlflow_users.py.
`indai-jobs` trains and registers through indai's real path, into an experiment the admin made;
`indai-serve` reads what Serve reads and changes nothing; neither manages users."""
from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from indai.platform import mlflow_users
from indai.platform.errors import UserError
from waiting import wait

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADMIN = ("admin", "admin-" + secrets.token_hex(12))
SERVE = ("indai-serve", "serve-" + secrets.token_hex(12))
JOBS = ("indai-jobs", "jobs-" + secrets.token_hex(12))


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uris_put_back():
    """indai's `registry.client` points MLflow's process-wide tracking and registry URIs at the server
    it is given: the tests after this module expect them where they were (the embedded default's)."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _client(uri: str):
    """A client on `uri` for both tracking and registry (a bare MlflowClient(uri) takes the registry
    from the process-wide URI, which earlier tests point at another server)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory) -> str:
    """The MLflow server of the chart's image, basic auth on, nothing granted by default, on a free
    loopback port."""
    folder = tmp_path_factory.mktemp("mlflow-auth")
    port = _free_port()
    template = (REPO / "mlflow" / "basic_auth.ini").read_text()
    assert "\ndefault_permission = READ\n" in template
    (folder / "template").mkdir()
    (folder / "template" / "basic_auth.ini").write_text(template.replace("default_permission = READ", "default_permission = NO_PERMISSIONS"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", TMPDIR=str(folder),
               MLFLOW_APP_NAME="basic-auth", MLFLOW_AUTH_CONFIG_PATH=str(folder / "template" / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1], MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(24),
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{folder / 'mlflow.db'}", MLFLOW_ARTIFACTS_DESTINATION=str(folder / "artifacts"),
               MLFLOW_PORT=str(port), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = folder / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(["sh", str(REPO / "mlflow" / "start-server.sh")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return requests.get(f"{uri}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False
    try:
        wait("MLflow with basic auth", up, timeout=180, interval=1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _user(uri: str, name: str) -> dict:
    r = requests.get(f"{uri}/api/2.0/mlflow/users/get", params={"username": name}, auth=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["user"]


def _search(uri: str, auth) -> int:
    return requests.get(f"{uri}/api/2.0/mlflow/registered-models/search", auth=auth, timeout=10).status_code


def _grants(uri: str, name: str) -> dict:
    r = requests.get(f"{uri}/api/3.0/mlflow/users/permissions/list", params={"username": name}, auth=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return {(p["resource_type"], p["resource_pattern"]): p["permission"] for p in r.json()["permissions"]}


def test_provisioning_makes_users_that_are_no_admins_again_and_again(auth_mlflow):
    uri, said = auth_mlflow, []
    mlflow_users.provision(uri, ADMIN, SERVE, JOBS, log=said.append)
    mlflow_users.provision(uri, ADMIN, SERVE, JOBS, log=said.append)  # the hook Job runs at every upgrade
    assert said == ["MLflow user indai-serve: made; READ on every experiment, READ on every registered model",
                    "MLflow user indai-jobs: made; EDIT on every experiment, EDIT on every registered model",
                    "MLflow user indai-serve: up to date", "MLflow user indai-jobs: up to date"]
    for user, permission in ((SERVE, "READ"), (JOBS, "EDIT")):
        assert _user(uri, user[0])["is_admin"] is False and _search(uri, user) == 200
        assert {k: v for k, v in _grants(uri, user[0]).items() if k[1] == "*"} == \
            {("experiment", "*"): permission, ("registered_model", "*"): permission}
    assert _search(uri, None) == 401

    # made an admin by hand, or given another grant: the next run takes it back
    r = requests.patch(f"{uri}/api/2.0/mlflow/users/update-admin", json={"username": "indai-serve", "is_admin": True},
                       auth=ADMIN, timeout=10)
    assert r.status_code == 200 and _user(uri, "indai-serve")["is_admin"] is True
    for verb, body in (("revoke", {}), ("grant", {"permission": "MANAGE"})):
        r = requests.post(f"{uri}/api/3.0/mlflow/users/permissions/{verb}", auth=ADMIN, timeout=10,
                          json={"username": "indai-serve", "resource_type": "registered_model", "resource_id": "*", **body})
        assert r.status_code == 200, r.text
    said.clear()
    mlflow_users.provision(uri, ADMIN, SERVE, JOBS, log=said.append)
    assert said == ["MLflow user indai-serve: was an admin; no longer; READ on every registered model (was MANAGE)",
                    "MLflow user indai-jobs: up to date"]
    assert _user(uri, "indai-serve")["is_admin"] is False and _grants(uri, "indai-serve")[("registered_model", "*")] == "READ"

    # a new secret in the release Secret: the old password stops working
    rotated = (SERVE[0], "rotated-" + secrets.token_hex(12))
    mlflow_users.provision(uri, ADMIN, rotated, JOBS, log=said.append)
    assert _search(uri, SERVE) == 401 and _search(uri, rotated) == 200
    mlflow_users.provision(uri, ADMIN, SERVE, JOBS, log=said.append)
    assert _search(uri, SERVE) == 200


@pytest.mark.parametrize("admin, serve, jobs, message", [
    (("admin", "not-the-password"), SERVE, JOBS, "refused the admin's credentials: check mlflowAdminPassword"),
    (SERVE, ("indai-serve-2", "another-password-1"), None, "the account given as admin is not an MLflow admin"),
    (ADMIN, ("admin", "another-password-1"), JOBS, "the MLflow user 'admin' must be a user of its own, not the admin 'admin'"),
    (ADMIN, SERVE, ("indai-jobs", "short"), r"indai-jobs has 5 characters; MLflow requires at least 12 \(mlflowJobsPassword"),
    (ADMIN, SERVE, ("indai-serve", "another-password-1"), "the serving cluster and the jobs need MLflow users of their own"),
], ids=["wrong admin password", "not an admin", "the admin itself", "short password", "one user for both"])
def test_bad_credentials_are_refused_with_what_to_fix(auth_mlflow, admin, serve, jobs, message):
    mlflow_users.provision(auth_mlflow, ADMIN, SERVE, JOBS, log=lambda _: None)
    with pytest.raises(UserError, match=message):
        mlflow_users.provision(auth_mlflow, admin, serve, jobs, wait_s=5, log=lambda _: None)
    assert "indai-serve-2" not in requests.get(f"{auth_mlflow}/api/2.0/mlflow/users/list", auth=ADMIN, timeout=10).text
    assert _search(auth_mlflow, SERVE) == 200 and _search(auth_mlflow, JOBS) == 200  # nothing half-changed


def test_a_server_that_does_not_answer_is_named_after_the_wait(monkeypatch):
    with pytest.raises(UserError, match=r"^MLflow at http://127.0.0.1:\d+ did not answer within 1 s \(ConnectionError\)"):
        mlflow_users.provision(f"http://127.0.0.1:{_free_port()}", ADMIN, SERVE, wait_s=1, log=lambda _: None)
    for name in ("INDAI_MLFLOW_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "INDAI_MLFLOW_SERVE_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="needs INDAI_MLFLOW_URI, MLFLOW_TRACKING_USERNAME, .* in its environment"):
        mlflow_users.provision_from_env(wait_s=1)


@pytest.fixture(scope="module")
def registered(auth_mlflow, services, cwru_dataset):
    """The shipped recipe (1 epoch, local launcher) trained and registered through the auth server as
    indai-jobs, the account of the jobs' cluster, in an experiment the admin made: indai's whole
    registration path (runs, metrics, the model's upload, its version, tags and alias) under basic auth."""

    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    name, version, _ = cwru_dataset
    mlflow_users.provision(auth_mlflow, ADMIN, SERVE, JOBS, log=lambda _: None)
    cfg = load_config(TrainConfig, REPO / "trainers" / "recipes" / "cwru_sensor.yaml",
                      [f"data.dataset={name}@{version}", "optim.epochs=1", "run.name=auth-cwru", "run.launcher=local",
                       "run.register_as=auth-cwru", "run.alias=champion", "run.progress=false"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        admin = _client(auth_mlflow)
        admin.create_experiment(cfg.run.experiment)  # made by the admin: the jobs' user writes there by its grant
        mp.setenv("MLFLOW_TRACKING_USERNAME", JOBS[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", JOBS[1])
        result = train(cfg, dataclasses.replace(services, mlflow_uri=auth_mlflow))
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        assert result.model_version == 1 and admin.get_model_version("auth-cwru", "1").status == "READY"
        assert admin.get_registered_model("auth-cwru").tags["indai.member"] == "cwru-demo"
        assert admin.get_registered_model("auth-cwru").aliases == {"champion": "1"}
        assert admin.get_run(result.run_id).info.experiment_id == admin.get_experiment_by_name(cfg.run.experiment).experiment_id
    return result


def test_serving_user_reads_what_serve_reads_and_changes_nothing(auth_mlflow, registered, services, cwru_dataset, monkeypatch):
    """As indai-serve, do what the Serve app does with the model the admin registered (resolve the
    alias, list models and read their tags, download and load the model, predict) and what it must
    not (move an alias, retag the model's owner, delete a version, log into the run, write an
    artefact, manage users): 403, and nothing changed."""
    from mlflow.exceptions import MlflowException

    from indai.platform import datasets, registry
    from indai.platform.model_format import IndaiModel
    from indai.platform.storage import open_store
    from indai.serving.client import split_instances

    uri = auth_mlflow
    name, version, _ = cwru_dataset
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = _client(uri)
    tags = admin.get_registered_model("auth-cwru").tags

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", SERVE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SERVE[1])
    ref = registry.parse_model_ref("auth-cwru@champion")
    assert int(registry.resolve_version(uri, ref).version) == 1
    assert {"name": "auth-cwru", "aliases": {"champion": "1"}, "versions": [1], "member_tag": "cwru-demo"} in registry.list_models(uri)
    assert registry.client(uri).get_registered_model("auth-cwru").tags == tags
    folder, got = registry.download(uri, ref, Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{secrets.token_hex(4)}")
    model = IndaiModel.load(folder / "artifacts" / "indai_model")
    instances, labels = split_instances(open_store(services.store_uri), datasets.DatasetRef(name, version), "test")
    answers = model.predict(instances[:16])
    assert got == 1 and len(answers) == 16 and {a["label"] for a in answers} <= set(model.classes)
    assert sum(a["label"] == label for a, label in zip(answers, labels)) >= 12  # the trained model, not a random one

    serve = registry.client(uri)
    run_id = admin.get_model_version("auth-cwru", "1").run_id
    history = [(m.step, m.value) for m in admin.get_metric_history(run_id, "test_accuracy")]
    refused = {
        "move the alias": lambda: registry.label_alias(uri, "auth-cwru", 1, "production"),
        "retag the owner": lambda: serve.set_registered_model_tag("auth-cwru", "indai.member", "steel-a"),
        "delete the version": lambda: serve.delete_model_version("auth-cwru", "1"),
        "log into the run": lambda: serve.log_metric(run_id, "test_accuracy", 1.0),
    }
    for what, act in refused.items():
        with pytest.raises(MlflowException) as e:
            act()
        assert e.value.get_http_status_code() == 403, what
    experiment = admin.get_run(run_id).info.experiment_id
    for method, path, body in [
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run_id}/artifacts/evil.txt", None),
        ("POST", "/api/2.0/mlflow/users/create", {"username": "evil", "password": "evil-password-1"}),
        ("PATCH", "/api/2.0/mlflow/users/update-password", {"username": "admin", "password": "evil-password-1"}),
        ("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": "indai-serve", "is_admin": True}),
    ]:
        r = requests.request(method, f"{uri}{path}", json=body, data=None if body else b"evil", auth=SERVE, timeout=10)
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
    assert admin.get_registered_model("auth-cwru").tags == tags
    assert admin.get_registered_model("auth-cwru").aliases == {"champion": "1"}
    assert [v.version for v in admin.search_model_versions("name='auth-cwru'")] == ["1"]
    assert [(m.step, m.value) for m in admin.get_metric_history(run_id, "test_accuracy")] == history and history
    assert _user(uri, "indai-serve")["is_admin"] is False and _search(uri, ADMIN) == 200


def test_serves_build_waits_while_mlflow_refuses_its_user_then_finds_the_model(auth_mlflow, registered, monkeypatch):
    """The Serve app's build resolves its default model through `wait_for_model`: while the user it
    reads as does not exist yet (the hook Job that makes it runs after the upgrade), it tries again,
    and goes on once the user is made. A password that stays wrong fails after the wait, naming the
    user; a model that does not exist fails at once."""
    import threading
    import time

    from indai.platform import registry

    uri, late = auth_mlflow, ("indai-serve-late", "late-" + secrets.token_hex(12))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", late[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", late[1])
    said, got = [], {}
    ref = registry.parse_model_ref("auth-cwru@champion")
    waiter = threading.Thread(target=lambda: got.update(v=registry.wait_for_model(uri, ref, wait_s=120, log=said.append)))
    t0 = time.monotonic()
    waiter.start()
    wait("the build to be refused once", lambda: said, timeout=60, interval=0.2)
    assert said == [f"MLflow at {uri} refused the credentials of this process (user indai-serve-late) resolving model "
                    "auth-cwru@champion: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on the cluster, the "
                    "provision-mlflow hook Job makes the platform's MLflow users after each install and upgrade); trying "
                    "again for up to 120 s"]
    assert waiter.is_alive()
    mlflow_users.provision(uri, ADMIN, late, log=lambda _: None)  # (as the serving user, without the jobs')
    waiter.join(30)
    assert not waiter.is_alive() and int(got["v"].version) == 1 and time.monotonic() - t0 < 60

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-" + secrets.token_hex(12))
    t0 = time.monotonic()
    with pytest.raises(registry.RegistryRefused, match=r"\(user indai-serve-late\).* \(tried for 3 s\)$"):
        registry.wait_for_model(uri, ref, wait_s=3, log=lambda _: None)
    assert 3 <= time.monotonic() - t0 < 30
    # a member's call meanwhile, for a version the pool has not loaded yet: 503 (retried by clients),
    # without the serving account's details (aliases resolve from the platform database: no MLflow)
    import asyncio
    import tempfile

    from indai.serving.app import ModelPool, fetch_model_files

    pool = ModelPool.func_or_class({"mlflow_uri": uri})

    async def get_model(model_id: str):
        return fetch_model_files(uri, model_id, tempfile.mkdtemp(dir=pool._tmp.name))
    pool.get_model = get_model
    model, failed = asyncio.run(pool._loaded("auth-cwru/1"))
    assert model is None and failed["status"] == 503 and "indai-serve-late" not in failed["error"]
    assert failed["error"].startswith("the model registry refused the serving service's credentials: retry later")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", late[1])
    model, failed = asyncio.run(pool._loaded("auth-cwru/1"))
    assert failed is None and (model / "artifacts" / "indai_model").is_dir()
    t0 = time.monotonic()
    # MLflow's auth answers 403 for a model it cannot find, before looking: the message says both
    with pytest.raises(UserError, match=r"^model no-such-model@champion: MLflow at .* denied user indai-serve-late access to it: "
                                        r"either there is no registered model no-such-model \(`indai model ls` lists them\) or"):
        registry.wait_for_model(uri, registry.parse_model_ref("no-such-model@champion"), wait_s=120, log=lambda _: None)
    assert time.monotonic() - t0 < 20


def test_the_jobs_user_cannot_manage_users_nor_delete_what_others_made(auth_mlflow, registered, monkeypatch):
    """Researchers' code holds indai-jobs: it may promote and tag (EDIT), but not make itself or
    anyone an admin, change a password, grant itself more, nor delete a model the admin made."""
    from mlflow.exceptions import MlflowException

    from indai.platform import registry

    uri = auth_mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    _client(uri).create_registered_model("admin-made")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", JOBS[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", JOBS[1])
    registry.label_alias(uri, "auth-cwru", 1, "production")  # the label `indai model promote` sets (gateway pod)
    assert registry.resolve_version(uri, registry.parse_model_ref("auth-cwru@production")).version == "1"
    with pytest.raises(MlflowException) as e:
        _client(uri).delete_registered_model("admin-made")
    assert e.value.get_http_status_code() == 403
    for method, path, body in [
        ("POST", "/api/2.0/mlflow/users/create", {"username": "evil", "password": "evil-password-1"}),
        ("PATCH", "/api/2.0/mlflow/users/update-password", {"username": "admin", "password": "evil-password-1"}),
        ("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": "indai-jobs", "is_admin": True}),
        ("POST", "/api/3.0/mlflow/users/permissions/grant",
         {"username": "indai-serve", "resource_type": "registered_model", "resource_id": "*", "permission": "MANAGE"}),
    ]:
        r = requests.request(method, f"{uri}{path}", json=body, auth=JOBS, timeout=10)
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
    assert _user(uri, "indai-jobs")["is_admin"] is False and _search(uri, ADMIN) == 200
    assert _grants(uri, "indai-serve")[("registered_model", "*")] == "READ"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    assert _client(uri).get_registered_model("admin-made").name == "admin-made"


def test_a_job_mlflow_refuses_is_told_which_account_and_what_to_fix(auth_mlflow, registered, services, cwru_dataset, monkeypatch):
    """A job whose MLflow user has no grant on the experiment (403), or whose password is wrong (401:
    the hook Job has not run yet), stops before training with a message naming the account, not
    MLflow's "API request ... failed with error code 403 != 200"."""
    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    bare = ("no-grant", "no-grant-" + secrets.token_hex(8))
    r = requests.post(f"{auth_mlflow}/api/2.0/mlflow/users/create", json={"username": bare[0], "password": bare[1]},
                      auth=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    name, version, _ = cwru_dataset
    cfg = load_config(TrainConfig, REPO / "trainers" / "recipes" / "cwru_sensor.yaml",
                      [f"data.dataset={name}@{version}", "optim.epochs=1", "run.name=auth-refused", "run.launcher=local",
                       "run.progress=false"])
    settings = dataclasses.replace(services, mlflow_uri=auth_mlflow)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", bare[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", bare[1])
    assert cfg.run.experiment == "cwru-bearing"  # the admin made it (the `registered` fixture)
    with pytest.raises(UserError, match=r"^MLflow at .* denied user no-grant opening a run in experiment cwru-bearing: on the "
                                        r"cluster the provision-mlflow hook Job grants the jobs' user indai-jobs EDIT"):
        train(cfg, settings)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-" + secrets.token_hex(8))
    with pytest.raises(UserError, match=r"^MLflow at .* refused the credentials of this process \(user no-grant\) opening a "
                                        r"run in experiment cwru-bearing: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        train(cfg, settings)
    # `indai train --compare-scratch` opens a parent run of its own first
    from indai.trainers.compare import compare
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", bare[1])
    with pytest.raises(UserError, match=r"^MLflow at .* denied user no-grant opening the comparison's run in experiment "
                                        r"cwru-bearing: on the cluster the provision-mlflow hook Job grants"):
        compare(cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"scratch_overrides": ["model.sensor.width=8"]})}),
                settings, train_fn=lambda *a, **k: pytest.fail("trained although MLflow refused the comparison's run"))
