"""ONNX Runtime backend, for devices that prefer it (Jetson with CUDA/TensorRT providers).

onnxruntime is imported when a model is loaded, never when the agent is imported: an edge
install without the ``onnx`` extra must not pay for it. An ``InferenceSession`` is safe to
``run`` from many threads, so no pool is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import Field

from agent.errors import BackendError, ModelLoadError, RuntimeMissingError
from agent.inference.backends.base import (
    BackendPlugin,
    BaseBackendSettings,
    bind_names,
    check_shape,
    is_flat,
)
from shared.contract import probe_inputs
from shared.manifest import Manifest

#: What ``backend.kind`` names this backend by.
BACKEND_KEY: Final = "onnx"
#: The manifest ``edge.format`` it runs.
EDGE_FORMAT: Final = "onnx"


class OnnxSettings(BaseBackendSettings):
    """Settings of the ONNX Runtime backend (``backend.kind = "onnx"``)."""

    kind: Literal["onnx"] = BACKEND_KEY
    intra_op_threads: int = Field(default=1, ge=0, description="0 lets ONNX Runtime choose")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class OnnxBackend:
    """``InferenceBackend`` on an ONNX Runtime session."""

    def __init__(self, settings: OnnxSettings) -> None:
        self.settings = settings
        self.name = "onnxruntime"
        self._session: Any = None
        self._input = self._output = ""
        self._names: list[str] = []
        self._runtime_names: list[str] = []
        self._bound_in: dict[str, str] = {}
        self.flat = False
        self._scale, self._offset = np.float32(1.0), np.float32(0.0)

    def load(self, artifact: Path, manifest: Manifest) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeMissingError(
                "the onnx backend needs onnxruntime: `pip install 'tandem[onnx]'`"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = 1
        available = set(ort.get_available_providers())
        providers = [p for p in self.settings.providers if p in available] or [
            "CPUExecutionProvider"
        ]
        try:
            self._session = ort.InferenceSession(
                str(artifact), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"{artifact} is not a loadable ONNX model: {exc}") from exc
        inputs = {t.name: t for t in self._session.get_inputs()}
        outputs = {t.name: t for t in self._session.get_outputs()}
        bound_in, bound_out = bind_names(manifest, list(inputs), list(outputs))
        for spec in manifest.inputs:
            shape = [d if isinstance(d, int) else -1 for d in inputs[bound_in[spec.name]].shape]
            check_shape(f"ONNX input {spec.name!r}", shape, spec)
        for ospec in manifest.outputs:
            shape = [d if isinstance(d, int) else -1 for d in outputs[bound_out[ospec.name]].shape]
            check_shape(f"ONNX output {ospec.name!r}", shape, ospec)
        self._bound_in = bound_in
        self._names = [t.name for t in manifest.outputs]
        self._runtime_names = [bound_out[n] for n in self._names]
        self.flat = is_flat(manifest)
        if self.flat:
            self._input = bound_in[manifest.inputs[0].name]
            self._output = bound_out[manifest.outputs[0].name]
            self._scale = np.float32(manifest.inputs[0].scale)
            self._offset = np.float32(manifest.inputs[0].offset)
        try:
            self.run(probe_inputs(manifest.inputs))
        except BackendError as exc:
            raise ModelLoadError(
                f"{artifact} fails on its load-time probe (zeros of its declared shape): {exc}"
            ) from exc

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            feed = {self._bound_in[n]: v for n, v in tensors.items()}
            values = self._session.run(self._runtime_names, feed)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"ONNX Runtime run failed: {exc}") from exc
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self._names, values)}

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = (x * self._scale + self._offset).astype(np.float32, copy=False)
        try:
            (y,) = self._session.run([self._output], {self._input: x})
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"ONNX Runtime run failed: {exc}") from exc
        return np.asarray(y, dtype=np.float32)

    def infer_one(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        return self.infer(x)[0], 1.0, 0.0

    def reset_state(self) -> None:
        """ONNX models carry state in their inputs and outputs (silero-vad), not inside."""

    def close(self) -> None:
        """Nothing to do eagerly: a request that picked this model before a swap may still
        run it; the session is freed with the backend."""


PLUGIN = BackendPlugin(BACKEND_KEY, EDGE_FORMAT, "onnxruntime_onnx", OnnxSettings, OnnxBackend)
