"""The backend plugins without a runtime: the registry built from their files, the settings
union it feeds, and the one shape-fit check they load models with."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from agent.errors import ModelLoadError
from agent.inference.backends import (
    BACKENDS,
    PLUGINS,
    BackendPlugin,
    BaseBackendSettings,
    onnx,
    settings_union,
    tflite,
)
from agent.inference.backends.base import check_shape
from agent.settings import AgentSettings
from shared.manifest import Manifest, TensorSpec


@pytest.mark.parametrize("module", [tflite, onnx], ids=["tflite", "onnx"])
def test_each_backend_file_carries_its_key_and_format(module: ModuleType) -> None:
    plugin = module.PLUGIN
    assert plugin.key == module.BACKEND_KEY
    assert plugin.edge_format == module.EDGE_FORMAT
    assert plugin.settings().kind == plugin.key  # the Literal pydantic tells them apart by
    assert BACKENDS[plugin.key] is plugin
    settings = AgentSettings(backend={"kind": plugin.key})
    assert type(settings.backend) is plugin.settings
    with pytest.raises(ValidationError, match="extra"):
        AgentSettings(backend={"kind": plugin.key, "typo": 1})


def test_the_registry_is_the_plugin_list() -> None:
    assert list(BACKENDS) == [p.key for p in PLUGINS] == ["tflite", "onnx"]
    with pytest.raises(ValidationError, match="'tflite', 'onnx'"):
        AgentSettings(backend={"kind": "nope"})


class EchoSettings(BaseBackendSettings):
    kind: Literal["echo"] = "echo"
    gain: float = 1.0


class EchoBackend:
    def __init__(self, settings: EchoSettings) -> None:
        self.name, self.gain = "echo", settings.gain

    def load(self, artifact: Path, manifest: Manifest) -> None:
        pass

    def infer(self, x: np.ndarray) -> np.ndarray:
        return x * self.gain

    def infer_one(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        return self.infer(x)[0], 1.0, 0.0

    def close(self) -> None:
        pass


def test_a_new_backend_is_its_plugin_and_one_more_entry() -> None:
    """What a backend file adds (settings, class, ``PLUGIN``) is all the registry needs."""
    echo = BackendPlugin("echo", "onnx", "echo_platform", EchoSettings, EchoBackend)
    union = TypeAdapter(settings_union((*PLUGINS, echo)))
    settings = union.validate_python({"kind": "echo", "gain": 2.0})
    assert isinstance(settings, EchoSettings)
    assert isinstance(union.validate_python({"kind": "onnx"}), onnx.OnnxSettings)
    backend = echo.create(settings)
    assert backend.infer(np.ones((1, 2), np.float32)).tolist() == [[2.0, 2.0]]
    with pytest.raises(TypeError, match="takes EchoSettings"):
        echo.create(tflite.TFLiteSettings())


@pytest.mark.parametrize(
    ("spec", "shape", "fits"),
    [
        ([-1, 4], [7, 4], True),  # a concrete shape: the spec's -1 takes any batch
        ([-1, 4], [7, 5], False),
        ([-1, 4], [-1, 4], True),  # a runtime's signature: dynamic batch on both sides
        ([1, 4], [-1, 4], True),  # a runtime with a dynamic batch runs a batch of 1
        ([-1, 4], [-1, -1], True),
        ([-1, 4], [4], False),  # rank differs
        ([-1, 4], [-1, 4, 1], False),
    ],
)
def test_one_shape_fit_check(spec: list[int], shape: list[int], fits: bool) -> None:
    tensor = TensorSpec(name="x", shape=spec, datatype="FP32")
    assert tensor.accepts(shape) is fits
    if fits:
        check_shape("input", shape, tensor)
    else:
        with pytest.raises(ModelLoadError, match=r"input has shape \[.*\], the manifest says"):
            check_shape("input", shape, tensor)
