"""``tandem-cloud model optimize`` on the digits split with small settings: every step runs
for real (Keras training, the TFLite converter and interpreter, ONNX Runtime's quantizer and
runtime), and the bundle it writes is packaged, signed, published and installed by an agent
over MQTT.

The pipeline runs in a child process, as an operator runs it: TensorFlow must never load in
the test process, whose agents use tflite_runtime (the two clash in native code). The
artifacts are read here with the agent's own interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from agent.inference.backends.tflite import find_interpreter_class
from cloud.cli import main as cloud_main
from cloud.pipeline.data import SplitData
from cloud.pipeline.settings import OptimizeSettings
from shared.manifest import Manifest
from tests.fleet import Fleet, last_state, wait_for
from tests.helpers import MODELS, ROOT

SMALL = {
    "hidden": [16],
    "epochs": 12,
    "prune_epochs": 3,
    "sparsities": [0.6],
    "latency_calls": 12,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("pipeline")
    settings = out / "optimize.toml"
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
            str(out / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["bundle"].endswith("bundle")
    yield out / "run", json.loads((out / "run/report.json").read_text())


def _interpreter(path: Path) -> Any:
    interp = find_interpreter_class()[1](model_path=str(path))
    interp.allocate_tensors()
    return interp


def _variant(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in report["variants"] if v["name"] == name)


def test_every_variant_is_written_and_measured(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    chosen = report["distillation"]["chosen"]
    names = {v["name"] for v in report["variants"]}
    for kind in ("float32", "dynamic", "float16", "int8", "int8-per-tensor", "pruned60-int8"):
        assert f"edge-{chosen}-{kind}" in names
    assert {"edge-labels-float32", "edge-distilled-float32", "cloud-static-int8"} <= names
    for v in report["variants"]:
        assert (out / v["file"]).stat().st_size == v["bytes"] > 0
        assert 0.5 < v["accuracy"] <= 1 and 0.5 < v["agreement"] <= 1 and v["latency_ms"] > 0
    f32, i8 = _variant(report, f"edge-{chosen}-float32"), _variant(report, f"edge-{chosen}-int8")
    assert i8["bytes"] < f32["bytes"] and abs(i8["accuracy"] - f32["accuracy"]) < 0.05
    per_tensor = _variant(report, f"edge-{chosen}-int8-per-tensor")
    assert per_tensor["bytes"] < i8["bytes"]


def test_int8_artifact_takes_and_gives_int8(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    path = out / _variant(report, f"edge-{report['distillation']['chosen']}-int8")["file"]
    interp = _interpreter(path)
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8


def test_pruning_zeroes_weights_and_pays_only_compressed(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    chosen = report["distillation"]["chosen"]
    pruned = _variant(report, f"edge-{chosen}-pruned60-float32")
    dense = _variant(report, f"edge-{chosen}-float32")
    interp = _interpreter(out / pruned["file"])
    kernels = [
        interp.get_tensor(d["index"])
        for d in interp.get_tensor_details()
        if len(d["shape"]) == 2 and d["shape"][0] > 1 and d["dtype"] == np.float32
    ]
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert zeros >= 0.55
    # zeros are stored like any weight: the same size on disk, less once compressed
    assert abs(pruned["bytes"] - dense["bytes"]) < 0.02 * dense["bytes"]
    assert pruned["gzip_bytes"] < 0.8 * dense["gzip_bytes"]


def test_onnx_quantization_is_real(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    ops = {
        name: {n.op_type for n in onnx.load(str(out / _variant(report, name)["file"])).graph.node}
        for name in ("cloud-float32", "cloud-dynamic-int8", "cloud-static-int8")
    }
    assert (
        "MatMulInteger" in ops["cloud-dynamic-int8"]
        or "DynamicQuantizeLinear" in ops["cloud-dynamic-int8"]
    )
    assert (
        "QuantizeLinear" in ops["cloud-static-int8"]
        and "QuantizeLinear" not in ops["cloud-float32"]
    )
    assert (
        _variant(report, "cloud-static-int8")["bytes"]
        < 0.4 * _variant(report, "cloud-float32")["bytes"]
    )


def test_distillation_is_compared_with_labels_alone(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    d = report["distillation"]
    assert d["chosen"] in ("labels", "distilled")
    assert (out / "variants/edge-labels-float32.tflite").read_bytes() != (
        out / "variants/edge-distilled-float32.tflite"
    ).read_bytes()
    assert any(f.startswith("Distillation:") for f in report["findings"])


def test_calibration_and_threshold_reach_the_bundle(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    cal, op = report["calibration"], report["routing"]["operating_point"]
    assert cal["temperature"] > 0 and cal["variant"] == report["shipped"]["variant"]
    assert op["calib"]["escalation"] <= 0.2 + 1e-9  # the default budget
    manifest = Manifest.load(out / "bundle")
    assert manifest.routing.temperature == cal["temperature"]
    assert manifest.routing.threshold == op["threshold"]
    assert manifest.input.datatype == "INT8" and manifest.golden


def test_report_page_has_the_table_and_the_charts(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    for v in report["variants"]:
        assert v["name"] in page
    assert "Reliability" in page or "reliability" in page


def test_bundle_is_packaged_and_installed_by_an_agent(
    run: tuple[Path, dict[str, Any]], fleet: Fleet, digits: SplitData
) -> None:
    out, _ = run
    service = fleet.start_agent("dev-0")
    release = fleet.release(out / "bundle")
    fleet.publish(release)
    wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="ACTIVE")
    agent = service.agent
    assert agent.model.manifest.version == 2
    assert agent.threshold == release.routing.threshold
    answers = [agent.infer(x, mode="edge") for x in digits.test.x[:50]]
    accuracy = np.mean([int(a.label) == y for a, y in zip(answers, digits.test.y[:50])])
    assert accuracy > 0.8 and answers[0].edge_model == "digits:2"


def test_bad_settings_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError):
        OptimizeSettings.model_validate(
            {"data": "d.npz", "teacher": "t.onnx", "out": str(tmp_path), "epochs": 0}
        )
    either = OptimizeSettings.model_validate(
        {"data": "d.npz", "teacher": "t.onnx", "out": str(tmp_path), "max_escalation": "none"}
    )
    assert either.max_escalation is None and either.min_relative_accuracy == 0.995
    with pytest.raises(SystemExit) as caught:
        cloud_main(["model", "optimize", "--data", "d.npz", "--teacher", "t.onnx"])
    assert caught.value.code == 2 and "invalid pipeline settings" in capsys.readouterr().err


def test_tensorflow_never_loaded_here() -> None:
    assert "tensorflow" not in sys.modules
