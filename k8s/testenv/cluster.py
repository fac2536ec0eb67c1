"""A real Kubernetes control plane on this machine, built from source, for the chart's tests.

    python k8s/testenv/cluster.py build   # build the pinned tools once (cached outside the repo)
    python k8s/testenv/cluster.py up      # etcd, kube-apiserver, controller-manager, scheduler,
                                          # KWOK (simulated CPU and GPU nodes), KubeRay operator
    python k8s/testenv/cluster.py env     # KUBECONFIG=... PATH=... for the stock kubectl and helm
    python k8s/testenv/cluster.py down

(`k8s/testenv/build.sh`, `up.sh` and `down.sh` run the same commands; the pytest fixture in
tests/k8s/conftest.py imports this file and calls up() and down() with a private state folder.)

No container engine runs here, so KWOK plays the kubelets: pods scheduled onto its fake
nodes are marked Running and Ready without running anything. Everything listens on
127.0.0.1. State (certificates, etcd data, logs, pids, kubeconfig) lives in
$INDAI_K8S_HOME (default ~/.indai-k8s). Only the standard library and the stock openssl
command are used, so `make k8s-up` works before any Python package is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINS_FILE = HERE / "pins.env"
KUBE_MODULE = HERE / "kube"
ETCD_MODULE = HERE / "etcd"
SERVICE_RANGE = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"

# bump when the way the tools are built changes (flags, stamping): it is part of the cache key
BUILD_RECIPE = "2: -trimpath -s -w, CGO off, version-stamped kube binaries and helm"

CPU_NODES = [f"kwok-cpu-{i}" for i in range(2)]
GPU_NODES = [f"kwok-gpu-{i}" for i in range(2)]


def pins() -> dict[str, str]:
    out = {}
    for line in PINS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def tools_dir() -> Path:
    h = hashlib.sha256()
    for f in (PINS_FILE, *(m / n for m in (KUBE_MODULE, ETCD_MODULE) for n in ("go.mod", "go.sum", "tools.go"))):
        h.update(f.read_bytes())
    h.update(BUILD_RECIPE.encode())
    root = Path(os.environ.get("INDAI_TOOLS_CACHE", Path.home() / ".cache" / "indai" / "tools"))
    return root / f"k8s-{h.hexdigest()[:12]}"


def bin_dir() -> Path:
    return tools_dir() / "bin"


def home() -> Path:
    return Path(os.environ.get("INDAI_K8S_HOME", Path.home() / ".indai-k8s")).expanduser().resolve()


def log(msg: str) -> None:
    print(f"[k8s-testenv] {msg}", file=sys.stderr, flush=True)


# ---- build ------------------------------------------------------------------------------------

def _go(args: list[str], cwd: Path, env: dict) -> None:
    done = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"go {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _ldflags(cmd: str, version: str) -> str:
    """-s -w, plus the version a release build would stamp (otherwise the API server reports
    v0.0.0-master, which `kubectl version` cannot parse and helm's kubeVersion checks reject)."""
    flags = ["-s", "-w"]
    if cmd.startswith("kube"):
        major, minor = version.lstrip("v").split(".")[:2]
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [f"-X {pkg}.gitVersion={version}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}",
                      f"-X {pkg}.gitTreeState=clean"]
    elif cmd == "helm":
        flags += [f"-X helm.sh/helm/v3/internal/version.version={version}", "-X helm.sh/helm/v3/internal/version.gitTreeState=clean"]
    return " ".join(flags)


def build() -> Path:
    """Build every pinned tool that is missing; print how long each took."""
    if not shutil.which("go"):
        raise SystemExit("Go is needed to build the test cluster (apt-get install golang, or see go.dev)")
    p = pins()
    out = bin_dir()
    out.mkdir(parents=True, exist_ok=True)
    # Go's build and module caches are private to this build and deleted after it: left in $HOME
    # they hold about 9 GB (measured: 6.1 GB build cache, 2.9 GB modules) that no later run reads,
    # which is more than a CI machine's disk may have to spare. -modcacherw: deletable files.
    caches = tools_dir() / ".go-caches"
    env = dict(os.environ, GOBIN=str(out), CGO_ENABLED="0", GOFLAGS="-trimpath -modcacherw",
               GOCACHE=str(caches / "build"), GOMODCACHE=str(caches / "mod"))
    try:
        _build_missing(p, out, env)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    return out


def _build_missing(p: dict, out: Path, env: dict) -> None:
    started = time.time()
    # modules whose go.mod replaces siblings with local folders cannot be `go install`ed: our own
    # small modules (kube/, etcd/) require them and point the replacements at published versions
    local = {cmd: (KUBE_MODULE, f"k8s.io/kubernetes/cmd/{cmd}", p["KUBERNETES"])
             for cmd in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")}
    local["etcd"] = (ETCD_MODULE, "go.etcd.io/etcd/server/v3", p["ETCD"])
    for cmd, (module, package, version) in local.items():
        if not (out / cmd).exists():
            t = time.time()
            tmp = out / f".{cmd}.tmp"  # an interrupted build leaves no half-written tool behind
            _go(["build", "-tags", "tools", f"-ldflags={_ldflags(cmd, version)}", "-o", str(tmp), package], module, env)
            tmp.rename(out / cmd)
            log(f"built {cmd} {version} in {time.time() - t:.0f} s")
    remote = {"kwok": f"sigs.k8s.io/kwok/cmd/kwok@{p['KWOK']}",
              "ray-operator": f"github.com/ray-project/kuberay/ray-operator@{p['KUBERAY']}",
              "helm": f"helm.sh/helm/v3/cmd/helm@{p['HELM']}"}
    for name, target in remote.items():
        if not (out / name).exists():
            t = time.time()
            _go(["install", f"-ldflags={_ldflags(name, target.split('@')[1])}", target], HERE, env)
            installed = out / target.split("@")[0].rsplit("/", 1)[-1]
            if installed != out / name and installed.exists():
                installed.rename(out / name)
            log(f"built {name} {target.split('@')[1]} in {time.time() - t:.0f} s")
    crds = tools_dir() / "kuberay-crds"
    if not crds.exists():
        info = subprocess.run(["go", "mod", "download", "-json", f"github.com/ray-project/kuberay/ray-operator@{p['KUBERAY']}"],
                              cwd=HERE, capture_output=True, text=True, check=True, env=env)
        src = Path(json.loads(info.stdout)["Dir"]) / "config" / "crd" / "bases"
        tmp = crds.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        for f in tmp.rglob("*"):
            f.chmod(0o644 if f.is_file() else 0o755)
        tmp.rename(crds)
    if time.time() - started > 5:
        log(f"tools built in {time.time() - started:.0f} s into {out}")


# ---- certificates -----------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(pki: Path) -> None:
    if (pki / "admin.crt").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "365",
             "-subj", "/CN=indai-testenv-ca", cwd=pki)
    sans = f"subjectAltName=IP:127.0.0.1,IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
    for name, subj, ext in (("apiserver", "/CN=kube-apiserver", sans), ("admin", "/O=system:masters/CN=indai-admin", None)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        args = ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "365"]
        if ext:
            (pki / f"{name}.ext").write_text(ext + "\n")
            args += ["-extfile", f"{name}.ext"]
        _openssl(*args, cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, pki: Path, port: int) -> None:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: indai-testenv
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {pki / 'ca.crt'}
users:
- name: admin
  user:
    client-certificate: {pki / 'admin.crt'}
    client-key: {pki / 'admin.key'}
contexts:
- name: indai-testenv
  context: {{cluster: indai-testenv, user: admin}}
current-context: indai-testenv
""")
    path.chmod(0o600)


# ---- processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, args: list[str], root: Path, env: dict | None = None) -> int:
    logf = open(root / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    (root / "pids" / name).write_text(str(proc.pid))
    _children[proc.pid] = proc
    return proc.pid


_children: dict[int, subprocess.Popen] = {}  # started by this process: reaped by down(), no zombies


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as gone
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def wait_for(what: str, check, timeout: float, root: Path, proc: str | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        if proc:
            pid = int((root / "pids" / proc).read_text())
            if not _alive(pid):
                break
        time.sleep(0.3)
    tail = ""
    if proc:
        tail = (root / "logs" / f"{proc}.log").read_text(errors="replace")[-2000:]
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s; log tail:\n{tail}")


def _https_ok(url: str, pki: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
        return r.status == 200


def kubectl(root: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, KUBECONFIG=str(root / "kubeconfig"))
    return subprocess.run([str(bin_dir() / "kubectl"), *args], input=input, capture_output=True, text=True, env=env, check=check)


def node_manifest(name: str, gpu: bool) -> dict:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "type": "kwok", "indai.io/pool": "gpu" if gpu else "cpu"}
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    spec: dict = {}
    if gpu:
        labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}
        capacity["nvidia.com/gpu"] = "8"
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake",
                                                                         "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": spec, "status": {"capacity": capacity, "allocatable": capacity}}


def storage_manifests(count: int = 8) -> dict:
    """No volume plugin runs here: a default StorageClass with pre-made PersistentVolumes that the
    controller-manager binds to claims, as on a cluster with static provisioning."""
    sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
          "metadata": {"name": "testenv-local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
          "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"}
    pvs = [{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"testenv-pv-{i}"},
            "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "testenv-local",
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/var/lib/testenv/pv-{i}"}}}
           for i in range(count)]
    return {"apiVersion": "v1", "kind": "List", "items": [sc, *pvs]}


def up() -> Path:
    """Start the cluster (building the tools first if needed); returns the admin kubeconfig.
    A start that fails part-way stops what it started (logs stay in $INDAI_K8S_HOME/logs)."""
    try:
        return _up()
    except BaseException:
        down()
        raise


def _up() -> Path:
    t0 = time.time()
    bins = build()
    root = home()
    if (root / "state.json").exists():
        state = json.loads((root / "state.json").read_text())
        if all(_alive(int((root / "pids" / n).read_text())) for n in state["processes"] if (root / "pids" / n).exists()):
            log(f"already running; KUBECONFIG={root / 'kubeconfig'}")
            return root / "kubeconfig"
        down()
    for d in ("logs", "pids", "pki", "etcd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    pki = root / "pki"
    make_certs(pki)
    ports = {k: free_port() for k in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "kwok", "kuberay_metrics", "kuberay_probe")}
    kubeconfig = root / "kubeconfig"
    write_kubeconfig(kubeconfig, pki, ports["apiserver"])
    processes = []

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    start("etcd", [str(bins / "etcd"), "--data-dir", str(root / "etcd"), "--listen-client-urls", etcd_url,
                   "--advertise-client-urls", etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{ports['etcd_peer']}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports['etcd_peer']}",
                   "--initial-cluster", f"default=http://127.0.0.1:{ports['etcd_peer']}", "--log-level", "warn"], root)
    processes.append("etcd")
    wait_for("etcd", lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=2).status == 200, 60, root, "etcd")

    start("kube-apiserver", [
        str(bins / "kube-apiserver"), f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}", "--advertise-address=127.0.0.1",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}", f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}", "--service-account-issuer=https://kubernetes.default.svc",
        "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_RANGE}",
        # privileged pods are allowed by the API server, so a refusal can only come from the
        # namespace's Pod Security level
        "--allow-privileged=true", "--enable-priority-and-fairness=false", "--profiling=false",
        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,PodSecurity,DefaultStorageClass,ResourceQuota,LimitRanger",
    ], root)
    processes.append("kube-apiserver")
    wait_for("kube-apiserver", lambda: _https_ok(f"https://127.0.0.1:{ports['apiserver']}/readyz", pki), 120, root, "kube-apiserver")

    start("kube-controller-manager", [
        str(bins / "kube-controller-manager"), f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", f"--secure-port={ports['kcm']}",
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
        "--use-service-account-credentials=true", "--leader-elect=false", f"--service-cluster-ip-range={SERVICE_RANGE}",
        "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
        "--concurrent-gc-syncs=5", "--profiling=false",
    ], root)
    processes.append("kube-controller-manager")
    start("kube-scheduler", [
        str(bins / "kube-scheduler"), f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}",
        "--leader-elect=false", "--profiling=false",
    ], root)
    processes.append("kube-scheduler")
    start("kwok", [
        str(bins / "kwok"), f"--kubeconfig={kubeconfig}", "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake", "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{ports['kwok']}", "--cidr=10.244.0.0/16",
        "--node-lease-duration-seconds=40",
    ], root)
    processes.append("kwok")

    wait_for("default service account", lambda: kubectl(root, "get", "serviceaccount", "default", check=False).returncode == 0,
             120, root, "kube-controller-manager")
    nodes = {"apiVersion": "v1", "kind": "List", "items": [node_manifest(n, False) for n in CPU_NODES] + [node_manifest(n, True) for n in GPU_NODES]}
    kubectl(root, "apply", "-f", "-", input=json.dumps(nodes))
    kubectl(root, "apply", "-f", "-", input=json.dumps(storage_manifests()))
    kubectl(root, "apply", "--server-side", "-f", str(tools_dir() / "kuberay-crds"))
    kubectl(root, "wait", "--for=condition=Established", "--timeout=60s", "crd/rayclusters.ray.io", "crd/rayjobs.ray.io", "crd/rayservices.ray.io")
    start("kuberay-operator", [str(bins / "ray-operator"), f"--metrics-addr=127.0.0.1:{ports['kuberay_metrics']}",
                               f"--health-probe-bind-address=127.0.0.1:{ports['kuberay_probe']}",
                               "--enable-leader-election=false"], root, env={"KUBECONFIG": str(kubeconfig)})
    processes.append("kuberay-operator")
    wait_for("4 Ready nodes", lambda: _ready_nodes(root) == len(CPU_NODES) + len(GPU_NODES), 120, root, "kwok")
    wait_for("KubeRay operator", lambda: urllib.request.urlopen(f"http://127.0.0.1:{ports['kuberay_probe']}/readyz", timeout=2).status == 200,
             120, root, "kuberay-operator")
    (root / "state.json").write_text(json.dumps({"ports": ports, "processes": processes, "bin": str(bins)}, indent=2))
    log(f"cluster up in {time.time() - t0:.0f} s; export KUBECONFIG={kubeconfig} PATH={bins}:$PATH")
    return kubeconfig


def _ready_nodes(root: Path) -> int:
    out = kubectl(root, "get", "nodes", "-o", "json").stdout
    ready = 0
    for n in json.loads(out)["items"]:
        conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
        ready += conds.get("Ready") == "True"
    return ready


def _is_ours(pid: int, name: str) -> bool:
    """A pid file can outlive its process (a reboot, a crash); never signal a reused pid."""
    try:
        argv0 = Path(f"/proc/{pid}").joinpath("cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return True  # no /proc: trust the pid file
    return Path(argv0).name == {"kuberay-operator": "ray-operator"}.get(name, name)


def down() -> None:
    root = home()
    pids_dir = root / "pids"
    if not pids_dir.exists():
        return
    order = ["kuberay-operator", "kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
    for name in order + sorted(p.name for p in pids_dir.iterdir() if p.name not in order):
        f = pids_dir / name
        if not f.exists():
            continue
        pid = int(f.read_text())
        if _alive(pid) and _is_ours(pid, name):
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        child = _children.pop(pid, None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        f.unlink()
    (root / "state.json").unlink(missing_ok=True)
    shutil.rmtree(root / "etcd", ignore_errors=True)  # a fresh cluster every time
    log("cluster stopped")


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    if cmd == "build":
        print(build())
    elif cmd == "up":
        up()
    elif cmd == "down":
        down()
    elif cmd == "env":
        print(f"export KUBECONFIG={home() / 'kubeconfig'}\nexport PATH={bin_dir()}:$PATH")
    elif cmd == "bin":
        print(bin_dir())
    else:
        print(__doc__)
        return 0 if cmd == "help" else 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
