"""Build the demo models from real data (scikit-learn's bundled digits), with measured accuracy.

Writes, under ``--out`` (default ``models/``):

- ``data/digits.npz``: the fixed, stratified train/calib/test split every script reuses;
- ``edge/digits-f32/`` and ``edge/digits-int8/``: a deliberately small MLP as TFLite, float32
  and full-integer int8 (int8 input and output), each with its ``manifest.json`` (contract,
  labels, preprocessing, routing defaults, golden samples);
- ``cloud/digits-cloud/1/model.onnx``: a clearly stronger MLP as ONNX with a dynamic batch
  dimension, in a Triton-style repository;
- ``metrics.json`` and ``README.md`` with every accuracy measured in the real runtimes.

Needs the ``build`` extra (TensorFlow, scikit-learn, onnx). Nothing else in Tandem does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset

from cloud.pipeline import convert, determinism
from cloud.pipeline.bundle import template_manifest, write_bundle
from cloud.pipeline.train import fold_scale
from shared.manifest import CloudTarget, GoldenSample, Manifest, RoutingDefaults

MODEL = "digits"
CLOUD_MODEL = "digits-cloud"
LABELS = [str(i) for i in range(10)]
SCALE = 1.0 / 16.0  # raw pixel intensities are 0..16; the networks train on [0, 1]
EDGE_HIDDEN = (8,)
EDGE_EPOCHS = 60  # stopped early on purpose: the edge model should be visibly weaker
CLOUD_EPOCHS = 200
CLOUD_HIDDEN = (512, 256)
GOLDEN_COUNT = 6
TARGET_MAX_ESCALATION = 0.20  # leaves room under the 25% the demo promises


def _keras_mlp(hidden: tuple[int, ...], dropout: float) -> Any:
    import tensorflow as tf

    layers: list[Any] = [tf.keras.Input((64,), name="input")]
    for width in hidden:
        layers.append(tf.keras.layers.Dense(width, activation="relu"))
        if dropout:
            layers.append(tf.keras.layers.Dropout(dropout))
    layers.append(tf.keras.layers.Dense(len(LABELS), name="logits"))
    model = tf.keras.Sequential(layers)
    model.compile(
        tf.keras.optimizers.Adam(3e-3),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def train(hidden: tuple[int, ...], dropout: float, data: dataset.Digits, epochs: int) -> Any:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(dataset.SEED)
    tf.config.experimental.enable_op_determinism()
    model = _keras_mlp(hidden, dropout)
    model.fit(data.train.x * SCALE, data.train.y, epochs=epochs, batch_size=64, verbose=0)
    return fold_scale(model, SCALE)  # the shipped models take raw pixel intensities


def to_tflite(model: Any, int8: bool, representative: np.ndarray) -> bytes:
    return convert.to_tflite(model, "int8" if int8 else "float32", representative)


def to_onnx(model: Any) -> bytes:
    """The Keras MLP as an ONNX graph: Gemm/Relu layers, then Softmax; batch is dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dense = [layer for layer in model.layers if layer.get_weights()]
    nodes, inits = [], []
    current = "input"
    for i, layer in enumerate(dense):
        w, b = layer.get_weights()
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        out = f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        current = out
        if i < len(dense) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            current = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        CLOUD_MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _interpreter(blob: bytes) -> Any:
    # TensorFlow is loaded already; loading tflite_runtime beside it clashes in native code.
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_content=blob)
    interp.allocate_tensors()
    return interp


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def tflite_probabilities(blob: bytes, raw: np.ndarray) -> np.ndarray:
    """Softmax of the artifact's logits, one sample at a time, as a device computes them."""
    interp = _interpreter(blob)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for row in raw:
        x = row[None, :].astype(np.float32)
        if inp["dtype"] == np.int8:
            s, z = inp["quantization"]
            x = np.clip(np.round(x / s + z), -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] == np.int8:
            s, z = out["quantization"]
            y = (y - z) * s
        rows.append(y[0])
    return _softmax(np.stack(rows))


