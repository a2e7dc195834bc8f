"""What ``Agent.infer`` returns: the answer, where it came from, why, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Source = Literal["edge", "cloud"]


@dataclass(frozen=True, slots=True)
class Latency:
    """Milliseconds. ``local_ms``/``cloud_ms`` are None when that path did not run."""

    total_ms: float
    local_ms: float | None
    cloud_ms: float | None


@dataclass(frozen=True, slots=True)
class InferenceResult:
    label: str
    index: int
    probabilities: np.ndarray
    confidence: float
    source: Source
    reason: str
    edge_model: str
    cloud_model: str | None
    latency: Latency

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for the CLI and logs)."""
        return {
            "label": self.label,
            "index": self.index,
            "confidence": round(self.confidence, 6),
            "source": self.source,
            "reason": self.reason,
            "edge_model": self.edge_model,
            "cloud_model": self.cloud_model,
            "latency_ms": {
                "total": round(self.latency.total_ms, 3),
                "local": None if self.latency.local_ms is None else round(self.latency.local_ms, 3),
                "cloud": None if self.latency.cloud_ms is None else round(self.latency.cloud_ms, 3),
            },
            "probabilities": [round(float(p), 6) for p in self.probabilities],
        }
