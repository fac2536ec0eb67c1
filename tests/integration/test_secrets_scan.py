"""No secret leaks out of a full demo run: `indai demo` in its own INDAI_HOME, with its own Ray
and MLflow, on PostgreSQL (a password in the database URL) and a MinIO store (access and
secret keys), followed by gateway traffic: a member's job submitted through `indai gateway
serve` (a dataset release, so the member's de-identification key is used), refused and
unauthenticated calls, and both front doors answering while the database is down.

Every secret the run created or used is then looked for, whole and as a 16-character prefix,
plus anything shaped like an API token: in every file below INDAI_HOME (MLflow's server log
and database, the gateway's log, reports, Ray Train's results, the artefacts), in Ray's whole
temp dir (session logs, job logs, runtime_env packages, exported events), in every object of
the store, in MLflow's experiments, runs (params, tags, metric names), logged and registered
models and their versions, in Ray's records of every job (metadata, entrypoint, runtime_env)
and of the Serve application, and in every error body of the gateway and the Serve ingress.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from secret_scan import TOKEN_SHAPE, SecretScan
from waiting import wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(720)]

INDAI = str(Path(sys.executable).parent / "indai")
BUCKET_URI = "s3://indai-secrets/consortium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, postgres, minio, repo):
    """`indai demo` in a fresh INDAI_HOME on PostgreSQL and MinIO, then `indai gateway serve`
    in front of its Ray with its log in $INDAI_HOME/logs; everything stopped afterwards."""
    home = tmp_path_factory.mktemp("secrets-home")
    database_url = postgres.new_database("t_secrets")
    base = {k: v for k, v in os.environ.items()
            if k not in ("INDAI_MLFLOW_URI", "INDAI_RAY_ADDRESS", "INDAI_SERVE_URL", "INDAI_SECRETS_DIR", "INDAI_GATEWAY", "INDAI_TOKEN")}
    env = {**base, "INDAI_HOME": str(home), "INDAI_DB_URL": database_url,
           "INDAI_STORE_URI": BUCKET_URI, "INDAI_S3_ENDPOINT": minio.endpoint, "INDAI_S3_ACCESS_KEY": minio.access_key,
           "INDAI_S3_SECRET_KEY": minio.secret_key, "INDAI_S3_SECURE": "0"}
    gateway = None
    try:
        run = subprocess.run([INDAI, "demo", "--min-accuracy", "0.9", "optim.epochs=2"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        (home / "logs").mkdir()
        port = free_port()
        log = open(home / "logs" / "gateway.log", "wb")
        gateway = subprocess.Popen([INDAI, "gateway", "serve", "--port", str(port)], cwd=repo, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert gateway.poll() is None, (home / "logs" / "gateway.log").read_text()[-2000:]
            try:
                return requests.get(f"{url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait("the job gateway", up, timeout=120)
        yield {"home": home, "env": env, "run": run, "gateway": url, "db_url": env["INDAI_DB_URL"]}
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        state = json.loads((home / "services.json").read_text()) if (home / "services.json").exists() else {}
        subprocess.run([INDAI, "down"], env=env, capture_output=True, timeout=180)
        if state.get("ray_temp_dir", "").startswith("/tmp/indai-ray-"):
            shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def gateway_traffic(demo: dict, postgres, scan: SecretScan) -> list[dict]:
    """A member's release job through the gateway, then the refusals; every answer is kept."""
    from ray.job_submission import JobSubmissionClient

    from indai.platform import db, tenancy

    eng = db.engine(demo["db_url"])
    tenancy.add_member(eng, "cwru-demo", "CWRU demo", "other", "research")
    tenancy.add_user(eng, "cw-researcher", "cwru-demo", "researcher")
    tenancy.add_user(eng, "cw-viewer", "cwru-demo", "consumer")
    tokens = {"researcher": tenancy.create_token(eng, "cw-researcher")[1], "consumer": tenancy.create_token(eng, "cw-viewer")[1]}
    revoked_id, tokens["revoked"] = tenancy.create_token(eng, "cw-researcher", "to-revoke")
    tenancy.revoke_token(eng, revoked_id)
    tokens["unseen"] = tenancy.create_token(eng, "cw-researcher", "first used while the database is down")[1]
    eng.dispose()
    for name, token in tokens.items():
        scan.add(f"{name} token", token)
        scan.add(f"{name} token's secret", token.split("_", 2)[2])
    forged = tokens["researcher"][:-6] + "AAAAAA"
    url, gw_bodies = demo["gateway"], []

    dataset = _demo_dataset(demo)
    client = JobSubmissionClient(url, headers={**bearer(tokens["researcher"]), "Idempotency-Key": str(uuid.uuid4())})
    sid = client.submit_job(entrypoint=f"indai data release {dataset} --quiet", metadata={"indai.datasets": dataset},
                            runtime_env={"env_vars": {"INDAI_LOG_NOTE": "release through the gateway"}})
    wait(f"release job {sid}", lambda: str(client.get_job_status(sid)).split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"),
         timeout=240, interval=1)
    logs = client.get_job_logs(sid)
    assert str(client.get_job_status(sid)).endswith("SUCCEEDED") and "released" in logs, logs[-2000:]
    scan.scan_record(f"gateway: logs of job {sid}", logs)
    # a member's job prints the environment it runs with (all but the store's credentials, which
    # jobs need to read their data): the platform database's URL must not be in it
    show_env = "import os; print(sorted((k, v) for k, v in os.environ.items() if not k.startswith('INDAI_S3_')))"
    plain = JobSubmissionClient(url, headers=bearer(tokens["researcher"]))
    env_job = plain.submit_job(entrypoint=f'python -c "{show_env}"')
    wait(f"job {env_job}", lambda: str(plain.get_job_status(env_job)).split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"),
         timeout=120, interval=1)
    env_logs = plain.get_job_logs(env_job)
    assert "INDAI_JOB_MEMBER" in env_logs, env_logs[-2000:]
    scan.scan_record(f"gateway: environment of job {env_job}", env_logs)

    def keep(what: str, r: requests.Response, status: int) -> None:
        assert r.status_code == status, (what, r.status_code, r.text)
        gw_bodies.append({"what": what, "status": r.status_code, "body": r.text, "headers": dict(r.headers)})

    jobs = f"{url}/api/jobs/"
    keep("gateway: no token", requests.get(jobs, timeout=30), 401)
    keep("gateway: forged secret", requests.get(jobs, headers=bearer(forged), timeout=30), 401)
    keep("gateway: token in the wrong header", requests.get(jobs, headers={"Authorization": tokens["researcher"]}, timeout=30), 401)
    keep("gateway: revoked", requests.get(jobs, headers=bearer(tokens["revoked"]), timeout=30), 401)
    keep("gateway: consumer submits", requests.post(jobs, json={"entrypoint": "echo"}, headers=bearer(tokens["consumer"]), timeout=30), 403)
    keep("gateway: bad key", requests.post(jobs, json={"entrypoint": "echo"}, timeout=30,
                                           headers={**bearer(tokens["researcher"]), "Idempotency-Key": "x"}), 400)
    keep("gateway: someone else's job", requests.get(f"{jobs}raysubmit_0000000000000000", headers=bearer(tokens["researcher"]),
                                                     timeout=30), 404)
    keep("gateway: dataset not readable", requests.post(jobs, json={"entrypoint": "echo", "metadata": {"indai.datasets": "no-such@0"}},
                                                        headers=bearer(tokens["researcher"]), timeout=30), 403)
    serve = json.loads((demo["home"] / "services.json").read_text())["serve_url"]
    predict = f"{serve}/v1/predict"
    one = {"instances": [{"sensor": [[0.0] * 2] * 8}]}
    keep("ingress: forged secret", requests.post(predict, json=one, headers=bearer(forged), timeout=30), 401)
    keep("ingress: revoked", requests.post(predict, json=one, headers=bearer(tokens["revoked"]), timeout=30), 401)
    keep("ingress: no token", requests.post(predict, json=one, timeout=30), 401)
    postgres.stop()
    try:
        keep("gateway: database down", requests.get(jobs, headers=bearer(tokens["unseen"]), timeout=30), 503)
        keep("gateway: database down, submission", requests.post(jobs, json={"entrypoint": "echo"}, timeout=30,
                                                                  headers={**bearer(tokens["unseen"]), "Idempotency-Key": str(uuid.uuid4())}), 503)
        keep("ingress: database down", requests.post(predict, json=one, headers=bearer(tokens["unseen"]), timeout=30), 503)
    finally:
        postgres.start()
    return gw_bodies


