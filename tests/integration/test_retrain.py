"""``tandem-cloud model retrain`` for real, in child processes (TensorFlow never loads here):
the factory digits model (int8, one hidden layer of 8) is release 1; field samples are the
training digits with strong noise, a shift it never saw; the retrain
distils a model of the same depth (widened to 64) on the split plus those samples labelled by the
teacher, with a guaranteed threshold, and publishes release 2. It verifies with the trust
store, loads and answers in the agent's real TFLite backend, and its report shows the
field: the candidate is better there than the serving model. The same inputs and seed give
the same artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.inference.backends.tflite import TFLiteBackend, TFLiteSettings
from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import FleetStore
from cloud.pipeline.data import SplitData
from cloud.pipeline.field import FieldData
from cloud.pipeline.retrain import retrain_release
from cloud.pipeline.settings import RetrainSettings
from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.signing import SigningKey, TrustStore
from tests.helpers import EDGE_INT8, MODELS, ROOT
from tests.sample_items import feature_item

DIGITS = MODELS / "data/digits.npz"
TEACHER = MODELS / "cloud/digits-cloud/1/model.onnx"


def shifted_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Training digits with strong sensor noise (sigma 3 of 16), rounded to the 0..16
    intensities a device sends: the teacher still gets 97% of them, the factory edge model
    89%."""
    with np.load(DIGITS) as f:
        x, y, idx = f["x"], f["y"], f["train"][:n]
    noisy = x[idx].astype(np.float32) + np.random.default_rng(0).normal(0.0, 3.0, (n, 64))
    return np.clip(np.round(noisy), 0, 16), y[idx]


@pytest.fixture
def release_1(tmp_path: Path) -> tuple[Path, Path, Path]:
    key = SigningKey.generate()
    key.save(tmp_path / "op.key")
    trust = TrustStore()
    trust.add(key.public_b64)
    trust.save(tmp_path / "trust.json")
    registry = Registry(tmp_path / "registry")
    package(
        PackageRequest(edge=EDGE_INT8 / "model.tflite", template=Manifest.load(EDGE_INT8)),
        key,
        registry,
    )
    x, truth = shifted_digits(600)
    np.savez(tmp_path / "field.npz", x=x, truth=truth)
    return tmp_path / "registry", tmp_path / "op.key", tmp_path / "field.npz"


def run_retrain(
    registry: Path, key: Path, out: Path, *args: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``tandem-cloud model retrain digits`` in a child process (TensorFlow) on the digits
    split and teacher with ``args``: the JSON line it printed, its report.json, its stdout."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "model",
            "retrain",
            "digits",
            "--registry",
            str(registry),
            "--data",
            str(DIGITS),
            "--teacher",
            str(TEACHER),
            "--key",
            str(key),
            *args,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the TFLite runtime may print its delegate's INFO line on stdout beside ours
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith('{"model"'))
    printed, _ = json.JSONDecoder().raw_decode(line)
    report = json.loads((out / "report.json").read_text())
    return dict(printed), dict(report), proc.stdout


def retrain(
    registry: Path, key: Path, samples: Path | None, out: Path, *extra: str
) -> dict[str, Any]:
    source = ["--samples", str(samples)] if samples is not None else []
    printed, report, stdout = run_retrain(
        registry, key, out, *source, *extra, "--epsilon", "0.05", "--delta", "0.1"
    )
    assert printed["version"] == report["release"]["version"]
    assert "before" in stdout and "after" in stdout  # the table
    return report


def test_retrain_publishes_a_signed_candidate_that_does_better_in_the_field(
    tmp_path: Path, release_1: tuple[Path, Path, Path], digits: SplitData
) -> None:
    registry_dir, key, samples = release_1
    twin = tmp_path / "registry-twin"
    shutil.copytree(registry_dir, twin)
    report = retrain(registry_dir, key, samples, tmp_path / "out")

    registry = Registry(registry_dir)
    assert registry.versions("digits") == [1, 2]
    manifest = registry.manifest("digits", 2)
    TrustStore.load(tmp_path / "trust.json").verify(manifest)
    # the serving 64-8-10 widened to min_hidden_width (64) by default
    assert report["release"]["serving_version"] == 1 and report["hidden"] == [64]
    guarantee = manifest.routing.guarantee
    assert guarantee is not None and guarantee.epsilon == 0.05 and guarantee.reference == "cloud"
    assert report["routing"]["chosen_by"] == "guarantee"
    assert manifest.routing.threshold == report["routing"]["threshold"]

    backend = TFLiteBackend(TFLiteSettings())
    backend.load(registry.release_dir("digits", 2) / manifest.edge.file, manifest)
    try:
        logits = backend.infer(digits.test.x[:100].astype(np.float32))
    finally:
        backend.close()
    assert (np.asarray(logits).argmax(axis=1) == digits.test.y[:100]).mean() > 0.8

    field = report["field"]
    assert field["samples"] == 600 and field["test"] == 150 and field["labels"]["teacher"] == 600
    before, after = report["before"]["field_test"], report["after"]["field_test"]
    assert after["edge_accuracy_truth"] > before["edge_accuracy_truth"]
    assert after["agreement_with_teacher"] > before["agreement_with_teacher"]
    assert 0.8 < report["after"]["original_test"]["hybrid_accuracy"] <= 1

    again = retrain(twin, key, samples, tmp_path / "again")
    assert again["artifact"] == report["artifact"]
    assert again["after"] == report["after"] and again["routing"] == report["routing"]


def test_retrain_reads_the_fleets_sample_store(
    tmp_path: Path, release_1: tuple[Path, Path, Path]
) -> None:
    """The same command without ``--samples``: what devices uploaded to the sample store
    (real SQLite), an operator's correction winning over the teacher, images skipped."""
    registry_dir, key, _ = release_1
    state = tmp_path / "state"
    state.mkdir()
    store = FleetStore(state / "fleet.db")
    try:
        samples = SampleStore(store, state / "samples")
        x, _ = shifted_digits(120)
        items = [feature_item(row, i) for i, row in enumerate(x)]
        assert samples.add("plant", "dev-1", items).stored == 120
        assert samples.label("plant", "dev-1", items[0][0].id, 3)
    finally:
        store.close()
    report = retrain(
        registry_dir,
        key,
        None,
        tmp_path / "out",
        "--state-dir",
        str(state),
        "--fleet",
        "plant",
        "--epochs",
        "10",
    )
    assert report["field"]["samples"] == 120
    assert report["field"]["labels"] == {"teacher": 119, "operator": 1}
    assert Registry(registry_dir).versions("digits") == [1, 2]


def test_retrain_refuses_without_field_samples_or_release(
    tmp_path: Path, release_1: tuple[Path, Path, Path]
) -> None:
    registry_dir, key, _ = release_1
    settings = RetrainSettings(model="digits", data=DIGITS, teacher=TEACHER, out=tmp_path / "o")
    empty = FieldData(np.zeros((0, 64), np.float32), np.zeros(0, np.int64), np.zeros(0, str))
    signing_key = SigningKey.load(key)
    with pytest.raises(ContractError, match="no field samples"):
        retrain_release(settings, Registry(registry_dir), signing_key, empty)
    other = settings.model_copy(update={"model": "nothing"})
    with pytest.raises(ContractError, match="no release"):
        retrain_release(other, Registry(registry_dir), signing_key, empty)
    assert not (tmp_path / "o").exists()
