"""``tandem-cloud model retrain MODEL``: the serving release's edge model distilled again,
from the original training split plus field samples labelled by the teacher, calibrated as
``optimize`` calibrates, and packaged as a signed candidate release (latest + 1). Nothing is
rolled out: ``tandem-cloud fleet rollout MODEL N+1 --shadow ...`` decides that on field data.

Two processes, because TensorFlow and the TFLite runtime clash in one (native code):

- this one (``retrain_release``): reads the registry's latest release and its artifact,
  writes the field samples and the job to ``out/``, starts the training process, then
  packages ``out/bundle`` like ``tandem-cloud model package`` does (the artifact run in the
  real TFLite runtime, golden samples checked, signed, published);
- the training process (``python -m cloud.pipeline.retrain JOB``, ``train_candidate``):
  the teacher labels every field sample (operator labels win), the field samples, one per
  id (copies two devices uploaded are one sample, ``FieldData.unique``) and ordered by id,
  are cut (seeded) into training, calibration and held-out shares, a model of the
  serving one's architecture (each hidden layer at least ``min_hidden_width`` wide) is
  distilled on the original training split plus the field's share, the int8 model is
  calibrated on the original calibration split plus the field's share
  (``operating.fit_routing``): by default the threshold is the one escalating least
  at which the candidate keeps the serving model's hybrid accuracy on each of the two
  (the serving model run in the TFLite runtime on the same samples; ``threshold_rule``),
  or the budget's, or the guaranteed one; and the serving and candidate models are
  measured side by side on the original held-out split and the field's held-out share;
  ``report.json`` says it all.

Seeded by ``RetrainSettings.seed`` with the numerics pinned (``determinism.py``): the same
inputs give the same candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline.field import (
    FieldData,
    check_labels,
    load_npz,
    split_field,
    teacher_labels,
)
from cloud.pipeline.settings import RetrainSettings
from cloud.releases.registry import Registry
from shared.errors import ContractError
from shared.manifest import MANIFEST_FILE, Manifest
from shared.signing import SigningKey

log = logging.getLogger(__name__)
JOB = "job.json"
#: as in ``run.py``: per tensor ships unless it loses more than this on calibration
PER_TENSOR_TOLERANCE = 0.005
_URL = re.compile(r"^/registry/(?P<model>[^/]+)/(?P<version>\d+)/(?P<file>[^/]+)$")


# ---------------------------------------------------------------- the command's process


def serving_release(
    registry: Registry, model: str, version: int | None = None
) -> tuple[Manifest, bytes]:
    """Release ``version`` of ``model`` (None: the latest) and its artifact's bytes (checked
    against the manifest's digest; a rollback release's artifact is read where its URL
    points)."""
    versions = registry.versions(model)
    if not versions:
        raise ContractError(f"{model} has no release in {registry.root} to retrain")
    if version is not None and version not in versions:
        raise ContractError(f"{model} has no release {version} in {registry.root}")
    manifest = registry.manifest(model, versions[-1] if version is None else version)
    if (
        not manifest.is_v1
        or manifest.edge.format != "tflite"
        or manifest.labels is None
        or manifest.cloud is None
    ):
        raise ContractError(
            f"{model} {manifest.version}: retrain takes a feature-vector classifier "
            "(a v1 TFLite release)"
        )
    path = registry.release_dir(model, manifest.version) / manifest.edge.file
    if not path.is_file() and manifest.edge.url and (m := _URL.match(manifest.edge.url)):
        path = registry.release_dir(m["model"], int(m["version"])) / m["file"]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ContractError(
            f"cannot read the artifact of {model} {manifest.version}: {exc}"
        ) from None
    if hashlib.sha256(blob).hexdigest() != manifest.edge.sha256:
        raise ContractError(f"the artifact of {model} {manifest.version} does not match its digest")
    return manifest, blob


def retrain_release(
    settings: RetrainSettings,
    registry: Registry,
    key: SigningKey,
    field: FieldData,
    *,
    expires_days: float | None = 365.0,
) -> tuple[Manifest, dict[str, Any]]:
    """Trains in a child process, then packages and publishes the candidate; returns its
    signed manifest and the report (also in ``out/report.json``). One sample per id
    (``FieldData.unique``); an operator label outside the model's classes is refused
    (``ContractError`` naming the samples, ``check_labels``) before anything is trained."""
    from cloud.releases.packaging import PackageRequest, package

    current, blob = serving_release(registry, settings.model, settings.serving_version)
    if len(field) == 0:
        raise ContractError(f"no field samples of {settings.model} to retrain on")
    field = field.unique()
    check_labels(field, len(current.labels or ()))  # serving_release checked there are some
    out = settings.out
    (out / "serving").mkdir(parents=True, exist_ok=True)
    (out / "serving" / "model.tflite").write_bytes(blob)
    (out / "serving" / MANIFEST_FILE).write_text(current.to_json())
    field.newest(settings.max_field_samples).save(out / "field.npz")
    (out / JOB).write_text(settings.model_dump_json(indent=2))
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    log.info("training the candidate in a child process (TensorFlow)")
    # its stdout (TensorFlow's converter prints there) goes to stderr: ours is the result
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.pipeline.retrain", str(out / JOB)], env=env, stdout=2
    )
    if proc.returncode != 0:
        raise ContractError(f"retraining failed (the training process exited {proc.returncode})")
    template = Manifest.load(out / "bundle")
    signed = package(
        PackageRequest(
            edge=out / "bundle" / template.edge.file,
            template=template,
            version=registry.versions(settings.model)[-1] + 1,
            expires_days=expires_days,
            min_agent_version=current.min_agent_version,
        ),
        key,
        registry,
    )
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    report["release"] = {
        "model": signed.model,
        "version": signed.version,
        "sha256": signed.edge.sha256,
        "key_id": signed.key_id,
        "serving_version": current.version,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return signed, report


# ---------------------------------------------------------------- the training process


def serving_hidden(blob: bytes, features: int, classes: int) -> list[int] | None:
    """The hidden widths of the serving MLP, read from its weight tensors (a chain of
    ``[out, in]`` matrices from ``features`` to ``classes``); None if it is not one."""
    from cloud.pipeline.measure import TfliteRunner

    shapes = [
        tuple(int(v) for v in d["shape"])
        for d in TfliteRunner(blob).interp.get_tensor_details()
        if len(d["shape"]) == 2 and int(d["shape"][0]) > 1
    ]
    widths: list[int] = []
    cur = features
    while cur != classes:
        nxt = next((s for s in shapes if s[1] == cur), None)
        if nxt is None or len(widths) > 8:
            return None
        shapes.remove(nxt)
        cur = nxt[0]
        if cur != classes:
            widths.append(cur)
    return widths or None


def _probabilities(
    blob: bytes, manifest: Manifest | None, x: np.ndarray, temperature: float
) -> np.ndarray:
    """A TFLite classifier's probabilities as a device computes them (preprocessing, int8
    I/O, the manifest's temperature on logits)."""
    from cloud.pipeline import calibrate, measure

    runner = measure.TfliteRunner(blob)
    pre = manifest.preprocessing if manifest is not None else None
    rows = x * pre.scale + pre.offset if pre is not None else x
    out = runner.outputs(np.asarray(rows, dtype=np.float32))
    if manifest is not None and manifest.output_kind != "logits":
        return np.asarray(out / out.sum(axis=1, keepdims=True))
    return calibrate.softmax(out, temperature)


