"""An edge/cloud pair of image models built end to end on synthetic pictures
(``cloud.pipeline.scenes``): trained, exported (int8 TFLite for the edge, ONNX for the
cloud), checked (the ONNX graph against Keras), measured in the runtimes that will run them,
calibrated for routing on the calibration split, and written out as ``model package`` and
``tandem-cloud serve`` take them::

    <out>/<edge name>/model.tflite      the edge artifact (uint8 in, int8 inside, uint8 out)
    <out>/<edge name>/contract.toml     what packaging cannot read from it (``--contract``)
    <out>/<edge name>/labels.txt        one label per class id
    <out>/<edge name>/golden-<i>.png    golden pictures (held-out)
    <out>/<edge name>/reference.npz     probe pictures and the Keras outputs for them
    <out>/cloud/<cloud name>/1/model.onnx, config.toml   a Triton-layout cloud repository

Classification routes on max-prob after temperature scaling, as the digits pipeline does;
detection on the agent's detection confidence, with the threshold that gives the best
mAP@0.5 within the escalation budget on the calibration split. Every figure reported is
on the held-out split, whose digits no model saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from cloud.pipeline import calibrate, detection_eval, image_models, measure, onnx_export, scenes
from cloud.pipeline.image_models import NetSpec, TrainBudget
from shared.errors import ContractError

#: How far the ONNX graph may be from Keras on the probe pictures (float32 round-off).
ONNX_ATOL = 1e-4
PROBES = 8
#: Detection: the score floor of the agent's confidence (``Confidence.floor``'s default)
#: and the reported detections' threshold.
FLOOR = 0.1
SCORE_THRESHOLD = 0.4


#: The cloud model's serving config: its input also takes the caller's uint8 frame (any
#: size) or encoded picture, resized and read as raw pixels like the edge's
#: (``cloud/serving/config.py``), so escalating a picture costs its uint8 bytes, not 4x that
#: in float32.
CLOUD_CONFIG = """max_batch_size = 16
max_queue_delay_us = 500

