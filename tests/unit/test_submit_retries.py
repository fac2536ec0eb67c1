"""The submission client's retries: which failures are retried, how often, and what the user
is told (the gateway side, with real Ray and PostgreSQL, is tests/integration/test_gateway_idempotency.py)."""
import io

import pytest
import requests

from indai.platform import submit
from indai.platform.errors import UserError

pytestmark = pytest.mark.timeout(30)


def failing(errors: list[Exception], result="raysubmit_x"):
    """A call that raises the given errors in turn, then returns result; counts its calls."""
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return call, calls


def ray_error(status: int) -> RuntimeError:  # the form Ray's JobSubmissionClient raises
    return RuntimeError(f'Request failed with status code {status}: {{"detail": "the platform database is unavailable"}}.')


def http_error(status: int) -> requests.HTTPError:
    r = requests.Response()
    r.status_code = status
    return requests.HTTPError(response=r)


@pytest.mark.parametrize("error", [ray_error(503), ray_error(502), ray_error(504), ray_error(409), http_error(503),
                                   requests.ConnectionError("reset"), requests.ReadTimeout("slow"), ConnectionError("refused"),
                                   submit.GatewayUnavailable("the gateway answered 503 (down)")])
def test_transient_failures_are_retried_and_the_user_is_told(error):
    call, calls = failing([error, error])
    told = io.StringIO()
    assert submit.with_retries("the submission", call, waits=(0, 0, 0), stream=told, note="; key k") == "raysubmit_x"
    lines = told.getvalue().splitlines()
    assert len(calls) == 3 and len(lines) == 2
    assert lines[0].startswith("indai: ") and "retrying the submission in 0 s (try 2 of 4; key k)" in lines[0]


@pytest.mark.parametrize("error", [ray_error(400), ray_error(403), ray_error(422), ray_error(429), ray_error(500),
                                   http_error(401), ValueError("bad"), UserError("refused")])
def test_other_failures_are_not_retried(error):
    call, calls = failing([error])
    told = io.StringIO()
    with pytest.raises(type(error)):
        submit.with_retries("the submission", call, waits=(0, 0), stream=told)
    assert len(calls) == 1 and told.getvalue() == ""


def test_retries_are_bounded_and_end_in_a_user_error():
    call, calls = failing([ray_error(503)] * 10)
    told = io.StringIO()
    with pytest.raises(UserError, match=r"the submission failed 4 times, the last time because the gateway answered 503"):
        submit.with_retries("the submission", call, waits=(0, 0, 0), stream=told)
    assert len(calls) == 4 and len(told.getvalue().splitlines()) == 3


def test_the_default_backoff_is_bounded():
    assert list(submit.RETRY_WAITS) == sorted(submit.RETRY_WAITS) and sum(submit.RETRY_WAITS) <= 60
