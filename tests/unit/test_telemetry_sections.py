"""The learning loop's telemetry sections refuse counts that cannot happen: the collector
would otherwise add them into the gate's and the dashboard's figures."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.telemetry import FieldAccuracy, ShadowStats

SHADOW: dict[str, Any] = {
    "model": "digits",
    "version": 2,
    "samples": 10,
    "agree_serving": 8,
    "labelled": 6,
    "agree_cloud": 5,
    "serving_agree_cloud": 4,
    "shadow_only_right": 2,
    "serving_only_right": 1,
    "would_escalate": 3,
}
AUDIT: dict[str, Any] = {
    "model": "digits",
    "version": 2,
    "audited": 10,
    "wrong": 1,
    "session_audited": 30,
    "session_wrong": 2,
    "epsilon": 0.05,
    "delta": 0.1,
}


def test_consistent_sections_load() -> None:
    ShadowStats(**SHADOW)
    FieldAccuracy(**AUDIT)


@pytest.mark.parametrize(
    "change",
    [
        {"agree_serving": 11},
        {"labelled": 11},
        {"would_escalate": 11},
        {"agree_cloud": 7},
        {"serving_agree_cloud": 7},
        {"shadow_only_right": 6},
        {"serving_only_right": 5},
    ],
)
def test_impossible_shadow_counts_are_refused(change: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        ShadowStats(**(SHADOW | change))


@pytest.mark.parametrize(
    "change",
    [{"wrong": 11}, {"session_wrong": 31}, {"delta": 0.0}, {"delta": 1.5}, {"epsilon": 2.0}],
)
def test_impossible_audit_figures_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FieldAccuracy(**(AUDIT | change))
