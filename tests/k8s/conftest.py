"""The k8s tier's cluster: the same `k8s/testenv/cluster.py` as `make k8s-up`, with a private
state folder, started once per session and stopped at the end."""
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cluster_module():
    spec = importlib.util.spec_from_file_location("indai_k8s_testenv", REPO / "k8s" / "testenv" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Cluster:
    """What the k8s tests get: an admin kubeconfig, the folder holding the pinned kubectl and
    helm, an environment for subprocesses (KUBECONFIG set, that folder first on PATH, helm's
    own folders private to the session) and helpers that run the two tools in it."""
    kubeconfig: Path
    bin: Path
    env: dict
    home: Path

    def _run(self, tool: str, args, check: bool, input: str | None, timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.bin / tool), *map(str, args)], input=input, capture_output=True, text=True,
                              env=self.env, timeout=timeout, cwd=REPO)
        if check and done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def kubectl(self, *args, check: bool = True, input: str | None = None, timeout: float = 120):
        return self._run("kubectl", args, check, input, timeout)

    def helm(self, *args, check: bool = True, input: str | None = None, timeout: float = 300):
        return self._run("helm", args, check, input, timeout)


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory):
    mod = _cluster_module()
    if not (mod.bin_dir() / "kube-apiserver").exists() and not shutil.which("go"):
        pytest.fail("the k8s tier needs the local cluster's tools, which are not built, and Go is not installed "
                    "to build them: install Go (apt-get install golang) and run `make k8s-up` once")
    home = tmp_path_factory.mktemp("k8s-home")
    old = os.environ.get("INDAI_K8S_HOME")
    os.environ["INDAI_K8S_HOME"] = str(home)
    try:
        try:
            kubeconfig = mod.up()  # builds the pinned tools first when they are not cached
        except SystemExit as e:  # cluster.py reports failures as SystemExit; keep pytest running
            raise RuntimeError(f"local cluster did not start: {e}") from None
        bins = mod.bin_dir()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PATH=f"{bins}:{os.environ.get('PATH', '')}",
                   HELM_CACHE_HOME=str(home / "helm-cache"), HELM_CONFIG_HOME=str(home / "helm-config"),
                   HELM_DATA_HOME=str(home / "helm-data"))
        yield Cluster(kubeconfig, bins, env, home)
    finally:
        mod.down()
        if old is None:
            os.environ.pop("INDAI_K8S_HOME", None)
        else:
            os.environ["INDAI_K8S_HOME"] = old
