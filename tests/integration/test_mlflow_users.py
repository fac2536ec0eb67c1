"""MLflow with basic auth as the chart runs it (the image's `mlflow/start-server.sh` and
`mlflow/basic_auth.ini`, here on SQLite): indai's training and registration through it with the
admin's account, as the jobs' cluster does, and the serving cluster's own user `indai-serve`
(platform/mlflow_users.py): it reads what Serve reads, and changes nothing."""
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory) -> str:
    """The MLflow server of the chart's image, basic auth on, on a free loopback port."""
    folder = tmp_path_factory.mktemp("mlflow-auth")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", TMPDIR=str(folder),
               MLFLOW_APP_NAME="basic-auth", MLFLOW_AUTH_CONFIG_PATH=str(REPO / "mlflow" / "basic_auth.ini"),
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


def test_provisioning_makes_a_user_that_is_no_admin_again_and_again(auth_mlflow):
    uri, said = auth_mlflow, []
    mlflow_users.provision(uri, ADMIN, SERVE, log=said.append)
    mlflow_users.provision(uri, ADMIN, SERVE, log=said.append)  # the hook Job runs at every upgrade
    assert said == ["MLflow user indai-serve: made", "MLflow user indai-serve: up to date"]
    assert _user(uri, "indai-serve")["is_admin"] is False and _search(uri, SERVE) == 200
    assert _search(uri, None) == 401

    # made an admin by hand: the next run takes it back
    r = requests.patch(f"{uri}/api/2.0/mlflow/users/update-admin", json={"username": "indai-serve", "is_admin": True},
                       auth=ADMIN, timeout=10)
    assert r.status_code == 200 and _user(uri, "indai-serve")["is_admin"] is True
    said.clear()
    mlflow_users.provision(uri, ADMIN, SERVE, log=said.append)
    assert said == ["MLflow user indai-serve: was an admin; no longer", "MLflow user indai-serve: up to date"]
    assert _user(uri, "indai-serve")["is_admin"] is False

    # a new secret in the release Secret: the old password stops working
    rotated = (SERVE[0], "rotated-" + secrets.token_hex(12))
    mlflow_users.provision(uri, ADMIN, rotated, log=said.append)
    assert _search(uri, SERVE) == 401 and _search(uri, rotated) == 200
    mlflow_users.provision(uri, ADMIN, SERVE, log=said.append)
    assert _search(uri, SERVE) == 200


@pytest.mark.parametrize("admin, serve, wait_s, message", [
    (("admin", "not-the-password"), SERVE, 5, "refused the admin's credentials: check mlflowAdminPassword"),
    (SERVE, ("indai-serve-2", "another-password-1"), 5, "the account given as admin is not an MLflow admin"),
    (ADMIN, ("admin", "another-password-1"), 5, "must be a user of its own, not the admin 'admin'"),
    (ADMIN, ("indai-serve", "short"), 5, "has 5 characters; MLflow requires at least 12"),
], ids=["wrong admin password", "not an admin", "the admin itself", "short password"])
def test_bad_credentials_are_refused_with_what_to_fix(auth_mlflow, admin, serve, wait_s, message):
    mlflow_users.provision(auth_mlflow, ADMIN, SERVE, log=lambda _: None)
    with pytest.raises(UserError, match=message):
        mlflow_users.provision(auth_mlflow, admin, serve, wait_s=wait_s, log=lambda _: None)
    assert "indai-serve-2" not in requests.get(f"{auth_mlflow}/api/2.0/mlflow/users/list", auth=ADMIN, timeout=10).text


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
    its admin, the account of the jobs' cluster: indai's whole registration path under basic auth."""
    from mlflow.tracking import MlflowClient

    from indai.platform.config import load_config
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    name, version, _ = cwru_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        cfg = load_config(TrainConfig, REPO / "trainers" / "recipes" / "cwru_sensor.yaml",
                          [f"data.dataset={name}@{version}", "optim.epochs=1", "run.name=auth-cwru", "run.launcher=local",
                           "run.register_as=auth-cwru", "run.alias=champion", "run.progress=false"])
        result = train(cfg, dataclasses.replace(services, mlflow_uri=auth_mlflow))
        admin = MlflowClient(auth_mlflow)
        assert result.model_version == 1 and admin.get_model_version("auth-cwru", "1").status == "READY"
        assert admin.get_registered_model("auth-cwru").tags["indai.member"] == "cwru-demo"
    return result


def test_serving_user_reads_what_serve_reads_and_changes_nothing(auth_mlflow, registered, services, cwru_dataset, monkeypatch):
    """As indai-serve, do what the Serve app does with the model the admin registered (resolve the
    alias, list models and read their tags, download and load the model, predict) and what it must
    not (move an alias, retag the model's owner, delete a version, log into the run, write an
    artefact, manage users): 403, and nothing changed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from indai.platform import datasets, registry
    from indai.platform.model_format import IndaiModel
    from indai.platform.storage import open_store
    from indai.serving.client import split_instances

    uri = auth_mlflow
    mlflow_users.provision(uri, ADMIN, SERVE, log=lambda _: None)
    name, version, _ = cwru_dataset
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = MlflowClient(uri)
    tags = admin.get_registered_model("auth-cwru").tags

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", SERVE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SERVE[1])
    ref = registry.parse_model_ref("auth-cwru@champion")
    assert int(registry.resolve_version(uri, ref).version) == 1
    assert {"name": "auth-cwru", "aliases": {"champion": "1"}, "versions": [1]} in registry.list_models(uri)
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
        "move the alias": lambda: registry.promote(uri, "auth-cwru", 1, "production"),
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
    assert said == [f"MLflow at {uri} refused the credentials of this process (user indai-serve-late): check "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; trying again for up to 120 s (on the cluster, "
                    "the provision-mlflow hook Job makes the serving cluster's user after each install and upgrade)"]
    assert waiter.is_alive()
    mlflow_users.provision(uri, ADMIN, late, log=lambda _: None)
    waiter.join(30)
    assert not waiter.is_alive() and int(got["v"].version) == 1 and time.monotonic() - t0 < 60

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-" + secrets.token_hex(12))
    t0 = time.monotonic()
    with pytest.raises(registry.RegistryRefused, match=r"\(user indai-serve-late\).* \(tried for 3 s\)$"):
        registry.wait_for_model(uri, ref, wait_s=3, log=lambda _: None)
    assert 3 <= time.monotonic() - t0 < 30
    # a member's call meanwhile: 503 (retried by clients), without the serving account's details
    import types

    from indai.serving.app import Ingress, Refused, ServeArgs
    ingress = types.SimpleNamespace(args=ServeArgs(mlflow_uri=uri), _versions={})
    with pytest.raises(Refused) as refused:
        Ingress.func_or_class._version(ingress, "auth-cwru@champion")
    assert refused.value.status == 503 and "indai-serve-late" not in refused.value.detail
    assert refused.value.detail.startswith("the model registry refused the serving service's credentials: retry later")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", late[1])
    assert Ingress.func_or_class._version(ingress, "auth-cwru@champion") == ("auth-cwru", 1)
    t0 = time.monotonic()
    # MLflow's auth answers 403 for a model it cannot find, before looking: the message says both
    with pytest.raises(UserError, match=r"^model no-such-model@champion: MLflow at .* denied user indai-serve-late access to it: "
                                        r"either there is no registered model no-such-model \(`indai model ls` lists them\) or"):
        registry.wait_for_model(uri, registry.parse_model_ref("no-such-model@champion"), wait_s=120, log=lambda _: None)
    assert time.monotonic() - t0 < 20
