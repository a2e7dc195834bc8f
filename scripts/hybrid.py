"""Running held-out samples through an agent in one routing mode, and sweeping the
threshold from measured per-sample answers: shared by ``demo.py`` and ``eval_hybrid.py``.

A sweep needs each sample's edge answer (and its confidence) and its cloud answer, both
measured; a sample escalates at threshold t when its edge confidence is below t, and then
costs its edge time plus its cloud time (the agent asks the edge first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dataset
import numpy as np

from agent import Agent, InferenceResult


@dataclass
class ModeRun:
    name: str
    results: list[InferenceResult]
    wall_ms: list[float]
    y: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(np.mean([int(r.label) == y for r, y in zip(self.results, self.y)]))

    @property
    def escalated(self) -> float:
        return float(np.mean([r.source == "cloud" for r in self.results]))

    def pct(self, q: float) -> float:
        return float(np.percentile(self.wall_ms, q))

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.name,
            "accuracy": self.accuracy,
            **timing(self.results, self.wall_ms),
        }


def timing(results: list[InferenceResult], wall_ms: list[float]) -> dict[str, Any]:
    """What a mode's run cost and why it went where it did: share escalated, wall-time
    percentiles, and the count of each routing reason (every mode's summary has these)."""
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return {
        "escalated": float(np.mean([r.source == "cloud" for r in results])),
        "p50_ms": float(np.percentile(wall_ms, 50)),
        "p95_ms": float(np.percentile(wall_ms, 95)),
        "max_ms": max(wall_ms),
        "mean_ms": float(np.mean(wall_ms)),
        "reasons": reasons,
    }


def run_mode(
    agent: Agent, name: str, mode: Any, split: dataset.Split, deadline_ms: float
) -> ModeRun:
    results, wall = [], []
    for x in split.x:
        t0 = time.perf_counter()
        results.append(agent.infer(x, mode=mode, deadline_ms=deadline_ms))
        wall.append((time.perf_counter() - t0) * 1000.0)
    return ModeRun(name, results, wall, split.y)


def sweep(edge: ModeRun, cloud: ModeRun) -> list[dict[str, float]]:
    """Accuracy and escalation for thresholds 0..1, from the measured answers of each path:
    a sample escalates when its edge confidence is below the threshold."""
    conf = np.array([r.confidence for r in edge.results])
    edge_ok = np.array([int(r.label) == y for r, y in zip(edge.results, edge.y)])
    cloud_ok = np.array([int(r.label) == y for r, y in zip(cloud.results, cloud.y)])
    edge_ms, cloud_ms = np.array(edge.wall_ms), np.array(cloud.wall_ms)
    curve = []
    for t in np.round(np.linspace(0.0, 1.0, 101), 2):
        esc = conf < t
        ms = np.where(esc, edge_ms + cloud_ms, edge_ms)
        curve.append(
            {
                "threshold": float(t),
                "escalated": float(esc.mean()),
                "accuracy": float(np.where(esc, cloud_ok, edge_ok).mean()),
                "mean_ms": float(ms.mean()),
                "p95_ms": float(np.percentile(ms, 95)),
            }
        )
    return curve
