"""The one interface every inference backend implements: ``load / infer / close``.

A backend owns a runtime (TFLite interpreter, ONNX Runtime session) and its threads. It takes
*raw* features and returns real-valued float32 output: it applies the manifest's
preprocessing and any int8 quantize/dequantize (from the tensor's own scale and zero point)
itself, because on the hot path one fused affine step is much cheaper than two, and
everything above it (confidence, routing) then sees real values whatever the precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from agent.errors import ModelLoadError
from shared.manifest import EdgeFormat, Manifest, TensorSpec


class InferenceBackend(Protocol):
    """What the agent needs of a runtime. Implementations must be safe to call from many
    threads at once."""

    #: Short name for logs and telemetry, e.g. ``tflite/tflite_runtime``.
    name: str

    def load(self, artifact: Path, manifest: Manifest) -> None:
        """Load ``artifact`` and check it against the manifest's input/output contract.

        Raises ``ModelLoadError`` (or ``RuntimeMissingError``) on failure."""
        ...

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Raw features ``[batch, features]`` in; real-valued float32 ``[batch, classes]`` out."""
        ...

    def infer_one(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        """One sample (``[1, features]``), the hot path: the output row as the runtime gave
        it, with the ``(scale, zero_point)`` that make it real (``1.0, 0.0`` for float).
        Dequantizing is left to the caller, which folds it into the softmax for free."""
        ...

    def close(self) -> None:
        """The model is no longer served. Must stay safe for requests already under way
        (they picked the model before a swap): free what they cannot be using."""
        ...


class BaseBackendSettings(BaseModel):
    """What every backend's settings have: ``kind``, their module's ``BACKEND_KEY``. Each
    backend narrows it to a ``Literal``, which is what lets pydantic pick the settings model
    a file names."""

    model_config = ConfigDict(extra="forbid")

    kind: str


S = TypeVar("S", bound=BaseBackendSettings)


@dataclass(frozen=True)
class BackendPlugin(Generic[S]):
    """A backend as the registry knows it; each backend file ends with one (``PLUGIN``)."""

    #: What ``backend.kind`` names it by (its module's ``BACKEND_KEY``).
    key: str
    #: The manifest ``edge.format`` it runs (its module's ``EDGE_FORMAT``).
    edge_format: EdgeFormat
    #: Triton's name for that runtime and format (a model configuration's ``platform``).
    triton_platform: str
    settings: type[S]
    backend: Callable[[S], InferenceBackend]

    def create(self, settings: BaseBackendSettings) -> InferenceBackend:
        if not isinstance(settings, self.settings):
            raise TypeError(f"the {self.key} backend takes {self.settings.__name__}")
        return self.backend(settings)


def check_shape(what: str, have: list[int], spec: TensorSpec) -> None:
    """Raise ``ModelLoadError`` when a runtime tensor's shape (``-1``: dynamic) does not fit
    the manifest's ``spec`` (``TensorSpec.accepts``)."""
    if not spec.accepts(have):
        raise ModelLoadError(f"{what} has shape {have}, the manifest says {spec.shape}")
