"""Inference backends. Each plugin is one file with its settings model, its class and its key.

``BackendSettings`` is the discriminated union the agent's settings use; ``create_backend``
builds the backend a settings object names. Runtimes are imported by ``load``, not here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from agent.inference.backends.base import InferenceBackend
from agent.inference.backends.onnx import OnnxBackend, OnnxSettings
from agent.inference.backends.tflite import TFLiteBackend, TFLiteSettings

BackendSettings = Annotated[TFLiteSettings | OnnxSettings, Field(discriminator="kind")]

#: Which manifest ``edge.format`` each backend can run.
FORMATS = {"tflite": "tflite", "onnx": "onnx"}


def create_backend(settings: TFLiteSettings | OnnxSettings) -> InferenceBackend:
    if isinstance(settings, TFLiteSettings):
        return TFLiteBackend(settings)
    return OnnxBackend(settings)


__all__ = [
    "FORMATS",
    "BackendSettings",
    "InferenceBackend",
    "OnnxBackend",
    "OnnxSettings",
    "TFLiteBackend",
    "TFLiteSettings",
    "create_backend",
]
