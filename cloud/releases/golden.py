"""Golden samples: inputs packaged with a release and the outputs the artifact gave for them.

Each device runs every golden input through its own preprocessing and runtime before it
switches to a release, and compares the outputs with the recorded ones (tolerance per
task), so a runtime, delegate or preprocessing that computes differently is caught before
it serves. The packager prepares each input exactly as the agent does, with the one
implementation both use (``shared.preprocess.Preprocessor``): an image is decoded,
converted, resized, normalised and quantized per the manifest; an array goes in as the
agent's Python API takes it.

Files (``shared.bundle`` reads them back): ``golden-<i><suffix>`` the input as given (a
``.jpg``/``.png``, a ``.npy`` for a one-input model, a ``.npz`` of arrays by input name),
``golden-<i>.expected.npz`` the real-valued outputs by output name.

A release always carries at least one: without ``--golden``, one case of the load-time
probe (``shared.contract.probe_inputs``: zeros of the declared input shapes unless an input
says its probe value), as a ``.npz``: the same input the agent's load check runs. It proves
less than a real sample (a model can be wrong everywhere but at zero), but it still catches
a device whose runtime computes the model differently, which is the check's purpose.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud.releases.runner import ModelRunner
from shared.bundle import IMAGE_SUFFIXES, load_npy, load_npz, npz_bytes
from shared.contract import GoldenCase, InputSpec, OutputSpec, Task, probe_inputs
from shared.errors import ContractError, TandemError

#: Slack on "probabilities are in [0, 1] and sum to 1" (quantized outputs are coarse).
_PROB_SLACK = 0.02
#: Largest golden input read (a photo; a release's files are downloaded by every device).
MAX_GOLDEN_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class GoldenInput:
    """A golden sample as the operator gives it, and the label it must give (classification)."""

    path: Path
    label: str | None = None


@dataclass
class GoldenResult:
    cases: list[GoldenCase]
    files: dict[str, bytes]
    #: the outputs of each case, by output name (what ``expected`` holds)
    outputs: list[dict[str, np.ndarray]]
    #: the prepared model inputs of each case
    tensors: list[dict[str, np.ndarray]]


def _preprocessor(inputs: list[InputSpec], max_pixels: int) -> Any:
    try:
        module = importlib.import_module("shared.preprocess")
    except ImportError as exc:  # Pillow is a base dependency; say so if it is missing
        raise ContractError(f"golden samples need shared.preprocess: {exc}") from None
    return module.Preprocessor(inputs, max_pixels)


def _read(path: Path, inputs: list[InputSpec]) -> tuple[str, bytes, object]:
    """(suffix, bytes, value for the preprocessor) of one golden input file."""
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
        if size > MAX_GOLDEN_BYTES:
            raise ContractError(f"golden {path} is {size} bytes; at most {MAX_GOLDEN_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ContractError(f"cannot read golden sample {path}: {exc}") from None
    if suffix in IMAGE_SUFFIXES:
        if not any(s.kind == "image" for s in inputs):
            first = inputs[0].name
            raise ContractError(
                f"golden {path.name} is an image, but no input of the model is one: declare "
                f'it in the contract file ([inputs."{first}"] kind = "image", with its '
                "colour, mean and std)"
            )
        return suffix, data, data
    if suffix == ".npy":
        if len(inputs) != 1:
            raise ContractError(
                f"golden {path.name}: a .npy is for a one-input model; this one takes "
                f"{[s.name for s in inputs]}: give a .npz of arrays by input name"
            )
        return suffix, data, load_npy(path.name, data)
    if suffix == ".npz":
        arrays = load_npz(path.name, data)
        want = {s.name for s in inputs}
        if arrays.keys() != want:
            raise ContractError(
                f"golden {path.name} holds arrays {sorted(arrays)}; the model's inputs are "
                f"{sorted(want)}"
            )
        return suffix, data, arrays
    raise ContractError(
        f"golden {path.name}: give an image ({', '.join(IMAGE_SUFFIXES)}), a .npy or a .npz"
    )


def _prepare(pre: Any, value: object, inputs: list[InputSpec], where: str) -> dict[str, Any]:
    try:
        prepared = pre.prepare(value)
    except TandemError as exc:
        raise ContractError(f"golden {where}: {exc.message}") from None
    tensors: dict[str, Any] = dict(prepared.tensors)
    return tensors


def _check_probabilities(
    task: Task, outputs: list[OutputSpec], got: dict[str, np.ndarray], where: str
) -> None:
    """An output said to hold probabilities must hold them; logits left unsaid would make
    every confidence meaningless."""
    for spec in outputs:
        if spec.role not in ("scores", "mask") or spec.activation != "probabilities":
            continue
        value = got[spec.name]
        if value.size == 0:
            continue
        low, high = float(value.min()), float(value.max())
        problem = None
        if low < -_PROB_SLACK or high > 1 + _PROB_SLACK:
            problem = f"values from {low:.3g} to {high:.3g}"
        elif task == "classification" and spec.role == "scores":
            sums = value.sum(axis=-1)
            if np.any(np.abs(sums - 1) > _PROB_SLACK * max(1, value.shape[-1] ** 0.5)):
                problem = f"scores summing to {float(sums.ravel()[0]):.3g}"
        if problem:
            raise ContractError(
                f"golden {where}: output {spec.name!r} gives {problem}, not probabilities: "
                'set its activation ("logits" for a softmax, "sigmoid" for independent '
                "scores) in the contract file; one score per class that need not sum to 1 "
                "is a multilabel model"
            )


def _check_class_ids(outputs: list[OutputSpec], got: dict[str, np.ndarray], where: str) -> None:
    """A ``classes`` output holds class ids: whole numbers. Exporters order an
    SSD head's four outputs differently, and when scores and classes are taken for each
    other nothing fails, the model just reports class 0 and 1 at scores 1.0 and 0.0; the
    roles cannot be fixed by a later update (devices refuse a change of output role)."""
    for spec in outputs:
        if spec.role != "classes":
            continue
        value = got[spec.name]
        if value.size == 0:
            continue
        if np.any(np.abs(value - np.round(value)) > 1e-3):
            raise ContractError(
                f"golden {where}: output {spec.name!r} (role classes) holds "
                f"{float(value.ravel()[0]):.4g}, not class ids: are classes and scores "
                "swapped? Say each output's role in the contract file ([outputs.NAME] role)"
            )


def make_golden(
    runner: ModelRunner,
    task: Task,
    inputs: list[InputSpec],
    outputs: list[OutputSpec],
    samples: list[GoldenInput],
    max_pixels: int,
) -> GoldenResult:
    """Run every golden sample (or the zeros case) and record its outputs."""
    result = GoldenResult([], {}, [], [])
    pre = _preprocessor(inputs, max_pixels)
    items: list[tuple[str, bytes, object, str]] = []
    for sample in samples:
        suffix, data, value = _read(sample.path, inputs)
        items.append((suffix, data, value, sample.path.name))
    if not items:
        probe = probe_inputs(inputs)
        items.append((".npz", npz_bytes(probe), probe, "zeros"))
    for i, (suffix, data, value, where) in enumerate(items):
        tensors = _prepare(pre, value, inputs, where)
        got = runner.run(tensors)
        _check_class_ids(outputs, got, where)
        _check_probabilities(task, outputs, got, where)
        name_in, name_out = f"golden-{i}{suffix}", f"golden-{i}.expected.npz"
        result.files[name_in] = data
        result.files[name_out] = npz_bytes(got)
        result.cases.append(GoldenCase(input=name_in, expected=name_out))
        result.outputs.append(got)
        result.tensors.append(tensors)
    return result
