"""The image model pairs (``scripts/build_image_models.py``) built on a small training budget,
then read here as a device and the cloud read them: the edge TFLite in the agent's own
interpreter, the cloud ONNX in ONNX Runtime and behind the real cloud server.

The build runs in a child process: TensorFlow must never load in the test process, whose
interpreter is ``tflite_runtime`` (the two clash in native code). What the child knew and
this process cannot (the Keras outputs) comes in ``reference.npz``; held-out pictures are
made again here from their seed, so every score below is measured in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from agent.inference.backends.tflite import find_interpreter_class
from cloud.app import create_app
from cloud.pipeline import detection_eval, image_pipeline, scenes
from cloud.pipeline.image_pipeline import CLASSIFIER, DETECTOR, PairSettings
from cloud.releases.contract_file import load_contract
from cloud.settings import CloudSettings
from shared.oip.codec import decode_response, encode_request, parse_header_length
from shared.oip.types import InferRequest, InferTensor, RequestedOutput
from tests.helpers import ROOT, serve_in_thread

pytestmark = pytest.mark.slow
PAIRS: dict[str, PairSettings] = {"classifier": CLASSIFIER, "detector": DETECTOR}


@pytest.fixture(scope="module")
def built(image_models: Path) -> tuple[Path, dict[str, Any]]:
    """The session's build (``tests/integration/conftest.py``: the classifier on 10%, the
    detector on 50% of the full build's pictures and epochs) and its figures."""
    return image_models, json.loads((image_models / "metrics.json").read_text())


def _interpreter(path: Path) -> Any:
    interp = find_interpreter_class()[1](model_path=str(path))
    interp.allocate_tensors()
    return interp


def _run_tflite(interp: Any, pictures: np.ndarray) -> dict[str, np.ndarray]:
    """One uint8 picture per call, outputs dequantized by name, as a device runs it."""
    inp = interp.get_input_details()[0]
    rows: dict[str, list[np.ndarray]] = {}
    for picture in pictures:
        interp.set_tensor(inp["index"], picture[None])
        interp.invoke()
        for d in interp.get_output_details():
            scale, zero = d["quantization"]
            value = (interp.get_tensor(d["index"])[0].astype(np.float32) - zero) * scale
            rows.setdefault(d["name"], []).append(value)
    return {name: np.stack(values) for name, values in rows.items()}


def _run_onnx(path: Path, pictures: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"image": pictures.astype(np.float32)})
    return dict(zip(names, values, strict=True))


def _paths(out: Path, figures: dict[str, Any]) -> tuple[Path, Path]:
    return out / figures["edge"]["file"], out / figures["cloud"]["file"]


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_edge_model_takes_uint8_frames_and_is_int8_inside(
    built: tuple[Path, dict[str, Any]], pair: str
) -> None:
    out, metrics = built
    spec = PAIRS[pair].edge
    interp = _interpreter(_paths(out, metrics[pair])[0])
    (inp,) = interp.get_input_details()
    assert inp["name"] == "image" and inp["dtype"] == np.uint8
    assert inp["shape"].tolist() == [1, spec.size, spec.size, 3]
    # the identity: a uint8 frame of the model's size goes in as it is
    assert inp["quantization"] == (1.0, 0)
    outputs = {d["name"]: d for d in interp.get_output_details()}
    assert sorted(outputs) == sorted(spec.outputs)
    assert all(d["dtype"] == np.uint8 for d in outputs.values())
    dtypes = {d["dtype"] for d in interp.get_tensor_details()}
    # weights and activations int8 (biases int32): no float tensor anywhere
    assert np.int8 in dtypes and np.float32 not in dtypes


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_cloud_onnx_matches_keras(built: tuple[Path, dict[str, Any]], pair: str) -> None:
    out, metrics = built
    edge_path, cloud_path = _paths(out, metrics[pair])
    reference = np.load(edge_path.parent / "reference.npz")
    got = _run_onnx(cloud_path, reference["image"])
    assert sorted(got) == sorted(PAIRS[pair].cloud.outputs)
    for name, value in got.items():
        np.testing.assert_allclose(value, reference[f"cloud.{name}"], rtol=0, atol=1e-4)
    # and the int8 edge model stays near its float Keras self on the same pictures
    edge = _run_tflite(_interpreter(edge_path), reference["image"])
    for name, value in edge.items():
        keras = reference[f"edge.{name}"]
        spread = float(np.ptp(keras))
        assert float(np.abs(value - keras).mean()) < 0.05 * spread, name


