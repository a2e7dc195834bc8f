"""Field samples for retraining (``cloud.pipeline.field``): from the sample store's
``FieldSample``s and from ``.npz``, operator labels winning over the teacher's, the seeded
split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cloud.pipeline.field import (
    FieldData,
    from_samples,
    load_npz,
    split_field,
    teacher_labels,
)
from shared.errors import ContractError


@dataclass(frozen=True)
class Sample:
    """The fields of ``cloud.fleet.samples.store.FieldSample`` that retraining reads."""

    features: np.ndarray | None
    label: int | None
    label_source: str | None
    id: str


def test_store_samples_keep_feature_rows_and_operator_labels_only() -> None:
    row = np.arange(4, dtype=np.float32)
    field, skipped = from_samples(
        [
            Sample(row, 3, "operator", "a"),
            Sample(row + 1, 5, "cloud", "b"),  # the cloud's label: the teacher relabels
            Sample(None, 1, "operator", "c"),  # an encoded image: not a feature row
            Sample(np.zeros(5, np.float32), None, None, "d"),  # another model's shape
        ],
        features=4,
    )
    assert skipped == 2 and list(field.ids) == ["a", "b"]
    assert list(field.operator_label) == [3, -1]
    assert field.x.shape == (2, 4) and field.x.dtype == np.float32


def test_operator_labels_win_over_the_teacher() -> None:
    field = FieldData(
        np.zeros((3, 2), np.float32), np.array([-1, 0, -1]), np.array(["a", "b", "c"])
    )
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]], np.float32)
    labels, soft = teacher_labels(field, probs)
    assert list(labels) == [1, 0, 0]
    assert soft[1].tolist() == [1.0, 0.0] and soft[0].tolist() == pytest.approx([0.1, 0.9])


def test_the_split_is_seeded_and_covers_every_sample_once() -> None:
    a, b, c = (
        split_field(100, 0.25, 0.25, 7),
        split_field(100, 0.25, 0.25, 7),
        split_field(100, 0.25, 0.25, 8),
    )
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "calib", "test"))
    assert not np.array_equal(a.test, c.test)
    assert (len(a.train), len(a.calib), len(a.test)) == (50, 25, 25)
    assert sorted(np.concatenate([a.train, a.calib, a.test]).tolist()) == list(range(100))


def test_npz_round_trip_and_refusals(tmp_path: Path) -> None:
    field = FieldData(
        np.ones((3, 4), np.float32),
        np.array([-1, 2, -1]),
        np.array(["x", "y", "z"]),
        np.array([1, 2, 3]),
    )
    field.save(tmp_path / "f.npz")
    back = load_npz(tmp_path / "f.npz")
    assert back.truth is not None and list(back.truth) == [1, 2, 3]
    assert list(back.operator_label) == [-1, 2, -1] and list(back.newest(2).ids) == ["y", "z"]
    np.savez(tmp_path / "plain.npz", x=np.zeros((2, 4)))
    plain = load_npz(tmp_path / "plain.npz")
    assert list(plain.operator_label) == [-1, -1] and plain.truth is None
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 4)), label=np.zeros(3))
    with pytest.raises(ContractError, match="length"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "none.npz", y=np.zeros(2))
    with pytest.raises(ContractError, match="not a field-sample file"):
        load_npz(tmp_path / "none.npz")
