"""Shared fixtures. Helpers that are not tests (minio_server, store_checks) live next to
this file, so the tests folder goes on sys.path."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from minio_server import MinioServer  # noqa: E402


@pytest.fixture(scope="session")
def minio():
    """A real MinIO server for the whole session (tests may stop() and start() it)."""
    with MinioServer() as server:
        yield server
