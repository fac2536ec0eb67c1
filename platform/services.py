"""The embedded default's services: a local Ray head and an MLflow server on SQLite.

`indai up` starts them as background processes bound to 127.0.0.1, with their state under
`$INDAI_HOME`; `indai down` stops exactly those processes (not other Ray clusters on the
machine). The object store of the embedded default is the folder `$INDAI_HOME/store`, and
MLflow keeps its artefacts in that store's `mlflow-artifacts/` prefix, as on a cluster.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from indai.platform.errors import UserError
from indai.platform.settings import OFFLINE_ENV, RAY_SERVE_ENV, SERVICES_FILE, home, read_services, write_services

DEFAULT_PORTS = {"mlflow": 5000, "ray_gcs": 6380, "dashboard": 8265, "serve": 8000}
# `ray start` options whose defaults are fixed ports shared by every Ray on the machine
AGENT_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                    "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    if preferred and port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def ray_temp_dir(root: Path) -> Path:
    # short: Ray's unix sockets live below it and their paths are limited to 107 bytes
    return Path("/tmp") / f"indai-ray-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"


def _wait_http(url: str, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise UserError(f"{what} did not answer at {url} within {timeout:.0f} s; see {log}: {tail.splitlines()[-1] if tail else ''}")


def start_mlflow(root: Path, port: int, store_root: Path) -> dict:
    folder = root / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = store_root / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # MLflow's server-side job runner (GenAI scorers, trace rollups: 7 huey worker processes) is
    # not used by indai; without it the server starts in a fraction of the time and memory
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env)
    uri = f"http://127.0.0.1:{port}"
    _wait_http(f"{uri}/health", 180, "MLflow server", log)
    return {"mlflow_uri": uri, "mlflow_pid": proc.pid, "mlflow_log": str(log)}


def ray_auth_token_file(root: Path) -> Path:
    """Ray's own token (token authentication, Ray >= 2.5x): only the platform's processes and
    the job gateway hold it, so nobody reaches Ray's job API or GCS without going through indai."""
    path = root / "ray_auth_token"
    if not path.exists():
        import secrets

        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path


def ray_auth_env(state: dict | None = None) -> dict[str, str]:
    """Environment that lets a process talk to the embedded Ray cluster (empty if none is up)."""
    state = state if state is not None else read_services()
    token = state.get("ray_auth_token_path")
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token} if token else {}


def use_ray_auth() -> None:
    """Put the embedded cluster's token settings into this process before ray.init. Ray reads
    them into its config when it is imported, so a process that imported Ray earlier has that
    config and the token cache refreshed."""
    env = ray_auth_env()
    if not env or all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def start_ray(root: Path, gcs_port: int, dashboard_port: int, num_cpus: int) -> dict:
    tmp = ray_temp_dir(root)
    token_file = ray_auth_token_file(root)
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if not ray:
        raise UserError("the `ray` command is not installed in this environment: run `make install`")
    cmd = [ray, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--temp-dir={tmp}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    # Ray's per-node agents listen on fixed default ports (52365, 10001, ...): a second indai home
    # on the same machine would find them taken and its job API would answer "No available agent
    # to submit job". Every one gets a free port instead.
    agent_ports = {name: pick_port(0) for name in AGENT_PORT_FLAGS}
    cmd += [f"--{name}={port}" for name, port in agent_ports.items()]
    # every Ray process of this cluster inherits the tag, so `indai down` stops exactly these
    # job drivers inherit this environment: they find `indai` (this environment's bin folder first
    # on PATH), the platform's services (INDAI_HOME) and Ray's token
    env = dict(os.environ, **OFFLINE_ENV, **RAY_SERVE_ENV, RAY_USAGE_STATS_ENABLED="0", INDAI_RAY_TAG=tmp.name, RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_file), INDAI_HOME=str(root),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # ... but not the platform database's URL and password: members' jobs run in these processes
    # and need none of it (the Serve app gets the URL as an argument, as on a cluster)
    env.pop("INDAI_DB_URL", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if done.returncode != 0:
        raise UserError(f"`ray start` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return {"ray_address": f"127.0.0.1:{gcs_port}", "ray_temp_dir": str(tmp), "ray_auth_token_path": str(token_file),
            "ray_dashboard": f"http://127.0.0.1:{dashboard_port}", "ray_agent_ports": agent_ports}


def up(num_cpus: int | None = None, ports: dict | None = None) -> dict:
    root = home()
    state = read_services(root)
    if state and _alive(state.get("mlflow_pid")) and _ray_pids(state):
        return state
    if state:
        down()
    ports = {**DEFAULT_PORTS, **(ports or {})}
    store_root = root / "store"
    store_root.mkdir(parents=True, exist_ok=True)
    state = {"store_uri": store_root.as_uri(), "home": str(root)}
    try:
        state.update(start_mlflow(root, pick_port(ports["mlflow"]), store_root))
        write_services(state, root)
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        state.update(start_ray(root, pick_port(ports["ray_gcs"]), pick_port(ports["dashboard"]), cpus))
        serve_port = pick_port(ports["serve"])
        state.update({"serve_port": serve_port, "serve_url": f"http://127.0.0.1:{serve_port}"})
        write_services(state, root)
    except BaseException:
        down()
        raise
    return state


def _ray_pids(state: dict) -> list[int]:
    import psutil

    tmp = state.get("ray_temp_dir")
    if not tmp:
        return []
    tag = Path(tmp).name
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(tmp in part for part in (p.info["cmdline"] or [])) or p.environ().get("INDAI_RAY_TAG") == tag:
                pids.append(p.info["pid"])
                # Ray's agents overwrite their argv and environment with a process title, so
                # neither the temp dir nor the tag finds them: take the children of what matched
                pids += [c.pid for c in p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(set(pids))


def _stop_pids(pids: list[int], grace: float = 10.0) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def down() -> dict:
    root = home()
    state = read_services(root)
    pid = state.get("mlflow_pid")
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
        for _ in range(40):
            if not _alive(pid):
                break
            time.sleep(0.25)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    _stop_pids(_ray_pids(state))
    (root / SERVICES_FILE).unlink(missing_ok=True)
    return state


def status() -> dict:
    state = read_services(home())
    if not state:
        return {"running": False}
    return {**state, "running": _alive(state.get("mlflow_pid")) and bool(_ray_pids(state)),
            "mlflow_alive": _alive(state.get("mlflow_pid")), "ray_processes": len(_ray_pids(state))}
