"""The UTC day, the unit of every daily byte budget and quota (the device's telemetry
budget, the uploads' share of it, the cloud's per-device sample quota): one rule for when
the next one starts, so the device and the cloud agree on it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


def seconds_to_utc_midnight(now: datetime) -> float:
    """Seconds from ``now`` (naive: read as UTC) until the next UTC day begins."""
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()
