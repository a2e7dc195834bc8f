"""``tandem-cloud model retrain`` with its default threshold rule, for real (child
processes, the TFLite runtime): the threshold is the one escalating least at which the
candidate keeps the serving release's hybrid accuracy on the calibration split and on the
field's calibration share (the serving model run on those same samples), the report says
so; and the candidate depends on which field samples there are, not on their order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud.releases.registry import Registry
from tests.integration.test_retrain import release_1, run_retrain, shifted_digits

__all__ = ["release_1"]  # the fixture


def retrain(registry: Path, key: Path, samples: Path, out: Path, *extra: str) -> dict[str, Any]:
    printed, report, _ = run_retrain(
        registry,
        key,
        out,
        "--samples",
        str(samples),
        "--epochs",
        "20",
        "--serving-version",
        "1",
        *extra,
    )
    assert printed["chosen_by"] == report["routing"]["chosen_by"]
    return report


def test_the_default_threshold_keeps_the_serving_models_hybrid_accuracy_whatever_the_order(
    tmp_path: Path, release_1: tuple[Path, Path, Path]
) -> None:
    registry, key, _ = release_1
    x, truth = shifted_digits(400)
    ids = np.asarray([f"s{i:04d}" for i in range(len(x))])
    kind = np.where(np.arange(len(x)) % 20 == 0, "audit", "escalation")
    np.savez(tmp_path / "a.npz", x=x, truth=truth, ids=ids, kind=kind)
    order = np.random.default_rng(1).permutation(len(x))  # the same samples, other arrival
    np.savez(tmp_path / "b.npz", x=x[order], truth=truth[order], ids=ids[order], kind=kind[order])

    report = retrain(registry, key, tmp_path / "a.npz", tmp_path / "out-a")
    routing = report["routing"]
    assert routing["chosen_by"] == "match"
    match = routing["match"]
    assert match["met"] and match["threshold"] == routing["threshold"]
    assert [p["name"] for p in match["parts"]] == ["original calib", "field calib"]
    assert report["split"]["calib"] == sum(p["n"] for p in match["parts"])
    for part in match["parts"]:
        assert part["candidate_hybrid"] >= part["serving_hybrid"]
    assert report["field"]["kinds"] == {"audit": 20, "escalation": 380}
    assert Registry(registry).manifest("digits", 2).routing.threshold == routing["threshold"]

    again = retrain(registry, key, tmp_path / "b.npz", tmp_path / "out-b")
    assert again["artifact"] == report["artifact"] and again["routing"] == routing

    budget = retrain(
        registry, key, tmp_path / "a.npz", tmp_path / "out-c", "--threshold-rule", "budget"
    )
    assert budget["routing"]["chosen_by"] == "budget"
    assert budget["routing"]["threshold"] == routing["budget_threshold"]
    assert budget["artifact"] == report["artifact"]  # the same model, another threshold
