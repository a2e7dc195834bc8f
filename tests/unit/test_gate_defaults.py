"""The gate's defaults are the ones ``scripts/bench_gate.py`` chose (docs/benchmarks.md, "The
gate"): 500 labelled samples and a margin of 1 point, used by the rollout and the CLI alike.
A candidate 1.6 points worse on 500 labels is stopped by them (the old 2-point margin let it
through)."""

from __future__ import annotations

import argparse
import inspect

from cloud.fleet import gate
from cloud.fleet.cli import add_fleet_parser
from cloud.fleet.gate import GateStats, decide
from cloud.fleet.rollout import RolloutController


def test_the_rollout_and_the_cli_use_the_gates_defaults() -> None:
    assert (gate.DEFAULT_MIN_SAMPLES, gate.DEFAULT_MARGIN) == (500, 0.01)
    params = inspect.signature(RolloutController.create).parameters
    assert params["gate_min_samples"].default == gate.DEFAULT_MIN_SAMPLES
    assert params["gate_margin"].default == gate.DEFAULT_MARGIN
    parser = argparse.ArgumentParser()
    add_fleet_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fleet", "rollout", "digits@2", "--shadow"])
    assert (args.gate_min_samples, args.gate_margin) == (500, 0.01)


def test_a_candidate_worse_by_more_than_a_point_on_500_labels_is_stopped() -> None:
    stats = GateStats(
        samples=500,
        agree_serving=450,
        labelled=500,
        agree_cloud=440,
        serving_agree_cloud=448,
        shadow_only_right=10,
        serving_only_right=18,
    )
    assert decide(stats, gate.DEFAULT_MIN_SAMPLES, gate.DEFAULT_MARGIN).state == "fail"
    fewer = GateStats(**{**stats.__dict__, "labelled": 499})
    assert decide(fewer, gate.DEFAULT_MIN_SAMPLES, gate.DEFAULT_MARGIN).state == "wait"
