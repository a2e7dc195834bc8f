"""Field samples ordered by id before the seeded split (``FieldData.by_id``): which samples
land in training, calibration and held-out depends on which were captured, not on the order
two devices' uploads happened to arrive in; the capture's kind travels with each sample."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.pipeline.field import FieldData, from_samples, load_npz, split_field


@dataclass(frozen=True)
class Sample:
    features: np.ndarray | None
    label: int | None
    label_source: str | None
    id: str
    kind: str


def field_of(order: np.ndarray) -> FieldData:
    ids = np.array([f"{i:04x}" for i in range(40)])[order]
    x = np.arange(40, dtype=np.float32)[order, None].repeat(2, axis=1)
    kind = np.where(np.arange(40)[order] % 10 == 0, "audit", "escalation")
    return FieldData(x, np.full(40, -1), ids, kind=kind)


def split_ids(field: FieldData) -> list[set[str]]:
    ordered = field.by_id()
    cut = split_field(len(ordered), 0.25, 0.25, seed=7)
    return [set(ordered.ids[part].tolist()) for part in (cut.train, cut.calib, cut.test)]


def test_the_split_depends_on_which_samples_not_their_arrival_order() -> None:
    arrival = field_of(np.arange(40))
    shuffled = field_of(np.random.default_rng(3).permutation(40))
    assert split_ids(arrival) == split_ids(shuffled)
    ordered = shuffled.by_id()
    assert list(ordered.ids) == sorted(ordered.ids)
    assert ordered.x[:, 0].tolist() == list(range(40))  # rows move with their ids
    assert (
        ordered.kind is not None and ordered.kind[0] == "audit" and ordered.kind[1] == "escalation"
    )


def test_kinds_come_from_the_store_and_survive_the_file(tmp_path: Path) -> None:
    row = np.zeros(2, np.float32)
    field, _ = from_samples(
        [Sample(row, None, None, "b", "audit"), Sample(row, None, None, "a", "escalation")], 2
    )
    assert field.kinds().tolist() == ["audit", "escalation"]
    field.save(tmp_path / "f.npz")
    again = load_npz(tmp_path / "f.npz")
    assert again.kinds().tolist() == ["audit", "escalation"]
    assert again.by_id().kinds().tolist() == ["escalation", "audit"]
    np.savez(tmp_path / "bare.npz", x=np.zeros((3, 2), np.float32))
    assert load_npz(tmp_path / "bare.npz").kinds().tolist() == ["", "", ""]
