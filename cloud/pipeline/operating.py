"""The routing defaults of a shipped edge model, from its logits: a temperature fitted on the
calibration split, the threshold for the escalation budget and accuracy target, and, when
``guarantee_epsilon`` is set, the guaranteed threshold (``guarantee.py``), which is then the
one shipped. ``optimize`` and ``retrain`` both call ``fit_routing``, so a retrained model is
calibrated exactly as the first one was. NumPy only.

A retrain has a third rule, and uses it by default (``rule="match"``): the threshold
escalating least at which the candidate keeps the serving model's hybrid accuracy on each
part of the calibration data (``calibrate.choose_matching_threshold``). A budget says how
much may escalate, not how much accuracy that costs; on a shifted field the budget's
threshold gave up to 2 points of hybrid accuracy (docs/benchmarks.md, "One cycle").

Why the guaranteed threshold wins when asked for rather than the stricter of the two: the
guarantee is a promise the agent checks live (``Telemetry.audit``), and raising the
threshold above it only escalates more without changing what is promised; the budget's
threshold is reported beside it, so an operator sees what the promise costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from cloud.pipeline import calibrate
from cloud.pipeline.guarantee import GuaranteedThreshold, choose_guaranteed_threshold
from shared.manifest import RoutingDefaults


@dataclass(frozen=True)
class RoutingTarget:
    """What the operator asked for (the ``OptimizeSettings`` fields of the same names)."""

    max_escalation: float | None
    min_relative_accuracy: float | None
    guarantee_epsilon: float | None = None
    guarantee_delta: float = 0.1
    guarantee_reference: Literal["cloud", "labels"] = "cloud"
    #: "budget": ``max_escalation``/``min_relative_accuracy``; "match": keep the serving
    #: model's hybrid accuracy (needs ``ServingReference``s); the guarantee wins over both
    rule: Literal["budget", "match"] = "budget"
    match_tolerance: float = 0.0


@dataclass(frozen=True)
class ServingReference:
    """The serving model on a part of the calibration split (``rows``): its probabilities
    there as a device computes them, its threshold, the labels to score against and the
    samples' weights; the "match" rule keeps its hybrid accuracy on each part."""

    name: str
    rows: np.ndarray
    probs: np.ndarray
    threshold: float
    weights: np.ndarray | None = None


@dataclass(frozen=True)
class FittedRouting:
    routing: RoutingDefaults
    temperature: float
    chosen_by: Literal["budget", "match", "guarantee"]
    budget_threshold: float
    budget_met: bool
    guarantee: GuaranteedThreshold | None
    #: the guaranteed threshold on the held-out split: coverage, error, answered
    guarantee_test: dict[str, float] | None
    operating: calibrate.OperatingPoint
    calib_curve: list[calibrate.CurvePoint]
    test_curve: list[calibrate.CurvePoint]
    matched: calibrate.MatchedThreshold | None = None

    def section(self) -> dict[str, Any]:
        """The report's view (JSON-ready)."""
        out: dict[str, Any] = {
            "chosen_by": self.chosen_by,
            "operating_point": asdict(self.operating),
            "budget_threshold": self.budget_threshold,
            "budget_met_on_calib": self.budget_met,
        }
        if self.matched is not None:
            out["match"] = asdict(self.matched)
        if self.guarantee is not None:
            out["guarantee"] = {
                **asdict(self.guarantee),
                "reference": self.routing.guarantee.reference if self.routing.guarantee else None,
                "test": self.guarantee_test,
            }
        return out


def wrong_against(
    probs: np.ndarray, reference: str, y: np.ndarray, cloud_probs: np.ndarray
) -> np.ndarray:
    """Whether each edge answer is wrong: against the labels, or the cloud model's answers."""
    truth = y if reference == "labels" else cloud_probs.argmax(axis=1)
    return np.asarray(probs.argmax(axis=1) != truth)


