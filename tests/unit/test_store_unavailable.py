"""Which store errors the collector leaves unacknowledged for the broker to send again (the
database is down or locked: it may work next time) and which it drops (it never would)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from cloud.fleet.listener import store_unavailable
from shared.settings_files import SettingsError


def _raised_from(cause: BaseException) -> SettingsError:
    try:
        raise SettingsError("cannot connect to the fleet database") from cause
    except SettingsError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "passes"),
    [
        (sqlite3.OperationalError("database is locked"), True),
        (psycopg.OperationalError("server closed the connection"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (_raised_from(psycopg.OperationalError("connection refused")), True),  # the pool's
        (sqlite3.IntegrityError("NOT NULL constraint failed"), False),
        (psycopg.errors.NumericValueOutOfRange("integer out of range"), False),
        (psycopg.errors.UndefinedTable("relation does not exist"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_operational_errors_are_worth_a_redelivery(exc: BaseException, passes: bool) -> None:
    assert store_unavailable(exc) is passes
