"""Model outputs into typed results, per task, and each result's confidence.

``build_decoder(manifest, labels)`` reads the manifest's task and output roles once and
returns a ``Decoder``; ``decode(outputs, placement)`` turns one sample's real-valued
outputs into a ``Prediction`` (``Classification``, ``MultiLabel``, ``Detections``,
``Segmentation``, ``Regression``, ``Custom``) and ``confidence(prediction)`` gives the
number the routing policy reads. ``compare`` is the golden check's rule.
"""

from __future__ import annotations

from .base import Decoder
from .build import build_decoder
from .compare import compare
from .predictions import (
    Classification,
    Custom,
    Detection,
    Detections,
    MultiLabel,
    Prediction,
    Regression,
    Segmentation,
)

__all__ = [
    "Classification",
    "Custom",
    "Decoder",
    "Detection",
    "Detections",
    "MultiLabel",
    "Prediction",
    "Regression",
    "Segmentation",
    "build_decoder",
    "compare",
]
