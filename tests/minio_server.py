"""A real MinIO server for tests, built from source once and cached.

Not a test module: fixtures in conftest.py use ``MinioServer``. The binary is built with
``go install`` at a pinned version (through the Go module proxy) the first time and kept in
``~/.cache/indai/tools`` (or ``$INDAI_TOOLS_CACHE``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MINIO_PIN = "v0.0.0-20260212201848-7aac2a2c5b7c"
MINIO_MODULE = "github.com/minio/minio"
START_TIMEOUT_S = 60.0


def tools_cache() -> Path:
    override = os.environ.get("INDAI_TOOLS_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache/indai/tools"


def minio_binary() -> Path:
    """The pinned minio binary; built with ``go install`` the first time (~2.5 min)."""
    folder = tools_cache() / f"minio-{MINIO_PIN}"
    binary = folder / "minio"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            f"the MinIO test server is not built yet and 'go' is not on PATH; install Go "
            f"(https://go.dev/dl) or put a minio binary at {binary}")
    folder.mkdir(parents=True, exist_ok=True)
    # Build into a private folder and rename, so parallel test runs never see half a binary.
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    print(f"building minio {MINIO_PIN} with go install (first time only, a few minutes)...",
          flush=True)
    started = time.monotonic()
    try:
        # Go's caches inside the staging folder, deleted with it: in $HOME they would keep gigabytes
        # no later run reads (-modcacherw: module files that can be deleted)
        subprocess.run([go, "install", f"{MINIO_MODULE}@{MINIO_PIN}"],
                       env={**os.environ, "GOBIN": str(staging), "GOCACHE": str(staging / "go-build"),
                            "GOMODCACHE": str(staging / "go-mod"), "GOFLAGS": "-modcacherw"}, check=True)
        os.replace(staging / "minio", binary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"built minio in {time.monotonic() - started:.0f} s: {binary}", flush=True)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MinioServer:
    """A MinIO server on loopback with random credentials and a private data folder.

    ``stop()`` and ``start()`` may be called any number of times: the server comes back
    on the same port with the same data and credentials.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self._owned_dir = None if data_dir else tempfile.mkdtemp(prefix="indai-minio-")
        self.work_dir = Path(data_dir or self._owned_dir)
        self.data_dir = self.work_dir / "data"
        self.log_path = self.work_dir / "minio.log"
        self.port = free_port()
        self.console_port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.access_key = "indai" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(16)
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "MinioServer":
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ,
               "MINIO_ROOT_USER": self.access_key,
               "MINIO_ROOT_PASSWORD": self.secret_key,
               "MINIO_UPDATE": "off",
               "MINIO_BROWSER": "off"}
        command = [str(minio_binary()), "server", str(self.data_dir),
                   "--address", self.endpoint,
                   "--console-address", f"127.0.0.1:{self.console_port}",
                   "--certs-dir", str(self.work_dir / "certs"), "--quiet"]
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen(command, env=env, stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_live()
        return self

    def _live(self) -> bool:
        url = f"http://{self.endpoint}/minio/health/live"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_live(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._live():
                return
            time.sleep(0.1)
        exited = self._process.poll()
        self.stop()
        state = f"exited with code {exited}" if exited is not None else \
            f"did not answer within {START_TIMEOUT_S:.0f} s"
        raise RuntimeError(f"MinIO on {self.endpoint} {state}; end of its log:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and delete its data if this object made the folder."""
        self.stop()
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def __enter__(self) -> "MinioServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
