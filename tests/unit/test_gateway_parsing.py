"""Fuzz the gateway's submission parsing: whatever JSON arrives, it is either a Submission that
holds only allowed runtime_env fields, or a ValidationError — never anything else."""
import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from indai.platform.gateway import PACKAGE_RE, SUBMISSION_ID_RE, Submission

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(["entrypoint", "submission_id", "runtime_env", "metadata", "entrypoint_num_gpus", "entrypoint_num_cpus",
                        "job_id", "pip", "working_dir", "py_modules", "__class__", "x"])
runtime_envs = st.dictionaries(st.sampled_from(["working_dir", "env_vars", "pip", "conda", "py_modules", "uv", "image_uri", "config"]),
                               values, max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, values, max_size=6), st.one_of(st.none(), runtime_envs))
def test_parsing_never_escapes_the_schema(body, runtime_env):
    if runtime_env is not None:
        body = dict(body, runtime_env=runtime_env)
    try:
        sub = Submission.model_validate_json(json.dumps(body))
    except ValidationError:
        return
    assert isinstance(sub.entrypoint, str) and 1 <= len(sub.entrypoint) <= 10_000
    for job_name in (sub.submission_id, sub.job_id):
        assert job_name is None or SUBMISSION_ID_RE.fullmatch(job_name)
    if sub.runtime_env is not None:
        dumped = sub.runtime_env.model_dump(exclude_none=True)
        assert set(dumped) <= {"working_dir", "env_vars"}
        if "working_dir" in dumped:
            assert dumped["working_dir"].startswith("gcs://_ray_pkg_") and ".." not in dumped["working_dir"]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_cleanly(raw):
    try:
        Submission.model_validate_json(raw)
    except ValidationError:
        pass


def test_job_id_follows_the_submission_id_rule():
    """job_id (Ray's old name for submission_id) names the job in upstream URLs just as well:
    "mine?0" would make the gateway ask Ray about job "mine", so the job would count against no
    quota and its owner could not stop it."""
    for field_name in ("job_id", "submission_id"):
        for bad in ("mine?0", "a/b", "../x", "x\n", "", "%2e%2e", "x" * 101, "x#y"):
            try:
                Submission.model_validate_json(json.dumps({"entrypoint": "echo", field_name: bad}))
            except ValidationError as e:
                [error] = e.errors()
                assert error["loc"] == (field_name,)
                assert "must be 1-100 letters, digits, '_' or '-'" in error["msg"], error["msg"]
            else:
                raise AssertionError(f"{field_name}={bad!r} was accepted")
        ok = Submission.model_validate_json(json.dumps({"entrypoint": "echo", field_name: "kim_run-2"}))
        assert getattr(ok, field_name) == "kim_run-2"


def test_each_member_has_its_own_package_namespace():
    """The upstream name of a member's package: Ray's form, fixed, and different per member."""
    from indai.platform.gateway import member_package

    name = "_ray_pkg_0123456789abcdef0123456789abcdef.zip"
    steel, auto = member_package("steel-a", name), member_package("auto-b", name)
    assert steel == "_ray_pkg_" + hashlib.sha256(f"steel-a:gcs://{name}".encode()).hexdigest() + ".zip"
    assert steel != auto and steel != name
    assert PACKAGE_RE.fullmatch(steel) and PACKAGE_RE.fullmatch(auto)
    assert member_package("steel-a", name) == steel  # the same on every call and every replica