[inputs.image]
kind = "image"
colour = "RGB"
resize = "squash"
mean = [0.0]
std = [1.0]
"""


@dataclass(frozen=True)
class Split:
    count: int
    seed: int


@dataclass(frozen=True)
class PairSettings:
    name: str  # the edge model's name; the cloud's is ``<name>-cloud``
    edge: NetSpec
    cloud: NetSpec
    edge_budget: TrainBudget
    cloud_budget: TrainBudget
    train: Split
    calib: Split
    test: Split
    max_escalation: float = 0.25
    golden: int = 3
    latency_calls: int = 300

    @property
    def task(self) -> str:
        return "classification" if self.edge.kind == "classifier" else "detection"

    @property
    def cloud_name(self) -> str:
        return f"{self.name}-cloud"


CLASSIFIER = PairSettings(
    name="digit-classifier",
    edge=NetSpec("classifier", 32, (8, "M", 16, "M", 16, "M")),
    cloud=NetSpec("classifier", 32, (32, "M", 64, "M", 64, "M"), dense=(128,), dropout=0.3),
    edge_budget=TrainBudget(epochs=12, learning_rate=3e-3),
    cloud_budget=TrainBudget(epochs=16, learning_rate=1e-3),
    train=Split(6000, 11),
    calib=Split(1000, 12),
    test=Split(1000, 13),
)
DETECTOR = PairSettings(
    name="digit-detector",
    edge=NetSpec("detector", 96, (8, "M", 16, "M", 24, "M", 32)),
    cloud=NetSpec("detector", 96, (16, "M", 32, "M", 48, 48, "M", 64, 64)),
    edge_budget=TrainBudget(epochs=10, learning_rate=3e-3),
    cloud_budget=TrainBudget(epochs=15, learning_rate=3e-3),
    train=Split(3000, 21),
    calib=Split(300, 22),
    test=Split(400, 23),
)


def quick(settings: PairSettings, share: float) -> PairSettings:
    """``settings`` on ``share`` of the training pictures and epochs (the tests' budget):
    same nets, same held-out split."""

    def less(budget: TrainBudget) -> TrainBudget:
        return replace(budget, epochs=max(1, round(budget.epochs * share)))

    return replace(
        settings,
        edge_budget=less(settings.edge_budget),
        cloud_budget=less(settings.cloud_budget),
        train=Split(max(64, round(settings.train.count * share)), settings.train.seed),
        calib=Split(max(64, round(settings.calib.count * share)), settings.calib.seed),
        latency_calls=30,
    )


def pictures(settings: PairSettings, split: scenes.SourceSplit) -> scenes.Crops | scenes.Scenes:
    """The pictures of one split, as every consumer (this pipeline, tests) makes them."""
    part: Split = getattr(settings, split)
    if settings.edge.kind == "classifier":
        return scenes.make_crops(part.count, part.seed, split, size=settings.edge.size)
    return scenes.make_scenes(part.count, part.seed, split, size=settings.edge.size)


def truths(data: scenes.Scenes) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each scene's boxes, normalised like the detectors' outputs, and classes."""
    size = data.images.shape[1]
    return [(b / size, c) for b, c in (data.objects(i) for i in range(len(data)))]


def detections(outputs: dict[str, np.ndarray]) -> list[detection_eval.Detections]:
    boxes, scores = outputs["boxes"], outputs["scores"]
    return [detection_eval.postprocess(boxes[i], scores[i]) for i in range(len(boxes))]


def score(
    settings: PairSettings, outputs: dict[str, np.ndarray], data: scenes.Crops | scenes.Scenes
) -> float:
    """Top-1 accuracy of a classifier, mAP@0.5 of a detector."""
    if isinstance(data, scenes.Crops):
        return float((outputs["logits"].argmax(axis=1) == data.labels).mean())
    return detection_eval.mean_average_precision(detections(outputs), truths(data))[0]


def build_pair(settings: PairSettings, out: Path) -> dict[str, Any]:
    """Builds, checks, measures and writes one pair; returns its figures."""
    started = time.perf_counter()
    train, calib, test = (pictures(settings, s) for s in scenes.SOURCE_SPLITS)
    timings: dict[str, float] = {"data_s": time.perf_counter() - started}
    models: dict[str, Any] = {}
    for role, spec, budget in (
        ("edge", settings.edge, settings.edge_budget),
        ("cloud", settings.cloud, settings.cloud_budget),
    ):
        start = time.perf_counter()
        models[role] = image_models.train(spec, train, budget)
        timings[f"train_{role}_s"] = time.perf_counter() - start
    blob = image_models.to_tflite(models["edge"], settings.edge, train.images[:300])
    onnx_blob = onnx_export.to_onnx(models["cloud"], settings.cloud, settings.cloud_name)

    edge_dir, cloud_dir = out / settings.name, out / "cloud" / settings.cloud_name
    (cloud_dir / "1").mkdir(parents=True, exist_ok=True)
    edge_dir.mkdir(parents=True, exist_ok=True)
    (edge_dir / "model.tflite").write_bytes(blob)
    onnx_path = cloud_dir / "1" / "model.onnx"
    onnx_path.write_bytes(onnx_blob)
    (cloud_dir / "config.toml").write_text(CLOUD_CONFIG)

    probes = test.images[:PROBES]
    keras = {role: image_models.predict(m, probes) for role, m in models.items()}
    onnx_probe = _onnx_outputs(onnx_path, probes)
    onnx_diff = max(float(np.abs(onnx_probe[k] - keras["cloud"][k]).max()) for k in onnx_probe)
    if onnx_diff > ONNX_ATOL:
        raise ContractError(f"the ONNX graph is {onnx_diff:.2g} from Keras (> {ONNX_ATOL})")
    np.savez(
        edge_dir / "reference.npz",
        image=probes,
        **cast(
            "dict[str, Any]",
            {f"{role}.{k}": v for role, outs in keras.items() for k, v in outs.items()},
        ),
    )

    edge = image_models.TfliteImageModel(blob)
    outputs = {
        split: {"edge": edge.run(d.images), "cloud": _onnx_outputs(onnx_path, d.images)}
        for split, d in (("calib", calib), ("test", test))
    }
    keras_edge_test = image_models.predict(models["edge"], test.images)
    latency = measure.median_latency_ms(
        {"edge": measure.TfliteRunner(blob), "cloud": measure.OnnxRunner(onnx_path)},
        test.images,
        settings.latency_calls,
    )
    if isinstance(test, scenes.Crops):
        assert isinstance(calib, scenes.Crops)
        routing = _route_classifier(settings, outputs, calib, test)
    else:
        assert isinstance(calib, scenes.Scenes)
        routing = _route_detector(settings, outputs, calib, test)
    golden = _write_golden(settings, edge_dir, test, outputs["test"]["edge"])
    (edge_dir / "labels.txt").write_text("\n".join(scenes.LABELS) + "\n")
    (edge_dir / "contract.toml").write_text(contract_toml(settings, routing, golden))

    figures: dict[str, Any] = {"task": settings.task, "edge_model": settings.name}
    figures["cloud_model"] = settings.cloud_name
    figures["metric"] = "accuracy" if settings.task == "classification" else "map50"
    for role, spec, path in (
        ("edge", settings.edge, edge_dir / "model.tflite"),
        ("cloud", settings.cloud, onnx_path),
    ):
        size, packed = measure.sizes(path)
        figures[role] = {
            "file": str(path.relative_to(out)),
            "architecture": asdict(spec),
            "parameters": int(models[role].count_params()),
            "score": score(settings, outputs["test"][role], test),
            "bytes": size,
            "gzip_bytes": packed,
            "invoke_ms": latency[role],
            "train_s": timings[f"train_{role}_s"],
        }
    figures["edge"]["keras_float_score"] = score(settings, keras_edge_test, test)
    figures["onnx_max_abs_diff"] = onnx_diff
    figures["outputs"] = {d["name"]: [int(v) for v in d["shape"]] for d in edge.outputs}
    figures["input"] = [int(v) for v in edge.input["shape"]]
    figures["split"] = {s: asdict(getattr(settings, s)) for s in scenes.SOURCE_SPLITS}
    figures["routing"] = routing
    figures["golden"] = golden
    figures["build_s"] = time.perf_counter() - started
    return figures


def _onnx_outputs(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [
        session.run(names, {"image": images[i : i + 256].astype(np.float32)})
        for i in range(0, len(images), 256)
    ]
    return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)}


