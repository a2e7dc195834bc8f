"""The same data, settings and seed give the same figures: ``tandem-cloud model optimize``
twice, in child processes (TensorFlow never loads here), once with TensorFlow's oneDNN
kernels asked for by the environment and once without, as two machines whose CPUs make
TensorFlow choose differently. The pipeline pins its kernels itself
(``cloud/pipeline/determinism.py``), so the reports and the shipped artifact are identical;
another seed gives other figures (the comparison can fail)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from shared.manifest import Manifest
from tests.helpers import MODELS, ROOT

SMALL = {"hidden": [32], "epochs": 8, "sparsities": [], "latency_calls": 12, "golden_count": 2}


def optimize(out: Path, seed: int, onednn_env: str, *extra: str) -> dict[str, Any]:
    settings = out.parent / f"{out.name}.toml"
    settings.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL.items()) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "model",
            "optimize",
            "--settings",
            str(settings),
            "--data",
            str(MODELS / "data/digits.npz"),
            "--teacher",
            str(MODELS / "cloud/digits-cloud/1/model.onnx"),
            "--out",
            str(out),
            "--seed",
            str(seed),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn_env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads((out / "report.json").read_text()))


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """Everything but what is measured on the clock (latency, and the findings quoting it)
    and the run's folder."""
    out = json.loads(json.dumps(report))
    for v in out["variants"]:
        v.pop("latency_ms")
    out.pop("findings")
    out["settings"].pop("out")
    return dict(out)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_figures_whatever_the_kernels(tmp_path: Path) -> None:
    a = optimize(tmp_path / "a", 7, "1")
    b = optimize(tmp_path / "b", 7, "0")
    assert figures(a) == figures(b)
    assert digest(tmp_path / "a/bundle/model.tflite") == digest(tmp_path / "b/bundle/model.tflite")
    assert a["reproducibility"]["onednn"] is False and a["reproducibility"]["seed"] == 7
    # another seed (and the guaranteed threshold, checked below): other figures
    c = optimize(tmp_path / "c", 8, "0", "--epsilon", "0.05", "--delta", "0.1")
    assert figures(c)["calibration"] != figures(a)["calibration"]
    assert digest(tmp_path / "c/bundle/model.tflite") != digest(tmp_path / "a/bundle/model.tflite")
    guaranteed_threshold_reaches_the_bundle(c, tmp_path / "c")


def guaranteed_threshold_reaches_the_bundle(report: dict[str, Any], out: Path) -> None:
    routing = report["routing"]
    g = routing["guarantee"]
    assert routing["chosen_by"] == "guarantee" and g["met"]
    assert g["bound"] <= 0.05 and g["reference"] == "cloud"
    manifest = Manifest.load(out / "bundle")
    assert manifest.routing.threshold == g["threshold"] == routing["operating_point"]["threshold"]
    assert manifest.routing.guarantee is not None
    assert manifest.routing.guarantee.epsilon == 0.05
    assert manifest.routing.guarantee.calibration_samples == report["split"]["calib"]
    assert manifest.routing.guarantee.coverage == g["coverage"]
    assert "budget_threshold" in routing and "Guarantee" in (out / "report.html").read_text()
