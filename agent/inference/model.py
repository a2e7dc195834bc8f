"""A loaded edge model: its manifest, a backend running its artifact, and the constants the
hot path needs, checked against the manifest's golden samples before it may serve.

The agent swaps whole ``LoadedModel`` objects (one reference assignment), so a request that
has picked one up finishes on it even if a newer model is activated meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import ModelLoadError
from agent.inference.backends import BACKENDS, BaseBackendSettings, InferenceBackend
from agent.inference.confidence import to_probabilities
from shared.manifest import Manifest

GOLDEN_ATOL = 0.02


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: Manifest
    backend: InferenceBackend
    features: int
    scale: float
    offset: float
    labels: tuple[str, ...]

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        """Raw features ``[batch, features]`` to the preprocessed float32 a cloud model takes
        (backends preprocess for themselves, fused with quantization)."""
        x = raw if raw.dtype == np.float32 else raw.astype(np.float32)
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        if self.offset != 0.0:
            x = x + np.float32(self.offset)
        return x

    def close(self) -> None:
        self.backend.close()


def load_model(model_dir: Path, backend_settings: BaseBackendSettings) -> LoadedModel:
    """Load the model in ``model_dir`` (``manifest.json`` + artifact) and prove it works."""
    manifest = Manifest.load(model_dir)
    plugin = BACKENDS[backend_settings.kind]
    if plugin.edge_format != manifest.edge.format:
        raise ModelLoadError(
            f"backend {backend_settings.kind!r} cannot run a {manifest.edge.format} artifact"
        )
    backend = plugin.create(backend_settings)
    backend.load(model_dir / manifest.edge.file, manifest)
    model = LoadedModel(
        manifest=manifest,
        backend=backend,
        features=manifest.input.shape[-1],
        scale=manifest.preprocessing.scale,
        offset=manifest.preprocessing.offset,
        labels=tuple(manifest.labels),
    )
    try:
        check_golden(model)
    except Exception:
        backend.close()
        raise
    return model


def check_golden(model: LoadedModel) -> None:
    """Every golden sample must give its expected label and probabilities (within
    ``GOLDEN_ATOL``) on this runtime, or the model must not serve."""
    m = model.manifest
    for i, sample in enumerate(m.golden):
        x = np.asarray([sample.input], dtype=np.float32)
        probs = to_probabilities(model.backend.infer(x)[0], m.output_kind)
        expected = np.asarray(sample.expected, dtype=np.float32)
        drift = float(np.abs(probs - expected).max())
        if int(probs.argmax()) != sample.label or drift > GOLDEN_ATOL:
            raise ModelLoadError(
                f"{m.ref} golden sample {i}: got label {int(probs.argmax())} "
                f"(expected {sample.label}), max drift {drift:.4f} > {GOLDEN_ATOL}"
            )
