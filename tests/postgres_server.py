"""A real PostgreSQL server from Debian's packages for tests: initdb into a temporary folder,
listen on a free loopback port with password (scram) authentication, stop at the end.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql (Debian's package)")
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="indai-pg-"))
        self.user, self.password = "indai", secrets.token_urlsafe(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if self.as_postgres else list(args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr[-2000:]}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"

    def new_database(self, prefix: str = "t") -> str:
        """A new, empty database on this server (its name: `prefix` and a random suffix, so tests
        never share one); its URL."""
        import uuid

        from sqlalchemy import create_engine, text

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        engine = create_engine(self.url)
        try:
            with engine.connect() as c:
                c.execution_options(isolation_level="AUTOCOMMIT").execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name

    def __enter__(self) -> "PostgresServer":
        bins = pg_bin()
        data, pwfile = self.dir / "data", self.dir / "pw"
        pwfile.write_text(self.password)
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(str(bins / "initdb"), "-D", str(data), "-U", self.user, "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8")
        self._run(str(bins / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.dir}")
        return self

    def stop(self) -> None:
        """Stop the server (fault tests); `start` brings it back with the same data."""
        self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    @contextmanager
    def frozen(self):
        """The server stopped in its tracks (SIGSTOP to the postmaster and every backend): it takes
        connections and statements and answers none, as a server whose disk hangs or whose VM is
        paused does, while the kernel still acknowledges every packet. SIGCONT at the end."""
        postmaster = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True).stdout
        pids = [postmaster, *(int(x) for x in children.split())]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield pids
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def start(self) -> None:
        self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.dir}")

    def __exit__(self, *exc) -> None:
        try:
            self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
