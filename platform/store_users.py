"""The object-store user that jobs and the gateway run with, on the cluster's MinIO (the serving
cluster holds no store keys: it reads models through MLflow).

Ray pods run researchers' code, so whatever credentials they hold, that code holds. With
MinIO's root keys it could create and delete buckets, add users, change policies, and rewrite
MLflow's artefacts (registered models) behind MLflow's own permissions. So the chart gives the
Ray pods and the gateway a user of their own (`jobs_policy`): objects of the platform bucket
only, and nothing under `mlflow-artifacts/`, which only the MLflow server (its artefact proxy)
reads and writes. MinIO's root keys stay with MinIO, the MLflow server and the hook Job that
runs `indai admin provision-store` after each install and upgrade (`provision`: the bucket,
the policy, the user and its attachment, each made or updated in place, so running it again
changes nothing and a new secret in the release Secret is taken on the next upgrade).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from indai.platform.errors import UserError

JOBS_POLICY = "indai-jobs"
MLFLOW_PREFIX = "mlflow-artifacts/"  # MLflow's artefact root in the bucket (mlflow/start-server.sh)


def jobs_policy(bucket: str) -> dict:
    """The IAM policy of the jobs' user: list the bucket and read, write and delete its objects,
    except MLflow's artefacts (an explicit Deny wins over the Allow in MinIO, as in AWS IAM)."""
    whole, objects = f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"
    mlflow = f"arn:aws:s3:::{bucket}/{MLFLOW_PREFIX}*"
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
         "Resource": [whole]},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                                       "s3:ListMultipartUploadParts"], "Resource": [objects]},
        {"Effect": "Deny", "Action": ["s3:*"], "Resource": [mlflow]},
        {"Effect": "Deny", "Action": ["s3:ListBucket"], "Resource": [whole],
         "Condition": {"StringLike": {"s3:prefix": [f"{MLFLOW_PREFIX}*"]}}},
    ]}


def check_credentials(access_key: str, secret_key: str, root_access_key: str) -> None:
    """MinIO's own rules for a user's keys (3-20 and 8-40 characters), and never the root's."""
    if not 3 <= len(access_key) <= 20 or not 8 <= len(secret_key) <= 40:
        raise UserError("the jobs' S3 access key must have 3 to 20 characters and its secret key 8 to 40 "
                        "(jobsAccessKey and jobsSecretKey in the release Secret)")
    if access_key == root_access_key:
        raise UserError("the jobs' S3 access key is MinIO's root access key: give the jobs a user of their own "
                        "(jobsAccessKey in the release Secret)")


def provision(endpoint: str, secure: bool, root: tuple[str, str], bucket: str, jobs: tuple[str, str],
              wait_s: float = 120.0, log=print) -> None:
    """Make (or bring up to date) the bucket, the `indai-jobs` policy, the jobs' user with its
    secret, and the policy's attachment to it. Waits up to `wait_s` for MinIO to answer (the hook
    Job may start before the server is ready)."""
    from minio import Minio, MinioAdmin
    from minio.credentials import StaticProvider
    from minio.error import MinioAdminException, S3Error

    check_credentials(*jobs, root[0])
    client = Minio(endpoint, access_key=root[0], secret_key=root[1], secure=secure)
    admin = MinioAdmin(endpoint=endpoint, credentials=StaticProvider(*root), secure=secure)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            exists = client.bucket_exists(bucket)
            break
        except S3Error as e:
            raise UserError(f"MinIO at {endpoint} refused the root credentials ({e.code}): check accessKey and "
                            "secretKey in the release Secret") from None
        except Exception as e:  # not answering yet: connection refused, DNS not ready
            if time.monotonic() > deadline:
                raise UserError(f"MinIO at {endpoint} did not answer within {wait_s:.0f} s ({type(e).__name__}): "
                                "check that its pod is ready") from None
            time.sleep(2)
    if not exists:
        client.make_bucket(bucket)
        log(f"bucket {bucket}: made")
    with tempfile.TemporaryDirectory(prefix="indai-policy-") as tmp:  # MinioAdmin reads the policy from a file
        path = os.path.join(tmp, "policy.json")
        with open(path, "w") as f:
            json.dump(jobs_policy(bucket), f)
        admin.policy_add(JOBS_POLICY, path)
    admin.user_add(*jobs)  # adds the user, or sets the secret of an existing one
    attached = json.loads(admin.user_info(jobs[0])).get("policyName", "")
    if JOBS_POLICY not in [p for p in attached.split(",") if p]:
        try:
            admin.attach_policy([JOBS_POLICY], user=jobs[0])
        except MinioAdminException as e:  # attached meanwhile by another run of this Job
            if "already" not in str(e).lower():
                raise
    log(f"bucket {bucket}, policy {JOBS_POLICY} and the jobs' user {jobs[0]}: up to date")


def provision_from_env(wait_s: float = 120.0) -> None:
    """`provision` with what the hook Job's environment holds: INDAI_STORE_URI (s3://bucket),
    INDAI_S3_ENDPOINT and INDAI_S3_SECURE, MinIO's root keys (MINIO_ROOT_USER, MINIO_ROOT_PASSWORD)
    and the jobs' keys (INDAI_JOBS_S3_ACCESS_KEY, INDAI_JOBS_S3_SECRET_KEY)."""
    names = ("INDAI_STORE_URI", "INDAI_S3_ENDPOINT", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
             "INDAI_JOBS_S3_ACCESS_KEY", "INDAI_JOBS_S3_SECRET_KEY")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise UserError(f"indai admin provision-store needs {', '.join(missing)} in its environment (the chart's "
                        "hook Job sets them all)")
    from indai.platform.storage import parse_s3_uri, parse_secure  # the store's own rules (StoreError is a UserError)

    uri = os.environ["INDAI_STORE_URI"]
    bucket, base = parse_s3_uri(uri) if uri.startswith("s3://") else ("", "not s3")
    secure = parse_secure(None)
    if base:
        raise UserError(f"INDAI_STORE_URI is {uri!r}: provision-store takes a whole bucket, s3://<bucket>")
    provision(os.environ["INDAI_S3_ENDPOINT"], secure, (os.environ["MINIO_ROOT_USER"], os.environ["MINIO_ROOT_PASSWORD"]),
              bucket, (os.environ["INDAI_JOBS_S3_ACCESS_KEY"], os.environ["INDAI_JOBS_S3_SECRET_KEY"]), wait_s)