def _route_classifier(
    settings: PairSettings,
    outputs: dict[str, dict[str, dict[str, np.ndarray]]],
    calib: scenes.Crops,
    test: scenes.Crops,
) -> dict[str, Any]:
    """Temperature on the calibration split, then the max-prob threshold meeting the
    escalation budget there; checked on the held-out split."""
    temperature = calibrate.fit_temperature(outputs["calib"]["edge"]["logits"], calib.labels)
    curves = {}
    for split, data in (("calib", calib), ("test", test)):
        edge = calibrate.softmax(outputs[split]["edge"]["logits"], temperature)
        cloud = calibrate.softmax(outputs[split]["cloud"]["logits"])
        curves[split] = calibrate.hybrid_curve(edge, cloud, data.labels)
    cloud_calib = score(settings, outputs["calib"]["cloud"], calib)
    threshold, met = calibrate.choose_threshold(
        curves["calib"], cloud_calib, settings.max_escalation, None
    )
    return {
        "metric": "max_prob",
        "temperature": temperature,
        "threshold": threshold,
        "max_escalation": settings.max_escalation,
        "met_on_calib": met,
        "calib": asdict(calibrate.point_at(curves["calib"], threshold)),
        "test": asdict(calibrate.point_at(curves["test"], threshold)),
        "curve_test": [asdict(p) for p in curves["test"]],
    }


def _route_detector(
    settings: PairSettings,
    outputs: dict[str, dict[str, dict[str, np.ndarray]]],
    calib: scenes.Scenes,
    test: scenes.Scenes,
) -> dict[str, Any]:
    """The detection confidence threshold with the best mAP@0.5 within the escalation
    budget on the calibration split (``accuracy`` in the curve points is mAP@0.5)."""
    thresholds = [round(t, 2) for t in np.arange(0.0, 1.0001, 0.02)]
    curves = {}
    for split, data in (("calib", calib), ("test", test)):
        edge = detections(outputs[split]["edge"])
        cloud = detections(outputs[split]["cloud"])
        points = detection_eval.hybrid_curve(edge, cloud, truths(data), FLOOR, thresholds)
        curves[split] = [calibrate.CurvePoint(p.threshold, p.escalated, p.map50) for p in points]
    threshold, _ = calibrate.choose_threshold(curves["calib"], 1.0, settings.max_escalation, None)
    return {
        "metric": "detection",
        "floor": FLOOR,
        "threshold": threshold,
        "max_escalation": settings.max_escalation,
        "calib": asdict(calibrate.point_at(curves["calib"], threshold)),
        "test": asdict(calibrate.point_at(curves["test"], threshold)),
        "curve_test": [asdict(p) for p in curves["test"]],
    }