def selective(
    probs: np.ndarray, threshold: float, reference: np.ndarray
) -> tuple[float, float, int]:
    """Coverage, error of the answered and how many answered at ``threshold``."""
    answered = probs.max(axis=1) >= threshold
    n = int(answered.sum())
    err = float((probs.argmax(axis=1)[answered] != reference[answered]).mean()) if n else 0.0
    return float(answered.mean()) if len(probs) else 0.0, err, n


def fit_routing(
    logits: dict[str, np.ndarray],
    cloud_probs: dict[str, np.ndarray],
    y: dict[str, np.ndarray],
    target: RoutingTarget,
    serving: Sequence[ServingReference] = (),
) -> FittedRouting:
    """``logits``/``cloud_probs``/``y`` by split, "calib" and "test": fits on "calib" only,
    and measures the result on "test". ``serving``: the serving model on parts of "calib"
    (the "match" rule; reported beside any rule when given)."""
    if target.rule == "match" and not serving:
        raise ValueError("the match rule needs the serving model's answers on calibration data")
    temperature = calibrate.fit_temperature(logits["calib"], y["calib"])
    probs = {k: calibrate.softmax(v, temperature) for k, v in logits.items()}
    cloud_calib_acc = float((cloud_probs["calib"].argmax(axis=1) == y["calib"]).mean())
    calib_curve = calibrate.hybrid_curve(probs["calib"], cloud_probs["calib"], y["calib"])
    test_curve = calibrate.hybrid_curve(probs["test"], cloud_probs["test"], y["test"])
    budget, budget_met = calibrate.choose_threshold(
        calib_curve, cloud_calib_acc, target.max_escalation, target.min_relative_accuracy
    )
    matched = None
    if serving:
        matched = calibrate.choose_matching_threshold(
            [
                calibrate.MatchPart(
                    name=ref.name,
                    candidate=probs["calib"][ref.rows],
                    serving=ref.probs,
                    serving_threshold=ref.threshold,
                    cloud=cloud_probs["calib"][ref.rows],
                    labels=y["calib"][ref.rows],
                    weights=ref.weights,
                )
                for ref in serving
            ],
            target.match_tolerance,
        )
    guaranteed, held_out = None, None
    chosen_by: Literal["budget", "match", "guarantee"] = "budget"
    threshold, met = budget, budget_met
    if target.rule == "match" and matched is not None:
        threshold, met, chosen_by = matched.threshold, matched.met, "match"
    if target.guarantee_epsilon is not None:
        ref = target.guarantee_reference
        guaranteed = choose_guaranteed_threshold(
            probs["calib"].max(axis=1),
            wrong_against(probs["calib"], ref, y["calib"], cloud_probs["calib"]),
            target.guarantee_epsilon,
            target.guarantee_delta,
        )
        threshold, met, chosen_by = guaranteed.threshold, guaranteed.met, "guarantee"
        truth = y["test"] if ref == "labels" else cloud_probs["test"].argmax(axis=1)
        coverage, error, n = selective(probs["test"], threshold, truth)
        held_out = {"coverage": coverage, "error": error, "n_answered": float(n)}
    operating = calibrate.OperatingPoint(
        threshold=threshold,
        max_escalation=target.max_escalation,
        min_relative_accuracy=target.min_relative_accuracy,
        met_on_calib=met,
        calib=calibrate.point_at(calib_curve, threshold),
        test=calibrate.point_at(test_curve, threshold),
    )
    routing = RoutingDefaults(
        metric="max_prob",
        threshold=threshold,
        temperature=temperature,
        guarantee=None
        if guaranteed is None or not guaranteed.met
        else guaranteed.manifest(target.guarantee_reference),
    )
    return FittedRouting(
        routing=routing,
        temperature=temperature,
        chosen_by=chosen_by,
        budget_threshold=budget,
        budget_met=budget_met,
        guarantee=guaranteed,
        guarantee_test=held_out,
        operating=operating,
        calib_curve=calib_curve,
        test_curve=test_curve,
        matched=matched,
    )