def test_detector_outputs_have_the_declared_shapes(built: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = built
    figures, spec = metrics["detector"], DETECTOR.edge
    cells = spec.grid**2
    assert cells == 144 and figures["outputs"] == {"boxes": [1, cells, 4], "scores": [1, cells, 10]}
    edge_path, cloud_path = _paths(out, figures)
    pictures = image_pipeline.pictures(DETECTOR, "test").images[:3]
    for got, batch in (
        (_run_tflite(_interpreter(edge_path), pictures), 3),
        (_run_onnx(cloud_path, pictures), 3),
    ):
        boxes, scores = got["boxes"], got["scores"]
        assert boxes.shape == (batch, cells, 4) and scores.shape == (batch, cells, 10)
        assert boxes.min() >= 0 and boxes.max() <= 1 and scores.min() >= 0 and scores.max() <= 1
        assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_figures_hold_in_the_agents_runtimes(built: tuple[Path, dict[str, Any]], pair: str) -> None:
    """The held-out score of each model, measured here (the agent's interpreter, ONNX
    Runtime), is the one the build reported from its own runtimes."""
    out, metrics = built
    settings = PAIRS[pair]
    test = image_pipeline.pictures(settings, "test")
    edge_path, cloud_path = _paths(out, metrics[pair])
    edge = _run_tflite(_interpreter(edge_path), test.images)
    cloud = _run_onnx(cloud_path, test.images)
    for role, outputs in (("edge", edge), ("cloud", cloud)):
        assert (
            abs(image_pipeline.score(settings, outputs, test) - metrics[pair][role]["score"]) < 0.02
        )


def test_cloud_detector_beats_edge_detector_on_held_out_scenes(
    built: tuple[Path, dict[str, Any]],
) -> None:
    out, metrics = built
    test = image_pipeline.pictures(DETECTOR, "test")
    assert isinstance(test, scenes.Scenes)
    edge_path, cloud_path = _paths(out, metrics["detector"])
    edge = _run_tflite(_interpreter(edge_path), test.images)
    cloud = _run_onnx(cloud_path, test.images)
    truths = image_pipeline.truths(test)
    edge_map = detection_eval.mean_average_precision(image_pipeline.detections(edge), truths)[0]
    cloud_map = detection_eval.mean_average_precision(image_pipeline.detections(cloud), truths)[0]
    assert cloud_map > edge_map + 0.1 and edge_map > 0.1
    # escalating the edge's least sure pictures buys mAP on the way to the cloud's
    # (the build's edge figures come from TensorFlow's interpreter: its int8 kernels round a
    # little differently from tflite_runtime's)
    curve = metrics["detector"]["routing"]["curve_test"]
    assert curve[0]["escalation"] == 0 and curve[0]["accuracy"] == pytest.approx(edge_map, abs=0.02)
    shares = [p["escalation"] for p in curve]
    assert shares == sorted(shares) and shares[-1] > 0.9
    assert max(p["accuracy"] for p in curve) > edge_map + 0.1
    chosen = metrics["detector"]["routing"]["test"]
    assert chosen["escalation"] < 0.5 and chosen["accuracy"] > edge_map


def test_scene_boxes_hold_their_digits() -> None:
    made = scenes.make_scenes(60, seed=5, split="test", owners=True)
    assert made.owners is not None
    assert np.array_equal(made.images, scenes.make_scenes(60, seed=5, split="test").images)
    counts = (made.classes >= 0).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 4 and counts.mean() > 2
    for i in range(len(made)):
        boxes, classes = made.objects(i)
        luminance = made.images[i].astype(np.float32).mean(axis=-1)
        for k, (y0, x0, y1, x1) in enumerate(boxes.astype(int)):
            ys, xs = np.nonzero(made.owners[i] == k)
            # every pixel drawn lies inside the box, and the box is no bigger than them
            assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)
            # the box holds a visible digit: ink is darker than what it was drawn on
            inside = made.owners[i][y0:y1, x0:x1] == k
            box = luminance[y0:y1, x0:x1]
            assert box[inside].mean() < box[~inside].mean() - 20
            for j, other in enumerate(boxes.astype(int)):  # digits never overlap
                if j != k:
                    assert other[2] <= y0 or y1 <= other[0] or other[3] <= x0 or x1 <= other[1]
        assert set(classes.tolist()) <= set(range(10))


