"""The job gateway in front of a real Ray job server: the stock `ray job submit` CLI and
JobSubmissionClient work through it with a bearer token; members are isolated; quotas,
revocation and hostile bodies are refused; everything is audited."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(services, tmp_path_factory):
    from servers import app_server

    from indai.platform import db, services as svc, tenancy
    from indai.platform.gateway import Limits, build_gateway

    eng = db.engine(f"sqlite:///{tmp_path_factory.mktemp('gw') / 'platform.db'}")
    db.upgrade(eng)
    tenancy.add_member(eng, "steel-a", "Steel A", "steel", "demand")
    tenancy.add_member(eng, "auto-b", "Auto B", "automotive", "demand")
    for user, member, role in (("kim", "steel-a", "researcher"), ("lee", "auto-b", "researcher"),
                               ("park", "steel-a", "consumer"), ("root", "steel-a", "admin")):
        tenancy.add_user(eng, user, member, role)
    tokens = {u: tenancy.create_token(eng, u) for u in ("kim", "lee", "park", "root")}
    state = svc.read_services()
    ray_token = Path(state["ray_auth_token_path"]).read_text().strip()
    from indai.platform.storage import open_store

    app = build_gateway(state["ray_dashboard"], eng, Limits(concurrent_jobs=2, gpus_per_job=1), ray_token=ray_token,
                        store=open_store(services.store_uri), mlflow_uri=services.mlflow_uri)
    with app_server(app) as url:
        yield url, eng, {u: t for u, (_, t) in tokens.items()}, {u: i for u, (i, _) in tokens.items()}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def client(url: str, token: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers=bearer(token))


def wait_done(c, sid: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(c.get_job_status(sid))
        if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status.split(".")[-1]
        time.sleep(0.5)
    raise AssertionError(f"job {sid} did not finish")


def test_stock_ray_cli_submits_through_the_gateway(gateway, tmp_path):
    """With a working_dir: the CLI checks the package, uploads it and submits, all through the gateway."""
    url, eng, tokens, _ = gateway
    ray = Path(sys.executable).parent / "ray"
    (tmp_path / "hello.py").write_text("print('hello from steel-a')\n")
    done = subprocess.run([str(ray), "job", "submit", "--address", url, "--headers", json.dumps(bearer(tokens["kim"])),
                           "--submission-id", "kim-hello", "--working-dir", str(tmp_path), "--", "python", "hello.py"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "hello from steel-a" in done.stdout  # followed the logs through the gateway's websocket
    c = client(url, tokens["kim"])
    assert wait_done(c, "kim-hello") == "SUCCEEDED"
    info = c.get_job_info("kim-hello")
    assert info.metadata["indai.member"] == "steel-a" and info.metadata["indai.user"] == "kim"


def test_a_researcher_promotes_versions_of_its_members_models_only(gateway, services, tmp_path, capsys):
    """`POST /api/indai/models/{name}/promote`: what members are served, decided by the owner's
    researchers (scope models:promote) or an admin, never by another member or a consumer."""
    from mlflow.tracking import MlflowClient
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indai.platform import db, promotion, tenancy

    url, eng, tokens, _ = gateway
    c = MlflowClient(tracking_uri=services.mlflow_uri, registry_uri=services.mlflow_uri)
    experiment = c.create_experiment("gw-promotions")
    for name in ("gw-steel", "gw-auto", "gw-nobody"):  # one small file each, logged by a run as a job logs its model
        c.create_registered_model(name)
        (tmp_path / name).mkdir()
        (tmp_path / name / "MLmodel").write_text(f"name: {name}\n")
        run = c.create_run(experiment)
        c.log_artifacts(run.info.run_id, str(tmp_path / name), artifact_path="model")
        c.set_terminated(run.info.run_id)
        c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    tenancy.set_model_access(eng, "gw-steel", "steel-a")
    tenancy.set_model_access(eng, "gw-auto", "auto-b")

    def promote(user: str, name: str, body) -> requests.Response:
        return requests.post(f"{url}/api/indai/models/{name}/promote", headers=bearer(tokens[user]), timeout=60,
                             data=body if isinstance(body, str) else json.dumps(body))

    r = promote("kim", "gw-steel", {"version": 1, "alias": "champion"})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("model", "alias", "version", "previous", "files")} == {
        "model": "gw-steel", "alias": "champion", "version": 1, "previous": None, "files": 1}
    assert promotion.alias_version(eng, "gw-steel", "champion") == 1
    assert promotion.version_digest(eng, "gw-steel", 1) == r.json()["sha256"]
    assert c.get_model_version_by_alias("gw-steel", "champion").version == "1"  # (the registry's label)

    for user, name, status, says in (
            ("lee", "gw-steel", 403, "member auto-b does not own model gw-steel"),
            ("kim", "gw-auto", 403, "member steel-a does not own model gw-auto"),
            ("kim", "gw-nobody", 403, "member steel-a does not own model gw-nobody"),
            ("park", "gw-steel", 403, "'models:promote' scope"),
            ("kim", "gw..steel", 400, "model name 'gw..steel' is not valid")):
        r = promote(user, name, {"version": 1, "alias": "production"})
        assert r.status_code == status and says in r.text, (user, name, r.status_code, r.text)
    for body, says in (({"version": 0}, "field version: Input should be greater than or equal to 1"),
                       ({"version": 1, "alias": "Prod"}, "alias 'Prod' is not valid"),
                       ({"version": 1, "owner": "auto-b"}, "field owner: Extra inputs are not permitted"),
                       ("{nope", "field (body)")):
        r = promote("kim", "gw-steel", body)
        assert r.status_code == 400 and says in r.json()["detail"], (body, r.text)
    r = promote("kim", "gw-steel", {"version": 7})
    assert (r.status_code, r.json()["detail"]) == (404, "model gw-steel has no version 7 in the registry")
    assert promotion.promoted_aliases(eng) == {"gw-steel": {"champion": 1}}  # nothing else was promoted

    # an admin's token may promote any member's model
    r = promote("root", "gw-auto", {"version": 1})
    assert r.status_code == 200 and promotion.alias_version(eng, "gw-auto", "champion") == 1
    with Session(eng) as s:
        rows = [(a.user_id, a.member_id, a.target, a.status) for a in s.scalars(
            select(db.Audit).where(db.Audit.action == "model.promote").order_by(db.Audit.id))]
    assert rows[0] == ("kim", "steel-a", "gw-steel@champion", 200) and rows[-1] == ("root", "steel-a", "gw-auto@champion", 200)
    assert ("lee", "auto-b", "gw-steel@production", 403) in rows

    # the researcher's CLI: `indai model promote ... --gateway`
    from indai.platform import cli

    capsys.readouterr()  # (what MLflow's client printed above)
    assert cli.main(["model", "promote", "gw-steel/1", "--alias", "staging", "--gateway", url, "--token", tokens["kim"]]) == 0
    assert promotion.alias_version(eng, "gw-steel", "staging") == 1
    assert re.match(r"gw-steel@staging -> version 1; files sha256 [0-9a-f]{16}", capsys.readouterr().out)
    assert cli.main(["model", "promote", "gw-auto/1", "--alias", "staging", "--gateway", url, "--token", tokens["kim"]]) == 2
    assert capsys.readouterr().err == ("indai: error: the job gateway refused the promotion (403): member steel-a does not own "
                                       "model gw-auto: only its owner's researchers, or an admin, may promote it (an admin "
                                       "records the owner with `indai model share`)\n")


def test_another_member_cannot_see_read_or_stop(gateway):
    url, eng, tokens, _ = gateway
    kim, lee = client(url, tokens["kim"]), client(url, tokens["lee"])
    sid = kim.submit_job(entrypoint="python -c \"import time; time.sleep(30)\"", submission_id="kim-sleep")
    assert all(j.submission_id != sid for j in lee.list_jobs())
    for method, path in (("GET", f"/api/jobs/{sid}"), ("GET", f"/api/jobs/{sid}/logs"), ("POST", f"/api/jobs/{sid}/stop"),
                         ("DELETE", f"/api/jobs/{sid}")):
        r = requests.request(method, f"{url}{path}", headers=bearer(tokens["lee"]), timeout=30)
        assert r.status_code == 404, (method, path, r.text)
    assert str(kim.get_job_status(sid)).split(".")[-1] in ("PENDING", "RUNNING")
    admin = client(url, tokens["root"])
    assert any(j.submission_id == sid for j in admin.list_jobs())
    assert kim.stop_job(sid)
    assert wait_done(kim, sid) == "STOPPED"


def test_jobs_run_with_the_hub_switched_off(gateway):
    """Every job gets the offline settings, whatever it asks for: weights come from the mirror."""
    url, eng, tokens, _ = gateway
    kim = client(url, tokens["kim"])
    show = "import os; print('hub', os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))"
    sid = kim.submit_job(entrypoint=f'python -c "{show}"', runtime_env={"env_vars": {"HF_HUB_OFFLINE": "0"}})
    assert wait_done(kim, sid) == "SUCCEEDED"
    assert "hub 1 1" in kim.get_job_logs(sid)


def test_consumers_submit_nothing_and_tokens_are_checked(gateway):
    url, eng, tokens, ids = gateway
    from indai.platform import tenancy

    r = requests.post(f"{url}/api/jobs/", json={"entrypoint": "echo hi"}, headers=bearer(tokens["park"]), timeout=30)
    assert r.status_code == 403 and "may not submit" in r.json()["detail"]
    assert requests.get(f"{url}/api/jobs/", timeout=30).status_code == 401
    assert requests.get(f"{url}/api/jobs/", headers=bearer("indai_0000000000000000_" + "x" * 43), timeout=30).status_code == 401
    _, extra = tenancy.create_token(eng, "lee", "to-revoke")
    assert requests.get(f"{url}/api/jobs/", headers=bearer(extra), timeout=30).status_code == 200
    tenancy.revoke_token(eng, extra.split("_")[1])
    r = requests.get(f"{url}/api/jobs/", headers=bearer(extra), timeout=30)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


@pytest.mark.parametrize("body,needle", [
    ({"entrypoint": "echo", "runtime_env": {"pip": ["--index-url=http://evil/simple", "x"]}}, "runtime_env.pip"),
    ({"entrypoint": "echo", "runtime_env": {"working_dir": "/etc"}}, "runtime_env.working_dir"),
    ({"entrypoint": "echo", "runtime_env": {"working_dir": "gcs://../../x.zip"}}, "runtime_env.working_dir"),
    ({"entrypoint": "echo", "runtime_env": {"py_modules": ["/home"]}}, "runtime_env.py_modules"),
    ({"entrypoint": "echo", "runtime_env": {"env_vars": {"LD_PRELOAD": "/tmp/x.so"}}}, "LD_PRELOAD"),
    ({"entrypoint": "echo", "unknown": 1}, "field unknown"),
    ({"entrypoint": 5}, "field entrypoint"),
    ({"entrypoint": "echo", "submission_id": "../x"}, "field submission_id"),
    ({"entrypoint": "echo", "job_id": "mine?0"}, "field job_id"),
    ({"entrypoint": "echo", "entrypoint_num_gpus": 2}, "at most 1 GPUs per job"),
])
def test_hostile_or_over_quota_submissions_change_nothing(gateway, body, needle):
    url, eng, tokens, _ = gateway
    before = requests.get(f"{url}/api/jobs/", headers=bearer(tokens["root"]), timeout=30).json()
    r = requests.post(f"{url}/api/jobs/", json=body, headers=bearer(tokens["kim"]), timeout=30)
    assert r.status_code in (400, 429) and needle in r.json()["detail"], r.text
    after = requests.get(f"{url}/api/jobs/", headers=bearer(tokens["root"]), timeout=30).json()
    assert len(after) == len(before)


def test_working_dir_packages_are_each_members_own(gateway, tmp_path):
    """Ray keeps working_dir packages in one namespace and its client skips the upload of a
    package that exists. Member auto-b uploads its own code under the very name steel-a's stock
    client computes for steel-a's folder (names are content hashes anyone can compute): steel-a's
    client must still upload its folder and run its own code. And auto-b cannot run a package
    only steel-a uploaded."""
    from ray._private.runtime_env.packaging import create_package
    from ray.job_submission import JobSubmissionClient

    from indai.platform import services as svc

    url, eng, tokens, _ = gateway
    mine, planted = tmp_path / "steel", tmp_path / "planted"
    mine.mkdir()
    planted.mkdir()
    (mine / "main.py").write_text("print('genuine steel-a code')\n")
    (planted / "main.py").write_text("print('PLANTED by auto-b')\n")

    class NameOnly(JobSubmissionClient):  # Ray's own client code computes the name, as steel-a's will
        def _package_exists(self, package_uri):
            self.names = [*getattr(self, "names", []), package_uri.removeprefix("gcs://")]
            return True

    spy = NameOnly(url, headers=bearer(tokens["lee"]))
    spy._upload_working_dir_if_needed({"working_dir": str(mine)})
    [name] = spy.names
    create_package(str(planted), tmp_path / "planted.zip", include_gitignore=True)
    r = requests.put(f"{url}/api/packages/gcs/{name}", data=(tmp_path / "planted.zip").read_bytes(),
                     headers=bearer(tokens["lee"]), timeout=60)
    assert r.status_code == 200, r.text

    kim = client(url, tokens["kim"])
    sid = kim.submit_job(entrypoint="python main.py", runtime_env={"working_dir": str(mine)})
    assert wait_done(kim, sid) == "SUCCEEDED"
    logs = kim.get_job_logs(sid)
    assert "genuine steel-a code" in logs and "PLANTED" not in logs, logs

    from indai.platform.gateway import member_package

    for token, exists in ((tokens["lee"], 200), (tokens["kim"], 200)):  # each sees its own upload under the name
        assert requests.get(f"{url}/api/packages/gcs/{name}", headers=bearer(token), timeout=30).status_code == exists
    assert requests.get(f"{url}/api/packages/gcs/{'_ray_pkg_' + '7' * 40 + '.zip'}", headers=bearer(tokens["kim"]),
                        timeout=30).status_code == 404
    upstream = f"gcs://{member_package('steel-a', name)}"
    assert kim.get_job_info(sid).runtime_env["working_dir"] == upstream  # what Ray ran: steel-a's own upload
    state = svc.read_services()
    ray_auth = {"X-Ray-Authorization": f"Bearer {Path(state['ray_auth_token_path']).read_text().strip()}"}
    for member in ("steel-a", "auto-b"):  # both uploads are in Ray, each under its member's name
        r = requests.get(f"{state['ray_dashboard']}/api/packages/gcs/{member_package(member, name)}", headers=ray_auth, timeout=30)
        assert r.status_code == 200, (member, r.text)

    only_steel = "_ray_pkg_" + "5" * 40 + ".zip"
    r = requests.put(f"{url}/api/packages/gcs/{only_steel}", data=(tmp_path / "planted.zip").read_bytes(),
                     headers=bearer(tokens["kim"]), timeout=60)
    assert r.status_code == 200, r.text
    r = requests.post(f"{url}/api/jobs/", json={"entrypoint": "python main.py", "runtime_env": {"working_dir": f"gcs://{only_steel}"}},
                      headers=bearer(tokens["lee"]), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == (f"submission refused: working_dir package gcs://{only_steel} was not uploaded by member auto-b: "
                                  "upload it through this gateway first (ray job submit and JobSubmissionClient do so when "
                                  "runtime_env.working_dir is a local folder)")


def test_scopes_decide_what_a_token_may_do(gateway):
    """jobs:read to list, read and tail; jobs:submit to submit, stop and delete; every member's
    jobs only with the admin scope. An admin's token narrowed to the job scopes acts, and its
    jobs run, as a researcher of the admin's member; one narrowed to models:predict, like a
    consumer's token, gets 403 even on its own member's job."""
    from indai.platform import tenancy

    url, eng, tokens, _ = gateway
    jobs_root = tenancy.create_token(eng, "root", "jobs-only", scopes=["jobs:submit", "jobs:read"])[1]
    predict_root = tenancy.create_token(eng, "root", "predict-only", scopes=["models:predict"])[1]
    reader_kim = tenancy.create_token(eng, "kim", "read-only", scopes=["jobs:read"])[1]
    show = "import os; print('role', os.environ['INDAI_JOB_ROLE'])"
    root = client(url, jobs_root)
    ours = root.submit_job(entrypoint=f'python -c "{show}"')
    theirs = client(url, tokens["lee"]).submit_job(entrypoint="python -c \"print('auto-b')\"")
    assert wait_done(root, ours) == "SUCCEEDED"

    for who, token in (("consumer", tokens["park"]), ("admin narrowed to models:predict", predict_root)):
        for method, path, scope in (("GET", "/api/jobs/", "jobs:read"), ("GET", f"/api/jobs/{ours}", "jobs:read"),
                                    ("GET", f"/api/jobs/{ours}/logs", "jobs:read"), ("POST", f"/api/jobs/{ours}/stop", "jobs:submit"),
                                    ("DELETE", f"/api/jobs/{ours}", "jobs:submit")):
            r = requests.request(method, f"{url}{path}", headers=bearer(token), timeout=30)
            assert r.status_code == 403 and f"lacks scope '{scope}'" in r.json()["detail"], (who, method, path, r.status_code, r.text)
    assert "role researcher" in root.get_job_logs(ours)  # so indai's dataset reader treats it as steel-a's
    assert requests.get(f"{url}/api/jobs/{theirs}", headers=bearer(jobs_root), timeout=30).status_code == 404
    assert all(j.submission_id != theirs for j in root.list_jobs())
    r = requests.get(f"{url}/api/jobs/{ours}/logs", headers=bearer(reader_kim), timeout=30)
    assert r.status_code == 200 and "role researcher" in r.json()["logs"]
    r = requests.delete(f"{url}/api/jobs/{ours}", headers=bearer(reader_kim), timeout=30)
    assert r.status_code == 403 and "lacks scope 'jobs:submit'" in r.json()["detail"]
    full_admin = client(url, tokens["root"])
    assert full_admin.get_job_info(theirs).metadata["indai.member"] == "auto-b"  # the admin scope sees every member's jobs
    assert wait_done(full_admin, theirs) == "SUCCEEDED"


def test_oversized_and_malformed_bodies(gateway):
    url, eng, tokens, _ = gateway
    r = requests.post(f"{url}/api/jobs/", data=b"x" * (2 * 1024 * 1024), headers=bearer(tokens["kim"]), timeout=30)
    assert r.status_code == 413
    r = requests.post(f"{url}/api/jobs/", data=b"{not json", headers=bearer(tokens["kim"]), timeout=30)
    assert r.status_code == 400
    r = requests.put(f"{url}/api/packages/file/..%2F..%2Fetc", data=b"x", headers=bearer(tokens["kim"]), timeout=30)
    assert r.status_code in (400, 404)


def test_concurrent_jobs_quota_names_the_limit(gateway):
    url, eng, tokens, _ = gateway
    lee = client(url, tokens["lee"])
    sids = [lee.submit_job(entrypoint="python -c \"import time; time.sleep(60)\"") for _ in range(2)]
    r = requests.post(f"{url}/api/jobs/", json={"entrypoint": "echo third"}, headers=bearer(tokens["lee"]), timeout=30)
    assert r.status_code == 429 and "limit 2 at a time" in r.json()["detail"]
    for sid in sids:
        lee.stop_job(sid)
    assert all(wait_done(lee, sid) == "STOPPED" for sid in sids)


def test_every_decision_is_audited(gateway):
    url, eng, tokens, _ = gateway
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indai.platform.db import Audit

    with Session(eng) as s:
        rows = s.execute(select(Audit.user_id, Audit.action, Audit.status)).all()
    assert ("kim", "submit", 200) in rows and ("park", "submit", 403) in rows
    assert any(r.status == 401 and r.user_id is None for r in rows)
    assert ("kim", "submit", 429) in rows and ("kim", "stop", 200) in rows


def test_ray_job_port_itself_refuses_without_ray_token(gateway, services):
    """Ray runs with token authentication: the gateway is the only way to its job API."""
    from indai.platform import services as svc

    state = svc.read_services()
    dashboard = state["ray_dashboard"]
    assert requests.get(f"{dashboard}/api/jobs/", timeout=30).status_code == 401
    r = requests.post(f"{dashboard}/api/jobs/", json={"entrypoint": "echo pwned"}, timeout=30)
    assert r.status_code == 401
    url, eng, tokens, _ = gateway
    # a member's indai token is not Ray's token either
    assert requests.get(f"{dashboard}/api/jobs/", headers=bearer(tokens["root"]), timeout=30).status_code == 403
    assert requests.get(f"{url}/api/jobs/", headers=bearer(tokens["root"]), timeout=30).status_code == 200


def test_gpu_hours_quota(gateway, services):
    """A member over its monthly GPU-hours is refused GPU jobs (CPU jobs still pass)."""
    from indai.platform import services as svc
    from indai.platform.gateway import Limits, build_gateway
    from fastapi.testclient import TestClient

    url, eng, tokens, _ = gateway
    state = svc.read_services()
    tight = build_gateway(state["ray_dashboard"], eng, Limits(concurrent_jobs=10, gpus_per_job=1, gpu_hours_per_month=0.0),
                          ray_token=Path(state["ray_auth_token_path"]).read_text().strip())
    from indai.platform.db import Job, utcnow
    from sqlalchemy.orm import Session

    kim = client(url, tokens["kim"])
    sid = kim.submit_job(entrypoint="python -c \"print(1)\"")
    assert wait_done(kim, sid) == "SUCCEEDED"
    with Session(eng) as s, s.begin():  # count that finished job as a 1-GPU job
        s.get(Job, sid).gpus = 1.0
    with TestClient(tight) as tc:
        r = tc.post("/api/jobs/", json={"entrypoint": "echo", "entrypoint_num_gpus": 1}, headers=bearer(tokens["kim"]))
        assert r.status_code == 429 and "GPU-hours this month" in r.json()["detail"]
        ok = tc.post("/api/jobs/", json={"entrypoint": "echo cpu only"}, headers=bearer(tokens["kim"]))
        assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def steel_dataset(services, tmp_path_factory, repo):
    """Raw data of member steel-a (two CWRU recordings) in the platform's store."""
    import shutil

    import yaml

    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store

    folder = tmp_path_factory.mktemp("steel-data")
    spec = yaml.safe_load((repo / "examples" / "cwru-0hp" / "dataset.yaml").read_text())
    spec.update(name="steel-bearings", member="steel-a")
    spec["sources"] = [s for s in spec["sources"] if s["label"] in ("normal", "ir_021")]
    for s in spec["sources"]:
        shutil.copy(repo / "examples" / "cwru-0hp" / s["path"], folder / s["path"])
    (folder / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return ingest(folder / "dataset.yaml", open_store(services.store_uri), progress=False)


def run_indai(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    import os

    exe = Path(sys.executable).parent / "indai"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def test_train_submit_follows_the_job_and_names_the_model(gateway, steel_dataset, repo):
    url, _, tokens, _ = gateway
    name, version, _ = steel_dataset
    done = run_indai(["train", "submit", str(repo / "trainers" / "recipes" / "cwru_sensor.yaml"), "--member", "steel-a",
                      f"data.dataset={name}@{version}", "optim.epochs=2", "run.workers=1", "run.name=steel-submit",
                      "run.register_as=steel-bearing", "run.log_every=5"],
                     {"INDAI_GATEWAY": url, "INDAI_TOKEN": tokens["kim"]})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted job" in done.stderr and "(member steel-a)" in done.stderr
    assert "training" in done.stderr and "epoch=2/2" in done.stderr  # the bar, fed by the loop's progress lines
    out = done.stdout + done.stderr
    assert out.count("epoch 1/2: loss") == 1, out[-3000:]  # each line of the workers once (Ray Train's print patch is off)
    line = done.stdout.strip().splitlines()[-1]
    assert "SUCCEEDED: MLflow run" in line and f"dataset {name}@{version}" in line and "registered steel-bearing version 1" in line
    acc = float(line.split("test accuracy ")[1].split(",")[0])
    assert acc > 0.9  # normal vs the largest inner-race fault is easy


def test_datasets_a_member_may_not_read_are_refused(gateway, steel_dataset, services, repo):
    """Declared in the submission: refused by the gateway; read anyway inside the job: refused
    by the reader, which sees the job's member; after a release: readable by everyone."""
    from indai.platform import datasets, release
    from indai.platform.settings import member_secret
    from indai.platform.storage import open_store

    url, _, tokens, _ = gateway
    name, version, _ = steel_dataset
    done = run_indai(["train", "submit", str(repo / "trainers" / "recipes" / "cwru_sensor.yaml"), f"data.dataset={name}@{version}"],
                     {"INDAI_GATEWAY": url, "INDAI_TOKEN": tokens["lee"]}, timeout=120)
    assert done.returncode == 2 and "raw data of member 'steel-a'" in done.stderr, done.stderr[-2000:]
    c = client(url, tokens["lee"])
    with pytest.raises(Exception, match="raw data of member"):
        c.submit_job(entrypoint="python -c 'print(1)'", metadata={"indai.datasets": f"{name}@{version}"})
    sneaky = ("python -c \"from indai.platform import datasets, settings, storage; "
              "s = storage.open_store(settings.load_settings().store_uri); "
              f"datasets.open_for_job(s, datasets.parse_ref('{name}@{version}')); print('READ' + ' IT')\"")
    sid = c.submit_job(entrypoint=sneaky)
    assert wait_done(c, sid) == "FAILED"
    logs = c.get_job_logs(sid)
    assert "READ IT" not in logs and "raw data of member 'steel-a'" in logs
    with pytest.raises(RuntimeError, match="may not be set"):
        c.submit_job(entrypoint="python -c 'print(1)'", runtime_env={"env_vars": {"INDAI_JOB_MEMBER": "steel-a"}})
    store = open_store(services.store_uri)
    rel, rv, _ = release.release(store, datasets.DatasetRef(name, version), member_secret("steel-a"), progress=False)
    sid = c.submit_job(entrypoint="python -c 'print(1)'", metadata={"indai.datasets": f"{rel}@{rv}"})
    assert wait_done(c, sid) == "SUCCEEDED"
