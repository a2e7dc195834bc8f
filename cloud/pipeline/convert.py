"""Keras to TFLite, in the four forms the field uses.

- ``float32``: no quantization, the reference;
- ``dynamic``: dynamic-range quantization, weights int8, activations float at run time;
- ``float16``: weights stored as float16 (halves the size; dequantized on CPU);
- ``int8``: full-integer post-training quantization, calibrated on a representative set
  (the calibration split), with int8 input and output unless ``int8_io`` is off; weights
  scaled per output channel (the converter's default);
- ``int8-per-tensor``: the same with one scale per weight tensor: a little coarser, and
  smaller, since per-channel parameters are a fixed cost a small model does not amortise.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np

Variant = Literal["float32", "dynamic", "float16", "int8", "int8-per-tensor"]
VARIANTS: tuple[Variant, ...] = ("float32", "dynamic", "float16", "int8", "int8-per-tensor")


def to_tflite(
    model: Any, variant: Variant, representative: np.ndarray, int8_io: bool = True
) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant in ("int8", "int8-per-tensor"):

        def samples() -> Any:
            for row in representative:
                yield [row[None, :].astype(np.float32)]

        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        if variant == "int8-per-tensor":
            # the converter's documented switch, still named experimental
            converter._experimental_disable_per_channel = True
    with warnings.catch_warnings():
        # int8 I/O without input statistics: the representative set gives them; harmless
        warnings.filterwarnings("ignore", "Statistics for quantized inputs", UserWarning)
        blob: bytes = converter.convert()
    return blob