def _write_golden(
    settings: PairSettings,
    folder: Path,
    test: scenes.Crops | scenes.Scenes,
    edge_outputs: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Held-out pictures as PNG files, those the edge model gets right first (a
    classifier: one per class from 0; a detector: scenes where it reports exactly the
    digits there are). A golden sample checks a device against the artifact's own
    answer, so a wrong one would do too; a right one also reads well in a demo."""
    from PIL import Image

    if isinstance(test, scenes.Crops):
        right = edge_outputs["logits"].argmax(axis=1) == test.labels
        firsts = [
            np.flatnonzero(right & (test.labels == c))[:1] for c in range(settings.edge.classes)
        ]
        good = [int(i) for hit in firsts for i in hit]
    else:
        good = []
        for i, found in enumerate(detections(edge_outputs)):
            shown = found.classes[found.scores >= SCORE_THRESHOLD]
            if sorted(shown.tolist()) == sorted(test.objects(i)[1].tolist()):
                good.append(i)
    taken = set(good)
    order = good + [i for i in range(len(test)) if i not in taken]
    chosen: list[dict[str, Any]] = []
    for k, index in enumerate(order[: settings.golden]):
        item: dict[str, Any] = {"file": f"golden-{k}.png", "index": index}
        if isinstance(test, scenes.Crops):
            if index in taken:
                # an expected label only where the edge model gives it: packaging refuses
                # a golden sample whose label the artifact does not reproduce
                item["label"] = scenes.LABELS[int(test.labels[index])]
        else:
            item["classes"] = test.objects(index)[1].tolist()
        Image.fromarray(test.images[index]).save(folder / item["file"])
        chosen.append(item)
    return chosen


def _toml_value(value: Any) -> str:
    """A TOML value (strings, numbers, booleans and lists of them: JSON writes them alike)."""
    return json.dumps(value)


def contract_toml(
    settings: PairSettings, routing: dict[str, Any], golden: list[dict[str, Any]]
) -> str:
    """The contract file ``model package --contract`` reads for the edge artifact
    (``cloud/releases/contract_file.py``)."""
    lines = [
        f"# {settings.name}: written by scripts/build_image_models.py",
        f"task = {_toml_value(settings.task)}",
        'labels = "labels.txt"',
        "",
        *image_models.RAW_PIXEL_INPUT,
    ]
    if settings.task == "classification":
        lines += ["[outputs.logits]", 'role = "scores"', 'activation = "logits"', ""]
        lines += ["[decoding]", "top_k = 3", ""]
        lines += [
            "[routing]",
            'metric = "max_prob"',
            f"threshold = {_toml_value(routing['threshold'])}",
            f"temperature = {_toml_value(round(routing['temperature'], 6))}",
            "",
        ]
    else:
        lines += ["[outputs.boxes]", 'role = "boxes"', 'box_format = "yxyx"', "normalized = true"]
        lines += ["", "[outputs.scores]", 'role = "scores"', 'activation = "probabilities"', ""]
        lines += ["[decoding]", f"score_threshold = {SCORE_THRESHOLD}", "iou = 0.5"]
        lines += ["max_detections = 10", "", "[confidence]", f"floor = {FLOOR}", ""]
        lines += ["[routing]", f"threshold = {_toml_value(routing['threshold'])}", ""]
    lines += [
        "[cloud]",
        f"model = {_toml_value(settings.cloud_name)}",
        'version = "1"',
        'send = "frame"  # the caller\'s uint8 frame: the cloud resizes it for its model',
        'input = "image"',
    ]
    if settings.task == "classification":
        lines += ['output = "logits"', 'output_kind = "logits"']
    for item in golden:
        lines += ["", "[[golden]]", f"file = {_toml_value(item['file'])}"]
        if "label" in item:
            lines.append(f"label = {_toml_value(item['label'])}")
    return "\n".join(lines) + "\n"
