"""Regression and custom models: values passed through.

Regression reads every ``value`` output (flattened, in manifest order). Its confidence is
always 1: routing then goes by mode and budget only. A model that also gives a variance
or an interval could be scored from it; no contract role says so yet, so none is read.
Custom models hand every output through as it came, batch dimension included.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.errors import ContractError
from shared.manifest import Manifest
from shared.placement import Placement

from .base import Decoder, expect, take, with_role
from .predictions import Custom, Prediction, Regression


class RegressionDecoder(Decoder):
    task = "regression"

    def __init__(self, manifest: Manifest) -> None:
        self._specs = with_role(manifest, "value")

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        values: list[float] = []
        for spec in self._specs:
            values += take(outputs, spec).reshape(-1).tolist()
        return Regression(values)

    def confidence(self, prediction: Prediction) -> float:
        expect(prediction, Regression)
        return 1.0


class CustomDecoder(Decoder):
    task = "custom"

    def __init__(self, manifest: Manifest) -> None:
        self._specs = list(manifest.outputs)

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        """Every output as the model gave it: a custom model's outputs need not be
        batch-first (silero-vad's state is ``[2, batch, 128]``)."""
        got = {}
        for s in self._specs:
            arr = outputs.get(s.name)
            if arr is None:
                raise ContractError(f"the model gave no output {s.name!r} (has {sorted(outputs)})")
            arr = np.asarray(arr, dtype=np.float32)
            if not s.accepts(arr.shape):
                raise ContractError(
                    f"output {s.name!r} has shape {list(arr.shape)}; the contract says {s.shape}"
                )
            got[s.name] = arr.tolist()
        return Custom(got)

    def confidence(self, prediction: Prediction) -> float:
        expect(prediction, Custom)
        return 1.0