def onnx_probabilities(blob: bytes, raw: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": raw.astype(np.float32)})[0])


def choose_threshold(edge_p: np.ndarray, cloud_p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The lowest max-prob threshold whose hybrid accuracy on the calibration split is within
    0.25 points of cloud-only while escalating at most ``TARGET_MAX_ESCALATION``; failing that,
    the threshold that escalates exactly that share (issue 6's pipeline calibrates properly)."""
    conf = edge_p.max(axis=1)
    edge_ok = edge_p.argmax(axis=1) == y
    cloud_ok = cloud_p.argmax(axis=1) == y
    cloud_acc = float(cloud_ok.mean())
    for t in np.round(np.arange(0.30, 1.0, 0.01), 2):
        esc = conf < t
        acc = float(np.where(esc, cloud_ok, edge_ok).mean())
        if esc.mean() <= TARGET_MAX_ESCALATION and acc >= cloud_acc - 0.0025:
            return {
                "threshold": float(t),
                "calib_accuracy": acc,
                "calib_escalation": float(esc.mean()),
            }
    t = float(np.floor(np.quantile(conf, TARGET_MAX_ESCALATION) * 100) / 100)
    esc = conf < t
    acc = float(np.where(esc, cloud_ok, edge_ok).mean())
    return {"threshold": round(t, 2), "calib_accuracy": acc, "calib_escalation": float(esc.mean())}


def write_edge(
    out: Path,
    name: str,
    blob: bytes,
    probs_golden: np.ndarray,
    golden_x: np.ndarray,
    golden_y: np.ndarray,
    routing: RoutingDefaults,
) -> Manifest:
    interp = _interpreter(blob)
    manifest = template_manifest(
        model=MODEL,
        blob=blob,
        input_detail=interp.get_input_details()[0],
        output_detail=interp.get_output_details()[0],
        cloud=CloudTarget(model=CLOUD_MODEL, version="1"),
        labels=LABELS,
        routing=routing,
        golden=[
            GoldenSample(
                input=[float(v) for v in x],
                expected=[round(float(p), 6) for p in probs],
                label=int(label),
            )
            for x, probs, label in zip(golden_x, probs_golden, golden_y, strict=False)
        ],
    )
    write_bundle(out / "edge" / name, manifest, blob)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "models")
    parser.add_argument(
        "--onednn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TensorFlow's oneDNN kernels, pinned either way (default on: what TensorFlow "
        "picks by itself on x86-64 Linux, and what the demo's story was measured with; the "
        "cloud model checked in has 99.17%% held-out, rebuilt on this machine 98.89%% with "
        "oneDNN and 97.50%% without, where the hybrid no longer reaches the cloud's "
        "accuracy; the pipeline's own default is off, for its reproducibility test)",
    )
    args = parser.parse_args(argv)
    determinism.pin_numerics(args.onednn)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out: Path = args.out

    data = dataset.make_split(out / "data" / "digits.npz")
    edge = train(EDGE_HIDDEN, 0.0, data, EDGE_EPOCHS)
    cloud = train(CLOUD_HIDDEN, 0.3, data, CLOUD_EPOCHS)

    f32 = to_tflite(edge, int8=False, representative=data.train.x)
    i8 = to_tflite(edge, int8=True, representative=data.train.x)
    onnx_blob = to_onnx(cloud)
    cloud_dir = out / "cloud" / CLOUD_MODEL / "1"
    cloud_dir.mkdir(parents=True, exist_ok=True)
    (cloud_dir / "model.onnx").write_bytes(onnx_blob)

    test, calib = data.test, data.calib
    results: dict[str, Any] = {
        "split": {k: len(getattr(data, k)) for k in ("train", "calib", "test")}
    }
    probs = {
        "edge-f32": tflite_probabilities(f32, test.x),
        "edge-int8": tflite_probabilities(i8, test.x),
        "cloud": onnx_probabilities(onnx_blob, test.x),
    }
    sizes = {"edge-f32": len(f32), "edge-int8": len(i8), "cloud": len(onnx_blob)}
    for key, p in probs.items():
        results[key] = {
            "test_accuracy": float((p.argmax(axis=1) == test.y).mean()),
            "bytes": sizes[key],
        }

    golden_idx = [int(np.flatnonzero(test.y == c)[0]) for c in range(GOLDEN_COUNT)]
    cloud_calib = onnx_probabilities(onnx_blob, calib.x)
    for name, blob in (("digits-f32", f32), ("digits-int8", i8)):
        key = "edge-f32" if name == "digits-f32" else "edge-int8"
        pick = choose_threshold(tflite_probabilities(blob, calib.x), cloud_calib, calib.y)
        results[key]["routing"] = pick
        manifest = write_edge(
            out,
            name,
            blob,
            probs[key][golden_idx],
            test.x[golden_idx],
            test.y[golden_idx],
            RoutingDefaults(metric="max_prob", threshold=pick["threshold"]),
        )
        conf = probs[key].max(axis=1)
        esc = conf < manifest.routing.threshold
        hybrid_ok = np.where(
            esc, probs["cloud"].argmax(1) == test.y, probs[key].argmax(1) == test.y
        )
        results[key]["hybrid_test_accuracy"] = float(hybrid_ok.mean())
        results[key]["hybrid_test_escalation"] = float(esc.mean())

    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "README.md").write_text(_readme(results))
    print(json.dumps(results, indent=2))
    return 0


def _readme(r: dict[str, Any]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    rows = "\n".join(
        f"| `{key}` | {pct(r[key]['test_accuracy'])} | {r[key]['bytes']:,} |"
        for key in ("edge-f32", "edge-int8", "cloud")
    )
    hybrid = "\n".join(
        f"| `{key}` + cloud | {r[key]['routing']['threshold']:.2f} | "
        f"{pct(r[key]['hybrid_test_accuracy'])} | {pct(r[key]['hybrid_test_escalation'])} |"
        for key in ("edge-f32", "edge-int8")
    )
    s = r["split"]
    return f"""# Demo models (generated by `scripts/build_models.py`; do not edit by hand)

Trained on scikit-learn's bundled `load_digits` (8x8 images, 10 classes) with a fixed seed and
a fixed, stratified split: {s["train"]} train, {s["calib"]} calibration, {s["test"]} held-out
test samples (`data/digits.npz`). Every figure below is measured on the held-out split in the
real runtime (TFLite interpreter, ONNX Runtime).

| model | held-out accuracy | bytes |
|---|---|---|
{rows}

- `edge/digits-f32`, `edge/digits-int8`: MLP 64-{EDGE_HIDDEN[0]}-10 (deliberately small),
  logits out; int8 is full-integer post-training quantization with int8 input and output.
- `cloud/digits-cloud/1/model.onnx`: MLP 64-{CLOUD_HIDDEN[0]}-{CLOUD_HIDDEN[1]}-10 with dropout,
  softmax out, dynamic batch.

Routing default (max-prob threshold chosen on the calibration split, then checked on test):

| pair | threshold | hybrid accuracy | escalated |
|---|---|---|---|
{hybrid}
"""


if __name__ == "__main__":
    raise SystemExit(main())
