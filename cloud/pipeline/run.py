"""The pipeline's steps in order, each measured, and what they leave in ``settings.out``:

    variants/*.tflite, variants/*.onnx   every candidate, as it would ship
    bundle/model.tflite + manifest.json  the chosen edge model: ``model package`` input
    report.json, report.html             the figures, the curve, the reliability diagrams

1. The teacher (the cloud ONNX model) scores every split.
2. The edge architecture is trained on labels, and again distilled from the teacher.
3. The better of the two (on the calibration split) is the float reference; it is converted
   to TFLite float32, dynamic-range, float16 and int8, and pruned to each target sparsity
   with fine-tuning (then converted to float32 and int8).
4. The cloud model is quantized by ONNX Runtime, dynamically and statically.
5. Every variant is measured in its runtime (``measure.py``).
6. The shipped variant (int8: per tensor unless that costs accuracy) is calibrated: a
   temperature on the calibration split, then the threshold meeting the target, or with
   ``guarantee_epsilon`` the guaranteed one (``operating.py``: the budget's is reported
   beside it); both are checked on the held-out split and go into the bundle's routing
   defaults, with the guarantee when it was met.

Reproducible: the numerics are pinned before TensorFlow loads (``determinism.py``), every
step is seeded, and the report's ``reproducibility`` section says what a rerun must match.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline import bundle, calibrate, convert, determinism, measure, onnx_quant, train
from cloud.pipeline.bundle import template_manifest
from cloud.pipeline.data import Split, SplitData, load_split
from cloud.pipeline.operating import RoutingTarget, fit_routing
from cloud.pipeline.settings import OptimizeSettings
from shared.manifest import CloudTarget, GoldenSample, RoutingDefaults

log = logging.getLogger(__name__)
#: A per-tensor int8 model ships instead of the per-channel one if it loses at most this much
#: accuracy on the calibration split: it is smaller, and devices run both alike.
PER_TENSOR_TOLERANCE = 0.005


def optimize(settings: OptimizeSettings) -> dict[str, Any]:
    """Runs the pipeline; returns the report's content (also written as report.json/html)."""
    determinism.pin_numerics(settings.onednn)
    data = load_split(settings.data)
    out = settings.out
    variants_dir = out / "variants"
    variants_dir.mkdir(parents=True, exist_ok=True)
    classes = data.classes
    labels = settings.labels or [str(i) for i in range(classes)]
    ts = train.TrainSettings(
        hidden=tuple(settings.hidden), epochs=settings.epochs, seed=settings.seed
    )

    log.info("1/6 teacher")
    teacher = measure.OnnxRunner(settings.teacher)
    teacher_probs = {k: teacher.outputs(getattr(data, k).x) for k in ("train", "calib", "test")}
    cloud_test_acc = float((measure.top1(teacher_probs["test"]) == data.test.y).mean())

    log.info("2/6 edge on labels, and distilled")
    on_labels = train.train_on_labels(data.train, classes, ts)
    distilled = train.train_distilled(
        data.train,
        teacher_probs["train"],
        classes,
        ts,
        settings.distill_temperature,
        settings.distill_alpha,
    )
    keras_acc = {
        name: {
            split: float(
                (
                    m.predict(getattr(data, split).x, verbose=0).argmax(1) == getattr(data, split).y
                ).mean()
            )
            for split in ("calib", "test")
        }
        for name, m in (("labels", on_labels), ("distilled", distilled))
    }
    chosen = (
        "distilled" if keras_acc["distilled"]["calib"] >= keras_acc["labels"]["calib"] else "labels"
    )
    reference = distilled if chosen == "distilled" else on_labels

    log.info("3/6 quantization and pruning")
    blobs: dict[str, tuple[bytes, str]] = {}
    for source, m in (("labels", on_labels), ("distilled", distilled)):
        blobs[f"edge-{source}-float32"] = (
            convert.to_tflite(m, "float32", data.calib.x),
            f"MLP {settings.hidden}, trained on {source}",
        )
    for variant in convert.VARIANTS[1:]:
        blobs[f"edge-{chosen}-{variant}"] = (
            convert.to_tflite(reference, variant, data.calib.x, settings.int8_io),
            f"{variant} of the {chosen} model",
        )
    for target in settings.sparsities:
        pruned = train.prune(reference, data.train, target, ts, settings.prune_epochs)
        share = train.sparsity(pruned)
        for variant in ("float32", "int8"):
            blobs[f"edge-{chosen}-pruned{round(100 * target)}-{variant}"] = (
                convert.to_tflite(pruned, variant, data.calib.x, settings.int8_io),
                f"{share:.0%} of weights zero, fine-tuned; {variant}",
            )

    log.info("4/6 cloud quantization")
    cloud_float = variants_dir / "cloud-float32.onnx"
    shutil.copy(settings.teacher, cloud_float)
    cloud_files = {
        "cloud-float32": (cloud_float, "the teacher as served"),
        "cloud-dynamic-int8": (
            onnx_quant.quantize_dynamic(cloud_float, variants_dir / "cloud-dynamic-int8.onnx"),
            "ONNX Runtime dynamic int8",
        ),
        "cloud-static-int8": (
            onnx_quant.quantize_static(
                cloud_float, variants_dir / "cloud-static-int8.onnx", data.calib.x, teacher.input
            ),
            "ONNX Runtime static int8 (QDQ), calibrated on the calibration split",
        ),
    }

    log.info("5/6 measuring every variant")
    outputs: dict[str, dict[str, np.ndarray]] = {}
    runners: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for name, (blob, _) in blobs.items():
        files[name] = variants_dir / f"{name}.tflite"
        files[name].write_bytes(blob)
        runners[name] = measure.TfliteRunner(blob)
    for name, (path, _) in cloud_files.items():
        files[name], runners[name] = path, measure.OnnxRunner(path)
    for name, runner in runners.items():
        outputs[name] = {"calib": runner.outputs(data.calib.x), "test": runner.outputs(data.test.x)}
    latency = measure.median_latency_ms(runners, data.test.x, settings.latency_calls)
    reference_top1 = {
        "edge": measure.top1(outputs[f"edge-{chosen}-float32"]["test"]),
        "cloud": measure.top1(teacher_probs["test"]),
    }
    notes = {name: note for name, (_, note) in {**blobs, **cloud_files}.items()}
    results: list[measure.VariantResult] = []
    for name, path in files.items():
        role = "cloud" if name.startswith("cloud-") else "edge"
        pred = measure.top1(outputs[name]["test"])
        size, packed = measure.sizes(path)
        results.append(
            measure.VariantResult(
                name=name,
                role=role,
                runtime="ONNX Runtime" if role == "cloud" else "TFLite interpreter",
                file=str(path.relative_to(out)),
                bytes=size,
                gzip_bytes=packed,
                accuracy=float((pred == data.test.y).mean()),
                agreement=float((pred == reference_top1[role]).mean()),
                latency_ms=latency[name],
                note=notes[name],
            )
        )

    log.info("6/6 calibration and routing")
    calib_acc = {
        v: float((measure.top1(outputs[f"edge-{chosen}-{v}"]["calib"]) == data.calib.y).mean())
        for v in ("int8", "int8-per-tensor")
    }
    per_tensor_ok = calib_acc["int8-per-tensor"] >= calib_acc["int8"] - PER_TENSOR_TOLERANCE
    shipped = f"edge-{chosen}-{'int8-per-tensor' if per_tensor_ok else 'int8'}"
    logits = outputs[shipped]
    fitted = fit_routing(
        logits,
        {k: teacher_probs[k] for k in ("calib", "test")},
        {"calib": data.calib.y, "test": data.test.y},
        routing_target(settings),
    )
    temperature, operating, routing = fitted.temperature, fitted.operating, fitted.routing
    before = {k: calibrate.softmax(v) for k, v in logits.items()}
    after = {k: calibrate.softmax(v, temperature) for k, v in logits.items()}
    bundle_dir = write_bundle(settings, data, blobs[shipped][0], labels, routing)

    edge_test_acc = float((measure.top1(logits["test"]) == data.test.y).mean())
    kernels = [layer.get_weights() for layer in reference.layers if layer.get_weights()]
    report: dict[str, Any] = {
        "settings": settings.model_dump(mode="json"),
        "edge_parameters": {
            "kernel": int(sum(k.size for k, _ in kernels)),
            "bias": int(sum(b.size for _, b in kernels)),
        },
        "split": {k: len(getattr(data, k)) for k in ("train", "calib", "test")},
        "variants": [r.to_dict() for r in results],
        "distillation": {
            "chosen": chosen,
            "keras_accuracy": keras_acc,
            "labels_test_accuracy": _find(results, "edge-labels-float32").accuracy,
            "distilled_test_accuracy": _find(results, "edge-distilled-float32").accuracy,
            "temperature": settings.distill_temperature,
            "alpha": settings.distill_alpha,
        },
        "shipped": {
            "variant": shipped,
            "calib_accuracy": calib_acc,
            "why": "int8 per tensor loses at most "
            f"{100 * PER_TENSOR_TOLERANCE:.1f} points on calibration"
            if per_tensor_ok
            else "int8 per tensor loses too much on calibration",
        },
        "calibration": {
            "variant": shipped,
            "temperature": temperature,
            "nll_before": calibrate.nll(logits["test"], data.test.y, 1.0),
            "nll_after": calibrate.nll(logits["test"], data.test.y, temperature),
            "reliability_before": asdict(calibrate.reliability(before["test"], data.test.y)),
            "reliability_after": asdict(calibrate.reliability(after["test"], data.test.y)),
        },
        "routing": {
            "operating_point": asdict(operating),
            "cloud_test_accuracy": cloud_test_acc,
            "edge_test_accuracy": edge_test_acc,
            "relative_accuracy": operating.test.accuracy / cloud_test_acc,
            "curve_test": [asdict(p) for p in fitted.test_curve],
            **{k: v for k, v in fitted.section().items() if k != "operating_point"},
        },
        "reproducibility": {"seed": settings.seed, **determinism.numerics()},
        "bundle": str(bundle_dir.relative_to(out)),
    }
    from cloud.pipeline.report import write_report

    write_report(report, out)
    return report


