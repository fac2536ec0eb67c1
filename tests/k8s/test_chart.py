"""The chart against a real Kubernetes API server (built from source; KWOK simulates the nodes).

What these tests prove: the API server accepts every object of every scenario, Pod Security
"restricted" admits every pod the chart and the KubeRay operator create, the scheduler places
Ray pods on the right pools with the right GPU requests, RBAC gives each ServiceAccount what
it needs and no more, and install / upgrade / rollback / uninstall behave. What they cannot
prove: that the containers run (KWOK marks pods Running without starting anything) and that
NetworkPolicies are enforced (no CNI runs here).
"""
import json
import time
from pathlib import Path

import pytest
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


def node_pool(c, node: str) -> str:
    return json.loads(c.kubectl("get", "node", node, "-o", "json").stdout)["metadata"]["labels"]["indai.io/pool"]


def wait(what: str, check, timeout: float = 90):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


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
    if "gpu-autoscaling" in scenario.stem:
        assert "RayService" in kinds and "RayCluster" not in kinds


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
    c.helm("install", "indai", CHART, "-n", ns, "--wait", "--timeout", "180s")
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
    c.kubectl("apply", "-n", ns, "-f", example)
    cluster = wait("RayJob's RayCluster", lambda: json.loads(c.kubectl("get", "rayjob", "cwru-train", "-n", ns, "-o", "json").stdout)
                   .get("status", {}).get("rayClusterName"))
    worker = wait("GPU worker pod", lambda: [p for p in pods(c, ns, f"ray.io/cluster={cluster},ray.io/group=gpu") if p["spec"].get("nodeName")])
    assert node_pool(c, worker[0]["spec"]["nodeName"]) == "gpu"
    assert worker[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
