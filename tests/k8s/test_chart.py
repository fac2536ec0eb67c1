"""The chart against a real Kubernetes API server (built from source; KWOK simulates the nodes).

What these tests prove: the API server accepts every object of every scenario, Pod Security
"restricted" admits every pod the chart and the KubeRay operator create, the scheduler places
Ray pods on the right pools with the right GPU requests, RBAC gives each ServiceAccount what
it needs and no more, and install / upgrade / rollback / uninstall behave. What they cannot
prove: that the containers run (KWOK marks pods Running without starting anything) and that
NetworkPolicies are enforced (no CNI runs here).
"""
import base64
import json
import re
from pathlib import Path

import pytest
from waiting import wait
import yaml

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "indai"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))


def restricted_namespace(c, name: str) -> str:
    c.kubectl("create", "namespace", name)
    c.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    return name


def pods(c, ns: str, selector: str) -> list[dict]:
    return json.loads(c.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout)["items"]


def evict(c, ns: str, pod: str):
    """POST an Eviction for `pod`, as `kubectl drain` does: the API server checks its disruption budget."""
    body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": ns}})
    return c.kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}/eviction", "-f", "-", input=body, check=False)


def node_pool(c, node: str) -> str:
    return json.loads(c.kubectl("get", "node", node, "-o", "json").stdout)["metadata"]["labels"]["indai.io/pool"]



def test_cluster_has_cpu_and_gpu_pools(k8s_cluster):
    nodes = json.loads(k8s_cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    pools = {}
    for n in nodes:
        ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
        assert ready == "True", n["metadata"]["name"]
        pools.setdefault(n["metadata"]["labels"]["indai.io/pool"], []).append(n)
    assert len(pools["cpu"]) == 2 and len(pools["gpu"]) == 2
    for n in pools["gpu"]:
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]


def test_lint_and_schema_errors_are_readable(k8s_cluster):
    c = k8s_cluster
    assert "0 chart(s) failed" in c.helm("lint", CHART).stdout
    bad = c.helm("template", "t", CHART, "--set", "images.pullPolicy=Sometimes", check=False)
    assert bad.returncode != 0 and "at '/images/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'" in bad.stderr
    typo = c.helm("template", "t", CHART, "--set", "ray.cpuWorkerz.replicas=2", check=False)
    assert typo.returncode != 0 and "additional properties 'cpuWorkerz' not allowed" in typo.stderr
    latest = c.helm("template", "t", CHART, "--set", "images.mlflow.tag=latest", check=False)
    assert latest.returncode != 0 and "/images/mlflow/tag" in latest.stderr
    missing = c.helm("template", "t", CHART, "--set", "minio.enabled=false", check=False)
    assert missing.returncode != 0 and "is required when minio.enabled is false" in missing.stderr
    perm = c.helm("template", "t", CHART, "--set", "mlflow.defaultPermission=ALL", check=False)
    assert perm.returncode != 0 and "at '/mlflow/defaultPermission': value must be one of 'READ', 'EDIT', 'MANAGE', 'NO_PERMISSIONS'" in perm.stderr
    # the platform's MLflow users hold grants of their own: any default permission goes with Serve
    assert c.helm("template", "t", CHART, "--set", "serve.enabled=true", "--set", "mlflow.defaultPermission=NO_PERMISSIONS").returncode == 0
    tol = c.helm("template", "t", CHART, "--set", "ray.gpuWorkers.tolerations[0].efect=NoSchedule", check=False)
    assert tol.returncode != 0 and "additional properties 'efect' not allowed" in tol.stderr
    op = c.helm("template", "t", CHART, "--set", "kuberay-operator.imag.tag=v1", check=False)
    assert op.returncode != 0 and "additional properties 'imag' not allowed" in op.stderr
    sql = c.helm("template", "t", CHART, "--set", "postgresql.mlflowDatabase=x;drop", check=False)
    assert sql.returncode != 0 and "/postgresql/mlflowDatabase" in sql.stderr
    when = c.helm("template", "t", CHART, "--set", "backup.schedule=nightly", check=False)
    assert when.returncode != 0 and "at '/backup/schedule': 'nightly' does not match pattern" in when.stderr
    weekly = c.helm("template", "t", CHART, "--set", "backup.verify.schedule=weekly", check=False)
    assert weekly.returncode != 0 and "/backup/verify/schedule" in weekly.stderr
    where = c.helm("template", "t", CHART, "--set", "backup.s3.uri=/var/backups", check=False)
    assert where.returncode != 0 and "/backup/s3/uri" in where.stderr
    redis = c.helm("template", "t", CHART, "--set", "serve.highAvailability.redis.address=redis://r:6379", check=False)
    assert redis.returncode != 0 and "/serve/highAvailability/redis/address" in redis.stderr
    secretless = c.helm("template", "t", CHART, "--set", "serve.enabled=true", "--set", "serve.highAvailability.enabled=true",
                        "--set", "serve.highAvailability.redis.address=r.example:6379", check=False)
    assert secretless.returncode != 0 and "serve.highAvailability.redis.existingSecret (a Secret with key password) is required" in secretless.stderr
    key = c.helm("template", "t", CHART, "--set", "backup.encryption.existingSecret=../key", check=False)
    assert key.returncode != 0 and "/backup/encryption/existingSecret" in key.stderr


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_passes_server_side_dry_run(k8s_cluster, scenario):
    c = k8s_cluster
    ns = restricted_namespace(c, f"dry-{scenario.stem.removesuffix('-values')}")
    rendered = c.helm("template", "indai", CHART, "-n", ns, "-f", scenario).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
    done = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=rendered)
    assert done.stdout.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d])
    assert "NetworkPolicy" in kinds and "Secret" in kinds
    if "external" in scenario.stem:
        assert "StatefulSet" not in kinds
    if "gpu-autoscaling" in scenario.stem:  # serving on a cluster of its own, beside the jobs' RayCluster
        assert {"RayService", "RayCluster"} <= kinds


TOGGLES = {
    "no-ray": ["ray.enabled=false"],
    "external-mlflow": ["mlflow.enabled=false", "mlflow.external.uri=http://mlflow.example:5000"],
    "external-mlflow-login": ["mlflow.enabled=false", "mlflow.external.uri=https://mlflow.example",
                              "mlflow.external.existingSecret=mlflow-login", "gateway.enabled=true"],
    "no-auth-no-policies": ["mlflow.auth=false", "networkPolicy.enabled=false"],
    "operator-and-serve": ["kuberay-operator.enabled=true", "serve.enabled=true"],
    "head-only": ["ray.cpuWorkers.enabled=false", "ray.gpuWorkers.enabled=false"],
    "gateway-pull-secret": ["gateway.enabled=true", "imagePullSecrets[0].name=regcred"],
    "backup-to-volume": ["backup.enabled=true", "backup.keep=7", "backup.persistence.size=50Gi"],
    "serve-high-availability": ["serve.enabled=true", "serve.highAvailability.enabled=true"],
}


