"""``scripts/opcount_cloud.py``: the deterministic cost of the hot path is counted, and an
inference costs more than the bare route it is compared with, in Tandem's own functions."""

from __future__ import annotations

import json
from pathlib import Path

import opcount_cloud


def test_opcount_counts_both_routes(tmp_path: Path) -> None:
    out = tmp_path / "opcount.json"
    assert opcount_cloud.main(["--requests", "64", "--top", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["bare_total"] < result["infer_total"]
    infer_only = {k for k, v in result["infer"].items() if v > 0 and k not in result["bare"]}
    assert any("cloud/serving/batcher.py" in k for k in infer_only)
    assert any("shared/oip/codec.py" in k for k in infer_only)
    # counting is exact: the same requests give the same count again
    again = tmp_path / "again.json"
    assert opcount_cloud.main(["--requests", "64", "--top", "5", "--out", str(again)]) == 0
    assert json.loads(again.read_text())["bare_total"] == result["bare_total"]
