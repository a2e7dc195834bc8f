"""What every decoder is, and the checks they share: finding outputs by role, taking one
sample's array out of the model's outputs, naming class ids, sizing the model's input."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, TypeVar

import numpy as np

from shared.contract import OutputRole, OutputSpec, Task
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.placement import Placement

from .predictions import Prediction

P = TypeVar("P")


class Decoder(ABC):
    """Turns one sample's real-valued outputs into the task's typed result, and scores it.

    Built once per model (``build_decoder``), after the manifest's outputs were checked
    against the task, so ``decode`` only checks what the runtime handed it."""

    task: ClassVar[Task]

    @abstractmethod
    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        """``outputs``: float32 arrays by output name, each with a leading batch dim of 1.
        ``placement`` maps the model's input pixels to the caller's frame (None: results
        stay in the model input's pixels)."""

    @abstractmethod
    def confidence(self, prediction: Prediction) -> float:
        """The task's confidence in [0, 1] of a result this decoder made."""


def expect(prediction: Prediction, kind: type[P]) -> P:
    """``prediction`` as the type its decoder makes (another decoder's result is a bug)."""
    if not isinstance(prediction, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(prediction).__name__}")
    return prediction


def with_role(manifest: Manifest, role: OutputRole) -> list[OutputSpec]:
    return [o for o in manifest.outputs if o.role == role]


def one_output(manifest: Manifest, role: OutputRole) -> OutputSpec:
    """The one output with ``role`` (``ContractError`` if there is none or several)."""
    found = with_role(manifest, role)
    if len(found) != 1:
        names = [o.name for o in found]
        raise ContractError(
            f"a {manifest.task} model needs exactly one output with role {role!r}, "
            f"has {len(found)} {names if names else ''}".rstrip()
        )
    return found[0]


def optional_output(manifest: Manifest, role: OutputRole) -> OutputSpec | None:
    return one_output(manifest, role) if with_role(manifest, role) else None


def need_rank(spec: OutputSpec, ranks: tuple[int, ...], what: str) -> None:
    if len(spec.shape) not in ranks:
        wanted = " or ".join(f"{r}-D" for r in ranks)
        raise ContractError(
            f"output {spec.name!r} ({spec.role}) must be {wanted} {what}, has shape {spec.shape}"
        )


def take(outputs: Mapping[str, np.ndarray], spec: OutputSpec) -> np.ndarray:
    """The one sample of output ``spec`` (its batch dimension dropped), as float32."""
    arr = outputs.get(spec.name)
    if arr is None:
        raise ContractError(f"the model gave no output {spec.name!r} (has {sorted(outputs)})")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 0 or arr.shape[0] != 1 or not spec.accepts(arr.shape):
        raise ContractError(
            f"output {spec.name!r} has shape {list(arr.shape)}; the contract says {spec.shape} "
            "for one sample"
        )
    sample: np.ndarray = arr[0]
    return sample


def fixed(dim: int) -> int | None:
    return dim if dim > 0 else None


class LabelNames:
    """Class id -> label, with ``class 7`` for an id the labels file does not name (COCO
    label maps have gaps)."""

    def __init__(self, mapping: Mapping[int, str]) -> None:
        self._map = dict(mapping)

    def __call__(self, class_id: int) -> str:
        return self._map.get(class_id) or f"class {class_id}"

    def check(self, classes: int | None, where: str) -> None:
        """Every named id must be a class the output can give."""
        if classes is None:
            return
        stray = sorted(i for i in self._map if not 0 <= i < classes)
        if stray:
            raise ContractError(
                f"labels name class ids {stray[:5]} but output {where!r} has {classes} classes"
            )


def label_names(
    manifest: Manifest, labels: Mapping[str, Mapping[int, str]], *specs: OutputSpec | None
) -> LabelNames:
    """The labels of the first of ``specs`` that has any (a v1 manifest's inline list for
    its one output), else none."""
    for spec in specs:
        if spec is None:
            continue
        if spec.name in labels:
            return LabelNames(labels[spec.name])
        if manifest.is_v1 and manifest.labels is not None:
            return LabelNames(dict(enumerate(manifest.labels)))
    return LabelNames({})


def model_size(manifest: Manifest) -> tuple[int, int] | None:
    """(height, width) of the model's first image input, which normalised boxes and
    anchors are relative to (None: the model takes no image)."""
    for spec in manifest.inputs:
        if spec.kind == "image":
            h, w, _ = spec.image_dims
            return h, w
    return None
