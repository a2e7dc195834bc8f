"""Fixtures of the integration tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import Fleet, running_fleet
from tests.mosquitto import Mosquitto


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, broker: Mosquitto) -> Iterator[Fleet]:
    """A running fleet (``tests/fleet.py``) with no agent started yet. Parametrise it
    indirectly for a variant: ``@pytest.mark.parametrize("fleet", [{"token": "s"}],
    indirect=True)`` passes the dict to ``running_fleet``."""
    options = getattr(request, "param", {})
    with running_fleet(tmp_path, broker, **options) as f:
        yield f
