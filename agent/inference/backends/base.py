"""The one interface every inference backend implements: ``load / infer / close``.

A backend owns a runtime (TFLite interpreter, ONNX Runtime session) and its threads. Two
ways in:

- ``run``, for any model: model-ready tensors by input name (``shared.preprocess`` made
  them: the input's own dtype, quantized already) in, every output of the contract by name
  out, real-valued float32 (dequantized from the tensor's own scale and zero point);
- ``infer``/``infer_one``, the flat-classifier hot path (one ``tensor`` input
  ``[batch, features]``, one scores output): *raw* features in, because one fused affine
  step (the manifest's ``x * scale + offset`` folded into the quantization) is much cheaper
  than two, and the output row as the runtime gave it. ``flat`` says whether it applies.

``load`` matches the contract's tensors to the runtime's by *name*, checks their shapes, and
runs the model once on zeros of its declared shape: a model the runtime cannot run (a
custom op, a shape it cannot take) is refused at load, never on the first request.
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
    #: Whether ``infer``/``infer_one`` apply (one flat tensor input, one output).
    flat: bool

    def load(self, artifact: Path, manifest: Manifest) -> None:
        """Load ``artifact`` and check it against the manifest's input/output contract.

        Raises ``ModelLoadError`` (or ``RuntimeMissingError``) on failure."""
        ...

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model-ready inputs by name in; real-valued float32 outputs by name out. Raises
        ``BackendError`` when the runtime fails."""
        ...

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Flat models: raw features ``[batch, features]`` in; real-valued float32
        ``[batch, classes]`` out."""
        ...

    def infer_one(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        """One sample (``[1, features]``), the hot path: the output row as the runtime gave
        it, with the ``(scale, zero_point)`` that make it real (``1.0, 0.0`` for float).
        Dequantizing is left to the caller, which folds it into the softmax for free."""
        ...

    def reset_state(self) -> None:
        """Forget what a streaming model carried over from earlier calls (its resource
        variables): its next call starts a fresh stream. A no-op for stateless models."""
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


def bind_names(
    manifest: Manifest, inputs: list[str], outputs: list[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Contract tensor name -> runtime tensor name, for inputs and for outputs.

    v2 names are the runtime's own: every contract name must be one of them, and every
    runtime input must be in the contract (the model needs them all). A v1 manifest named
    its one input and one output freely, so they bind to the runtime's only ones. Raises
    ``ModelLoadError`` when the names do not match."""
    want_in = [t.name for t in manifest.inputs]
    want_out = [t.name for t in manifest.outputs]
    if manifest.is_v1:
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(
                f"the model has {len(inputs)} inputs and {len(outputs)} outputs; a v1 "
                "manifest describes one of each"
            )
        return {want_in[0]: inputs[0]}, {want_out[0]: outputs[0]}
    for what, have, want, all_of_have in (
        ("input", inputs, want_in, True),
        ("output", outputs, want_out, False),
    ):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want] if all_of_have else []
        if missing or extra:
            raise ModelLoadError(
                f"the manifest's {what}s {want} do not match the model's {have}"
                + (f": no {missing}" if missing else "")
                + (f": {extra} not in the manifest" if extra else "")
            )
    return {n: n for n in want_in}, {n: n for n in want_out}


def is_flat(manifest: Manifest) -> bool:
    """One ``tensor`` input ``[batch, features]`` into one output: the classifier hot path."""
    return (
        len(manifest.inputs) == 1
        and len(manifest.outputs) == 1
        and manifest.inputs[0].kind == "tensor"
        and len(manifest.inputs[0].shape) == 2
        and manifest.task == "classification"
        and manifest.outputs[0].activation in ("probabilities", "logits")
    )


def check_shape(what: str, have: list[int], spec: TensorSpec) -> None:
    """Raise ``ModelLoadError`` when a runtime tensor's shape (``-1``: dynamic) does not fit
    the manifest's ``spec`` (``TensorSpec.accepts``)."""
    if not spec.accepts(have):
        raise ModelLoadError(f"{what} has shape {have}, the manifest says {spec.shape}")
