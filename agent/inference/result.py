"""What ``Agent.infer`` returns: the answer, where it came from, why, and what it cost.

Built on every request, so these are plain slotted classes (a frozen dataclass pays for
``object.__setattr__`` per field), and the probability array is made only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Source = Literal["edge", "cloud"]


class Reason:
    """Why a request was answered where it was: every ``InferenceResult.reason`` is one of
    these, and nowhere else spells them. Stable strings: telemetry counts by them."""

    # answered at the edge by choice
    CONFIDENT = "confident"
    FORCED_EDGE = "forced_edge"
    # wanted the cloud but did not ask it
    NO_CLOUD = "no_cloud"
    NO_BUDGET = "no_budget"
    BREAKER_OPEN = "breaker_open"
    # escalated
    LOW_CONFIDENCE = "low_confidence"
    LOOSE_BUDGET = "loose_budget"
    FORCED_CLOUD = "forced_cloud"
    # escalated, but the cloud failed: the local answer stands (``CloudError.reason``)
    CLOUD_TIMEOUT = "cloud_timeout"
    CLOUD_UNAVAILABLE = "cloud_unavailable"
    CLOUD_ERROR = "cloud_error"
    # the local model failed, and the cloud answered in its place
    EDGE_ERROR = "edge_error"


@dataclass(slots=True)
class Latency:
    """Milliseconds. ``local_ms``/``cloud_ms`` are None when that path did not run."""

    total_ms: float
    local_ms: float | None
    cloud_ms: float | None


@dataclass(slots=True)
class InferenceResult:
    """One answer. ``label``/``index``/``probs`` are a classifier's (empty for other
    tasks); ``prediction`` is the typed result of any task (``shared.decode``: detections,
    a mask, values...), None on the flat-classifier hot path, where ``label`` says it all."""

    label: str
    index: int
    probs: list[float]
    confidence: float
    source: Source
    reason: str
    edge_model: str
    cloud_model: str | None
    latency: Latency
    prediction: Any = None
    task: str = "classification"

    @property
    def probabilities(self) -> np.ndarray:
        """The class probabilities as a float32 array (made on access)."""
        return np.asarray(self.probs, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for the CLI and logs)."""
        lat = self.latency
        head: dict[str, Any] = {"task": self.task}
        if self.index >= 0:
            head |= {"label": self.label, "index": self.index}
        return {
            **head,
            "confidence": round(self.confidence, 6),
            "source": self.source,
            "reason": self.reason,
            "edge_model": self.edge_model,
            "cloud_model": self.cloud_model,
            "latency_ms": {
                "total": round(lat.total_ms, 3),
                "local": None if lat.local_ms is None else round(lat.local_ms, 3),
                "cloud": None if lat.cloud_ms is None else round(lat.cloud_ms, 3),
            },
            **({"probabilities": [round(p, 6) for p in self.probs]} if self.index >= 0 else {}),
            **({"prediction": self.prediction.to_dict()} if self.prediction is not None else {}),
        }
