"""Calibration and threshold choice on synthetic data with known answers (NumPy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.pipeline import calibrate
from cloud.pipeline.data import load_split
from shared.errors import ContractError


def _overconfident(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose calibrated temperature is ``true_t``: labels drawn from softmax(z / T)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, size=(n, 5))
    p = calibrate.softmax(z, true_t)
    y = np.array([rng.choice(5, p=row) for row in p])
    return z, y


def test_temperature_is_recovered() -> None:
    z, y = _overconfident(4000, 2.5)
    t = calibrate.fit_temperature(z, y)
    assert 2.2 < t < 2.8
    assert calibrate.nll(z, y, t) < calibrate.nll(z, y, 1.0)


def test_temperature_scaling_lowers_the_calibration_error() -> None:
    z, y = _overconfident(4000, 3.0)
    before = calibrate.reliability(calibrate.softmax(z), y)
    after = calibrate.reliability(calibrate.softmax(z, calibrate.fit_temperature(z, y)), y)
    assert after.ece < before.ece / 2
    assert sum(before.counts) == len(y) and len(before.bin_edges) == 11


def _curve() -> tuple[list[calibrate.CurvePoint], float]:
    # edge right on confident samples only; cloud right everywhere but one
    conf = np.linspace(0.3, 1.0, 100, endpoint=False)
    edge = np.stack([conf, 1 - conf], axis=1)
    y = np.where(conf > 0.6, 0, 1)  # below 0.6 the edge (which says 0) is wrong
    cloud = np.eye(2)[y]
    cloud[0] = 1 - cloud[0]  # and the cloud wrong once
    return calibrate.hybrid_curve(edge, cloud, y), float((cloud.argmax(1) == y).mean())


def test_curve_runs_from_edge_only_to_cloud_only() -> None:
    curve, _ = _curve()
    assert curve[0].threshold == 0 and curve[0].escalation == 0
    assert curve[-1].threshold == 1 and curve[-1].escalation == 1
    assert curve[0].accuracy < curve[-1].accuracy


def test_budget_is_respected_and_spent_on_accuracy() -> None:
    curve, cloud_acc = _curve()
    t, met = calibrate.choose_threshold(curve, cloud_acc, 0.5, 0.99)
    point = calibrate.point_at(curve, t)
    assert point.escalation <= 0.5 and met
    assert point.accuracy == max(p.accuracy for p in curve if p.escalation <= 0.5)
    # a budget too small to reach the target: the best within it, flagged as unmet
    t, met = calibrate.choose_threshold(curve, cloud_acc, 0.1, 0.99)
    assert calibrate.point_at(curve, t).escalation <= 0.1 and not met


def test_accuracy_target_alone_escalates_least() -> None:
    curve, cloud_acc = _curve()
    t, met = calibrate.choose_threshold(curve, cloud_acc, None, 0.99)
    need = 0.99 * cloud_acc
    ok = [p for p in curve if p.accuracy >= need]
    assert met and calibrate.point_at(curve, t).escalation == min(p.escalation for p in ok)
    with pytest.raises(ValueError):
        calibrate.choose_threshold(curve, cloud_acc, None, None)


def test_a_file_that_is_not_a_split_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 2)))
    with pytest.raises(ContractError, match="not a split file"):
        load_split(bad)