def test_held_out_pictures_draw_on_handwriting_no_model_saw() -> None:
    sources = {s: scenes.digit_sources(s)[0].reshape(-1, 64) for s in scenes.SOURCE_SPLITS}
    train = {row.tobytes() for row in sources["train"]}
    assert not any(row.tobytes() in train for s in ("calib", "test") for row in sources[s])
    assert sum(len(v) for v in sources.values()) == 1797


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_contract_file_is_what_packaging_reads(
    built: tuple[Path, dict[str, Any]], pair: str
) -> None:
    out, metrics = built
    folder = _paths(out, metrics[pair])[0].parent
    contract = load_contract(folder / "contract.toml").spec
    assert contract.task == PAIRS[pair].task
    image = contract.inputs["image"]
    assert (image.kind, image.colour, image.layout, image.mean, image.std) == (
        "image",
        "RGB",
        "NHWC",
        [0.0],
        [1.0],
    )
    roles = {name: o.role for name, o in contract.outputs.items()}
    assert roles == (
        {"logits": "scores"} if pair == "classifier" else {"boxes": "boxes", "scores": "scores"}
    )
    assert contract.cloud is not None and contract.cloud.model == metrics[pair]["cloud_model"]
    assert (
        contract.routing is not None
        and contract.routing.threshold == metrics[pair]["routing"]["threshold"]
    )
    assert (folder / "labels.txt").read_text().split() == scenes.LABELS
    assert len(contract.golden) == PAIRS[pair].golden
    for golden in contract.golden:
        with Image.open(folder / golden.file) as picture:
            assert picture.size == (PAIRS[pair].edge.size,) * 2 and picture.mode == "RGB"


def test_cloud_server_serves_both_detector_outputs(built: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = built
    name = metrics["detector"]["cloud_model"]
    pictures = image_pipeline.pictures(DETECTOR, "test").images[:2].astype(np.float32)
    expected = _run_onnx(_paths(out, metrics["detector"])[1], pictures)
    request = InferRequest(
        inputs=[InferTensor.of("image", pictures)],
        outputs=[
            RequestedOutput("boxes", binary_data=True),
            RequestedOutput("scores", binary_data=True),
        ],
    )
    body, headers = encode_request(request)
    with serve_in_thread(create_app(CloudSettings(repo=out / "cloud", repo_poll_s=0))) as url:
        reply = httpx.post(
            f"{url}/v2/models/{name}/infer", content=body, headers=headers, timeout=30
        )
    assert reply.status_code == 200, reply.text
    answer = decode_response(reply.content, parse_header_length(reply.headers))
    for key in ("boxes", "scores"):
        np.testing.assert_allclose(answer.output(key).data, expected[key], rtol=0, atol=1e-5)


def test_tensorflow_never_loaded_here() -> None:
    assert "tensorflow" not in sys.modules


def test_model_optimize_builds_an_image_pair_from_the_command_line(tmp_path: Path) -> None:
    """``tandem-cloud model optimize --task image-detector`` is the same build (in its own
    process: TensorFlow and the agent's runtime never share one)."""
    cmd = [sys.executable, "-m", "cloud.cli", "model", "optimize", "--task", "image-detector"]
    proc = subprocess.run(
        [*cmd, "--quick", "0.05", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["task"] == "detection" and summary["metric"] == "map50"
    assert (tmp_path / DETECTOR.name / "model.tflite").is_file()
    assert (tmp_path / "cloud" / DETECTOR.cloud_name / "1" / "model.onnx").is_file()
    contract = load_contract(tmp_path / DETECTOR.name / "contract.toml")
    assert contract.spec.task == "detection"
    bad = subprocess.run([*cmd, "--quick", "2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--quick" in bad.stderr
