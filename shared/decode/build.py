"""Picking and building the decoder a manifest's task and output roles call for."""

from __future__ import annotations

import math
from collections.abc import Mapping

from shared.errors import ContractError
from shared.manifest import ConfidenceMetric, Manifest

from .base import Decoder, with_role
from .classification import ClassificationDecoder, MultiLabelDecoder
from .detection import AnchorsDecoder, BoxesScoresDecoder, PostProcessDecoder
from .regression import CustomDecoder, RegressionDecoder
from .segmentation import SegmentationDecoder


def build_decoder(
    manifest: Manifest,
    labels: Mapping[str, Mapping[int, str]],
    *,
    temperature: float = 1.0,
    metric: ConfidenceMetric = "max_prob",
) -> Decoder:
    """The decoder of ``manifest``'s outputs. ``labels``: output name -> class id ->
    label (``shared.bundle.read_labels``); a v1 manifest's inline labels serve its one
    output. ``ContractError`` when the outputs cannot give the task's result."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ContractError(f"temperature must be a positive number, not {temperature}")
    task = manifest.task
    if task == "classification":
        return ClassificationDecoder(manifest, labels, temperature, metric)
    if task == "multilabel":
        return MultiLabelDecoder(manifest, labels, temperature)
    if task == "detection":
        if with_role(manifest, "anchors"):
            return AnchorsDecoder(manifest, labels, temperature)
        if not with_role(manifest, "boxes"):
            raise ContractError("a detection model needs a boxes or an anchors output")
        if with_role(manifest, "classes"):
            return PostProcessDecoder(manifest, labels, temperature)
        return BoxesScoresDecoder(manifest, labels, temperature)
    if task == "segmentation":
        return SegmentationDecoder(manifest, labels, temperature)
    if task == "regression":
        if not with_role(manifest, "value"):
            raise ContractError("a regression model needs an output with role 'value'")
        return RegressionDecoder(manifest)
    return CustomDecoder(manifest)
