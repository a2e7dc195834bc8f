"""Fixtures every tier shares. Servers are real (uvicorn on 127.0.0.1, a free port) and
every fixture stops what it started."""

from __future__ import annotations

from collections.abc import Iterator

import dataset
import pytest

from cloud.app import create_app
from cloud.settings import CloudSettings
from tests.helpers import CLOUD_REPO, serve_in_thread


@pytest.fixture(scope="session")
def digits() -> dataset.Digits:
    return dataset.load()


@pytest.fixture(scope="session")
def cloud_url() -> Iterator[str]:
    """The real cloud server on the demo repository, shared by the session (read-only)."""
    with serve_in_thread(create_app(CloudSettings(repo=CLOUD_REPO))) as url:
        yield url
