"""The digit segmenter built end to end on synthetic scenes: trained
(``cloud.pipeline.segmentation_model``), exported to int8 TFLite, measured in the
interpreter a device runs, and written out as ``model package`` takes it::

    <out>/<name>/model.tflite     uint8 [1, 96, 96, 3] in, uint8 ``mask`` [1, 48, 48, 11] out
    <out>/<name>/contract.toml    task, image input, mask output, confidence (``--contract``)
    <out>/<name>/labels.txt       background, 0..9 (the mask's class ids)
    <out>/<name>/golden-<i>.png   held-out scenes the artifact segments well
    <out>/<name>/metrics.json     what this build measured

Every figure is on held-out scenes, whose handwriting the model never saw: pixel accuracy
and mean IoU at the mask's own 48 x 48 grid and at the picture's 96 x 96 pixels (the mask
resized by nearest pixel, as ``Segmentation.in_frame`` does), the agent's confidence (a low
quantile of the per-pixel max probability) on those scenes and on pictures unlike them.
There is no cloud segmenter: the release routes nowhere, it is the segmentation path's
real-model proof.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline import image_models, measure, scenes, segmentation_model
from cloud.pipeline import segmentation_eval as seg_eval
from cloud.pipeline.image_pipeline import Split
from cloud.pipeline.segmentation_model import SegmenterBudget, SegmenterSpec


@dataclass(frozen=True)
class SegmenterSettings:
    name: str
    spec: SegmenterSpec
    budget: SegmenterBudget
    train: Split
    test: Split
    #: the confidence rule's quantile of per-pixel max probability (``[confidence]``)
    quantile: float = 0.05
    golden: int = 2
    latency_calls: int = 300


SEGMENTER = SegmenterSettings(
    name="digit-segmenter",
    spec=SegmenterSpec(),
    budget=SegmenterBudget(epochs=10),
    train=Split(3000, 41),
    test=Split(400, 43),
)


#: How many held-out scenes the odd pictures' confidence figures take.
ODD = 50


def quick(settings: SegmenterSettings, share: float) -> SegmenterSettings:
    """``settings`` on ``share`` of the training scenes and epochs (the tests' budget):
    the same net and held-out split."""
    epochs = max(1, round(settings.budget.epochs * share))
    return replace(
        settings,
        budget=replace(settings.budget, epochs=epochs),
        train=Split(max(64, round(settings.train.count * share)), settings.train.seed),
        test=Split(min(settings.test.count, 100), settings.test.seed),
        latency_calls=30,
    )


def held_out(settings: SegmenterSettings) -> scenes.Scenes:
    """The held-out scenes, as the build and the tests make them."""
    t = settings.test
    return scenes.make_scenes(t.count, t.seed, "test", settings.spec.size, owners=True)


def full_size(masks: np.ndarray, stride: int) -> np.ndarray:
    """``[n, G, G]`` masks to the picture's pixels (nearest: each cell covers ``stride``)."""
    out: np.ndarray = np.repeat(np.repeat(masks, stride, axis=1), stride, axis=2)
    return out


#: The noise added to held-out scenes for the "noisy" confidence figures (pixel sd).
HEAVY_NOISE = 60.0


def odd_pictures(clean: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Pictures unlike the training scenes, for the confidence figures: uniform noise,
    the ``clean`` scenes under heavy noise (``noisy_scenes``, one per clean one, in order),
    and a photograph (scikit-learn's ``china.jpg``) squashed to the model's size."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    size = clean.shape[1]
    noise = rng.integers(0, 256, clean.shape, dtype=np.uint8)
    noisy = clean + rng.normal(0, HEAVY_NOISE, clean.shape)
    photo = load_sample_images().images[0]
    squashed = np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR))
    return {
        "uniform_noise": noise,
        "noisy_scenes": np.clip(np.round(noisy), 0, 255).astype(np.uint8),
        "photo_china": squashed[None],
    }


def _confidences(probs: np.ndarray, quantile: float) -> np.ndarray:
    return np.array([seg_eval.max_prob_quantile(p, quantile) for p in probs])


def _summary(values: np.ndarray) -> dict[str, float]:
    p10, p50, p90 = (float(v) for v in np.percentile(values, [10, 50, 90]))
    return {"min": float(values.min()), "p10": p10, "median": p50, "p90": p90}


def build_segmenter(settings: SegmenterSettings, out: Path) -> dict[str, Any]:
    """Builds, measures and writes the segmenter; returns its figures."""
    started = time.perf_counter()
    spec = settings.spec
    train = scenes.make_scenes(
        settings.train.count, settings.train.seed, "train", spec.size, owners=True
    )
    test = held_out(settings)
    maps = seg_eval.class_maps(train, spec.out_stride)
    data_s = time.perf_counter() - started
    start = time.perf_counter()
    model = segmentation_model.train(spec, train.images, maps, settings.budget)
    train_s = time.perf_counter() - start
    blob = segmentation_model.to_tflite(model, spec, train.images[:300])

    folder = out / settings.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.tflite").write_bytes(blob)
    (folder / "labels.txt").write_text("\n".join(seg_eval.LABELS) + "\n")

    edge = image_models.TfliteImageModel(blob)
    probs = edge.run(test.images)[segmentation_model.OUTPUT]
    keras = image_models.predict(model, test.images)[segmentation_model.OUTPUT]
    grid_truth = seg_eval.class_maps(test, spec.out_stride)
    pixel_truth = seg_eval.class_maps(test)
    masks = probs.argmax(axis=-1)
    grid = seg_eval.scores(masks, grid_truth)
    pixels = seg_eval.scores(full_size(masks, spec.out_stride), pixel_truth)
    keras_pixels = seg_eval.scores(full_size(keras.argmax(axis=-1), spec.out_stride), pixel_truth)
    agreement = [
        float(np.mean(m == t)) for m, t in zip(full_size(masks, spec.out_stride), pixel_truth)
    ]
    golden = _write_golden(settings, folder, test, agreement)
    (folder / "contract.toml").write_text(contract_toml(settings, golden))
    latency = measure.median_latency_ms(
        {"edge": measure.TfliteRunner(blob)}, test.images, settings.latency_calls
    )
    held_conf = _confidences(probs, settings.quantile)
    odd_conf = {
        name: _confidences(edge.run(pics)[segmentation_model.OUTPUT], settings.quantile)
        for name, pics in odd_pictures(test.images[:ODD], settings.test.seed + 1).items()
    }
    odd: dict[str, Any] = {name: _summary(c) for name, c in odd_conf.items()}
    # the same scene is less sure of itself under heavy noise: how often
    odd["noisy_below_clean_share"] = float(np.mean(odd_conf["noisy_scenes"] < held_conf[:ODD]))
    size, packed = measure.sizes(folder / "model.tflite")
    figures: dict[str, Any] = {
        "task": "segmentation",
        "model": settings.name,
        "architecture": asdict(spec),
        "budget": asdict(settings.budget),
        "split": {"train": asdict(settings.train), "test": asdict(settings.test)},
        "parameters": int(model.count_params()),
        "input": [int(v) for v in edge.input["shape"]],
        "outputs": {d["name"]: [int(v) for v in d["shape"]] for d in edge.outputs},
        "grid": grid.as_dict(),
        "pixels": pixels.as_dict(),
        "keras_float_pixels": keras_pixels.as_dict(),
        "picture_agreement": _summary(np.array(agreement)),
        "confidence": {
            "quantile": settings.quantile,
            "held_out": _summary(held_conf),
            **odd,
        },
        "bytes": size,
        "gzip_bytes": packed,
        "invoke_ms": latency["edge"],
        "invoke_runtime": "tensorflow (the build's interpreter)",
        "data_s": data_s,
        "train_s": train_s,
        "golden": golden,
        "build_s": time.perf_counter() - started,
    }
    (folder / "metrics.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _write_golden(
    settings: SegmenterSettings, folder: Path, test: scenes.Scenes, agreement: list[float]
) -> list[dict[str, Any]]:
    """Held-out scenes with several digits whose mask agrees best with the truth, as PNG
    files (a golden sample checks a device against the artifact's own answer, so any
    picture would do; one segmented well, with several digits, also reads well in a
    demo)."""
    from PIL import Image

    many = [len(set(test.objects(i)[1].tolist())) >= 3 for i in range(len(test))]
    order = sorted(range(len(test)), key=lambda i: (many[i], agreement[i]), reverse=True)
    chosen = []
    for k, index in enumerate(order[: settings.golden]):
        item = {
            "file": f"golden-{k}.png",
            "index": index,
            "classes": test.objects(index)[1].tolist(),
            "pixel_agreement": agreement[index],
        }
        Image.fromarray(test.images[index]).save(folder / item["file"])
        chosen.append(item)
    return chosen


def contract_toml(settings: SegmenterSettings, golden: list[dict[str, Any]]) -> str:
    """The contract file ``model package --contract`` reads
    (``cloud/releases/contract_file.py``)."""
    lines = [
        f"# {settings.name}: written by scripts/build_segmentation_model.py",
        'task = "segmentation"',
        'labels = "labels.txt"  # class ids of the mask: background, then digits 0..9',
        "",
        *image_models.RAW_PIXEL_INPUT,
        "[outputs.mask]  # [1, 48, 48, 11] class probabilities (softmax inside the model)",
        'role = "mask"',
        'activation = "probabilities"',
        "",
        "[confidence]  # the quantile of per-pixel max probability",
        f"quantile = {settings.quantile}",
    ]
    for item in golden:
        lines += ["", "[[golden]]", f"file = {json.dumps(item['file'])}"]
    return "\n".join(lines) + "\n"
