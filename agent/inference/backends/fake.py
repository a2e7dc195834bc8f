"""A backend for unit tests: a function from input to output, no runtime at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.errors import BackendError
from shared.manifest import Manifest


class FakeBackend:
    """``InferenceBackend`` that answers with ``fn(x)``; ``fail`` makes every call raise."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.name = "fake"
        self.fn = fn
        self.fail = False
        self.calls = 0
        self.loaded: Path | None = None
        self.closed = False
        self.flat = True
        self.names: tuple[str, str] = ("input", "output")

    def load(self, artifact: Path, manifest: Manifest) -> None:
        self.loaded = artifact
        self.names = (manifest.inputs[0].name, manifest.outputs[0].name)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The one input through ``fn``, as the one output."""
        return {self.names[1]: self.infer(tensors[self.names[0]])}

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise BackendError("fake backend told to fail")
        return np.asarray(self.fn(x), dtype=np.float32)

    def infer_one(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        return self.infer(x)[0], 1.0, 0.0

    def reset_state(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
