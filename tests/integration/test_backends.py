"""The real TFLite interpreter and ONNX Runtime behind the backend interface."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelLoadError
from agent.inference.backends import OnnxSettings, TFLiteSettings
from agent.inference.backends.tflite import find_interpreter_class
from agent.inference.model import load_model
from cloud.pipeline.data import SplitData
from shared.manifest import CloudTarget, EdgeArtifact, Manifest, Preprocessing, TensorSpec
from tests.helpers import CLOUD_REPO, EDGE_F32, EDGE_INT8


def test_loader_finds_a_runtime() -> None:
    package, cls = find_interpreter_class()
    assert package in ("ai_edge_litert", "tflite_runtime", "tensorflow") and cls is not None


@pytest.mark.parametrize("model_dir", [EDGE_F32, EDGE_INT8], ids=["f32", "int8"])
def test_tflite_models_reach_their_documented_accuracy(model_dir: Path, digits: SplitData) -> None:
    model = load_model(model_dir, TFLiteSettings())  # runs the golden check too
    x = digits.test.x
    preds = np.array([model.backend.infer(row[None, :])[0].argmax() for row in x])
    accuracy = float((preds == digits.test.y).mean())
    assert accuracy > 0.9  # models/README.md states the exact figure (94.4% for int8)
    batch = model.backend.infer(x[:16])  # a batch resizes the interpreter
    assert batch.shape == (16, 10)
    np.testing.assert_array_equal(batch.argmax(1), preds[:16])
    model.close()


def test_int8_quantization_follows_the_tensor_parameters(digits: SplitData) -> None:
    """int8 and float32 artifacts of the same network agree on nearly every sample."""
    f32 = load_model(EDGE_F32, TFLiteSettings())
    i8 = load_model(EDGE_INT8, TFLiteSettings())
    x = digits.test.x[:100]
    a = np.array([f32.backend.infer(r[None])[0].argmax() for r in x])
    b = np.array([i8.backend.infer(r[None])[0].argmax() for r in x])
    assert (a == b).mean() >= 0.97
    logits = i8.backend.infer(x[:1])
    assert logits.dtype == np.float32 and np.abs(logits).max() > 1  # dequantized, not raw int8


def test_concurrent_requests_get_their_own_answers(digits: SplitData) -> None:
    model = load_model(EDGE_INT8, TFLiteSettings(pool_size=3))
    x = digits.test.x[:64]
    expected = [model.backend.infer(r[None])[0] for r in x]
    errors: list[str] = []

    def worker(offset: int) -> None:
        for _ in range(20):
            for i in range(offset, 64, 8):
                got = model.backend.infer(x[i][None])[0]
                if not np.array_equal(got, expected[i]):
                    errors.append(f"row {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_not_a_model_is_a_load_error(tmp_path: Path) -> None:
    shutil.copy(EDGE_INT8 / "manifest.json", tmp_path / "manifest.json")
    (tmp_path / "model.tflite").write_bytes(b"definitely not a flatbuffer")
    with pytest.raises(ModelLoadError, match="not a loadable TFLite model"):
        load_model(tmp_path, TFLiteSettings())


@pytest.mark.parametrize("model_dir", [EDGE_F32, EDGE_INT8], ids=["f32", "int8"])
def test_a_contract_the_artifact_contradicts_is_a_load_error(
    model_dir: Path, tmp_path: Path
) -> None:
    """Both tensors are checked against the manifest with ``TensorSpec.accepts``: a fixed
    batch of 1 fits the artifact's dynamic batch, 63 features do not fit its 64."""
    shutil.copy(model_dir / "model.tflite", tmp_path / "model.tflite")
    m = Manifest.load(model_dir)
    fixed = m.model_copy(update={"input": m.input.model_copy(update={"shape": [1, 64]})})
    (tmp_path / "manifest.json").write_text(fixed.to_json())
    load_model(tmp_path, TFLiteSettings()).close()
    narrow = m.model_copy(
        update={
            "input": m.input.model_copy(update={"shape": [-1, 63]}),
            "golden": [],
        }
    )
    (tmp_path / "manifest.json").write_text(narrow.to_json())
    with pytest.raises(ModelLoadError, match=r"TFLite input .input. has shape \[-1, 64\]"):
        load_model(tmp_path, TFLiteSettings())
    wide = m.model_copy(update={"output": m.output.model_copy(update={"shape": [-1, 1, 10]})})
    (tmp_path / "manifest.json").write_text(wide.to_json())
    with pytest.raises(ModelLoadError, match=r"TFLite output .* has shape"):
        load_model(tmp_path, TFLiteSettings())


