"""``scripts/opcount_cloud.py``: the deterministic cost of the hot path is counted, and an
inference costs more than the bare route it is compared with, in Tandem's own functions.
The script runs as a user runs it (tests import nothing from ``scripts/``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import ROOT


def _opcount(out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "opcount_cloud.py"),
            *("--requests", "64", "--top", "5", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_opcount_counts_both_routes(tmp_path: Path) -> None:
    result = _opcount(tmp_path / "opcount.json")
    assert 0 < result["bare_total"] < result["infer_total"]
    infer_only = {k for k, v in result["infer"].items() if v > 0 and k not in result["bare"]}
    assert any("cloud/serving/batcher.py" in k for k in infer_only)
    assert any("shared/oip/codec.py" in k for k in infer_only)
    # counting is exact: the same requests give the same count again
    assert _opcount(tmp_path / "again.json")["bare_total"] == result["bare_total"]
