"""Fixtures every tier shares. Servers are real (uvicorn on 127.0.0.1, a free port) and
every fixture stops what it started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cloud.app import create_app
from cloud.pipeline.data import SplitData, load_split
from cloud.settings import CloudSettings
from tests.helpers import CLOUD_REPO, DIGITS, serve_in_thread
from tests.mosquitto import Mosquitto
from tests.postgres import Postgres

# Property tests draw new examples each run (that is how they find things), and a failure
# prints the blob that replays it; generating examples on a loaded 2-core machine must not
# fail a test by itself (``too_slow``).
settings.register_profile("tandem", print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tandem")

#: Accounts every test broker knows: the cloud's two, and devices dev-0 .. dev-9.
BROKER_USERS = {"controller": "ctl-pw", "collector": "col-pw"} | {
    f"dev-{i}": f"pw-{i}" for i in range(10)
}


@pytest.fixture(scope="session")
def digits() -> SplitData:
    """The fixed split ``scripts/build_models.py`` wrote (``models/data/digits.npz``)."""
    return load_split(DIGITS)


@pytest.fixture(scope="session")
def cloud_url() -> Iterator[str]:
    """The real cloud server on the demo repository, shared by the session (read-only)."""
    with serve_in_thread(create_app(CloudSettings(repo=CLOUD_REPO))) as url:
        yield url


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test (unique topics for free), stopped afterwards."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), BROKER_USERS)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL for the session; call it for a fresh database's URL per test."""
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for ``open_store``: a fresh SQLite file, then a fresh PostgreSQL database
    (the server starts only when a test asks for this one)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'fleet.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.database()