def test_golden_mismatch_refuses_to_serve(tmp_path: Path) -> None:
    """Golden samples whose expected labels the artifact does not reproduce."""
    shutil.copy(EDGE_INT8 / "model.tflite", tmp_path / "model.tflite")
    other = Manifest.load(EDGE_INT8)
    bad = other.model_copy(
        update={
            "golden": [g.model_copy(update={"label": (g.label + 1) % 10}) for g in other.golden]
        }
    )
    (tmp_path / "manifest.json").write_text(bad.to_json())
    with pytest.raises(ModelLoadError, match="golden sample 0"):
        load_model(tmp_path, TFLiteSettings())


def test_onnx_backend_runs_an_onnx_edge_artifact(tmp_path: Path, digits: SplitData) -> None:
    """Devices that prefer ONNX Runtime (Jetson) run an ONNX edge artifact the same way."""
    blob = (CLOUD_REPO / "digits-cloud" / "1" / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(blob)
    base = Manifest.load(EDGE_F32)
    manifest = base.model_copy(
        update={
            "edge": EdgeArtifact(
                format="onnx",
                file="model.onnx",
                size=len(blob),
                sha256=hashlib.sha256(blob).hexdigest(),
            ),
            "output": TensorSpec(name="probabilities", shape=[-1, 10], datatype="FP32"),
            "output_kind": "probabilities",
            "golden": [],
            "cloud": CloudTarget(model="digits-cloud"),
        }
    )
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    model = load_model(tmp_path, OnnxSettings())
    probs = model.backend.infer(digits.test.x)
    assert float((probs.argmax(1) == digits.test.y).mean()) > 0.97
    with pytest.raises(ModelLoadError, match="cannot run"):
        load_model(tmp_path, TFLiteSettings())


@pytest.mark.parametrize("model_dir", [EDGE_F32, EDGE_INT8], ids=["f32", "int8"])
def test_manifest_preprocessing_is_applied(
    model_dir: Path, tmp_path: Path, digits: SplitData
) -> None:
    """A manifest whose preprocessing is ``x * 2 + 1``, with golden inputs given before that
    step: the golden check passes only if the backend applies it (fused with quantization)."""
    shutil.copy(model_dir / "model.tflite", tmp_path / "model.tflite")
    m = Manifest.load(model_dir)
    shifted = m.model_copy(
        update={
            "preprocessing": Preprocessing(scale=2.0, offset=1.0),
            "golden": [
                g.model_copy(update={"input": [(v - 1.0) / 2.0 for v in g.input]}) for g in m.golden
            ],
        }
    )
    (tmp_path / "manifest.json").write_text(shifted.to_json())
    model = load_model(tmp_path, TFLiteSettings())
    plain = load_model(model_dir, TFLiteSettings())
    x = digits.test.x[:20]
    np.testing.assert_allclose(model.backend.infer((x - 1) / 2), plain.backend.infer(x), atol=1e-4)
    np.testing.assert_allclose(model.preprocess(np.ones((1, 64), np.float32)), 3.0)


def test_public_interpreter_api_gives_the_same_answers(digits: SplitData) -> None:
    """Runtimes without the native wrapper go through set_tensor/invoke/get_tensor."""
    native = load_model(EDGE_INT8, TFLiteSettings(pool_size=1))
    public = load_model(EDGE_INT8, TFLiteSettings(pool_size=1))
    for slot in public.backend._slots:  # type: ignore[attr-defined]
        slot.native = False
    x = digits.test.x[:10]
    for row in x:
        np.testing.assert_array_equal(
            native.backend.infer_one(row[None])[0], public.backend.infer_one(row[None])[0]
        )
    np.testing.assert_array_equal(native.backend.infer(x), public.backend.infer(x))
