"""Tandem's own image models (``scripts/build_image_models.py``: a CNN classifier and a
grid detector, each an int8 TFLite edge model and a bigger ONNX cloud one) the whole way a
fleet takes them: packaged from the pipeline's contract file, served by the cloud, released
over MQTT to a device that boots on the previous release, run on held-out pictures, and
escalated to the cloud model, whose answer comes back decoded in the caller's pixels."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.device.service import AgentService
from cloud.pipeline import scenes
from cloud.pipeline.image_pipeline import DETECTOR
from cloud.releases.package_model import ModelPackageRequest, package_model
from shared.decode import Classification, Detections
from tests.fleet import FLEET, Fleet, wait_for

pytestmark = pytest.mark.slow


def _package(fleet: Fleet, folder: Path, name: str) -> int:
    golden = sorted(folder.glob("golden-*.png"))
    request = ModelPackageRequest(
        edge=folder / "model.tflite",
        name=name,
        contract=folder / "contract.toml",
        labels=folder / "labels.txt",
        golden=golden[:1],
    )
    return package_model(request, fleet.key, fleet.registry).version


def _state(fleet: Fleet, device: str, model: str, version: int) -> tuple[str, str] | None:
    got = fleet.store.job_states(FLEET, model, version).get(device)
    return None if got is None else (got[0].value, got[1])


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("fleet", [{"repo_from": "image_models"}], indirect=True)
def test_own_detector_package_update_infer_escalate(fleet: Fleet, image_models: Path) -> None:
    name = "digit-detector"
    folder = image_models / name
    first = _package(fleet, folder, name)
    settings = fleet.agent_settings("dev-0").model_copy(
        update={"model_dir": fleet.registry.release_dir(name, first)}
    )
    service = AgentService(settings)
    service.start(wait_s=10)
    fleet.agents["dev-0"] = service

    second = _package(fleet, folder, name)
    fleet.publish(fleet.registry.manifest(name, second))
    wait_for(lambda: _state(fleet, "dev-0", name, second) == ("ACTIVE", ""), what="ACTIVE")
    agent = service.agent
    assert agent.model.manifest.ref == f"{name}:{second}"

    held_out = scenes.make_scenes(8, seed=DETECTOR.test.seed, split="test")
    edge_hits = cloud_hits = truths = 0
    for i, picture in enumerate(held_out.images):
        boxes, classes = held_out.objects(i)
        local = agent.infer(picture, mode="edge")
        remote = agent.infer(picture, mode="cloud", deadline_ms=10_000)
        assert isinstance(local.prediction, Detections) and local.source == "edge"
        assert isinstance(remote.prediction, Detections)
        assert remote.source == "cloud", remote.reason
        assert remote.cloud_model == f"{DETECTOR.cloud_name}:1"
        for box, cls in zip(boxes, classes):
            truths += 1
            y0, x0, y1, x1 = (float(v) for v in box)
            truth = (x0, y0, x1, y1)
            for hits, result in ((0, local), (1, remote)):
                found = any(
                    d.class_id == int(cls) and iou(d.box, truth) >= 0.5
                    for d in result.prediction.items
                )
                if found and hits == 0:
                    edge_hits += 1
                elif found:
                    cloud_hits += 1
    # boxes come back in the caller's pixels from both; the cloud model finds more
    assert cloud_hits >= edge_hits and cloud_hits >= 0.5 * truths, (edge_hits, cloud_hits, truths)
    auto = [agent.infer(p, mode="auto", deadline_ms=10_000) for p in held_out.images]
    assert {r.reason for r in auto} <= {"confident", "low_confidence"}
    assert all((r.source == "cloud") == (r.reason == "low_confidence") for r in auto)


@pytest.mark.parametrize("fleet", [{"repo_from": "image_models"}], indirect=True)
def test_own_classifier_package_infer_escalate(fleet: Fleet, image_models: Path) -> None:
    name = "digit-classifier"
    folder = image_models / name
    version = _package(fleet, folder, name)
    settings = fleet.agent_settings("dev-1").model_copy(
        update={"model_dir": fleet.registry.release_dir(name, version)}
    )
    service = AgentService(settings)
    service.start(wait_s=10)
    fleet.agents["dev-1"] = service
    import onnxruntime as ort

    cloud_model = image_models / "cloud" / "digit-classifier-cloud" / "1" / "model.onnx"
    session = ort.InferenceSession(str(cloud_model), providers=["CPUExecutionProvider"])
    crops = scenes.make_crops(10, seed=13, split="test")
    for picture in crops.images:
        remote = service.agent.infer(picture, mode="cloud", deadline_ms=10_000)
        assert isinstance(remote.prediction, Classification)
        assert remote.source == "cloud", remote.reason
        assert remote.cloud_model == "digit-classifier-cloud:1"
        # what the cloud model says on the raw pixels the agent sent (send = "tensor")
        (logits,) = session.run(None, {"image": picture[None].astype("float32")})
        assert remote.index == int(logits.argmax()), (remote.probs, logits)
        local = service.agent.infer(picture, mode="edge")
        assert local.source == "edge" and len(local.probs) == 10
