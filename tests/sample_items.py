"""A field sample as a device would upload it (``shared.samples``), for the tests that fill
a sample store with feature rows: one definition instead of one per test file."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from shared.samples import Answer, SampleMeta, encode_features, sample_id


def feature_item(row: np.ndarray, i: int) -> tuple[SampleMeta, bytes]:
    """An escalation of the digits model (edge 1, cloud 2) carrying ``row``; ``i`` spreads
    the timestamps."""
    encoding, shape, payload = encode_features(row)
    return SampleMeta(
        id=sample_id(payload),
        kind="escalation",
        model="digits",
        version=1,
        ts=datetime(2026, 12, 1, 12, 0, i % 60, tzinfo=timezone.utc),
        encoding=encoding,
        shape=shape,
        size=len(payload),
        edge=Answer(index=1, confidence=0.3),
        cloud=Answer(index=2, confidence=0.9),
        cloud_model="digits-cloud",
        threshold=0.85,
    ), payload
