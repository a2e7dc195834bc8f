"""The backend plugins without a runtime: the registry built from their files, the settings
union it feeds, and the one shape-fit check they load models with."""

from __future__ import annotations

import pytest

from agent.errors import ModelLoadError
from agent.inference.backends.base import check_shape
from shared.manifest import TensorSpec


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
