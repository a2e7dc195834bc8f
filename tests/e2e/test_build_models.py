"""CI runs the model build once (with the build extra) and checks what it writes, so the
committed demo models can always be made again from the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.inference.backends import TFLiteSettings
from agent.inference.model import load_model
from cloud.serving.model import OnnxModel
from cloud.settings import OrtSettings
from shared.manifest import Manifest
from tests.helpers import MODELS, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_models.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_layout(built: Path) -> None:
    for rel in [
        "data/digits.npz",
        "edge/digits-f32/model.tflite",
        "edge/digits-f32/manifest.json",
        "edge/digits-int8/model.tflite",
        "edge/digits-int8/manifest.json",
        "cloud/digits-cloud/1/model.onnx",
        "metrics.json",
        "README.md",
    ]:
        assert (built / rel).is_file(), rel


def test_models_load_and_pass_their_golden_samples(built: Path) -> None:
    for name in ("digits-f32", "digits-int8"):
        model = load_model(built / "edge" / name, TFLiteSettings())
        assert len(model.manifest.golden) >= 5
        model.close()
    onnx = OnnxModel("digits-cloud", "1", built / "cloud/digits-cloud/1/model.onnx", OrtSettings())
    assert onnx.inputs[0].shape == [-1, 64]  # dynamic batch
    int8 = Manifest.load(built / "edge" / "digits-int8")
    assert int8.input.datatype == "INT8" and int8.output.datatype == "INT8"


def test_measured_accuracy_tells_the_demo_story(built: Path) -> None:
    m = json.loads((built / "metrics.json").read_text())
    cloud = m["cloud"]["test_accuracy"]
    for edge in ("edge-f32", "edge-int8"):
        assert m[edge]["test_accuracy"] <= cloud - 0.03  # escalation visibly matters
        assert m[edge]["hybrid_test_accuracy"] >= cloud - 0.005
        assert m[edge]["hybrid_test_escalation"] <= 0.25
    assert cloud >= 0.97
    assert m["edge-int8"]["bytes"] < m["edge-f32"]["bytes"]
    committed = json.loads((MODELS / "metrics.json").read_text())
    for key in ("edge-f32", "edge-int8", "cloud"):  # the committed models are this build's
        assert abs(committed[key]["test_accuracy"] - m[key]["test_accuracy"]) <= 0.01
    readme = (built / "README.md").read_text()
    assert f"{100 * cloud:.2f}%" in readme
