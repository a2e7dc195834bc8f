"""A loaded edge model: its manifest, a backend running its artifact, what turns a caller's
input into the model's tensors and the model's outputs into a typed result, all checked
against the manifest's golden samples before it may serve.

Two ways through a model. A *flat* classifier (one ``tensor`` input ``[batch, features]``,
one scores output: every v1 manifest, and v2 ones of that shape) keeps the hot path that
costs a few microseconds over the raw interpreter (``Agent.infer`` on raw features). Any
other model, and any input that is not a feature row (an image, a dict of named tensors),
goes through ``preprocessor`` (``shared.preprocess``), ``backend.run`` and ``decoder``
(``shared.decode``).

The agent swaps whole ``LoadedModel`` objects (one reference assignment), so a request that
has picked one up finishes on it even if a newer model is activated meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.errors import ModelLoadError
from agent.inference.backends import BACKENDS, BaseBackendSettings, InferenceBackend
from agent.inference.confidence import to_probabilities
from shared.bundle import read_golden, read_labels
from shared.errors import TandemError
from shared.manifest import Manifest

if TYPE_CHECKING:
    from shared.decode import Decoder
    from shared.preprocess import Preprocessor

GOLDEN_ATOL = 0.02
#: Decoded pixels an image may have when nothing else is said (``images.max_pixels``).
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: Manifest
    backend: InferenceBackend
    features: int
    scale: float
    offset: float
    #: The scores output's labels by index (a flat classifier; else empty).
    labels: tuple[str, ...]
    #: Output name -> class id -> label, from the bundle's labels files.
    label_maps: dict[str, dict[int, str]] | None = None
    preprocessor: Preprocessor | None = None
    decoder: Decoder | None = None
    #: The folder it was loaded from (its bundle files: the golden samples).
    bundle_dir: Path | None = None

    @property
    def flat(self) -> bool:
        """Whether raw feature rows take the hot path (``backend.infer``)."""
        return self.backend.flat

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


def load_model(
    model_dir: Path,
    backend_settings: BaseBackendSettings,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedModel:
    """Load the model in ``model_dir`` (``manifest.json``, artifact, bundle files) and prove
    it works: it runs on zeros (the backend's load) and reproduces its golden samples."""
    manifest = Manifest.load(model_dir)
    plugin = BACKENDS[backend_settings.kind]
    if plugin.edge_format != manifest.edge.format:
        raise ModelLoadError(
            f"backend {backend_settings.kind!r} cannot run a {manifest.edge.format} artifact"
        )
    backend = plugin.create(backend_settings)
    backend.load(model_dir / manifest.edge.file, manifest)
    try:
        model = _assemble(manifest, backend, model_dir, max_pixels)
        check_golden(model)
    except TandemError as exc:
        backend.close()
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{manifest.ref}: {exc}") from exc
    except Exception:
        backend.close()
        raise
    return model


def _assemble(
    manifest: Manifest, backend: InferenceBackend, model_dir: Path, max_pixels: int
) -> LoadedModel:
    from shared.decode import build_decoder
    from shared.preprocess import Preprocessor

    if manifest.is_v1:
        assert manifest.labels is not None
        label_maps = {manifest.outputs[0].name: dict(enumerate(manifest.labels))}
    else:
        label_maps = {
            o.name: read_labels(manifest, model_dir, o.labels) for o in manifest.outputs if o.labels
        }
    spec = manifest.inputs[0]
    preprocessor = Preprocessor(list(manifest.inputs), max_pixels)
    if any(t.kind == "image" for t in manifest.inputs):
        preprocessor.warm()  # Pillow's import and first resize at load, not on a request
    labels: tuple[str, ...] = ()
    if backend.flat:
        classes = manifest.outputs[0].shape[-1]
        names = label_maps.get(manifest.outputs[0].name, {})
        labels = tuple(names.get(i, f"class {i}") for i in range(classes))
    return LoadedModel(
        manifest=manifest,
        backend=backend,
        features=spec.shape[-1],
        scale=spec.scale,
        offset=spec.offset,
        labels=labels,
        label_maps=label_maps,
        preprocessor=preprocessor,
        bundle_dir=model_dir,
        decoder=build_decoder(
            manifest,
            label_maps,
            temperature=manifest.routing.temperature,
            metric=manifest.routing.metric,
        ),
    )


def check_golden(model: LoadedModel) -> None:
    """Every golden sample must reproduce on this runtime (v1: the expected label and
    probabilities within ``GOLDEN_ATOL``; v2: the task's comparison within the manifest's
    tolerance), or the model must not serve."""
    m = model.manifest
    if m.is_v1:
        assert m.output_kind is not None
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
        return
    assert model.preprocessor is not None and model.decoder is not None
    assert model.bundle_dir is not None
    try:
        _check_golden_v2(model, m, model.bundle_dir)
    finally:
        if m.streaming:  # serving starts a fresh stream, not the golden samples' tail
            model.backend.reset_state()


def _check_golden_v2(model: LoadedModel, m: Manifest, bundle_dir: Path) -> None:
    """A streaming model is checked from a fresh state per sample, as packaging ran it:
    a health-watch check restarts the stream callers were in (one keyword window)."""
    from shared.decode import compare

    assert model.preprocessor is not None and model.decoder is not None
    for golden in read_golden(m, bundle_dir):
        if m.streaming:
            model.backend.reset_state()
        if golden.image is not None:
            value: object = golden.image
        elif set(golden.arrays) == {""}:
            value = golden.arrays[""]
        else:
            value = golden.arrays
        prepared = model.preprocessor.prepare(value)
        outputs = model.backend.run(prepared.tensors)
        got = model.decoder.decode(outputs, prepared.placement)
        want = model.decoder.decode(golden.expected, prepared.placement)
        problem = compare(want, got, m.tolerance)
        if problem is not None:
            raise ModelLoadError(f"{m.ref} golden sample {golden.name}: {problem}")
