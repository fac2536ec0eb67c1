"""Polling helper shared by tests that wait for a controller to act."""
import time


def wait(what: str, check, timeout: float = 90, interval: float = 0.5):
    """Call check() until it returns something truthy; return that, or fail naming `what`."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
