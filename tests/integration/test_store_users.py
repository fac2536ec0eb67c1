"""The jobs' own MinIO user (platform/store_users.py), on a real MinIO server: what the chart's hook
Job makes, what the user may do (the platform's whole store behaviour) and what it may not (MLflow's
artefacts, other buckets, buckets, users and policies)."""
from __future__ import annotations

import io
import uuid

import pytest
from minio import Minio, MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException, S3Error

from indai.platform import store_users
from indai.platform.errors import UserError
from indai.platform.storage import S3Store
from store_checks import CHECKS

pytestmark = pytest.mark.integration

JOBS = ("indai-jobs", "jobs-secret-0123456789")


def _provision(minio, bucket: str, jobs=JOBS, **kw) -> list[str]:
    said: list[str] = []
    store_users.provision(minio.endpoint, False, (minio.access_key, minio.secret_key), bucket, jobs, log=said.append, **kw)
    return said


def _bucket() -> str:
    return f"indai-{uuid.uuid4().hex[:10]}"


def _as(minio, keys) -> Minio:
    return Minio(minio.endpoint, access_key=keys[0], secret_key=keys[1], secure=False)


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_jobs_user_has_the_whole_store_behaviour(minio, check, tmp_path):
    """Every check the platform's S3 store passes with the root keys, it passes with the jobs' user."""
    bucket = _bucket()
    _provision(minio, bucket)
    check(S3Store(f"s3://{bucket}", endpoint=minio.endpoint, access_key=JOBS[0], secret_key=JOBS[1], secure=False), tmp_path)


def test_the_jobs_user_cannot_touch_mlflow_artefacts_other_buckets_or_the_server(minio):
    bucket = _bucket()
    assert _provision(minio, bucket) == [f"bucket {bucket}: made",
                                         f"bucket {bucket}, policy indai-jobs and the jobs' user indai-jobs: up to date"]
    root, jobs = _as(minio, (minio.access_key, minio.secret_key)), _as(minio, JOBS)
    other = _bucket()
    root.make_bucket(other)
    root.put_object(other, "secret.txt", io.BytesIO(b"s"), 1)
    root.put_object(bucket, "mlflow-artifacts/1/abc/artifacts/model/model.pt2", io.BytesIO(b"weights"), 7)

    jobs.put_object(bucket, "datasets/steel/v1/a.npy", io.BytesIO(b"data"), 4)
    assert jobs.get_object(bucket, "datasets/steel/v1/a.npy").read() == b"data"
    refused = {
        "rewrite a registered model": lambda: jobs.put_object(bucket, "mlflow-artifacts/1/abc/artifacts/model/model.pt2",
                                                              io.BytesIO(b"evil"), 4),
        "read a registered model": lambda: jobs.get_object(bucket, "mlflow-artifacts/1/abc/artifacts/model/model.pt2").read(),
        "delete a registered model": lambda: jobs.remove_object(bucket, "mlflow-artifacts/1/abc/artifacts/model/model.pt2")
        or jobs.stat_object(bucket, "mlflow-artifacts/1/abc/artifacts/model/model.pt2"),
        "list MLflow's artefacts": lambda: list(jobs.list_objects(bucket, prefix="mlflow-artifacts/", recursive=True)),
        "make a bucket": lambda: jobs.make_bucket(_bucket()),
        "delete the bucket": lambda: jobs.remove_bucket(bucket),
        "read another bucket": lambda: jobs.get_object(other, "secret.txt").read(),
        "list another bucket": lambda: list(jobs.list_objects(other)),
        "change the bucket's policy": lambda: jobs.set_bucket_policy(bucket, '{"Version":"2012-10-17","Statement":[]}'),
    }
    for what, attempt in refused.items():
        with pytest.raises(S3Error) as e:
            attempt()
        assert e.value.code == "AccessDenied", what
    assert root.get_object(bucket, "mlflow-artifacts/1/abc/artifacts/model/model.pt2").read() == b"weights"
    admin = MinioAdmin(endpoint=minio.endpoint, credentials=StaticProvider(*JOBS), secure=False)
    for what, attempt in {"list users": admin.user_list, "add a user": lambda: admin.user_add("mallory", "mallory-secret-1"),
                          "read a policy": lambda: admin.policy_info(store_users.JOBS_POLICY)}.items():
        with pytest.raises(MinioAdminException):
            attempt()
            pytest.fail(what)


def test_provisioning_again_changes_nothing_and_takes_a_new_secret(minio):
    bucket = _bucket()
    _provision(minio, bucket)
    _as(minio, JOBS).put_object(bucket, "a", io.BytesIO(b"1"), 1)
    assert _provision(minio, bucket) == [f"bucket {bucket}, policy indai-jobs and the jobs' user indai-jobs: up to date"]
    assert _as(minio, JOBS).get_object(bucket, "a").read() == b"1"
    rotated = (JOBS[0], "a-new-jobs-secret-987654")
    _provision(minio, bucket, jobs=rotated)
    assert _as(minio, rotated).get_object(bucket, "a").read() == b"1"
    with pytest.raises(S3Error, match="SignatureDoesNotMatch|InvalidAccessKeyId"):
        _as(minio, JOBS).get_object(bucket, "a")


@pytest.mark.parametrize("jobs, message", [
    (("ab", "long-enough-secret"), "3 to 20 characters"),
    (("indai-jobs", "short"), "secret key 8 to 40"),
    (None, "is MinIO's root access key"),
])
def test_bad_jobs_credentials_are_refused_before_minio_is_asked(minio, jobs, message):
    with pytest.raises(UserError, match=message):
        _provision(minio, _bucket(), jobs=jobs or (minio.access_key, "some-other-secret"))


def test_wrong_root_keys_and_a_silent_server_are_clear_errors(minio):
    with pytest.raises(UserError, match=r"refused the root credentials \(.*\): check accessKey and secretKey"):
        store_users.provision(minio.endpoint, False, (minio.access_key, "not-the-secret"), _bucket(), JOBS, wait_s=0)
    from minio_server import free_port

    with pytest.raises(UserError, match=r"did not answer within 1 s .*check that its pod is ready"):
        store_users.provision(f"127.0.0.1:{free_port()}", False, JOBS, _bucket(), ("other-jobs", "other-secret-1"), wait_s=1)


def test_the_cli_command_the_hook_job_runs(minio):
    import os
    import subprocess
    import sys

    bucket = _bucket()
    env = {**os.environ, "INDAI_STORE_URI": f"s3://{bucket}", "INDAI_S3_ENDPOINT": minio.endpoint, "INDAI_S3_SECURE": "0",
           "MINIO_ROOT_USER": minio.access_key, "MINIO_ROOT_PASSWORD": minio.secret_key,
           "INDAI_JOBS_S3_ACCESS_KEY": JOBS[0], "INDAI_JOBS_S3_SECRET_KEY": JOBS[1]}
    cli = [sys.executable, "-m", "indai.platform.cli", "admin", "provision-store", "--wait", "10"]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"bucket {bucket}, policy indai-jobs and the jobs' user indai-jobs: up to date"
    _as(minio, JOBS).put_object(bucket, "k", io.BytesIO(b"v"), 1)
    done = subprocess.run(cli, env={**env, "INDAI_STORE_URI": f"s3://{bucket}/prefix"}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "provision-store takes a whole bucket, s3://<bucket>" in done.stderr
    done = subprocess.run(cli, env={k: v for k, v in env.items() if k != "MINIO_ROOT_PASSWORD"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "needs MINIO_ROOT_PASSWORD in its environment" in done.stderr
