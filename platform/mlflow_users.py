"""The MLflow account the serving cluster reads models with, on the chart's MLflow server.

Serve's ingress and model replicas only read from MLflow: they resolve a model reference, read a
registered model's tags and download a version's files. Until now they did so as MLflow's admin,
which may also delete or rewrite every member's registered models and runs, add users, make a
user an admin and change the admin's password. So the chart gives the serving cluster a user of
its own, `indai-serve`: not an admin, granted nothing, so it holds only the server's
`default_permission` (the chart's `mlflow.defaultPermission`, READ by default). Measured on a real
server (tests/integration/test_mlflow_users.py): it reads what Serve reads and is refused (403)
aliases, tags, deletions, runs, artefact uploads and every user-management call.

`provision` makes the user or sets its password (each run brings it up to date: running it again
changes nothing, and a new secret in the release Secret is taken on the next upgrade), and takes
the admin flag off it if somebody set it. The chart's hook Job runs it after each install and
upgrade with the admin's credentials (`indai admin provision-mlflow`).
"""
from __future__ import annotations

import os
import time

from indai.platform.errors import UserError

SERVE_USER = "indai-serve"
MIN_PASSWORD = 12  # MLflow's own rule (mlflow.utils.validation._validate_password)
TIMEOUT_S = 10


def check_credentials(user: str, password: str, admin_user: str) -> None:
    """The serving user's name and password as MLflow will take them, and never the admin's."""
    if not user or user == admin_user:
        raise UserError(f"the serving cluster's MLflow user is {user!r}: it must be a user of its own, not the admin "
                        f"{admin_user!r}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the serving cluster's MLflow password has {len(password)} characters; MLflow requires at least "
                        f"{MIN_PASSWORD} (mlflowServePassword in the release Secret)")


def _call(session, method: str, url: str, deadline: float, wait_s: float, **kw):
    """One request to the auth API; retried while the server does not answer or answers 5xx
    (it may start after the hook Job), until `deadline`."""
    import requests

    while True:
        try:
            r = session.request(method, url, timeout=TIMEOUT_S, allow_redirects=False, **kw)
            if r.status_code < 500:
                return r
            why = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            why = type(e).__name__
        if time.monotonic() > deadline:
            raise UserError(f"MLflow at {url.split('/api/')[0]} did not answer within {wait_s:.0f} s ({why}): check that "
                            "its pod is ready")
        time.sleep(2)


def _refused(r, what: str, uri: str) -> UserError:
    if r.status_code == 401:
        return UserError(f"MLflow at {uri} refused the admin's credentials: check mlflowAdminPassword in the release Secret "
                         "(it must be the password the server's admin has now)")
    if r.status_code == 403:
        return UserError(f"MLflow at {uri} refused to {what}: the account given as admin is not an MLflow admin")
    return UserError(f"MLflow at {uri} could not {what}: HTTP {r.status_code} {r.text[:300]}")


def provision(uri: str, admin: tuple[str, str], serve: tuple[str, str], wait_s: float = 120.0, log=print) -> None:
    """Make (or bring up to date) the serving user `serve` = (name, password): created if missing,
    its password set otherwise, never an admin. `admin` = (name, password) of an MLflow admin.
    Waits up to `wait_s` for the server to answer."""
    import requests

    check_credentials(*serve, admin[0])
    uri = uri.rstrip("/")
    api = f"{uri}/api/2.0/mlflow/users"
    deadline = time.monotonic() + wait_s
    with requests.Session() as s:
        s.auth = admin
        s.trust_env = False  # no proxy from the environment between the Job and the in-cluster server
        r = _call(s, "GET", f"{api}/get", deadline, wait_s, params={"username": serve[0]})
        if r.status_code == 404:
            r = _call(s, "POST", f"{api}/create", deadline, wait_s, json={"username": serve[0], "password": serve[1]})
            if r.status_code != 200:
                raise _refused(r, f"create the user {serve[0]}", uri)
            log(f"MLflow user {serve[0]}: made")
            return
        if r.status_code != 200:
            raise _refused(r, f"read the user {serve[0]}", uri)
        was_admin = bool(r.json()["user"].get("is_admin"))
        # an admin changing another user's password: no current password asked (MLflow's rule)
        r = _call(s, "PATCH", f"{api}/update-password", deadline, wait_s, json={"username": serve[0], "password": serve[1]})
        if r.status_code != 200:
            raise _refused(r, f"set the password of {serve[0]}", uri)
        if was_admin:
            r = _call(s, "PATCH", f"{api}/update-admin", deadline, wait_s, json={"username": serve[0], "is_admin": False})
            if r.status_code != 200:
                raise _refused(r, f"take the admin flag off {serve[0]}", uri)
            log(f"MLflow user {serve[0]}: was an admin; no longer")
        log(f"MLflow user {serve[0]}: up to date")


def provision_from_env(wait_s: float = 120.0) -> None:
    """`provision` with what the hook Job's environment holds: INDAI_MLFLOW_URI, the admin's
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, and INDAI_MLFLOW_SERVE_PASSWORD (the user
    name is INDAI_MLFLOW_SERVE_USER, default indai-serve)."""
    names = ("INDAI_MLFLOW_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "INDAI_MLFLOW_SERVE_PASSWORD")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise UserError(f"indai admin provision-mlflow needs {', '.join(missing)} in its environment (the chart's "
                        "hook Job sets them all)")
    uri = os.environ["INDAI_MLFLOW_URI"]
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"INDAI_MLFLOW_URI is {uri!r}: provision-mlflow takes the server's http(s):// address")
    provision(uri, (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]),
              (os.environ.get("INDAI_MLFLOW_SERVE_USER") or SERVE_USER, os.environ["INDAI_MLFLOW_SERVE_PASSWORD"]), wait_s)