@pytest.mark.parametrize("name", TOGGLES)
def test_each_part_switches_off_or_on(k8s_cluster, name):
    """Every switch renders objects the API server accepts, and the switched-off part is gone."""
    c = k8s_cluster
    ns = restricted_namespace(c, f"toggle-{name}")
    rendered = c.helm("template", "indai", CHART, "-n", ns, *[a for kv in TOGGLES[name] for a in ("--set", kv)]).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    done = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=rendered)
    assert done.stdout.count("(server dry run)") == len(docs)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    if name == "no-ray":
        assert not {k for k, _ in kinds} & {"RayCluster", "RayService"} and ("ServiceAccount", "indai-ray") not in kinds
    if name == "external-mlflow":
        assert ("Deployment", "indai-mlflow") not in kinds
        ray = next(d for d in docs if d["kind"] == "RayCluster")
        env = {e["name"]: e.get("value") for e in ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["INDAI_MLFLOW_URI"] == "http://mlflow.example:5000" and "MLFLOW_TRACKING_PASSWORD" not in env
    if name == "external-mlflow-login":  # the account comes from the admin's Secret, into every platform pod
        checked = set()
        for d in docs:
            for where, spec in pod_specs(d):
                for container in spec["containers"]:
                    env = {e["name"]: e for e in container.get("env", [])}
                    if "INDAI_MLFLOW_URI" not in env:
                        continue
                    checked.add(where)
                    assert env["INDAI_MLFLOW_URI"]["value"] == "https://mlflow.example"
                    login = {k: env[f"MLFLOW_TRACKING_{k.upper()}"]["valueFrom"]["secretKeyRef"] for k in ("username", "password")}
                    assert login == {k: {"name": "mlflow-login", "key": k} for k in ("username", "password")}, (where, env)
        assert {"indai-gateway", "indai-ray/head"} <= checked, checked
    if name == "no-auth-no-policies":
        assert "NetworkPolicy" not in {k for k, _ in kinds} and ("ConfigMap", "indai-mlflow-auth") not in kinds
    if name == "operator-and-serve":
        assert ("Deployment", "indai-kuberay-operator") in kinds and ("RayService", "indai-serve") in kinds
        # without serve.highAvailability: no Redis, no password for one, and a head that fate-shares
        service = next(d for d in docs if d["kind"] == "RayService")
        assert "gcsFaultToleranceOptions" not in service["spec"]["rayClusterConfig"]
        assert not {n for k, n in kinds if "redis" in n}
        assert "redisPassword" not in next(d for d in docs if d["kind"] == "Secret")["data"]
    if name == "serve-high-availability":  # the serving head's control state in the chart's own Redis
        service = next(d for d in docs if d["kind"] == "RayService")
        assert service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
            "redisAddress": "indai-redis:6379",
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "indai-secrets", "key": "redisPassword"}}}}
        assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
        assert "redisPassword" in next(d for d in docs if d["kind"] == "Secret")["data"]
        redis = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "indai-redis")
        (ctr,) = redis["spec"]["template"]["spec"]["containers"]
        assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
        assert ctr["env"] == [{"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": {"name": "indai-secrets", "key": "redisPassword"}}}]
        assert "--appendonly yes" in ctr["command"][-1] and '--requirepass "$REDISCLI_AUTH"' in ctr["command"][-1]
        assert ctr["image"].startswith("docker.io/library/redis:") and redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert ("Service", "indai-redis") in kinds
        policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "indai-redis")
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "indai", "indai.io/platform": "true"},
                                                 "matchExpressions": [{"key": "indai.io/component", "operator": "In",
                                                                       "values": ["serve-head", "helm-test"]}]}}]
        assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
        # `helm test` asks it with the password (PONG) and without (NOAUTH)
        probe = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "indai-test-redis")
        (check,) = probe["spec"]["containers"]
        assert check["env"] == ctr["env"] and "grep -q NOAUTH" in check["args"][0] and check["image"] == ctr["image"]
        assert ("RayCluster", "indai-ray") in kinds and ("ServiceAccount", "indai-serve") in kinds
    if name == "head-only":
        assert not next(d for d in docs if d["kind"] == "RayCluster")["spec"]["workerGroupSpecs"]
    if name == "backup-to-volume":  # a volume of its own, kept on uninstall; one run at a time
        cron = next(d for d in docs if d["kind"] == "CronJob")
        assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["schedule"] == "30 2 * * *"
        (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
        (where, labels, spec), = pod_templates(cron)
        (container,) = spec["containers"]
        assert container["command"] == ["indai", "admin", "backup", "--to", "/backups", "--keep", "7"]
        assert {"name": "backups", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in spec["volumes"]
        env = {e["name"]: e for e in container["env"]}
        # the store's full keys (MLflow's artefacts are in the bucket), both databases
        assert env["INDAI_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "indai-secrets", "key": "accessKey"}
        assert env["INDAI_DB_URL"]["value"].endswith("@indai-postgresql:5432/indai")
        assert env["INDAI_MLFLOW_DB_URL"]["value"].endswith("@indai-postgresql:5432/mlflow")
        assert not {k for k in env if k.startswith("INDAI_BACKUP_")}  # the platform's store keys; not encrypted
        assert "backup-key" not in {v["name"] for v in spec["volumes"]}
        # PostgreSQL admits the backup's pods
        pg = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "indai-postgresql")
        admitted = pg["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
        assert labels["indai.io/component"] == "backup" and "backup" in admitted
        # the weekly read-back: the same volume, the backup key if any, and nothing else (no database, no store keys)
        verify = next(d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "indai-backup-verify")
        assert verify["spec"]["schedule"] == "0 5 * * 0" and verify["spec"]["concurrencyPolicy"] == "Forbid"
        (vwhere, vlabels, vspec), = pod_templates(verify)
        (vctr,) = vspec["containers"]
        assert vctr["command"] == ["indai", "admin", "verify-backup", "--at", "/backups", "--restore-test"]
        assert vctr["env"] == [{"name": "TMPDIR", "value": "/work"}]
        assert {"name": "backups", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in vspec["volumes"]
        assert vlabels["indai.io/component"] == "backup-verify" and "backup-verify" not in admitted
    if name == "gateway-pull-secret":
        for d in docs:
            for where, spec in pod_specs(d):
                assert spec["imagePullSecrets"] == [{"name": "regcred"}], where


def pod_templates(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, labels, pod spec) for every pod a rendered object makes, Ray groups included."""
    kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
    if kind == "Pod":
        return [(name, doc["metadata"].get("labels", {}), spec)]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(name, spec["template"]["metadata"].get("labels", {}), spec["template"]["spec"])]
    if kind == "CronJob":
        template = spec["jobTemplate"]["spec"]["template"]
        return [(name, template["metadata"].get("labels", {}), template["spec"])]
    ray = spec.get("rayClusterConfig", spec) if kind == "RayService" else spec if kind == "RayCluster" else None
    if ray is None:
        return []
    groups = [("head", ray["headGroupSpec"])] + [(g["groupName"], g) for g in ray["workerGroupSpecs"]]
    return [(f"{name}/{group}", g["template"]["metadata"]["labels"], g["template"]["spec"]) for group, g in groups]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod a rendered object makes, Ray groups included."""
    return [(where, spec) for where, _, spec in pod_templates(doc)]


AUTOSCALER_API_VOLUME = "autoscaler-api-access"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_every_pod_is_restricted_and_least_privileged(k8s_cluster, scenario):
    """What Pod Security admission checks, and what it does not: tokens, limits, pinned images,
    GPU placement, secrets by reference, MLflow and the platform on databases of their own."""
    docs = [d for d in yaml.safe_load_all(k8s_cluster.helm("template", "indai", CHART, "-f", scenario).stdout) if d]
    values = yaml.safe_load(scenario.read_text()) or {}
    autoscaling = values.get("ray", {}).get("autoscaling", {}).get("enabled", False)
    minio = values.get("minio", {}).get("enabled", True)
    specs = [x for d in docs for x in pod_specs(d)]
    if minio:  # the hook Job that makes the bucket and the jobs' MinIO user runs `indai admin provision-store`
        job = next(spec for where, spec in specs if where == "indai-minio-provision")
        assert job["containers"][0]["command"][:3] == ["indai", "admin", "provision-store"]
        assert {e["name"] for e in job["containers"][0]["env"]} >= {"MINIO_ROOT_USER", "INDAI_JOBS_S3_ACCESS_KEY"}
        secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "indai-secrets")
        assert {"jobsAccessKey", "jobsSecretKey"} <= set(secret["data"])
    assert any(w.endswith("/head") for w, _ in specs) and any("test-" in w for w, _ in specs)
    mlflow_auth = values.get("mlflow", {}).get("enabled", True) and values.get("mlflow", {}).get("auth", True)
    provision = [spec for where, spec in specs if where == "indai-mlflow-provision"]
    if mlflow_auth:  # the hook Job that makes the serving cluster's MLflow user runs `indai admin provision-mlflow`
        (job,) = provision
        env = {e["name"]: e for e in job["containers"][0]["env"]}
        assert job["containers"][0]["command"][:3] == ["indai", "admin", "provision-mlflow"]
        assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "admin"
        assert (env["INDAI_MLFLOW_SERVE_USER"]["value"], env["INDAI_MLFLOW_JOBS_USER"]["value"]) == ("indai-serve", "indai-jobs")
        assert env["INDAI_MLFLOW_SERVE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "indai-secrets", "key": "mlflowServePassword"}
        assert env["INDAI_MLFLOW_JOBS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "indai-secrets", "key": "mlflowJobsPassword"}
        secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "indai-secrets")
        assert {"mlflowServePassword", "mlflowJobsPassword"} <= set(secret["data"])
    else:
        assert provision == []
    serving = values.get("serve", {}).get("enabled", False)
    assert any(w == "indai-serve/head" for w, _ in specs) is serving and any(w == "indai-ray/head" for w, _ in specs)
    for where, spec in specs:
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["seccompProfile"]["type"] == "RuntimeDefault", where
        # no pod gets API credentials; the autoscaler sidecar alone mounts the head's projected token
        assert spec["automountServiceAccountToken"] is False, where
        api_volumes = [v["name"] for v in spec.get("volumes", []) if v["name"] == AUTOSCALER_API_VOLUME]
        # (the jobs' head only: the serving cluster has a fixed size and no autoscaler)
        assert api_volumes == ([AUTOSCALER_API_VOLUME] if autoscaling and where == "indai-ray/head" else []), where
        assert not any(m["name"] == AUTOSCALER_API_VOLUME for ctr in spec["containers"] for m in ctr.get("volumeMounts", [])), where
        for ctr in spec["containers"]:
            csc = ctr["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], where
            assert ctr["resources"]["limits"], where
            assert ":" in ctr["image"] and not ctr["image"].endswith(":latest"), where
            for env in ctr.get("env", []):
                if any(k in env["name"] for k in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (where, env["name"])
                ref = env.get("valueFrom", {}).get("secretKeyRef", {})
                if minio and ref.get("name") == "indai-secrets" and ref.get("key") in ("accessKey", "secretKey"):
                    # MinIO's root keys: MinIO, the MLflow server (its artefact proxy) and the hook Job only
                    assert where in ("indai-minio", "indai-mlflow", "indai-minio-provision"), (where, env["name"])
                if ref.get("key") == "redisPassword":  # the serving cluster's Redis: only Redis (the operator gives it to the serve head)
                    assert where in ("indai-redis", "indai-test-redis"), (where, env["name"])
                if ref.get("name") == "indai-secrets" and ref.get("key") == "mlflowAdminPassword":
                    # MLflow's admin: the server, the hook Job that makes the platform's users, and helm test's probe
                    assert where in ("indai-mlflow", "indai-mlflow-provision") or where.startswith("indai-test-"), (where, env["name"])
            names = {e["name"]: e for e in ctr.get("env", [])}
            if minio and "INDAI_S3_ACCESS_KEY" in names and where != "indai-minio-provision":
                # Ray pods (researchers' code) and the gateway: the jobs' own user (platform/store_users.py)
                assert names["INDAI_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "indai-secrets", "key": "jobsAccessKey"}, where
                assert names["INDAI_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "indai-secrets", "key": "jobsSecretKey"}, where
        envs = {e["name"] for ctr in spec["containers"] for e in ctr.get("env", [])}
        mlflow_env = {e["name"]: e for e in spec["containers"][0].get("env", [])}
        if mlflow_auth and (where.startswith("indai-ray/") or where == "indai-gateway"):
            # researchers' code (and the gateway, where admins run `indai model promote`): the jobs' user, no admin
            assert mlflow_env["MLFLOW_TRACKING_USERNAME"]["value"] == "indai-jobs", where
            assert mlflow_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == \
                {"secretKeyRef": {"name": "indai-secrets", "key": "mlflowJobsPassword"}}, where
        if where.startswith("indai-ray/"):
            # the jobs' RayCluster runs researchers' code: never the platform database
            assert not envs & {"INDAI_DB_URL", "DB_PASSWORD"}, where
        if where.startswith("indai-serve/"):
            # the serving cluster checks tokens and meters calls in it, and holds nothing of the jobs'
            assert {"INDAI_DB_URL", "DB_PASSWORD"} <= envs and spec["serviceAccountName"] == "indai-serve", where
            assert not any("RAY_AUTH" in e or e == "INDAI_SECRETS_DIR" for e in envs) and not spec.get("volumes"), where
            # it reads models from MLflow, as a user that is no admin, and holds no object-store keys
            assert not any(e.startswith(("INDAI_S3_", "INDAI_STORE_", "AWS_")) for e in envs), where
            mlflow_user = {e["name"]: e for e in spec["containers"][0]["env"]}.get("MLFLOW_TRACKING_USERNAME")
            if mlflow_auth:
                assert mlflow_user["value"] == "indai-serve", where
                assert {e["name"]: e for e in spec["containers"][0]["env"]}["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == \
                    {"secretKeyRef": {"name": "indai-secrets", "key": "mlflowServePassword"}}, where
        if where.endswith("/gpu"):
            assert spec["nodeSelector"] == {"indai.io/pool": "gpu"}
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
            assert int(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert ":" in spec["containers"][0]["image"] and spec["containers"][0]["image"].endswith("-gpu")
        elif "/" in where:
            assert spec["containers"][0]["image"].endswith("-cpu"), where
    for d in docs:
        ray = d["spec"].get("rayClusterConfig", d["spec"]) if d["kind"] in ("RayCluster", "RayService") else None
        if ray is not None and d["kind"] == "RayService":
            assert ray["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in ray
        elif ray is not None:
            assert ray["enableInTreeAutoscaling"] is autoscaling
            if autoscaling:
                csc = ray["autoscalerOptions"]["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
                assert {"name": AUTOSCALER_API_VOLUME, "mountPath": SA_DIR, "readOnly": True} in ray["autoscalerOptions"]["volumeMounts"]
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-mlflow"):
            env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and env["MLFLOW_BACKEND_STORE_URI"].endswith("/mlflow")
            assert env["MLFLOW_ARTIFACTS_DESTINATION"].endswith("/mlflow-artifacts") and env["MLFLOW_APP_NAME"] == "basic-auth"
            # MLflow's own Host check (its DNS-rebinding guard) lets in-cluster and port-forward clients through
            from mlflow.server.security_utils import is_allowed_host_header
            allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
            for host in ("indai-mlflow:5000", "indai-mlflow.default.svc:5000", "indai-mlflow.default.svc.cluster.local:5000", "127.0.0.1:5000", "localhost:5000"):
                assert is_allowed_host_header(allowed, host), host
            assert not is_allowed_host_header(allowed, "evil.example:5000")
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"):
            env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["INDAI_DB_URL"].startswith("postgresql+psycopg://") and env["INDAI_DB_URL"].endswith("/indai")


JOBS_CLUSTER = ["ray-head", "ray-worker-cpu", "ray-worker-gpu"]
SERVING_CLUSTER = ["serve-head", "serve-worker"]


def cluster_of(peer: dict) -> list[str]:
    """The components a peer that selects one Ray cluster's own pods names (release label checked)."""
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "indai"}, peer
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert (expr["key"], expr["operator"]) == ("indai.io/component", "In"), peer
    return expr["values"]


def test_network_policies_keep_ray_ports_inside_the_release(k8s_cluster):
    """Two Ray clusters, two trust domains: the jobs' Ray ports answer its own pods and the gateway;
    the serving cluster's its own pods and the KubeRay operator, and Serve's port everyone; neither
    cluster is the other's peer. PostgreSQL answers only the pods that hold a password for it."""
    docs = [d for d in yaml.safe_load_all(k8s_cluster.helm("template", "indai", CHART, "--set", "serve.enabled=true",
                                                                 "--set", "gateway.enabled=true").stdout) if d]
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    seen = {}
    for name, cluster, own in (("indai-ray-head", "jobs", JOBS_CLUSTER), ("indai-ray-workers", "jobs", JOBS_CLUSTER),
                               ("indai-serve-head", "serving", SERVING_CLUSTER), ("indai-serve-workers", "serving", SERVING_CLUSTER)):
        rules = policies[name]["ingress"]
        for rule in rules:
            ports = {p["port"] for p in rule.get("ports", [])}
            peers = rule.get("from")
            if peers is None:  # open to everyone: Serve's HTTP port on the serving cluster, nothing on the jobs'
                assert cluster == "serving" and ports == {8000}, name
                seen[(name, "open")] = True
                continue
            for peer in peers:
                labels = peer["podSelector"].get("matchLabels", {})
                if "namespaceSelector" in peer:  # the KubeRay operator deploys Serve apps through the dashboard
                    assert name == "indai-serve-head" and labels == {"app.kubernetes.io/name": "kuberay-operator"} and ports == {8265}
                    seen[(name, "operator")] = True
                elif labels.get("indai.io/component") == "gateway":  # the only way in to the job API
                    assert name == "indai-ray-head" and ports == {8265, 6379, 10001}
                    seen[(name, "gateway")] = True
                else:  # the cluster's own pods, on every port, and never the other cluster's
                    assert cluster_of(peer) == own and not ports, name
                    seen[(name, "own")] = True
    assert set(seen) == {("indai-ray-head", "own"), ("indai-ray-head", "gateway"), ("indai-ray-workers", "own"),
                         ("indai-serve-head", "own"), ("indai-serve-head", "operator"), ("indai-serve-head", "open"),
                         ("indai-serve-workers", "own"), ("indai-serve-workers", "open")}
    # every Ray pod the chart makes is selected by one of these policies
    selected = {"indai-ray-head": ["ray-head"], "indai-ray-workers": ["ray-worker-cpu", "ray-worker-gpu"],
                "indai-serve-head": ["serve-head"], "indai-serve-workers": ["serve-worker"]}
    for name, components in selected.items():
        sel = policies[name]["podSelector"]
        got = [sel["matchLabels"]["indai.io/component"]] if "indai.io/component" in sel["matchLabels"] else sel["matchExpressions"][0]["values"]
        assert got == components, name
    made = {labels["indai.io/component"] for d in docs if d["kind"] in ("RayCluster", "RayService") for _, labels, _ in pod_templates(d)}
    assert made == {c for cs in selected.values() for c in cs}
    platform = {"app.kubernetes.io/instance": "indai", "indai.io/platform": "true"}
    (rule,) = policies["indai-mlflow"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": platform}}] and rule["ports"] == [{"port": 5000, "protocol": "TCP"}]
    # MinIO: the platform's pods but the serving cluster's, which reads models through MLflow only
    (rule,) = policies["indai-minio"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": platform, "matchExpressions": [
        {"key": "indai.io/component", "operator": "NotIn", "values": SERVING_CLUSTER}]}}]
    assert rule["ports"] == [{"port": 9000, "protocol": "TCP"}]
    holders = {labels["indai.io/component"] for d in docs for _, labels, spec in pod_templates(d)
               if any(e["name"] == "INDAI_S3_ACCESS_KEY" for ctr in spec["containers"] for e in ctr.get("env", []))}
    assert holders and not holders & set(SERVING_CLUSTER)
    (rule,) = policies["indai-postgresql"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "indai", "indai.io/platform": "true"}
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert (expr["key"], expr["operator"]) == ("indai.io/component", "In")
    assert not set(expr["values"]) & set(JOBS_CLUSTER)  # researchers' code never reaches the platform database
    assert set(expr["values"]) == {"gateway", "mlflow", "serve-head", "serve-worker", "helm-test", "backup"}
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    # and the pods the PostgreSQL rule admits are exactly those that hold one of its passwords (or probe it)
    holders = {labels["indai.io/component"] for d in docs for _, labels, spec in pod_templates(d)
               if any(e["name"] == "DB_PASSWORD" for ctr in spec["containers"] for e in ctr.get("env", []))}
    assert holders - {"postgresql"} == {"gateway", "mlflow", "serve-head", "serve-worker"}


def budgets_and_templates(c, *sets: str) -> tuple[dict, dict]:
    args = [a for kv in sets for a in ("--set", kv)]
    docs = [d for d in yaml.safe_load_all(c.helm("template", "indai", CHART, *args).stdout) if d]
    parts = {labels["indai.io/component"]: (labels, spec) for d in docs for _, labels, spec in pod_templates(d)
             if "indai.io/component" in labels}
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}, parts


def test_parts_with_replicas_keep_one_through_a_drain(k8s_cluster):
    """Where the gateway, MLflow or the serving workers run more than one replica, a disruption
    budget lets a drain take one at a time (the serving workers' as minAvailable: their owner,
    KubeRay's RayCluster, has no scale subresource), and it selects the pods of its own part and
    no other; their pods spread over nodes. With one replica there is no budget to block a drain."""
    c = k8s_cluster
    budgets, templates = budgets_and_templates(c, "serve.enabled=true", "serve.workers.replicas=3", "gateway.enabled=true",
                                               "gateway.replicas=2", "mlflow.replicas=2")
    assert {n: {k: v for k, v in b.items() if k != "selector"} for n, b in budgets.items()} == {
        "indai-gateway": {"maxUnavailable": 1}, "indai-mlflow": {"maxUnavailable": 1}, "indai-serve-worker": {"minAvailable": 2}}
    for name, budget in budgets.items():
        want = budget["selector"]["matchLabels"]
        chosen = [part for part, (labels, _) in templates.items() if want.items() <= labels.items()]
        assert chosen == [name.removeprefix("indai-")], (name, chosen)  # its own part's pods, nobody else's
        spread = templates[chosen[0]][1]["topologySpreadConstraints"]
        assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                           "labelSelector": {"matchLabels": want}}], name
    assert {"serve-head", "ray-head", "postgresql", "minio"} <= templates.keys()  # the parts no budget covers were seen
    budgets, _ = budgets_and_templates(c, "serve.enabled=true", "gateway.enabled=true")
    assert budgets == {}  # one replica each: a budget would only block drains


def test_restricted_namespace_rejects_privileged_pod(k8s_cluster):
    c = k8s_cluster
    ns = restricted_namespace(c, "psa-check")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "securityContext": {"privileged": True}}]}}
    done = c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod), check=False)
    assert done.returncode != 0 and 'violates PodSecurity "restricted' in done.stderr and "privileged" in done.stderr
    # the same pod in an unlabelled namespace is admitted: the refusal came from the label
    c.kubectl("create", "namespace", "psa-open")
    c.kubectl("apply", "--dry-run=server", "-n", "psa-open", "-f", "-", input=json.dumps(pod))