def figures(
    probs: np.ndarray,
    threshold: float,
    teacher: np.ndarray,
    labels: np.ndarray,
    truth: np.ndarray | None = None,
) -> dict[str, float]:
    """Edge accuracy (against ``labels``), agreement with the teacher, escalation at
    ``threshold`` and hybrid accuracy (escalated answers are the teacher's); with ``truth``
    the same accuracies against it too."""
    edge = probs.argmax(axis=1)
    cloud = teacher.argmax(axis=1)
    escalated = probs.max(axis=1) < threshold
    hybrid = np.where(escalated, cloud, edge)
    out = {
        "n": float(len(labels)),
        "edge_accuracy": float((edge == labels).mean()) if len(labels) else 0.0,
        "agreement_with_teacher": float((edge == cloud).mean()) if len(labels) else 0.0,
        "escalation": float(escalated.mean()) if len(labels) else 0.0,
        "hybrid_accuracy": float((hybrid == labels).mean()) if len(labels) else 0.0,
    }
    if truth is not None and len(truth):
        out["edge_accuracy_truth"] = float((edge == truth).mean())
        out["hybrid_accuracy_truth"] = float((hybrid == truth).mean())
        out["teacher_accuracy_truth"] = float((cloud == truth).mean())
    return out


def train_candidate(settings: RetrainSettings) -> dict[str, Any]:
    """The training process's work (see the module docstring); writes ``out/bundle`` and
    ``out/report.json`` and returns the report."""
    from cloud.pipeline import determinism

    determinism.pin_numerics(settings.onednn)
    from cloud.pipeline import bundle, convert, measure, train
    from cloud.pipeline.data import Split, load_split
    from cloud.pipeline.field import capture_weights
    from cloud.pipeline.operating import RoutingTarget, ServingReference, fit_routing
    from cloud.pipeline.run import golden_samples

    out = settings.out
    current = Manifest.load(out / "serving")
    serving_blob = (out / "serving" / "model.tflite").read_bytes()
    if current.labels is None or current.cloud is None:
        raise ContractError(f"{current.model} {current.version} has no labels or cloud target")
    data = load_split(settings.data)
    field = load_npz(out / "field.npz").unique().by_id()
    classes = len(current.labels)
    check_labels(field, classes)
    features = data.train.x.shape[1]
    if field.x.shape[1] != features:
        raise ContractError(f"field samples have {field.x.shape[1]} features, the split {features}")

    log.info("teacher labels for %d field samples", len(field))
    teacher = measure.OnnxRunner(settings.teacher)
    t_probs = {k: teacher.outputs(getattr(data, k).x) for k in ("train", "calib", "test")}
    t_field = teacher.outputs(field.x) if len(field) else np.zeros((0, classes), np.float32)
    f_labels, f_soft = teacher_labels(field, t_field)
    cut = split_field(
        len(field), settings.field_test_share, settings.field_calib_share, settings.seed
    )
    rep = np.repeat(cut.train, settings.field_oversample)

    hidden = settings.hidden or [
        max(w, settings.min_hidden_width)
        for w in serving_hidden(serving_blob, features, classes) or [128, 64]
    ]
    ts = train.TrainSettings(hidden=tuple(hidden), epochs=settings.epochs, seed=settings.seed)
    train_split = Split(
        np.concatenate([data.train.x, field.x[rep]]), np.concatenate([data.train.y, f_labels[rep]])
    )
    log.info("distilling %s on %d + %d samples", hidden, len(data.train), len(rep))
    model = train.train_distilled(
        train_split,
        np.concatenate([t_probs["train"], f_soft[rep]]),
        classes,
        ts,
        settings.distill_temperature,
        settings.distill_alpha,
    )
    calib_x = np.concatenate([data.calib.x, field.x[cut.calib]])
    calib_y = np.concatenate([data.calib.y, f_labels[cut.calib]])
    calib_t = np.concatenate([t_probs["calib"], t_field[cut.calib]])
    blobs = {
        v: convert.to_tflite(model, v, calib_x, settings.int8_io)
        for v in ("int8", "int8-per-tensor")
    }
    runners = {v: measure.TfliteRunner(b) for v, b in blobs.items()}
    calib_acc = {
        v: float((r.outputs(calib_x).argmax(1) == calib_y).mean()) for v, r in runners.items()
    }
    variant = (
        "int8-per-tensor"
        if calib_acc["int8-per-tensor"] >= calib_acc["int8"] - PER_TENSOR_TOLERANCE
        else "int8"
    )
    blob, runner = blobs[variant], runners[variant]
    n_clean = len(data.calib)
    serving_calib = _probabilities(serving_blob, current, calib_x, current.routing.temperature)
    field_weights = (
        capture_weights(field.kinds()[cut.calib], settings.audit_rate)
        if settings.match_weighting == "importance"
        else None
    )
    serving_refs = [
        ServingReference(
            "original calib",
            np.arange(n_clean),
            serving_calib[:n_clean],
            current.routing.threshold,
        ),
        ServingReference(
            "field calib",
            np.arange(n_clean, len(calib_x)),
            serving_calib[n_clean:],
            current.routing.threshold,
            field_weights,
        ),
    ]
    fitted = fit_routing(
        {"calib": runner.outputs(calib_x), "test": runner.outputs(data.test.x)},
        {"calib": calib_t, "test": t_probs["test"]},
        {"calib": calib_y, "test": data.test.y},
        RoutingTarget(
            max_escalation=settings.max_escalation,
            min_relative_accuracy=settings.min_relative_accuracy,
            guarantee_epsilon=settings.guarantee_epsilon,
            guarantee_delta=settings.guarantee_delta,
            guarantee_reference=settings.guarantee_reference,
            rule=settings.threshold_rule,
            match_tolerance=settings.match_tolerance,
        ),
        serving_refs,
    )

    log.info("measuring the serving release and the candidate")
    truth = None if field.truth is None else field.truth[cut.test]
    compared: dict[str, dict[str, dict[str, float]]] = {}
    for name, b, manifest, temperature, threshold in (
        ("before", serving_blob, current, current.routing.temperature, current.routing.threshold),
        ("after", blob, None, fitted.temperature, fitted.routing.threshold),
    ):
        compared[name] = {
            "original_test": figures(
                _probabilities(b, manifest, data.test.x, temperature),
                threshold,
                t_probs["test"],
                data.test.y,
            ),
            "field_test": figures(
                _probabilities(b, manifest, field.x[cut.test], temperature),
                threshold,
                t_field[cut.test],
                f_labels[cut.test],
                truth,
            ),
        }
        compared[name]["threshold"] = {"value": threshold, "temperature": temperature}

    golden = golden_samples(runner, data.test, classes, settings.golden_count)
    template = bundle.template_manifest(
        model=settings.model,
        blob=blob,
        input_detail=runner.inp,
        output_detail=runner.out,
        cloud=current.cloud,
        labels=list(current.labels),
        routing=fitted.routing,
        golden=golden,
    )
    bundle.write_bundle(out / "bundle", template, blob)
    operator = int((field.operator_label >= 0).sum())
    report: dict[str, Any] = {
        "settings": settings.model_dump(mode="json"),
        "serving": {
            "version": current.version,
            "threshold": current.routing.threshold,
            "temperature": current.routing.temperature,
        },
        "hidden": hidden,
        "variant": variant,
        "calib_accuracy": calib_acc,
        "field": {
            "samples": len(field),
            "train": len(cut.train),
            "train_rows": len(rep),
            "calib": len(cut.calib),
            "test": len(cut.test),
            "labels": {"teacher": len(field) - operator, "operator": operator},
            "kinds": dict(Counter(str(k) for k in field.kinds())),
            "truth": field.truth is not None,
        },
        "split": {
            "train": len(train_split),
            "calib": len(calib_y),
            "original_test": len(data.test),
        },
        "routing": {
            "temperature": fitted.temperature,
            "threshold": fitted.routing.threshold,
            **fitted.section(),
        },
        "before": compared["before"],
        "after": compared["after"],
        "artifact": {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
        "reproducibility": {"seed": settings.seed, **determinism.numerics()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """The training process: ``python -m cloud.pipeline.retrain OUT/job.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cloud.pipeline.retrain OUT/job.json", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = RetrainSettings.model_validate_json(Path(args[0]).read_text())
    train_candidate(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
