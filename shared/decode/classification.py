"""Classification and multilabel: one ``scores`` output whose last axis is the classes.

A classifier with a single score (a keyword spotter, a yes/no model) is read as two
classes, ``[p, 1 - p]``: the model's class 0 (its label) and ``not <label>``, so top-1,
margin and entropy mean what they mean for any classifier. Its one score is read on its
own (a sigmoid for logits), since a softmax over one value is always 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shared.contract import OutputSpec
from shared.errors import ContractError
from shared.manifest import ConfidenceMetric, Manifest
from shared.placement import Placement

from .activations import class_probs, each_probs
from .base import Decoder, LabelNames, expect, fixed, label_names, one_output, take
from .predictions import Classification, MultiLabel, Prediction

_TINY = 1e-12


def _scores_output(
    manifest: Manifest, labels: Mapping[str, Mapping[int, str]]
) -> tuple[OutputSpec, int | None, LabelNames]:
    spec = one_output(manifest, "scores")
    if not spec.shape or any(d not in (1, -1) for d in spec.shape[:-1]):
        raise ContractError(
            f"{manifest.task} output {spec.name!r} has shape {spec.shape}: one sample's "
            "scores on the last axis expected"
        )
    classes = fixed(spec.shape[-1])
    names = label_names(manifest, labels, spec)
    names.check(classes, spec.name)
    return spec, classes, names


def metric_of(probs: list[float], metric: ConfidenceMetric) -> float:
    """max_prob, margin (top-1 minus top-2) or 1 - normalised entropy of a distribution."""
    if metric == "max_prob":
        return max(probs)
    if metric == "margin":
        top = sorted(probs)[-2:]
        return top[1] - top[0]
    h = -sum(p * math.log(p) for p in probs if p > _TINY)
    return max(0.0, min(1.0, 1.0 - h / math.log(len(probs))))


class ClassificationDecoder(Decoder):
    task = "classification"

    def __init__(
        self,
        manifest: Manifest,
        labels: Mapping[str, Mapping[int, str]],
        temperature: float,
        metric: ConfidenceMetric,
    ) -> None:
        self._spec, self._classes, self._names = _scores_output(manifest, labels)
        self._temperature = temperature
        self._metric = metric
        self._top_k = manifest.decoding.top_k

    def _name(self, index: int, binary: bool) -> str:
        if binary and index == 1:
            return f"not {self._names(0)}"
        return self._names(index)

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        row = take(outputs, self._spec).reshape(-1)
        spec = self._spec
        binary = row.size == 1
        if binary:
            p = float(each_probs(row, spec.activation, self._temperature)[0])
            probs = np.array([p, 1.0 - p], dtype=np.float32)
        else:
            probs = class_probs(row, spec.activation, self._temperature)
        order = np.argsort(-probs, kind="stable")[: self._top_k]
        values: list[float] = probs.tolist()
        index = int(order[0])
        return Classification(
            label=self._name(index, binary),
            index=index,
            probs=values,
            top_k=[(self._name(int(i), binary), values[int(i)]) for i in order],
        )

    def confidence(self, prediction: Prediction) -> float:
        return metric_of(expect(prediction, Classification).probs, self._metric)


class MultiLabelDecoder(Decoder):
    """Each label on its own: present at 0.5 or above. Confidence is the least decisive
    label's ``|2p - 1|``: one label near 0.5 is one the model could not decide."""

    task = "multilabel"

    def __init__(
        self, manifest: Manifest, labels: Mapping[str, Mapping[int, str]], temperature: float
    ) -> None:
        self._spec, self._classes, self._names = _scores_output(manifest, labels)
        self._temperature = temperature

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        row = take(outputs, self._spec).reshape(-1)
        probs = each_probs(row, self._spec.activation, self._temperature)
        values: list[float] = probs.tolist()
        order = np.argsort(-probs, kind="stable")
        present = [(self._names(int(i)), values[int(i)]) for i in order if values[int(i)] >= 0.5]
        return MultiLabel(labels=present, probs=values)

    def confidence(self, prediction: Prediction) -> float:
        probs = expect(prediction, MultiLabel).probs
        return min((abs(2.0 * p - 1.0) for p in probs), default=1.0)
