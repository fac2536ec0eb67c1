"""Where the platform's services are: object store, MLflow, Ray, Serve.

On the embedded default, `indai up` starts local Ray and an MLflow server on SQLite and
writes their addresses into `$INDAI_HOME/services.json`; every other command reads them from
there. On a cluster the same fields come from environment variables (INDAI_STORE_URI,
INDAI_MLFLOW_URI, INDAI_RAY_ADDRESS, INDAI_SERVE_URL), so only configuration differs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from indai.platform.errors import UserError

SERVICES_FILE = "services.json"
# a consortium member's id: in the platform database, dataset specs, de-identification key files
# and store paths alike (one rule; tenancy.check_id applies it)
MEMBER_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{1,63}")


def home() -> Path:
    """The embedded default's state folder (`INDAI_HOME`, default `~/.indai`)."""
    return Path(os.environ.get("INDAI_HOME", Path.home() / ".indai")).expanduser().resolve()


@dataclass
class Settings:
    store_uri: str
    """Object store root: file:///path or s3://bucket/prefix."""
    mlflow_uri: str | None
    """MLflow tracking server, e.g. http://127.0.0.1:5000."""
    ray_address: str | None
    """Ray cluster address (host:port of the GCS) or None when no cluster is up."""
    serve_url: str | None
    """Base URL of the Ray Serve HTTP proxy."""
    home: Path

    def require_mlflow(self) -> str:
        if not self.mlflow_uri:
            raise UserError("no MLflow server is configured: run `indai up` (embedded default) or set INDAI_MLFLOW_URI")
        return self.mlflow_uri

    def require_ray(self) -> str:
        if not self.ray_address:
            raise UserError("no Ray cluster is running: run `indai up` (embedded default) or set INDAI_RAY_ADDRESS")
        return self.ray_address


# No process of the platform ever asks the Hugging Face Hub for anything: pretrained weights come
# from the mirror in the object store (indai.platform.mirror). Set for the CLI, the embedded Ray
# cluster, every job the gateway submits and every process that loads mirrored weights.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

# Ray Serve's controller replaces an HTTP proxy after 3 failed health checks in a row, one every
# 10 s by default: a proxy that died refused every request for about 30 s (measured). One every
# 2 s brings that to the few seconds `indai.serving.client` retries over (RELIABILITY.md). Set
# for the embedded Ray cluster and the chart's Ray pods.
RAY_SERVE_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2"}


def go_offline() -> None:
    """Put OFFLINE_ENV into this process. huggingface_hub reads HF_HUB_OFFLINE once, when it is
    imported, so a process that imported it earlier gets its constant switched too."""
    import sys

    os.environ.update(OFFLINE_ENV)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def cache_dir() -> Path:
    """Local copies of things kept in the object store (mirrored weights): `$INDAI_HOME/cache`."""
    return home() / "cache"


def read_services(root: Path | None = None) -> dict:
    path = (root or home()) / SERVICES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is damaged: run `indai down` and `indai up` again") from None


def write_services(data: dict, root: Path | None = None) -> Path:
    root = root or home()
    root.mkdir(parents=True, exist_ok=True)
    path = root / SERVICES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def load_settings() -> Settings:
    root = home()
    svc = read_services(root)
    env = os.environ.get
    return Settings(
        store_uri=env("INDAI_STORE_URI") or svc.get("store_uri") or (root / "store").as_uri(),
        mlflow_uri=env("INDAI_MLFLOW_URI") or svc.get("mlflow_uri"),
        ray_address=env("INDAI_RAY_ADDRESS") or svc.get("ray_address"),
        serve_url=env("INDAI_SERVE_URL") or svc.get("serve_url"),
        home=root,
    )


def as_dict(s: Settings) -> dict:
    d = asdict(s)
    d["home"] = str(s.home)
    return d


def member_secret(member: str, create: bool = True) -> bytes:
    """The member's de-identification key (keyed pseudonyms, time shift). Kept in
    `INDAI_SECRETS_DIR` (default `$INDAI_HOME/secrets`; a mounted Secret on the cluster),
    created on first use, readable by the owner only; never written to a dataset."""
    import secrets as _secrets

    if not MEMBER_ID_RE.fullmatch(member or ""):
        raise ValueError(f"member id {member!r} is not valid")
    given = os.environ.get("INDAI_SECRETS_DIR")
    folder = Path(given or home() / "secrets")
    path = folder / f"{member}.key"
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no de-identification key for member {member} in {folder}")
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            # a key made here would live in this container only: the next pod would make another,
            # and the same asset would get other pseudonyms and another time shift in each release
            raise UserError(
                f"no de-identification key for member {member} in {folder}: on the cluster the keys are a Secret "
                f"({'add ' + member + '.key, 64 hex characters from `openssl rand -hex 32`, to it' if given else 'set the chart value ray.memberKeys.existingSecret to a Secret with ' + member + '.key (64 hex characters, `openssl rand -hex 32`)'})")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_secrets.token_hex(32))
    text = path.read_text().strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise UserError(f"{path} does not hold a de-identification key (64 hex characters): replace it with one from "
                        "`openssl rand -hex 32`; every release of the member must use the same key")
    return bytes.fromhex(text)