def _demo_dataset(demo: dict) -> str:
    """name@version of the dataset the demo ingested, from its own output."""
    for line in demo["run"].stderr.splitlines():
        if line.strip().startswith("dataset ") and "windows" in line:
            return line.split()[1].rstrip(",")
    raise AssertionError("the demo did not name its dataset")


def mlflow_records(uri: str, scan: SecretScan) -> int:
    """Experiments, runs, logged models, registered models and versions: everything MLflow
    shows about them. Returns the number of runs."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    c = MlflowClient(uri, registry_uri=uri)  # the demo's registry, not a global one an earlier test set
    experiments = c.search_experiments(view_type=ViewType.ALL)
    runs = 0
    for e in experiments:
        scan.scan_record(f"MLflow experiment {e.name}", {"tags": e.tags, "location": e.artifact_location})
        for r in c.search_runs([e.experiment_id], run_view_type=ViewType.ALL, max_results=1000):
            runs += 1
            scan.scan_record(f"MLflow run {r.info.run_id} params/tags/metric names",
                             {"params": r.data.params, "tags": r.data.tags, "metrics": sorted(r.data.metrics),
                              "name": r.info.run_name, "artifact_uri": r.info.artifact_uri,
                              "inputs": [d.dataset.to_dictionary() if hasattr(d.dataset, "to_dictionary") else str(d)
                                         for d in (r.inputs.dataset_inputs if r.inputs else [])]})
        for m in c.search_logged_models(experiment_ids=[e.experiment_id]):
            scan.scan_record(f"MLflow logged model {m.model_id}", {"params": m.params, "tags": m.tags, "name": m.name})
    for m in c.search_registered_models():
        scan.scan_record(f"MLflow registered model {m.name}", {"tags": m.tags, "description": m.description,
                                                                "aliases": m.aliases})
        for v in c.search_model_versions(f"name='{m.name}'"):
            scan.scan_record(f"MLflow {m.name} version {v.version}", {"tags": v.tags, "description": v.description,
                                                                       "source": v.source, "run_link": v.run_link})
    return runs


def ray_records(state: dict, ray_token: str, scan: SecretScan) -> list[dict]:
    """Ray's record of every job and of the Serve application, read with Ray's own token."""
    auth = {"X-Ray-Authorization": f"Bearer {ray_token}"}
    jobs = requests.get(f"{state['ray_dashboard']}/api/jobs/", headers=auth, timeout=30).json()
    for j in jobs:
        scan.scan_record(f"Ray job {j.get('submission_id') or j.get('job_id')} (metadata, entrypoint, runtime_env)", j)
        if j.get("submission_id"):
            logs = requests.get(f"{state['ray_dashboard']}/api/jobs/{j['submission_id']}/logs", headers=auth, timeout=30)
            scan.scan_record(f"Ray job {j['submission_id']} logs", logs.text)
    apps = requests.get(f"{state['ray_dashboard']}/api/serve/applications/", headers=auth, timeout=30)
    assert apps.status_code == 200, apps.text
    scan.scan_record("Ray Serve applications", apps.text)
    return jobs


def test_no_secret_in_logs_records_or_error_bodies_after_a_demo_run(demo, postgres, minio):
    from indai.platform.storage import S3Store

    home = demo["home"]
    state = json.loads((home / "services.json").read_text())
    scan = SecretScan()
    scan.add("database password", postgres.password)
    scan.add("S3 access key", minio.access_key)
    scan.add("S3 secret key", minio.secret_key)
    ray_token = (home / "ray_auth_token").read_text().strip()
    scan.add("Ray's token", ray_token)
    demo_token = (home / "demo.token").read_text().strip()
    scan.add("the demo's API token", demo_token)
    scan.add("the demo's API token's secret", demo_token.split("_", 2)[2])

    bodies = gateway_traffic(demo, postgres, scan)
    member_keys = sorted((home / "secrets").glob("*.key"))
    assert [k.name for k in member_keys] == ["cwru-demo.key"]  # the release job used the member's key
    scan.add("member key of cwru-demo", member_keys[0].read_text().strip())
    assert len(scan.secrets) == 15  # database, S3 (2), Ray, 5 API tokens and their secrets (10), a member key

    kept_on_purpose = (home / "demo.token", home / "ray_auth_token", home / "secrets")
    scan.scan_tree(home, skip=kept_on_purpose)
    scan.scan_tree(Path(state["ray_temp_dir"]))
    store = S3Store(BUCKET_URI, endpoint=minio.endpoint, access_key=minio.access_key, secret_key=minio.secret_key, secure=False)
    objects = store.list("")
    for key in objects:
        scan.scan_bytes(f"{BUCKET_URI}/{key}", store.get_bytes(key))
    runs = mlflow_records(state["mlflow_uri"], scan)
    jobs = ray_records(state, ray_token, scan)
    for b in bodies:
        scan.scan_record(f"{b['what']} ({b['status']})", b)
    scan.scan_record("the demo's stdout", demo["run"].stdout)
    scan.scan_record("the demo's stderr", demo["run"].stderr)

    print(f"secret scan: {len(scan.secrets)} secrets, {scan.files} files and {len(objects)} store objects, "
          f"{scan.bytes / 1e6:.1f} MB, {scan.records} records ({runs} MLflow runs, {len(jobs)} Ray jobs, {len(bodies)} error bodies)")
    assert scan.findings == [], "\n".join(scan.findings[:50])
    # the scan looked where the secrets would be: it covered what the run wrote ...
    assert (home / "logs" / "gateway.log").exists() and (home / "mlflow" / "server.log").stat().st_size > 0
    assert scan.files > 100 and any(k.startswith("datasets/cwru-0hp-released/") for k in objects)
    assert runs >= 1 and any((j.get("metadata") or {}).get("indai.member") == "cwru-demo" for j in jobs) and len(bodies) == 14
    # ... and it finds each secret where one is kept on purpose (the needles are right)
    control = SecretScan(dict(scan.secrets))
    for path in (home / "demo.token", home / "ray_auth_token", *member_keys):
        control.scan_bytes(str(path), path.read_bytes())
    found = {f.split(": ", 1)[1].split(" after ")[0] for f in control.findings}
    assert {"Ray's token", "the demo's API token", "member key of cwru-demo"} <= found
    assert TOKEN_SHAPE.search(demo_token.encode())


def test_the_demo_relays_the_training_workers_lines_and_not_every_serve_request(demo):
    """What the demo's user reads (this module's demo run, the suite's only one): rank 0's epoch
    lines and progress, passed to the driver through its board (trainers.relay) while the workers
    train, and the demo's own stages; not a log line of the Serve replicas for each of the 218
    requests. The connection the training opened went on relaying whatever ran next until
    `run_workers` closed it after the fit."""
    said = demo["run"].stdout + demo["run"].stderr
    epochs = [line for line in said.splitlines() if "epoch 2/2: loss" in line or "epoch 1/2: loss" in line]
    assert len(epochs) == 2 and all(line.startswith("epoch ") for line in epochs), epochs  # the driver's, no worker prefix
    # not a terminal: the progress events as the lines `indai train submit` follows, from the driver
    events = [line for line in demo["run"].stdout.splitlines() if "[indai] progress {" in line]
    assert events and all(line.startswith("[indai] progress {") for line in events), events[:3]
    assert "ServeReplica" not in said and "POST /v1/predict" not in said, [
        line for line in said.splitlines() if "ServeReplica" in line][:5]
    assert "stage timings:" in said and "served accuracy" in said
