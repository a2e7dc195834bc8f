"""A field sample as a device would upload it (``shared.samples``), for the tests and benches
that fill a sample store with feature rows: one place derives the id, encoding, shape and
size from the row, instead of one copy per file."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from shared.samples import Answer, SampleMeta, encode_features, sample_id

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
EDGE = Answer(index=1, confidence=0.3)
CLOUD = Answer(index=2, confidence=0.9)


def feature_sample(
    row: np.ndarray,
    *,
    kind: str = "escalation",
    ts: datetime = T0,
    edge: Answer = EDGE,
    cloud: Answer | None = CLOUD,
    **fields: Any,
) -> tuple[SampleMeta, bytes]:
    """A sample of the digits model carrying ``row``; ``fields`` set any other of
    ``SampleMeta``'s (``model``, ``version``, ``cloud_model``, ``threshold``...)."""
    encoding, shape, payload = encode_features(row)
    meta = SampleMeta(
        **{"model": "digits", "version": 1, **fields},
        id=sample_id(payload),
        kind=kind,
        ts=ts,
        encoding=encoding,
        shape=shape,
        size=len(payload),
        edge=edge,
        cloud=cloud,
    )
    return meta, payload


def feature_item(row: np.ndarray, i: int) -> tuple[SampleMeta, bytes]:
    """An escalation of the digits model (edge 1, cloud 2) carrying ``row``; ``i`` spreads
    the timestamps."""
    return feature_sample(
        row,
        ts=T0.replace(second=i % 60),
        cloud_model="digits-cloud",
        threshold=0.85,
    )
