"""The platform's own MLflow accounts on the chart's MLflow server: none of them an admin.

Every platform pod once used MLflow's admin account. The admin may also add users, make
any user an admin and change the admin's password, and every Ray pod runs researchers' code: a
member's job could take the registry over for good, or lock the platform out of it. So the chart
gives two accounts of their own, each made by `provision`, and keeps the admin's password for the
MLflow server, the hook Job that runs `provision`, and `helm test`:

- `indai-serve`, the serving cluster's: READ on every experiment and registered model. It
  resolves, lists and downloads models, and is refused aliases, tags, deletions, runs, artefact
  uploads and user management;
- `indai-jobs`, the jobs' Ray cluster's and the gateway's (where admins run `indai model
  promote` and `indai kpi`): EDIT on every experiment and registered model, whoever made them. It
  logs runs and registers, tags and promotes versions; it may not manage users or permissions, nor
  delete what another user made.

The grants are MLflow's wildcard grants (resource `*`), so they hold for experiments and models
made later too, and whatever `mlflow.defaultPermission` says (a user's grant wins over the
default). MLflow still lets every signed-in user create experiments and registered models of new
names, and makes their creator MANAGE them.

`provision` makes each user or sets its password, takes an admin flag off it, and sets its two
grants (each run brings them up to date: running it again changes nothing, and a new secret in the
release Secret is taken on the next upgrade). The chart's hook Job runs it after each install and
upgrade with the admin's credentials (`indai admin provision-mlflow`). Measured on a real server
(tests/integration/test_mlflow_users.py).
"""
from __future__ import annotations

import os
import time

from indai.platform.errors import UserError

SERVE_USER = "indai-serve"
JOBS_USER = "indai-jobs"
SERVE_PERMISSION = "READ"
JOBS_PERMISSION = "EDIT"
RESOURCES = ("experiment", "registered_model")
MIN_PASSWORD = 12  # MLflow's own rule (mlflow.utils.validation._validate_password)
TIMEOUT_S = 10


def check_credentials(user: str, password: str, admin_user: str, secret_key: str) -> None:
    """A platform account's name and password as MLflow will take them, and never the admin's."""
    if not user or user == admin_user:
        raise UserError(f"the MLflow user {user!r} must be a user of its own, not the admin {admin_user!r}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password of MLflow user {user} has {len(password)} characters; MLflow requires at least "
                        f"{MIN_PASSWORD} ({secret_key} in the release Secret)")


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


def _user(uri: str, name: str, password: str, call) -> str:
    """Make the user or set its password; take an admin flag off it. What was done, in words."""
    api = f"{uri}/api/2.0/mlflow/users"
    r = call("GET", f"{api}/get", params={"username": name})
    if r.status_code == 404:
        r = call("POST", f"{api}/create", json={"username": name, "password": password})
        if r.status_code != 200:
            raise _refused(r, f"create the user {name}", uri)
        return "made"
    if r.status_code != 200:
        raise _refused(r, f"read the user {name}", uri)
    was_admin = bool(r.json()["user"].get("is_admin"))
    # an admin changing another user's password: no current password asked (MLflow's rule)
    r = call("PATCH", f"{api}/update-password", json={"username": name, "password": password})
    if r.status_code != 200:
        raise _refused(r, f"set the password of {name}", uri)
    if was_admin:
        r = call("PATCH", f"{api}/update-admin", json={"username": name, "is_admin": False})
        if r.status_code != 200:
            raise _refused(r, f"take the admin flag off {name}", uri)
        return "was an admin; no longer"
    return ""


def _grants(uri: str, name: str, permission: str, call) -> str:
    """Give the user `permission` on every experiment and registered model (wildcard grants),
    replacing a wildcard grant of another permission. What was changed, in words."""
    api = f"{uri}/api/3.0/mlflow/users/permissions"
    r = call("GET", f"{api}/list", params={"username": name})
    if r.status_code != 200:
        raise _refused(r, f"list the permissions of {name}", uri)
    held = {(p["resource_type"], p["resource_pattern"]): p["permission"] for p in r.json().get("permissions", [])}
    changed = []
    for resource in RESOURCES:
        now = held.get((resource, "*"))
        if now == permission:
            continue
        grant = {"username": name, "resource_type": resource, "resource_id": "*"}
        if now is not None:
            r = call("POST", f"{api}/revoke", json=grant)
            if r.status_code != 200:
                raise _refused(r, f"revoke {now} on every {resource} from {name}", uri)
        r = call("POST", f"{api}/grant", json={**grant, "permission": permission})
        if r.status_code != 200:
            raise _refused(r, f"grant {name} {permission} on every {resource}", uri)
        changed.append(f"{permission} on every {resource.replace('_', ' ')}" + (f" (was {now})" if now else ""))
    return ", ".join(changed)


def provision(uri: str, admin: tuple[str, str], serve: tuple[str, str], jobs: tuple[str, str] | None = None,
              wait_s: float = 120.0, log=print) -> None:
    """Make (or bring up to date) the serving user `serve` = (name, password), READ on everything,
    and, when given, the jobs' user `jobs`, EDIT on everything; neither an admin. `admin` =
    (name, password) of an MLflow admin. Waits up to `wait_s` for the server to answer."""
    import requests

    accounts = [(serve, SERVE_PERMISSION, "mlflowServePassword")] + ([(jobs, JOBS_PERMISSION, "mlflowJobsPassword")] if jobs else [])
    for (name, password), _, key in accounts:
        check_credentials(name, password, admin[0], key)
    if jobs and jobs[0] == serve[0]:
        raise UserError(f"the serving cluster and the jobs need MLflow users of their own; both are {serve[0]!r}")
    uri = uri.rstrip("/")
    deadline = time.monotonic() + wait_s
    with requests.Session() as s:
        s.auth = admin
        s.trust_env = False  # no proxy from the environment between the Job and the in-cluster server

        def call(method: str, url: str, **kw):
            return _call(s, method, url, deadline, wait_s, **kw)

        for (name, password), permission, _ in accounts:
            done = [x for x in (_user(uri, name, password, call), _grants(uri, name, permission, call)) if x]
            log(f"MLflow user {name}: {'; '.join(done) if done else 'up to date'}")


def provision_from_env(wait_s: float = 120.0) -> None:
    """`provision` with what the hook Job's environment holds: INDAI_MLFLOW_URI, the admin's
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, INDAI_MLFLOW_SERVE_PASSWORD and
    INDAI_MLFLOW_JOBS_PASSWORD (the user names are INDAI_MLFLOW_SERVE_USER and INDAI_MLFLOW_JOBS_USER,
    by default indai-serve and indai-jobs)."""
    names = ("INDAI_MLFLOW_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "INDAI_MLFLOW_SERVE_PASSWORD",
             "INDAI_MLFLOW_JOBS_PASSWORD")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise UserError(f"indai admin provision-mlflow needs {', '.join(missing)} in its environment (the chart's "
                        "hook Job sets them all)")
    uri = os.environ["INDAI_MLFLOW_URI"]
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"INDAI_MLFLOW_URI is {uri!r}: provision-mlflow takes the server's http(s):// address")
    provision(uri, (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]),
              (os.environ.get("INDAI_MLFLOW_SERVE_USER") or SERVE_USER, os.environ["INDAI_MLFLOW_SERVE_PASSWORD"]),
              (os.environ.get("INDAI_MLFLOW_JOBS_USER") or JOBS_USER, os.environ["INDAI_MLFLOW_JOBS_PASSWORD"]), wait_s)
