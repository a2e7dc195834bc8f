"""ONNX Runtime's own int8 quantization of the cloud model.

- ``dynamic``: weights int8, activations quantized per call from their observed range;
- ``static``: weights and activations int8 (QDQ format), activation ranges calibrated on the
  calibration split.

Both come from ``onnxruntime.quantization``; the float model is the reference they are
measured against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def quantize_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    ort_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def quantize_static(src: Path, dst: Path, calibration: np.ndarray, input_name: str) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as ort_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._rows = iter(calibration.astype(np.float32))

        def get_next(self) -> dict[str, Any] | None:
            row = next(self._rows, None)
            return None if row is None else {input_name: row[None, :]}

    ort_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return dst
