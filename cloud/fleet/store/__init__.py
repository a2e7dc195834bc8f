"""The fleet store: the fleet's state on SQLite (embedded, the default) or PostgreSQL (when
several ``tandem-cloud`` instances share a fleet), one interface and the same SQL on both.
``open_store`` picks the engine from the settings' ``database_url``."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from cloud.fleet.store.backend import Dialect
from cloud.fleet.store.fleet_store import POSTGRES_SCHEMES, SQLITE_SCHEME, FleetStore, Rollout
from shared.settings_files import SettingsError

__all__ = ["Dialect", "FleetStore", "Rollout", "open_store"]


def open_store(url: str | SecretStr | None, state_dir: Path) -> FleetStore:
    """The store ``url`` names (``sqlite://PATH``, ``postgresql://...``), or SQLite at
    ``state_dir/fleet.db`` when there is none; migrated to the current schema."""
    if url is None:
        return FleetStore(state_dir / "fleet.db")
    text = url.get_secret_value() if isinstance(url, SecretStr) else url
    if not text.startswith((*POSTGRES_SCHEMES, SQLITE_SCHEME)):
        what = f"scheme {text.partition('://')[0]!r}" if "://" in text else "not a URL"
        raise SettingsError(f"database_url: {what} (sqlite://PATH or postgresql://...)")
    return FleetStore(text)
