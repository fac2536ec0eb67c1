"""Fuzz the gateway's submission parsing: whatever JSON arrives, it is either a Submission that
holds only allowed runtime_env fields, or a ValidationError — never anything else."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from indai.platform.gateway import Submission

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
