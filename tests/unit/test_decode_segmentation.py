"""shared.decode: segmentation masks, areas, the quantile confidence, frame mapping."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shared.decode import Segmentation, build_decoder
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.placement import Placement


def manifest(mask_shape: list[int], activation: str = "logits", **extra: Any) -> Manifest:
    return Manifest.model_validate(
        {
            "schema": "tandem.manifest/v2",
            "model": "demo",
            "version": 1,
            "created": "2025-01-01T00:00:00Z",
            "edge": {"format": "tflite", "file": "m.tflite", "sha256": "0" * 64, "size": 1},
            "task": "segmentation",
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 8, 8, 3],
                    "datatype": "FP32",
                    "kind": "image",
                    "image": {},
                }
            ],
            "outputs": [
                {
                    "name": "mask",
                    "shape": mask_shape,
                    "datatype": "FP32",
                    "role": "mask",
                    "activation": activation,
                }
            ],
            **extra,
        }
    )


def seg(pred: Any) -> Segmentation:
    assert isinstance(pred, Segmentation)
    return pred


def three_class_logits() -> np.ndarray:
    """8 x 8: left half class 0, right half class 2, one row of the right half unsure."""
    z = np.zeros((1, 8, 8, 3), np.float32)
    z[0, :, :4, 0] = 6.0
    z[0, :, 4:, 2] = 6.0
    z[0, 7, 4:, 1] = 6.0  # row 7, right: classes 1 and 2 tie
    return z


def test_argmax_mask_and_areas() -> None:
    dec = build_decoder(manifest([1, 8, 8, 3]), {"mask": {0: "sky", 2: "road"}})
    pred = seg(dec.decode({"mask": three_class_logits()}, None))
    assert pred.mask.shape == (8, 8) and pred.mask.dtype == np.int32
    assert (pred.mask[:, :4] == 0).all() and (pred.mask[:7, 4:] == 2).all()
    assert (pred.mask[7, 4:] == 1).all()  # a tie goes to the first class
    assert pred.areas == {"sky": 0.5, "class 1": 4 / 64, "road": 28 / 64}


def test_confidence_is_a_low_quantile_of_the_per_pixel_max_probability() -> None:
    z = three_class_logits()
    e = np.exp(6.0)
    sure, unsure = e / (e + 2), e / (2 * e + 1)
    # 4 of 64 pixels (6.25%) are unsure: the 4% quantile sees them, the median does not
    low = build_decoder(manifest([1, 8, 8, 3], confidence={"quantile": 0.04}), {})
    mid = build_decoder(manifest([1, 8, 8, 3], confidence={"quantile": 0.5}), {})
    assert low.confidence(low.decode({"mask": z}, None)) == pytest.approx(unsure, rel=1e-5)
    assert mid.confidence(mid.decode({"mask": z}, None)) == pytest.approx(sure, rel=1e-5)
    # a temperature makes every pixel less sure
    hot = build_decoder(manifest([1, 8, 8, 3], confidence={"quantile": 0.5}), {}, temperature=4.0)
    assert hot.confidence(hot.decode({"mask": z}, None)) < sure - 0.1


def test_one_channel_mask_is_background_or_foreground() -> None:
    p = np.full((1, 8, 8, 1), 0.1, np.float32)
    p[0, 2:6, 2:6, 0] = 0.8
    dec = build_decoder(
        manifest([1, 8, 8, 1], "probabilities", confidence={"quantile": 0.0}),
        {"mask": {0: "background", 1: "person"}},
    )
    pred = seg(dec.decode({"mask": p}, None))
    assert pred.mask.sum() == 16 and pred.mask[3, 3] == 1
    assert pred.areas == {"background": 0.75, "person": 0.25}
    assert dec.confidence(pred) == pytest.approx(0.8)  # min over pixels of max(p, 1 - p)


def test_a_mask_of_class_ids() -> None:
    ids = np.zeros((1, 4, 4), np.float32)
    ids[0, 0, :] = 3
    dec = build_decoder(manifest([1, 4, 4]), {"mask": {3: "cat"}})
    pred = seg(dec.decode({"mask": ids}, None))
    assert pred.areas == {"class 0": 0.75, "cat": 0.25} and dec.confidence(pred) == 1.0
    with pytest.raises(ContractError, match="negative"):
        dec.decode({"mask": -ids}, None)


def test_letterbox_padding_is_not_counted_in_areas() -> None:
    """A 4 x 8 frame letterboxed into the 8 x 8 model: rows 0-1 and 6-7 are padding."""
    ids = np.zeros((1, 8, 8), np.float32)
    ids[0, 2:6, :4] = 1  # half the picture is class 1; the padding is class 0
    placement = Placement(4, 8, 8, 8, 1.0, 1.0, 0.0, -2.0)
    dec = build_decoder(manifest([1, 8, 8]), {})
    pred = seg(dec.decode({"mask": ids}, placement))
    assert pred.areas == {"class 0": 0.5, "class 1": 0.5}
    framed = pred.in_frame()
    assert framed.shape == (4, 8) and (framed == ids[0, 2:6].astype(np.int32)).all()
    # without the placement the padding counts
    assert seg(dec.decode({"mask": ids}, None)).areas == {"class 0": 0.75, "class 1": 0.25}


def test_in_frame_resizes_and_marks_what_a_crop_cut_off() -> None:
    """A 4 x 8 mask (half the model's 8 x 8 resolution) over a centre crop of a 16 x 32
    frame: the model sees frame columns 8-23, scaled by 2."""
    ids = np.arange(32, dtype=np.float32).reshape(1, 4, 8)
    dec = build_decoder(manifest([1, 4, 8]), {})
    placement = Placement(16, 32, 8, 8, 2.0, 2.0, 8.0, 0.0)
    framed = seg(dec.decode({"mask": ids}, placement)).in_frame()
    assert framed.shape == (16, 32)
    assert (framed[:, :8] == -1).all() and (framed[:, 24:] == -1).all()
    # frame (x=9, y=5) is model (0.5, 2.5): mask column 0 (8 wide over 8), row 1 (4 high over 8)
    assert framed[5, 9] == 8 and framed[15, 23] == 31
    assert seg(dec.decode({"mask": ids}, None)).in_frame().shape == (4, 8)


def test_segmentation_contract_errors() -> None:
    with pytest.raises(ContractError, match=r"3-D or 4-D"):
        build_decoder(manifest([1, 64]), {})
    with pytest.raises(ContractError, match=r"class ids \[3\].*3 classes"):
        build_decoder(manifest([1, 8, 8, 3]), {"mask": {3: "x"}})
    dec = build_decoder(manifest([1, 8, 8, 3]), {})
    with pytest.raises(ContractError, match="shape"):
        dec.decode({"mask": np.zeros((1, 8, 8, 4), np.float32)}, None)
