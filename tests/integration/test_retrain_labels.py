"""``retrain_release`` refuses an operator label outside the model's classes before anything
is trained (the store accepts any label below 1024; ``np.eye(classes)[labels]`` used to raise
IndexError in the training process, whose exit code was all the operator saw)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.pipeline.field import FieldData
from cloud.pipeline.retrain import retrain_release
from cloud.pipeline.settings import RetrainSettings
from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.signing import SigningKey
from tests.helpers import EDGE_INT8, MODELS


def test_an_operator_label_outside_the_classes_is_refused_naming_the_sample(
    tmp_path: Path,
) -> None:
    key = SigningKey.generate()
    registry = Registry(tmp_path / "registry")
    package(
        PackageRequest(edge=EDGE_INT8 / "model.tflite", template=Manifest.load(EDGE_INT8)),
        key,
        registry,
    )
    field = FieldData(
        np.zeros((3, 64), np.float32), np.array([-1, 3, 12]), np.array(["aa", "bb", "cc"])
    )
    settings = RetrainSettings(
        model="digits",
        data=MODELS / "data/digits.npz",
        teacher=MODELS / "cloud/digits-cloud/1/model.onnx",
        out=tmp_path / "out",
    )
    with pytest.raises(ContractError, match=r"outside the model's 10 classes .*cc \(12\)"):
        retrain_release(settings, registry, key, field)
    assert not (tmp_path / "out" / "job.json").exists()  # refused before the training process
    assert registry.versions("digits") == [1]
