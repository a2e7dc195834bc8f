"""The image hybrid: Tandem's own detector pair (``scripts/build_image_models.py``, shipped
built in ``models/image``) through an agent on held-out synthetic scenes, in edge, cloud
and auto modes, scored by mAP@0.5 on what the agent reports; and the threshold swept from
the measured per-picture answers. Shared by ``demo.py`` and ``eval_hybrid.py``.

The edge release is packaged here (``model package --name`` with the pipeline's contract
file) into a throwaway registry, as a device owner would; the cloud model is served by
``tandem-cloud serve`` from the pair's repository.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dataset
import numpy as np
from hybrid import timing

from agent import Agent, AgentSettings, InferenceResult
from cloud.pipeline import detection_eval, scenes
from cloud.pipeline.image_pipeline import DETECTOR
from cloud.releases.package_model import ModelPackageRequest, package_model
from cloud.releases.registry import Registry
from shared.decode import Detections
from shared.signing import SigningKey

IMAGE_MODELS = dataset.ROOT / "models" / "image"
DETECTOR_DIR = IMAGE_MODELS / DETECTOR.name
IMAGE_REPO = IMAGE_MODELS / "cloud"


def package_detector(edge_dir: Path, registry_dir: Path) -> Path:
    """The detector's edge release, packaged from its folder; returns the release folder."""
    registry = Registry(registry_dir)
    request = ModelPackageRequest(
        edge=edge_dir / "model.tflite",
        name=DETECTOR.name,
        contract=edge_dir / "contract.toml",
        labels=edge_dir / "labels.txt",
    )
    manifest = package_model(request, SigningKey.generate(), registry)
    return registry.release_dir(DETECTOR.name, manifest.version)


def held_out(count: int) -> scenes.Scenes:
    """The pair's held-out scenes (digits no model saw), the first ``count``."""
    return scenes.make_scenes(count, seed=DETECTOR.test.seed, split="test")


def _found(result: InferenceResult) -> detection_eval.Detections:
    """What the agent reported, in the scorer's form (``y0, x0, y1, x1`` pixels)."""
    assert isinstance(result.prediction, Detections)
    items = result.prediction.items
    boxes = np.array([[d.box[1], d.box[0], d.box[3], d.box[2]] for d in items], np.float32)
    return detection_eval.Detections(
        boxes.reshape(-1, 4),
        np.array([d.score for d in items], np.float32),
        np.array([d.class_id for d in items], np.int64),
    )


@dataclass
class DetectionRun:
    name: str
    results: list[InferenceResult]
    wall_ms: list[float]
    truths: list[tuple[np.ndarray, np.ndarray]]

    @property
    def map50(self) -> float:
        found = [_found(r) for r in self.results]
        return detection_eval.mean_average_precision(found, self.truths)[0]

    @property
    def escalated(self) -> float:
        return float(np.mean([r.source == "cloud" for r in self.results]))

    def summary(self) -> dict[str, Any]:
        return {"mode": self.name, "map50": self.map50, **timing(self.results, self.wall_ms)}


def run_mode(
    agent: Agent, name: str, mode: Any, data: scenes.Scenes, deadline_ms: float
) -> DetectionRun:
    results, wall = [], []
    for picture in data.images:
        t0 = time.perf_counter()
        results.append(agent.infer(picture, mode=mode, deadline_ms=deadline_ms))
        wall.append((time.perf_counter() - t0) * 1000.0)
    truths = [data.objects(i) for i in range(len(data))]
    return DetectionRun(name, results, wall, truths)


def sweep(edge: DetectionRun, cloud: DetectionRun, steps: int = 51) -> list[dict[str, float]]:
    """mAP@0.5 and share escalated for thresholds 0..1, from each picture's measured edge
    answer (and its confidence) and cloud answer: a picture escalates when its edge
    confidence is below the threshold, and then costs both times."""
    conf = np.array([r.confidence for r in edge.results])
    edge_found = [_found(r) for r in edge.results]
    cloud_found = [_found(r) for r in cloud.results]
    edge_marks = [detection_eval.mark(f, t) for f, t in zip(edge_found, edge.truths)]
    cloud_marks = [detection_eval.mark(f, t) for f, t in zip(cloud_found, cloud.truths)]
    edge_ms, cloud_ms = np.array(edge.wall_ms), np.array(cloud.wall_ms)
    curve = []
    for t in np.round(np.linspace(0.0, 1.0, steps), 3):
        esc = conf < t
        marks = [c if e else m for e, m, c in zip(esc, edge_marks, cloud_marks)]
        ms = np.where(esc, edge_ms + cloud_ms, edge_ms)
        curve.append(
            {
                "threshold": float(t),
                "escalated": float(esc.mean()),
                "map50": detection_eval.pooled_map(marks)[0],
                "mean_ms": float(ms.mean()),
            }
        )
    return curve


def run_image_hybrid(
    cloud_url: str, count: int, deadline_ms: float, out: Path
) -> tuple[dict[str, DetectionRun], list[dict[str, float]], float]:
    """Package the detector, run ``count`` held-out scenes in each mode against the cloud
    at ``cloud_url``; returns the runs, the swept curve and the release's threshold."""
    data = held_out(count)
    with tempfile.TemporaryDirectory() as tmp:
        folder = package_detector(DETECTOR_DIR, Path(tmp) / "registry")
        settings = AgentSettings(
            model_dir=folder,
            state_dir=Path(tmp) / "state",
            cloud={"url": cloud_url, "binary": True},  # type: ignore[arg-type]
        )
        with Agent(settings) as agent:
            threshold = agent.threshold
            runs = {m: run_mode(agent, m, m, data, deadline_ms) for m in ("edge", "cloud", "auto")}
    return runs, sweep(runs["edge"], runs["cloud"]), threshold


def table(runs: dict[str, DetectionRun]) -> str:
    lines = [f"{'mode':<8} {'mAP@0.5':>8} {'escalated':>10} {'mean ms':>8} {'p95 ms':>8}"]
    for name, run in runs.items():
        s = run.summary()
        lines.append(
            f"{name:<8} {s['map50']:8.3f} {100 * s['escalated']:9.1f}% "
            f"{s['mean_ms']:8.2f} {s['p95_ms']:8.2f}"
        )
    return "\n".join(lines)


def plot(
    curve: list[dict[str, float]], runs: dict[str, DetectionRun], threshold: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(
        [100 * c["escalated"] for c in curve],
        [c["map50"] for c in curve],
        "-",
        color="#3465a4",
        label="hybrid (threshold swept 0 → 1)",
    )
    ax.axhline(runs["cloud"].map50, color="#cc0000", ls="--", lw=1, label="cloud only")
    ax.axhline(runs["edge"].map50, color="#4e9a06", ls="--", lw=1, label="edge only")
    auto = runs["auto"]
    ax.plot(
        [100 * auto.escalated],
        [auto.map50],
        "o",
        color="#f57900",
        ms=8,
        label=f"auto at threshold {threshold:.2f}",
    )
    ax.set_xlabel("share of pictures escalated to the cloud (%)")
    ax.set_ylabel("held-out mAP@0.5")
    ax.set_title("Tandem on synthetic scenes: detection mAP vs escalation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
