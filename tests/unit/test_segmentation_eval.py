"""cloud.pipeline.segmentation_eval: ownership maps to class ids, and the scores."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.pipeline import segmentation_eval
from cloud.pipeline.scenes import Scenes, make_scenes


def two_digit_scene() -> Scenes:
    """One 4 x 4 picture: digit slot 0 is a 7 (top-left block), slot 1 a 0 (one pixel of
    the bottom-right block), slot 2 padding."""
    owners = np.full((1, 4, 4), -1, dtype=np.int8)
    owners[0, :2, :2] = 0
    owners[0, 3, 3] = 1
    classes = np.array([[7, 0, -1]])
    return Scenes(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3, 4)), classes, owners)


def test_class_maps_name_each_pixels_digit_and_pool_by_majority() -> None:
    scene = two_digit_scene()
    pixels = segmentation_eval.class_maps(scene)
    assert pixels.dtype == np.uint8
    assert pixels[0].tolist() == [[8, 8, 0, 0], [8, 8, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    # 2 x 2 blocks: the 7 fills its block; the 0 has one pixel of four (background wins)
    assert segmentation_eval.class_maps(scene, stride=2)[0].tolist() == [[8, 0], [0, 0]]
    assert segmentation_eval.LABELS[8] == "7" and segmentation_eval.LABELS[1] == "0"


def test_class_maps_of_real_scenes_hold_their_digits() -> None:
    scenes = make_scenes(4, seed=3, owners=True)
    maps = segmentation_eval.class_maps(scenes)
    for i in range(len(scenes)):
        assert set(np.unique(maps[i])) == {0, *(int(c) + 1 for c in scenes.objects(i)[1])}
    with pytest.raises(ValueError, match="owners"):
        segmentation_eval.class_maps(make_scenes(1, seed=3))
    with pytest.raises(ValueError, match="stride"):
        segmentation_eval.class_maps(scenes, stride=5)


def test_scores_count_pixels_and_iou_per_class() -> None:
    truth = np.array([[0, 0, 1, 1]])
    predicted = np.array([[0, 1, 1, 2]])
    got = segmentation_eval.scores(predicted, truth)
    assert got.pixel_accuracy == 0.5
    assert got.digit_pixel_accuracy == 0.5  # of the two class-1 pixels, one is right
    # background 1/2, "0" (class 1) 1/3, "1" (class 2, predicted only) 0
    assert got.iou == {"background": 0.5, "0": pytest.approx(1 / 3), "1": 0.0}
    assert got.mean_iou == pytest.approx((0.5 + 1 / 3 + 0.0) / 3)
    perfect = segmentation_eval.scores(truth, truth)
    assert (perfect.pixel_accuracy, perfect.mean_iou) == (1.0, 1.0)


def test_max_prob_quantile_is_the_low_tail() -> None:
    probs = np.zeros((10, 10, 2), np.float32)
    probs[..., 0] = 1.0
    probs[0, :5] = (0.6, 0.4)  # 5% of the pixels unsure
    assert segmentation_eval.max_prob_quantile(probs, 0.02) == pytest.approx(0.6)
    assert segmentation_eval.max_prob_quantile(probs, 0.5) == 1.0