def can(c, ns: str, sa: str, verb: str, resource: str) -> bool:
    done = c.kubectl("auth", "can-i", verb, resource, "-n", ns, f"--as=system:serviceaccount:{ns}:{sa}", check=False)
    return done.stdout.strip() == "yes"


def test_install_upgrade_rollback_uninstall(k8s_cluster):
    c = k8s_cluster
    ns = restricted_namespace(c, "indai")
    installed = c.helm("install", "indai", CHART, "-n", ns, "--wait", "--timeout", "180s").stdout
    assert "Backups are off (backup.enabled=false)" in installed  # the notes say what keeps no copy
    secret_before = json.loads(c.kubectl("get", "secret", "indai-secrets", "-n", ns, "-o", "json").stdout)["data"]

    # the operator turned the RayCluster into pods on the right pools
    ray = "ray.io/cluster=indai-ray"
    head = wait("ray head", lambda: [p for p in pods(c, ns, ray + ",ray.io/node-type=head") if p["status"].get("phase") == "Running"])
    assert node_pool(c, head[0]["spec"]["nodeName"]) == "cpu"
    workers = wait("2 ray workers", lambda: (w := [p for p in pods(c, ns, ray + ",ray.io/node-type=worker")
                                                 if p["status"].get("phase") == "Running"]) and len(w) == 2 and w)
    by_group = {p["metadata"]["labels"]["ray.io/group"]: p for p in workers}
    assert node_pool(c, by_group["gpu"]["spec"]["nodeName"]) == "gpu"
    assert node_pool(c, by_group["cpu"]["spec"]["nodeName"]) == "cpu"
    gpu_limits = by_group["gpu"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in by_group["cpu"]["spec"]["containers"][0]["resources"]["limits"]
    for p in (*head, *workers):
        assert p["spec"]["securityContext"]["runAsNonRoot"] is True

    # MLflow, MinIO, PostgreSQL and the bucket hook
    for component in ("mlflow", "minio", "postgresql"):
        assert wait(component, lambda: [p for p in pods(c, ns, f"indai.io/component={component}") if p["status"].get("phase") == "Running"])

    # least privilege: nothing in the chart reads secrets or creates pods through the API
    for sa in ("indai-ray", "indai-mlflow", "indai-minio", "indai-postgresql"):
        assert not can(c, ns, sa, "get", "secrets") and not can(c, ns, sa, "create", "pods")
    assert not can(c, ns, "indai-ray", "list", "pods")  # no autoscaler, no API access

    # upgrade: more CPU workers and the autoscaler (which needs pods and its RayCluster), secrets kept
    c.helm("upgrade", "indai", CHART, "-n", ns, "--reuse-values", "--set", "ray.cpuWorkers.replicas=2",
           "--set", "ray.autoscaling.enabled=true", "--wait", "--timeout", "180s")
    spec = json.loads(c.kubectl("get", "raycluster", "indai-ray", "-n", ns, "-o", "json").stdout)["spec"]
    assert {g["groupName"]: g["replicas"] for g in spec["workerGroupSpecs"]}["cpu"] == 2
    assert spec["enableInTreeAutoscaling"] is True
    wait("2 cpu workers", lambda: len([p for p in pods(c, ns, ray + ",ray.io/group=cpu") if p["status"].get("phase") == "Running"]) == 2)
    assert can(c, ns, "indai-ray", "list", "pods") and can(c, ns, "indai-ray", "patch", "rayclusters.ray.io")
    assert not can(c, ns, "indai-ray", "delete", "pods") and not can(c, ns, "indai-ray", "get", "secrets")
    secret_after = json.loads(c.kubectl("get", "secret", "indai-secrets", "-n", ns, "-o", "json").stdout)["data"]
    assert secret_after == secret_before

    # rollback restores the first revision
    c.helm("rollback", "indai", "1", "-n", ns, "--wait", "--timeout", "180s")
    spec = json.loads(c.kubectl("get", "raycluster", "indai-ray", "-n", ns, "-o", "json").stdout)["spec"]
    assert {g["groupName"]: g["replicas"] for g in spec["workerGroupSpecs"]}["cpu"] == 1
    assert spec["enableInTreeAutoscaling"] is False
    # the chart's autoscaler Role went with revision 2 (KubeRay keeps the one it made for the cluster)
    assert c.kubectl("get", "role", "indai-ray-autoscaler", "-n", ns, check=False).returncode != 0

    # uninstall: only the data volumes (and the secret that unlocks them) stay
    c.helm("uninstall", "indai", "-n", ns, "--wait", "--timeout", "180s")

    def leftovers():
        out = c.kubectl("get", "all,configmap,secret,serviceaccount,role,rolebinding,networkpolicy,pvc,raycluster",
                        "-n", ns, "-o", "json").stdout
        names = {f"{i['kind']}/{i['metadata']['name']}" for i in json.loads(out)["items"]}
        names -= {"ConfigMap/kube-root-ca.crt", "ServiceAccount/default"}
        return names
    expected = {"PersistentVolumeClaim/data-indai-minio-0", "PersistentVolumeClaim/data-indai-postgresql-0",
                "Secret/indai-secrets"}
    wait("only kept volumes left", lambda: leftovers() == expected or None, timeout=120)


def test_rayjob_example_is_reconciled_onto_the_gpu_pool(k8s_cluster):
    c = k8s_cluster
    ns = restricted_namespace(c, "research")
    example = REPO / "k8s" / "examples" / "rayjob-train.yaml"
    assert example.read_text().startswith("# kubectl apply -n <namespace> -f k8s/examples/rayjob-train.yaml")
    # researchers' code runs as the jobs' MLflow user, never the admin (platform/mlflow_users.py)
    assert "mlflowAdminPassword" not in example.read_text() and "{name: MLFLOW_TRACKING_USERNAME, value: indai-jobs}" in example.read_text()
    c.kubectl("apply", "-n", ns, "-f", example)
    cluster = wait("RayJob's RayCluster", lambda: json.loads(c.kubectl("get", "rayjob", "cwru-train", "-n", ns, "-o", "json").stdout)
                   .get("status", {}).get("rayClusterName"))
    worker = wait("GPU worker pod", lambda: [p for p in pods(c, ns, f"ray.io/cluster={cluster},ray.io/group=gpu") if p["spec"].get("nodeName")])
    assert node_pool(c, worker[0]["spec"]["nodeName"]) == "gpu"
    assert worker[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_gateway_is_the_only_peer_of_rays_job_port(k8s_cluster):
    """With the gateway on, the chart deploys it and the head's NetworkPolicy admits to the job
    (8265), GCS (6379) and client (10001) ports only the gateway and the RayCluster's own pods."""
    c = k8s_cluster
    ns = restricted_namespace(c, "gw")
    rendered = c.helm("template", "indai", CHART, "-n", ns, "--set", "gateway.enabled=true").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    c.kubectl("apply", "-n", ns, "-f", "-", input=rendered)
    wait("gateway pod", lambda: [p for p in pods(c, ns, "indai.io/component=gateway") if p["status"].get("phase") == "Running"])
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "indai-ray-head")
    # the RayCluster's own pods on every port (raylets and object managers need more than the three),
    # the gateway on the job (8265), GCS (6379) and client (10001) ports, and nobody else
    ray_pods, gateway = policy["spec"]["ingress"]
    assert ray_pods["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["ray-head", "ray-worker-cpu", "ray-worker-gpu"]
    assert gateway["from"][0]["podSelector"]["matchLabels"]["indai.io/component"] == "gateway"
    assert {p["port"] for p in gateway["ports"]} == {8265, 6379, 10001}
    peers = ray_pods["from"] + gateway["from"]
    assert len(peers) == 2 and all("namespaceSelector" not in p and "ipBlock" not in p for p in peers)
    tests = [d for d in docs if d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"]
    assert "indai-test-gateway" in {t["metadata"]["name"] for t in tests}  # helm test reaches Ray's side through the gateway
    gw = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "indai-gateway")
    assert gw["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["indai", "gateway", "serve"]


def test_external_stores_with_autoscaled_gpu_pool_and_serve(k8s_cluster):
    """ci/external-values.yaml + ci/gpu-autoscaling-values.yaml for real: no MinIO or PostgreSQL,
    the admin's own Secrets, a RayService whose RayCluster gets the autoscaler sidecar (admitted
    under "restricted"), GPU workers with 2 GPUs on the GPU pool, and the gateway with no API rights."""
    c = k8s_cluster
    ns = restricted_namespace(c, "auto")
    c.kubectl("create", "secret", "generic", "indai-s3", "-n", ns, "--from-literal=accessKey=a", "--from-literal=secretKey=b")
    c.kubectl("create", "secret", "generic", "indai-db", "-n", ns, "--from-literal=password=c")
    c.kubectl("create", "secret", "generic", "indai-member-keys", "-n", ns, f"--from-literal=steel-a.key={'ab' * 32}")
    installed = c.helm("install", "auto", CHART, "-n", ns, "-f", CHART / "ci/external-values.yaml", "-f", CHART / "ci/gpu-autoscaling-values.yaml",
                       "--set", "ray.memberKeys.existingSecret=indai-member-keys", "--set", "gateway.replicas=2",
                       "--set", "serve.workers.replicas=2", "--wait", "--timeout", "180s").stdout
    assert "Backups: 30 2 * * * (Asia/Seoul), the newest 14 snapshots kept, in s3://indai-backups/prod." in installed
    assert "Encrypted with the backup key in the Secret indai-backup-key: keep a copy of it off the cluster" in installed
    assert "The newest snapshot is read back in full (0 5 * * 0): kubectl get pods -n auto -l indai.io/component=backup-verify" in installed
    assert "Serving is highly available: the serving head keeps its control state in redis.example.internal:6379" in installed
    assert not json.loads(c.kubectl("get", "statefulsets,pvc", "-n", ns, "-o", "json").stdout)["items"]
    served = yaml.safe_load(json.loads(c.kubectl("get", "rayservice", "auto-indai-serve", "-n", ns, "-o", "json").stdout)["spec"]["serveConfigV2"])
    args = served["applications"][0]["args"]
    assert (args["num_replicas"], args["ingress_replicas"]) == (2, 2)  # the defaults: one replica of each may die
    from indai.serving.app import ServeArgs  # every argument the chart gives is one the app takes (extras are refused)

    # the build waits while MLflow refuses the serving user, which the hook Job makes after the upgrade
    assert ServeArgs.model_validate(args).registry_wait_s == 300

    mine = "app.kubernetes.io/instance=auto"
    head = wait("ray head with the autoscaler", lambda: [p for p in pods(c, ns, mine + ",indai.io/component=ray-head")
                                                         if p["status"].get("phase") == "Running"])[0]
    names = [ctr["name"] for ctr in head["spec"]["containers"]]
    assert len(names) == 2 and "autoscaler" in names, names
    assert node_pool(c, head["spec"]["nodeName"]) == "cpu" and head["spec"]["automountServiceAccountToken"] is False
    # the API credentials reach the autoscaler sidecar only: job drivers run in ray-head, and with
    # them could patch the RayCluster (any image, any Secret of the namespace mounted)
    api = {ctr["name"]: [m for m in ctr.get("volumeMounts", []) if m["mountPath"] == SA_DIR] for ctr in head["spec"]["containers"]}
    assert api == {"ray-head": [], "autoscaler": [{"name": AUTOSCALER_API_VOLUME, "mountPath": SA_DIR, "readOnly": True}]}, api
    sources = next(v for v in head["spec"]["volumes"] if v["name"] == AUTOSCALER_API_VOLUME)["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token" and sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    gpu = wait("GPU worker", lambda: [p for p in pods(c, ns, mine + ",indai.io/component=ray-worker-gpu") if p["status"].get("phase") == "Running"])
    assert len(gpu) == 1  # minReplicas
    assert node_pool(c, gpu[0]["spec"]["nodeName"]) == "gpu"
    assert gpu[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu[0]["spec"]["automountServiceAccountToken"] is False
    gateway = wait("gateway", lambda: [p for p in pods(c, ns, mine + ",indai.io/component=gateway") if p["status"].get("phase") == "Running"])
    env = {e["name"]: e for e in gateway[0]["spec"]["containers"][0]["env"]}
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "indai-db"
    assert env["INDAI_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "indai-s3"
    # Serve's ingress replicas check tokens, access rules and metering in the platform database: on the
    # serving cluster, the same PostgreSQL as the gateway, never a pod-local SQLite file; and never on
    # the jobs' RayCluster, where researchers' code runs
    serving = wait("serving head and workers", lambda: (s := [p for p in pods(c, ns, mine) if p["metadata"]["labels"].get("indai.io/component")
                                                              in ("serve-head", "serve-worker") and p["status"].get("phase") == "Running"])
                   and len(s) == 3 and s)
    for p in serving:
        ray_env = {e["name"]: e for e in ray_container(p["spec"])["env"]}
        assert ray_env["INDAI_DB_URL"]["value"] == env["INDAI_DB_URL"]["value"] == \
            "postgresql+psycopg://indai:$(DB_PASSWORD)@postgres.example.internal:5432/indai", p["metadata"]["name"]
        assert ray_env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "indai-db", "key": "password"}
        # no Ray token, member keys or API credentials: no Secret or projected volume at all
        assert "INDAI_SECRETS_DIR" not in ray_env and not any(k.startswith("RAY_AUTH") for k in ray_env), p["metadata"]["name"]
        assert not [v["name"] for v in p["spec"].get("volumes", []) if "secret" in v or "projected" in v], p["metadata"]["name"]
        assert p["spec"]["serviceAccountName"] == "auto-indai-serve" and p["spec"]["automountServiceAccountToken"] is False
        assert node_pool(c, p["spec"]["nodeName"]) == "cpu"
        # GCS fault tolerance, as the operator wires it: the head's GCS writes to the admin's Redis with
        # the password from the admin's Secret; the workers wait 10 min (not 60 s) for a restarted head
        if p["metadata"]["labels"]["indai.io/component"] == "serve-head":
            assert ray_env["RAY_REDIS_ADDRESS"]["value"] == "redis.example.internal:6379"
            assert ray_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "indai-redis", "key": "password"}
            assert p["metadata"]["annotations"]["ray.io/ft-enabled"] == "true"
        else:
            assert ray_env["RAY_gcs_rpc_server_reconnect_timeout_s"]["value"] == "600"
            assert "REDIS_PASSWORD" not in ray_env and "RAY_REDIS_ADDRESS" not in ray_env
    for p in (head, gpu[0]):
        ray_env = {e["name"]: e for e in ray_container(p["spec"])["env"]}
        assert "INDAI_DB_URL" not in ray_env and "DB_PASSWORD" not in ray_env, p["metadata"]["name"]
        # the members' de-identification keys: the admin's Secret, read-only, where `indai data release` looks
        assert ray_env["INDAI_SECRETS_DIR"]["value"] == "/var/run/secrets/indai/member-keys"
        volumes = {v["name"]: v for v in p["spec"]["volumes"]}
        assert volumes["member-keys"]["secret"] == {"secretName": "indai-member-keys", "defaultMode": 0o400}
        assert {"name": "member-keys", "mountPath": "/var/run/secrets/indai/member-keys", "readOnly": True} in \
            ray_container(p["spec"])["volumeMounts"]

    # the nightly backup, run now as an admin would before an upgrade: the restricted namespace admits
    # its pod, which gets the store's keys (the admin's Secret), both databases and the backup bucket's keys
    c.kubectl("create", "job", "backup-now", "--from=cronjob/auto-indai-backup", "-n", ns)
    (run,) = wait("backup pod", lambda: [p for p in pods(c, ns, "job-name=backup-now")
                                         if p["status"].get("phase") in ("Running", "Succeeded")])  # KWOK ends it at once
    assert run["metadata"]["labels"]["indai.io/component"] == "backup" and run["spec"]["automountServiceAccountToken"] is False
    (ctr,) = run["spec"]["containers"]
    assert ctr["command"] == ["indai", "admin", "backup", "--to", "s3://indai-backups/prod", "--keep", "14"]
    benv = {e["name"]: e for e in ctr["env"]}
    assert benv["INDAI_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "indai-s3", "key": "secretKey"}
    assert benv["INDAI_MLFLOW_DB_URL"]["value"] == "postgresql+psycopg://indai:$(DB_PASSWORD)@postgres.example.internal:5432/mlflow"
    assert benv["INDAI_BACKUP_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "indai-backup-s3", "key": "accessKey"}
    assert (benv["INDAI_BACKUP_S3_ENDPOINT"]["value"], benv["INDAI_BACKUP_S3_SECURE"]["value"]) == ("backup-s3.example.internal:443", "1")
    # the backup key: a read-only file from the admin's Secret, never a variable holding the key
    assert benv["INDAI_BACKUP_KEY_FILE"]["value"] == "/var/run/secrets/indai/backup-key/key" and "INDAI_BACKUP_KEY" not in benv
    bvol = {v["name"]: v for v in run["spec"]["volumes"]}
    assert bvol["backup-key"]["secret"] == {"secretName": "indai-backup-key", "defaultMode": 0o400, "items": [{"key": "key", "path": "key"}]}
    assert {"name": "backup-key", "mountPath": "/var/run/secrets/indai/backup-key", "readOnly": True} in ctr["volumeMounts"]
    # a restore as the README makes one: a Job from the CronJob with another command (README uses jq)
    job = json.loads(c.kubectl("create", "job", "restore-now", "--from=cronjob/auto-indai-backup", "-n", ns,
                               "--dry-run=client", "-o", "json").stdout)
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["indai", "admin", "restore", "--from", "s3://indai-backups/prod", "--replace"]
    c.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
    (rest,) = wait("restore pod", lambda: [p for p in pods(c, ns, "job-name=restore-now") if p["status"].get("phase") in ("Running", "Succeeded")])
    assert rest["metadata"]["labels"]["indai.io/component"] == "backup"  # admitted by PostgreSQL's policy
    assert rest["spec"]["containers"][0]["command"][:3] == ["indai", "admin", "restore"]
    cron = json.loads(c.kubectl("get", "cronjob", "auto-indai-backup", "-n", ns, "-o", "json").stdout)["spec"]
    assert (cron["timeZone"], cron["concurrencyPolicy"]) == ("Asia/Seoul", "Forbid")
    # the weekly read-back holds the backup bucket's keys and the backup key, and no database or store key
    vcron = json.loads(c.kubectl("get", "cronjob", "auto-indai-backup-verify", "-n", ns, "-o", "json").stdout)["spec"]
    (vctr,) = vcron["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    venv = {e["name"] for e in vctr["env"]}
    assert vctr["command"] == ["indai", "admin", "verify-backup", "--at", "s3://indai-backups/prod", "--restore-test"]
    assert venv == {"INDAI_BACKUP_S3_ENDPOINT", "INDAI_BACKUP_S3_SECURE", "INDAI_BACKUP_S3_ACCESS_KEY", "INDAI_BACKUP_S3_SECRET_KEY",
                    "INDAI_BACKUP_KEY_FILE", "TMPDIR"}

    # the autoscaler may read pods and scale its RayCluster; nothing else, and nobody else may
    assert can(c, ns, "auto-indai-ray", "list", "pods") and can(c, ns, "auto-indai-ray", "patch", "rayclusters.ray.io")
    assert not can(c, ns, "auto-indai-ray", "get", "secrets") and not can(c, ns, "auto-indai-ray", "create", "rayjobs.ray.io")
    for verb, resource in (("get", "secrets"), ("list", "pods"), ("create", "rayjobs.ray.io"), ("get", "rayclusters.ray.io")):
        assert not can(c, ns, "auto-indai-serve", verb, resource), (verb, resource)
        assert not can(c, ns, "auto-indai-gateway", verb, resource), (verb, resource)
        assert not can(c, ns, "auto-indai-mlflow", verb, resource), (verb, resource)

    # a drain: the CPU nodes cordoned (so a replacement stays pending, as on a busy cluster), then
    # evictions. The disruption controller counts each part's ready pods, and the API server lets one
    # of two go and refuses the next while the first is not replaced
    for part, budget in (("gateway", "auto-indai-gateway"), ("serve-worker", "auto-indai-serve-worker")):
        status = wait(f"{budget} counted", lambda: (st := json.loads(c.kubectl("get", "pdb", budget, "-n", ns, "-o", "json").stdout)
                                                    .get("status", {})).get("disruptionsAllowed") == 1 and st)
        assert (status["expectedPods"], status["currentHealthy"]) == (2, 2), status
    cpu_nodes = c.kubectl("get", "nodes", "-l", "indai.io/pool=cpu", "-o", "name").stdout.split()
    c.kubectl("cordon", *cpu_nodes)
    try:
        for part in ("gateway", "serve-worker"):
            first, second = [p["metadata"]["name"] for p in pods(c, ns, f"{mine},indai.io/component={part}")][:2]
            assert evict(c, ns, first).returncode == 0
            refused = evict(c, ns, second)
            assert refused.returncode != 0 and "disruption budget" in refused.stderr, (part, refused.stdout, refused.stderr)
    finally:
        c.kubectl("uncordon", *cpu_nodes)

    c.helm("uninstall", "auto", "-n", ns, "--wait", "--timeout", "180s")
    left = json.loads(c.kubectl("get", "secret", "-n", ns, "-o", "json").stdout)["items"]
    assert {s["metadata"]["name"] for s in left} == {"indai-s3", "indai-db", "indai-member-keys", "auto-indai-secrets"}


RAY_TOKEN_DIR = "/var/run/secrets/indai/ray-auth"
RAY_TOKEN_FILE = f"{RAY_TOKEN_DIR}/token"
RAY_AUTH_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": RAY_TOKEN_FILE}


def ray_auth_of(spec: dict, container: dict) -> tuple[dict, dict]:
    """What one container gets of Ray's token: its RAY_AUTH_* (and INDAI_RAY_AUTH_*) variables, and
    for every mounted Secret volume (secret, [(key, path)], defaultMode, readOnly) by mount path."""
    env = {e["name"]: e.get("value") for e in container.get("env", []) if "RAY_AUTH" in e["name"]}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {}
    for m in container.get("volumeMounts", []):
        secret = volumes.get(m["name"], {}).get("secret")
        if secret:
            mounts[m["mountPath"]] = (secret["secretName"], [(i["key"], i["path"]) for i in secret.get("items", [])],
                                      secret.get("defaultMode"), m.get("readOnly"))
    return env, mounts


def token_mount(secret: str) -> dict:
    return {RAY_TOKEN_DIR: (secret, [("rayAuthToken", "token")], 0o400, True)}


def ray_container(spec: dict) -> dict:
    return next(ctr for ctr in spec["containers"] if ctr["name"] in ("ray-head", "ray-worker"))


def public_ray_paths() -> set[str]:
    """The HTTP paths Ray 2.60 answers without a token: the dashboard's (a set literal inside its
    server's start-up code) and the dashboard agent's."""
    import ast
    import inspect
    from ray.dashboard import http_server_agent, http_server_head

    src = inspect.getsource(http_server_head)
    start = src.index("public_exact_paths = {") + len("public_exact_paths = ")
    head = ast.literal_eval(src[start:src.index("}", start) + 1])
    return {p.lstrip("/") for p in (*head, *http_server_agent.PUBLIC_EXACT_PATHS)}


def test_ray_auth_token_reaches_every_ray_pod_and_the_gateway_only(k8s_cluster):
    """Installed with the gateway and the autoscaler: the release secret gets Ray's token once
    (kept by `helm upgrade`); the head, both worker groups, the autoscaler sidecar, KubeRay's
    wait-gcs-ready init containers and the gateway get RAY_AUTH_MODE=token and the token file,
    read-only and mode 0400; no other pod sees it; KubeRay's probes only ask Ray's public paths."""
    c = k8s_cluster
    ns = restricted_namespace(c, "rayauth")
    c.helm("install", "indai", CHART, "-n", ns, "--set", "gateway.enabled=true", "--set", "ray.autoscaling.enabled=true",
           "--wait", "--timeout", "180s")
    secret = lambda: json.loads(c.kubectl("get", "secret", "indai-secrets", "-n", ns, "-o", "json").stdout)["data"]
    token = base64.b64decode(secret()["rayAuthToken"]).decode()
    assert len(token) == 64 and token.isalnum()

    # the RayCluster as the API server stores it
    spec = json.loads(c.kubectl("get", "raycluster", "indai-ray", "-n", ns, "-o", "json").stdout)["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert [name for name, _ in groups] == ["head", "cpu", "gpu"]
    for name, group in groups:
        pod = group["template"]["spec"]
        assert ray_auth_of(pod, ray_container(pod)) == (RAY_AUTH_ENV, token_mount("indai-secrets")), name
        env = {e["name"]: e.get("value") for e in ray_container(pod).get("env", [])}
        assert env.get("HF_HUB_OFFLINE") == env.get("TRANSFORMERS_OFFLINE") == "1", name  # weights from the mirror only
        assert env.get("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S") == "2", name  # a dead proxy is replaced in seconds
        # Serve is off: member jobs on Ray pods get no platform database (only the gateway has it)
        assert "INDAI_DB_URL" not in env and "DB_PASSWORD" not in env, name
        assert "INDAI_SECRETS_DIR" not in env, name  # no member keys given: a release there is refused, not keyed at random
    scaler = spec["autoscalerOptions"]
    assert {e["name"]: e["value"] for e in scaler["env"]} == RAY_AUTH_ENV
    assert scaler["volumeMounts"] == [{"name": AUTOSCALER_API_VOLUME, "mountPath": SA_DIR, "readOnly": True},
                                      {"name": "ray-auth-token", "mountPath": RAY_TOKEN_DIR, "readOnly": True}]

    # the pods KubeRay made of it: every container that talks to Ray holds the token
    ray = "ray.io/cluster=indai-ray"
    head = wait("ray head", lambda: [p for p in pods(c, ns, ray + ",ray.io/node-type=head") if p["status"].get("phase") == "Running"])[0]
    workers = wait("2 ray workers", lambda: (w := [p for p in pods(c, ns, ray + ",ray.io/node-type=worker")
                                                 if p["status"].get("phase") == "Running"]) and len(w) == 2 and w)
    public = public_ray_paths()
    for p in (head, *workers):
        where = p["metadata"]["name"]
        spec = p["spec"]
        checked = spec["containers"] + spec.get("initContainers", [])
        names = {ctr["name"] for ctr in checked}
        assert names == ({"ray-head", "autoscaler"} if p is head else {"ray-worker", "wait-gcs-ready"}), (where, names)
        for ctr in checked:
            assert ray_auth_of(spec, ctr) == (RAY_AUTH_ENV, token_mount("indai-secrets")), (where, ctr["name"])
        ctr = ray_container(spec)
        for probe in (ctr["readinessProbe"], ctr["livenessProbe"]):
            paths = set(re.findall(r"http://localhost:\d+/(\S+)", " ".join(probe["exec"]["command"])))
            assert paths and paths <= public, (where, paths)

    # the gateway forwards with it (`indai gateway serve` reads INDAI_RAY_AUTH_TOKEN_PATH)
    gw = wait("gateway", lambda: [p for p in pods(c, ns, "indai.io/component=gateway") if p["status"].get("phase") == "Running"])[0]
    assert ray_auth_of(gw["spec"], gw["spec"]["containers"][0]) == ({"INDAI_RAY_AUTH_TOKEN_PATH": RAY_TOKEN_FILE},
                                                                  token_mount("indai-secrets"))
    assert {e["name"]: e.get("value") for e in gw["spec"]["containers"][0]["env"]}.get("HF_HUB_OFFLINE") == "1"
    # and nothing else: no other pod mounts or reads the key
    for p in pods(c, ns, "app.kubernetes.io/instance=indai"):
        if "rayAuthToken" in json.dumps(p["spec"]):
            assert p["metadata"]["labels"].get("indai.io/component") in ("ray-head", "ray-worker-cpu", "ray-worker-gpu", "gateway"), \
                p["metadata"]["name"]

    # `helm upgrade` keeps the token (lookup), and the RayCluster keeps the wiring
    c.helm("upgrade", "indai", CHART, "-n", ns, "--reuse-values", "--set", "ray.cpuWorkers.replicas=2", "--wait", "--timeout", "180s")
    assert base64.b64decode(secret()["rayAuthToken"]).decode() == token
    spec = json.loads(c.kubectl("get", "raycluster", "indai-ray", "-n", ns, "-o", "json").stdout)["spec"]
    assert {g["groupName"]: g["replicas"] for g in spec["workerGroupSpecs"]}["cpu"] == 2
    pod = spec["headGroupSpec"]["template"]["spec"]
    assert ray_auth_of(pod, ray_container(pod)) == (RAY_AUTH_ENV, token_mount("indai-secrets"))
    c.helm("uninstall", "indai", "-n", ns, "--wait", "--timeout", "180s")


def test_ray_auth_existing_secret_off_switch_and_schema(k8s_cluster):
    """ray.auth.existingSecret moves every mount to the admin's Secret (and the chart generates no
    token); ray.auth.enabled=false (or ray.enabled=false) renders none of it; the schema refuses
    unknown keys and bad Secret names; Serve, which KubeRay v1.5.0 deploys without the token, runs
    on a cluster of its own without it while the jobs' RayCluster keeps it."""
    c = k8s_cluster
    on = ["--set", "gateway.enabled=true", "--set", "ray.autoscaling.enabled=true", "--set", "networkPolicy.enabled=false"]
    ns = restricted_namespace(c, "rayauth-own")
    rendered = c.helm("template", "indai", CHART, "-n", ns, *on, "--set", "ray.auth.existingSecret=ray-token").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    done = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=rendered)
    assert done.stdout.count("(server dry run)") == len(docs)
    release_secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "indai-secrets")
    assert "rayAuthToken" not in release_secret["data"]
    holders = set()
    for d in docs:
        for where, spec in pod_specs(d):
            for ctr in spec["containers"]:
                env, mounts = ray_auth_of(spec, ctr)
                if mounts:
                    assert mounts == token_mount("ray-token"), where
                    assert env in (RAY_AUTH_ENV, {"INDAI_RAY_AUTH_TOKEN_PATH": RAY_TOKEN_FILE}), where
                    holders.add(where)
    assert holders == {"indai-ray/head", "indai-ray/cpu", "indai-ray/gpu", "indai-gateway"}
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    assert {e["name"] for e in ray["spec"]["autoscalerOptions"]["env"]} == set(RAY_AUTH_ENV)
    # without the NetworkPolicies `helm test` asks the head itself: its health answers, its job API refuses the token-less pod
    check = next(d for d in docs if d["metadata"]["name"] == "indai-test-ray-head")["spec"]["containers"][0]
    assert "/api/gcs_healthz" in check["args"][0] and "/api/jobs/)\" = 401" in check["args"][0] and "volumeMounts" not in check

    for off in (["--set", "ray.auth.enabled=false"], ["--set", "ray.enabled=false"]):
        rendered = c.helm("template", "indai", CHART, *on, *off).stdout
        for word in ("RAY_AUTH", "rayAuthToken", "ray-auth-token", RAY_TOKEN_DIR):
            assert word not in rendered, (off, word)
    off = [d for d in yaml.safe_load_all(c.helm("template", "indai", CHART, *on, "--set", "ray.auth.enabled=false").stdout) if d]
    check = next(d for d in off if d["metadata"]["name"] == "indai-test-ray-head")["spec"]["containers"][0]
    assert check["args"][0].endswith(":8265/api/version")
    assert "autoscalerOptions" in next(d for d in off if d["kind"] == "RayCluster")["spec"]

    typo = c.helm("template", "t", CHART, "--set", "ray.auth.enabeld=true", check=False)
    assert typo.returncode != 0 and "additional properties 'enabeld' not allowed" in typo.stderr
    name = c.helm("template", "t", CHART, "--set", "ray.auth.existingSecret=Ray_Token", check=False)
    assert name.returncode != 0 and "/ray/auth/existingSecret" in name.stderr
    served = [d for d in yaml.safe_load_all(c.helm("template", "indai", CHART, "--set", "serve.enabled=true").stdout) if d]
    for d in served:
        for where, spec in pod_specs(d):
            env, mounts = ray_auth_of(spec, ray_container(spec)) if d["kind"] in ("RayCluster", "RayService") else ({}, {})
            if d["kind"] == "RayService":
                assert env == {} and mounts == {}, where
            elif d["kind"] == "RayCluster":
                assert (env, mounts) == (RAY_AUTH_ENV, token_mount("indai-secrets")), where
    assert {d["kind"] for d in served} >= {"RayService", "RayCluster"}
