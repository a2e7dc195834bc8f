"""``scripts/eval_hybrid.py`` against a real cloud server (a short simulated delay keeps it
quick, the script loaded from its file): the sweep runs from edge-only to cloud-only and
agrees with the measured auto run."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import EDGE_INT8, load_script

eval_hybrid = load_script("eval_hybrid")


def test_eval_hybrid_sweeps_and_measures(tmp_path: Path) -> None:
    assert (
        eval_hybrid.main(["--bundle", str(EDGE_INT8), "--wan-ms", "5", "--out", str(tmp_path)]) == 0
    )
    result = json.loads((tmp_path / "eval_hybrid.json").read_text())
    curve = result["curve"]
    assert curve[0]["threshold"] == 0 and curve[0]["escalated"] == 0
    assert curve[-1]["threshold"] == 1 and curve[-1]["escalated"] > 0.95
    modes = result["modes"]
    assert modes["edge"]["escalated"] == 0 and modes["cloud"]["escalated"] == 1
    assert modes["cloud"]["mean_ms"] >= 5  # the simulated round trip is really there
    # the swept point at the bundle's threshold predicts the measured auto run
    at = result["at_threshold"]
    assert abs(at["escalated"] - modes["auto"]["escalated"]) < 0.02
    assert abs(at["accuracy"] - modes["auto"]["accuracy"]) < 0.02
    assert (tmp_path / "eval_hybrid.png").stat().st_size > 10_000
