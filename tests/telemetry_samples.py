"""One well-formed telemetry message for tests and benchmarks that only need many of them
(the collectors' ingest), so each does not spell out the schema's every field."""

from __future__ import annotations

from datetime import datetime, timezone

from shared.telemetry import Histogram, Telemetry


def sample_telemetry(device: str, seq: int, *, interval_s: float = 10.0) -> bytes:
    """Session 1, message ``seq`` of ``device``: ten requests, one sent to the cloud; as
    the agent puts it on the wire (JSON bytes)."""
    message = Telemetry(
        device=device,
        session=1,
        seq=seq,
        ts=datetime.now(timezone.utc),
        interval_s=interval_s,
        requests=10,
        routes={"edge": 9, "cloud": 1},
        reasons={"confident": 9, "low_confidence": 1},
        errors=0,
        latency_local=Histogram(),
        latency_cloud=Histogram(),
        latency_total=Histogram(),
        confidence=[0] * 10,
        offload_rate=0.1,
    )
    return message.model_dump_json().encode()
