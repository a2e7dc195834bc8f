"""Inference backends. A backend is one file: ``BACKEND_KEY`` (what ``backend.kind`` names it
by), ``EDGE_FORMAT`` (the manifest format it runs), its settings model, its class, and the
``PLUGIN`` that binds them. Adding one is that file and its line in ``PLUGINS``.

``BACKENDS`` finds a plugin by key; ``BackendSettings``, the discriminated union the agent's
settings use, is built from the plugins' settings models. Runtimes are imported by ``load``,
not here.
"""

from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from agent.inference.backends import onnx, tflite
from agent.inference.backends.base import BackendPlugin, BaseBackendSettings, InferenceBackend
from agent.inference.backends.onnx import OnnxSettings
from agent.inference.backends.tflite import TFLiteSettings

#: Every backend the agent can run.
PLUGINS: tuple[BackendPlugin[Any], ...] = (tflite.PLUGIN, onnx.PLUGIN)

BACKENDS: dict[str, BackendPlugin[Any]] = {p.key: p for p in PLUGINS}


def settings_union(plugins: tuple[BackendPlugin[Any], ...]) -> Any:
    """The plugins' settings models as one union, told apart by ``kind``."""
    return Annotated[
        functools.reduce(operator.or_, [p.settings for p in plugins]), Field(discriminator="kind")
    ]


if TYPE_CHECKING:  # the type checker sees any backend's settings
    BackendSettings = BaseBackendSettings
else:  # pydantic validates exactly one plugin's, chosen by ``kind``
    BackendSettings = settings_union(PLUGINS)

__all__ = [
    "BACKENDS",
    "PLUGINS",
    "BackendPlugin",
    "BackendSettings",
    "BaseBackendSettings",
    "InferenceBackend",
    "OnnxSettings",
    "TFLiteSettings",
    "settings_union",
]
