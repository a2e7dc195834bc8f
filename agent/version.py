"""The agent's version: in births, and checked against ``min_agent_version``."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

__version__ = "0.1.0"


def older_than(minimum: str, current: str = __version__) -> bool:
    """Whether ``current`` is older than ``minimum``, by PEP 440 (``1.0rc1 < 1.0 < 1.0.5``).
    Raises ``ValueError`` when ``minimum`` is not a version: a manifest's requirement that
    cannot be read cannot be met."""
    try:
        wanted = Version(minimum)
    except InvalidVersion:
        raise ValueError(f"min_agent_version {minimum!r} is not a version") from None
    return Version(current) < wanted
