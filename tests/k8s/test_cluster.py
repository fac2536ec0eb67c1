"""The local test cluster itself (k8s/testenv): a real control plane built from the pinned
sources, KWOK nodes in a CPU and a GPU pool, the KubeRay operator, Pod Security admission.
If these fail, the chart tests next to them cannot be trusted."""
import json
import time
from pathlib import Path

import pytest
from waiting import wait

pytestmark = pytest.mark.k8s

PINS = Path(__file__).resolve().parents[2] / "k8s" / "testenv" / "pins.env"
CPU_POOL = {"kwok-cpu-0", "kwok-cpu-1"}
GPU_POOL = {"kwok-gpu-0", "kwok-gpu-1"}



def get(c, *args) -> dict:
    return json.loads(c.kubectl("get", *args, "-o", "json").stdout)


def apply(c, *docs: dict) -> None:
    c.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))


def namespace(c, name: str, **labels: str) -> str:
    c.kubectl("create", "namespace", name)
    if labels:
        c.kubectl("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))
    return name


def running_pods(c, ns: str, selector: str, count: int) -> list[dict]:
    def check():
        items = get(c, "pods", "-n", ns, "-l", selector)["items"]
        ok = [p for p in items if p["status"].get("phase") == "Running" and p["spec"].get("nodeName")
              and all(s.get("ready") for s in p["status"].get("containerStatuses", [{}]))]
        return ok if len(ok) == count else None
    return wait(f"{count} running pod(s) {selector} in {ns}", check, timeout=90)


def pod(name: str, ns: str, **spec) -> dict:
    container = {"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"containers": [container], **spec}}


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
RESTRICTED_SC = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000,
                 "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def test_control_plane_is_the_pinned_release_and_healthy(k8s_cluster):
    pins = dict(line.split("=", 1) for line in PINS.read_text().splitlines() if "=" in line and not line.startswith("#"))
    version = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"] == pins["KUBERNETES"]
    assert k8s_cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    assert k8s_cluster.kubectl("get", "--raw", "/livez").stdout.strip() == "ok"
    # everything listens on loopback only
    server = k8s_cluster.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    assert server.startswith("https://127.0.0.1:")
    assert k8s_cluster.helm("version", "--short").stdout.strip() == pins["HELM"]
    crds = {c["metadata"]["name"] for c in get(k8s_cluster, "crd")["items"]}
    assert {"rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io"} <= crds


def test_four_ready_nodes_in_a_cpu_and_a_gpu_pool(k8s_cluster):
    nodes = {n["metadata"]["name"]: n for n in get(k8s_cluster, "nodes")["items"]}
    assert set(nodes) == CPU_POOL | GPU_POOL
    for name, node in nodes.items():
        conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert conds.get("Ready") == "True", (name, conds)
        labels, alloc = node["metadata"]["labels"], node["status"]["allocatable"]
        taints = node["spec"].get("taints", [])
        if name in GPU_POOL:
            assert labels["indai.io/pool"] == "gpu"
            assert labels["nvidia.com/gpu.present"] == "true"
            assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
            assert alloc["nvidia.com/gpu"] == "8" and node["status"]["capacity"]["nvidia.com/gpu"] == "8"
            assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in taints
        else:
            assert labels["indai.io/pool"] == "cpu"
            assert "nvidia.com/gpu" not in alloc
            assert not [t for t in taints if t["key"] == "nvidia.com/gpu"]


def test_deployment_pods_run_on_the_cpu_pool_and_jobs_complete(k8s_cluster):
    c = k8s_cluster
    ns = namespace(c, "tc-workloads")
    c.kubectl("create", "deployment", "web", "-n", ns, "--image=nginx:1.27", "--replicas=3")
    pods = running_pods(c, ns, "app=web", 3)
    assert {p["spec"]["nodeName"] for p in pods} <= CPU_POOL  # the GPU taint keeps them off GPU nodes
    c.kubectl("create", "job", "once", "-n", ns, "--image=busybox:1.36", "--", "true")
    wait("job to complete", lambda: get(c, "job", "once", "-n", ns)["status"].get("succeeded") == 1)
    # the service-account controllers ran: default SA exists and the API server issues tokens for it
    assert c.kubectl("create", "token", "default", "-n", ns).stdout.count(".") == 2
    # deleting the namespace removes it and everything in it (namespace + garbage collector)
    c.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=90s")
    assert c.kubectl("get", "namespace", ns, check=False).returncode != 0


def test_gpu_pod_lands_on_gpu_pool_only_with_toleration(k8s_cluster):
    c = k8s_cluster
    ns = namespace(c, "tc-gpu")
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    apply(c, pod("with-toleration", ns, container=gpu, tolerations=[GPU_TOLERATION]),
          pod("no-toleration", ns, container=gpu),
          pod("too-many-gpus", ns, container={"resources": {"limits": {"nvidia.com/gpu": "9"}}}, tolerations=[GPU_TOLERATION]))
    placed = running_pods(c, ns, "app=with-toleration", 1)[0]
    assert placed["spec"]["nodeName"] in GPU_POOL

    def unschedulable(name):
        p = get(c, "pod", name, "-n", ns)
        conds = {x["type"]: x for x in p["status"].get("conditions", [])}
        sched = conds.get("PodScheduled", {})
        return p["status"].get("phase") == "Pending" and sched.get("reason") == "Unschedulable" and sched.get("message")
    assert "untolerated taint" in wait("no-toleration pod to be unschedulable", lambda: unschedulable("no-toleration"))
    assert "nvidia.com/gpu" in wait("9-GPU pod to be unschedulable", lambda: unschedulable("too-many-gpus"))
    c.kubectl("delete", "namespace", ns, "--wait=false")


def test_raycluster_is_reconciled_into_running_head_and_workers(k8s_cluster):
    c = k8s_cluster
    ns = namespace(c, "tc-ray")
    ray = "rayproject/ray:2.40.0"
    cluster = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "rc", "namespace": ns},
        "spec": {
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {
                "nodeSelector": {"indai.io/pool": "cpu"},
                "containers": [{"name": "ray-head", "image": ray, "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}]}}},
            "workerGroupSpecs": [
                {"groupName": "cpu", "replicas": 2, "minReplicas": 0, "maxReplicas": 4, "rayStartParams": {},
                 "template": {"spec": {"nodeSelector": {"indai.io/pool": "cpu"}, "containers": [
                     {"name": "ray-worker", "image": ray, "resources": {"limits": {"cpu": "4", "memory": "8Gi"}}}]}}},
                {"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "rayStartParams": {},
                 "template": {"spec": {"nodeSelector": {"indai.io/pool": "gpu"}, "tolerations": [GPU_TOLERATION],
                                       "containers": [{"name": "ray-worker", "image": ray, "resources": {
                                           "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}}}]}}},
            ],
        },
    }
    apply(c, cluster)
    head = running_pods(c, ns, "ray.io/cluster=rc,ray.io/node-type=head", 1)
    cpu_workers = running_pods(c, ns, "ray.io/cluster=rc,ray.io/group=cpu", 2)
    gpu_workers = running_pods(c, ns, "ray.io/cluster=rc,ray.io/group=gpu", 1)
    assert {p["spec"]["nodeName"] for p in head + cpu_workers} <= CPU_POOL
    assert gpu_workers[0]["spec"]["nodeName"] in GPU_POOL
    # the operator made the head's Service and reports the cluster ready with its resources
    assert get(c, "service", "-n", ns, "-l", "ray.io/cluster=rc")["items"]
    status = wait("RayCluster status ready", lambda: (s := get(c, "raycluster", "rc", "-n", ns).get("status", {}))
                  .get("state") == "ready" and s)
    assert status["availableWorkerReplicas"] == 3
    assert status["desiredGPU"] == "2"
    # scaling the CR is reconciled too
    c.kubectl("patch", "raycluster", "rc", "-n", ns, "--type=json",
              "-p", json.dumps([{"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 3}]))
    running_pods(c, ns, "ray.io/cluster=rc,ray.io/group=cpu", 3)
    c.kubectl("delete", "namespace", ns, "--wait=false")


def test_restricted_namespace_rejects_privileged_pod(k8s_cluster):
    c = k8s_cluster
    ns = namespace(c, "tc-restricted", **{"pod-security.kubernetes.io/enforce": "restricted"})
    privileged = pod("privileged", ns, container={"securityContext": {"privileged": True}})
    done = c.kubectl("apply", "-f", "-", input=json.dumps(privileged), check=False)
    assert done.returncode != 0
    assert 'violates PodSecurity "restricted' in done.stderr and "privileged" in done.stderr
    # a pod that meets the restricted profile is admitted and runs, so the refusal was the policy
    apply(c, pod("compliant", ns, container={"securityContext": RESTRICTED_SC}))
    running_pods(c, ns, "app=compliant", 1)
    # the same privileged pod is admitted where no level is enforced
    open_ns = namespace(c, "tc-unrestricted")
    privileged["metadata"]["namespace"] = open_ns
    apply(c, privileged)
    for n in (ns, open_ns):
        c.kubectl("delete", "namespace", n, "--wait=false")
