"""The model registry (MLflow): model references, aliases, and fetching what it holds.

A model reference is `name@alias` (follows the alias) or `name/version` (pinned). Names and
aliases are checked before they reach MLflow, so a reference can never smuggle a path, a
scheme or a query into a URI.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from indai.platform.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: int | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: "$" alone lets "x\n" through
        raise UserError(f"model name {name!r} is not valid: use letters, digits, '.', '_' and '-' (at most 128)")
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise UserError(f"alias {alias!r} is not valid: use lower-case letters, digits, '_' or '-', starting with a letter (not 'latest' or 'v<N>')")
    return alias


def parse_model_ref(text: str) -> ModelRef:
    """`name@alias` or `name/version`."""
    text = str(text)
    if "@" in text:
        name, alias = text.split("@", 1)
        return ModelRef(check_model_name(name), alias=check_alias(alias))
    if "/" in text:
        name, version = text.split("/", 1)
        check_model_name(name)
        if not VERSION_RE.fullmatch(version):  # not str.isdigit(): it takes "²" and "３", and int() of 5000 digits raises
            raise UserError(f"model version {version!r} is not valid: use a positive number, as in {name}/3")
        return ModelRef(check_model_name(name), version=int(version))
    raise UserError(f"model reference {text!r} must be name@alias (e.g. cwru-bearing@champion) or name/version (e.g. cwru-bearing/3)")


def client(tracking_uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class RegistryRefused(UserError):
    """MLflow refused this process's credentials (HTTP 401)."""


class ModelMissing(UserError):
    """The registry has no such model, version or alias (or, under MLflow's auth, may not show it)."""


class RegistryAway(UserError):
    """MLflow did not answer (no connection, a timeout, a connection cut) or failed (5xx)."""


def refusal(e, tracking_uri: str, doing: str) -> UserError | None:
    """MLflow's 401 or 403 (an MlflowException) as an error that names the account and what to
    do, instead of MLflow's "API request to endpoint ... failed with error code 403 != 200"; None
    for any other failure."""
    status, user = e.get_http_status_code(), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        return RegistryRefused(f"MLflow at {tracking_uri} refused the credentials of this process "
                               f"({f'user {user}' if user else 'no MLFLOW_TRACKING_USERNAME set'}) {doing}: check "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on the cluster, the provision-mlflow "
                               "hook Job makes the platform's MLflow users after each install and upgrade)")
    if status == 403:
        return UserError(f"MLflow at {tracking_uri} denied user {user or '(none)'} {doing}: on the cluster the "
                         "provision-mlflow hook Job grants the jobs' user indai-jobs EDIT, and the serving user indai-serve "
                         "READ, on every experiment and model (`helm upgrade` runs it again)")
    return None


def resolve_version(tracking_uri: str, ref: ModelRef):
    """The registered ModelVersion the reference points at, or a clear error."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        if ref.alias:
            return c.get_model_version_by_alias(ref.name, ref.alias)
        return c.get_model_version(ref.name, str(ref.version))
    except MlflowException as e:
        code = getattr(e, "error_code", "")
        if e.get_http_status_code() == 401:
            raise refusal(e, tracking_uri, f"resolving model {ref}") from None
        if e.get_http_status_code() == 403:
            # MLflow's basic auth checks the permission before the model is looked up, and answers 403
            # for a model that does not exist as for one the user may not read (measured, MLflow 3.17)
            user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "?"
            raise ModelMissing(f"model {ref}: MLflow at {tracking_uri} denied user {user} access to it: either there is no "
                               f"registered model {ref.name} (`indai model ls` lists them) or the user may not read it") from None
        if tracking_server_away(e):
            raise RegistryAway(f"the registry at {tracking_uri} did not answer for {ref} ({short_cause(e)}): "
                               "retry once MLflow is up") from None
        if "RESOURCE_DOES_NOT_EXIST" in str(code) or "not found" in str(e).lower() or "INVALID_PARAMETER_VALUE" in str(code):
            raise ModelMissing(f"model {ref} is not in the registry at {tracking_uri}: `indai model ls` lists the registered models") from None
        raise UserError(f"registry at {tracking_uri} failed for {ref}: {e.message if hasattr(e, 'message') else e}") from None


@contextlib.contextmanager
def refusals_named(tracking_uri: str, doing: str):
    """MLflow's 401 and 403 inside the block raised as `refusal`'s errors."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if (error := refusal(e, tracking_uri, doing)) is None:
            raise
        raise error from None