def routing_target(settings: OptimizeSettings) -> RoutingTarget:
    return RoutingTarget(
        max_escalation=settings.max_escalation,
        min_relative_accuracy=settings.min_relative_accuracy,
        guarantee_epsilon=settings.guarantee_epsilon,
        guarantee_delta=settings.guarantee_delta,
        guarantee_reference=settings.guarantee_reference,
    )


def _find(results: list[measure.VariantResult], name: str) -> measure.VariantResult:
    return next(r for r in results if r.name == name)


def golden_samples(
    runner: measure.TfliteRunner, split: Split, classes: int, count: int
) -> list[GoldenSample]:
    """The first sample of each of the first ``count`` classes that the model gets right,
    with the probabilities it gives."""
    golden = []
    for label in range(classes):
        for i in np.flatnonzero(split.y == label):
            probs = calibrate.softmax(runner(split.x[i])[None, :])[0]
            if int(probs.argmax()) == label:
                golden.append(
                    GoldenSample(
                        input=[float(v) for v in split.x[i]],
                        expected=[round(float(p), 6) for p in probs],
                        label=label,
                    )
                )
                break
        if len(golden) == count:
            break
    return golden


def write_bundle(
    settings: OptimizeSettings,
    data: SplitData,
    blob: bytes,
    labels: list[str],
    routing: RoutingDefaults,
) -> Path:
    """``bundle/``: the shipped artifact and its template manifest, with golden samples (the
    first held-out sample of each of the first classes that the model gets right)."""
    runner = measure.TfliteRunner(blob)
    golden = golden_samples(runner, data.test, len(labels), settings.golden_count)
    manifest = template_manifest(
        model=settings.model,
        blob=blob,
        input_detail=runner.inp,
        output_detail=runner.out,
        cloud=CloudTarget(model=settings.cloud_model, version=settings.cloud_version),
        labels=labels,
        routing=routing,
        golden=golden,
    )
    return bundle.write_bundle(settings.out / "bundle", manifest, blob)