def wait_for_model(tracking_uri: str, ref: ModelRef, wait_s: float = 300.0, log=print):
    """`resolve_version`, tried again every 5 s for up to `wait_s` while MLflow refuses the
    credentials or does not answer. On the cluster the serving cluster's MLflow user is made by a
    hook Job that runs after each install and upgrade, and MLflow itself may still be starting,
    when Serve builds its app: a build that failed then would stay failed (KubeRay does not deploy
    the same config again). Any other answer (no such model, 403) is final at once."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return resolve_version(tracking_uri, ref)
        except (RegistryRefused, RegistryAway) as e:
            if time.monotonic() >= deadline:
                raise type(e)(f"{e} (tried for {wait_s:.0f} s)") from None
            if not said:
                log(f"{e}; trying again for up to {wait_s:.0f} s")
                said = True
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def label_alias(tracking_uri: str, name: str, version: int, alias: str) -> None:
    """Point the registry's alias at a version: a label for people reading MLflow. Serving never
    reads it (every job's account may move it); `indai model promote` (platform/promotion.py) is
    what members are served."""
    check_model_name(name)
    check_alias(alias)
    resolve_version(tracking_uri, ModelRef(name, version=version))
    client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def list_models(tracking_uri: str) -> list[dict]:
    c = client(tracking_uri)
    out = []
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        out.append({"name": rm.name, "aliases": dict(rm.aliases or {}),
                    "versions": sorted(int(v.version) for v in versions),
                    # the member whose job trained it, as that job wrote it: a hint, never read for access
                    "member_tag": (rm.tags or {}).get("indai.member")})
    return out


def download(tracking_uri: str, ref: ModelRef, dest: Path) -> tuple[Path, int]:
    """Download the model's files into dest; return (model folder, resolved version)."""
    import mlflow

    mv = resolve_version(tracking_uri, ref)
    client(tracking_uri)
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{mv.version}", dst_path=str(dest))
    return Path(path), int(mv.version)


def short_cause(e: Exception, limit: int = 200) -> str:
    """What failed, in short: MLflow's client puts urllib3's cause at the end of a long line
    ("... (Caused by ReadTimeoutError("...: Read timed out. (read timeout=5)"))")."""
    text = str(getattr(e, "message", e)).strip()
    if "(Caused by " in text:
        cause = text.rsplit("(Caused by ", 1)[1]
        why = cause.rsplit("): ", 1)[-1]
        why = why[:-3] if why.endswith('"))') else why.rstrip(")")
        return f"{cause.split('(', 1)[0]}: {why}"[:limit]
    return (text.splitlines() or [type(e).__name__])[0][:limit]


def client_for_current():
    """A client for the tracking URI set by `client(...)` earlier in this process."""
    import mlflow
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())


def tracking_server_away(exc: Exception) -> bool:
    """Whether a failed MLflow request means the server is away (no connection, a connection
    broken mid-answer, 5xx) rather than a refusal (4xx) that sending again would only repeat."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.RequestException):
        return True
    # a connection that never came, or broke while the answer was read ("IncompleteRead"),
    # arrives from MLflow's client, after its own retries, as INTERNAL_ERROR (500)
    return isinstance(exc, MlflowException) and exc.get_http_status_code() >= 500


def while_server_away(read, what: str, deadline_s: float = 120.0):
    """`read()` (a request that changes nothing), sent again with backoff while the tracking
    server is away, until `deadline_s`. MLflow's client retries refused connections itself, but
    not an answer cut off half-way by a server that died: that one surfaces here."""
    import sys
    import time

    wait, end = 0.5, time.monotonic() + deadline_s
    while True:
        try:
            return read()
        except Exception as exc:
            if not tracking_server_away(exc) or time.monotonic() + wait > end:
                raise
            print(f"MLflow did not answer {what} ({str(exc).splitlines()[0][:160]}); asking again in {wait:.1f} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)
