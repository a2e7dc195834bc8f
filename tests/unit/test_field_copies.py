"""One sample per id before the retrain's split (``FieldData.unique``): the sample store is
keyed on (fleet, device, id), so the same payload uploaded by two devices is two rows, and
without this the copies of one sample land in training, calibration and held-out alike (the
held-out figures and the calibrated threshold then measure rows the model trained on).
Operator labels outside the model's classes are refused (``check_labels``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cloud.fleet.samples.store import FieldSample, SampleStore
from cloud.fleet.store import FleetStore
from cloud.pipeline.field import FieldData, check_labels, from_samples, split_field
from shared.errors import ContractError
from tests.sample_items import feature_item


def parts(field: FieldData) -> list[set[str]]:
    ordered = field.by_id()
    cut = split_field(len(ordered), 0.2, 0.2, seed=7)
    return [set(ordered.ids[p].tolist()) for p in (cut.train, cut.calib, cut.test)]


def test_two_devices_uploading_the_same_rows_give_each_sample_once(tmp_path: Path) -> None:
    """The real store on SQLite: two devices upload the same 50 rows; an operator labels
    one of them on the second device only."""
    store = FleetStore(tmp_path / "fleet.db")
    try:
        samples = SampleStore(store, tmp_path / "samples")
        rows = np.random.default_rng(1).integers(0, 17, (50, 64)).astype(np.float32)
        items = [feature_item(row, i) for i, row in enumerate(rows)]
        for device in ("dev-1", "dev-2"):
            assert samples.add("plant", device, items).stored == 50
        assert samples.label("plant", "dev-2", items[0][0].id, 4)
        exported = samples.export("plant", "digits")
    finally:
        store.close()
    field, skipped = from_samples(exported, 64)
    assert skipped == 0 and len(field) == 50 and len(set(field.ids.tolist())) == 50
    train, calib, test = parts(field)
    assert not (train & calib or train & test or calib & test)
    assert len(train | calib | test) == 50
    labelled = field.operator_label[field.ids == items[0][0].id]
    assert labelled.tolist() == [4]  # the operator's label survives whichever copy had it


def sample(row: float, label: int | None, source: str | None, id: str, device: str) -> FieldSample:
    return FieldSample(
        np.full(2, row, np.float32), label, source, None, "escalation", device, 1, id
    )


def test_copies_with_different_operator_labels_keep_one_deterministically(
    caplog: pytest.LogCaptureFixture,
) -> None:
    copies = [
        sample(0.0, 7, "operator", "a", "dev-1"),
        sample(0.0, 2, "operator", "a", "dev-2"),
        sample(1.0, 5, "cloud", "b", "dev-1"),  # a device's claim: not an operator label
        sample(1.0, None, None, "b", "dev-2"),
        sample(2.0, None, None, "c", "dev-1"),
    ]
    with caplog.at_level(logging.WARNING, logger="cloud.pipeline.field"):
        field, _ = from_samples(copies, 2)
        again, _ = from_samples(copies[::-1], 2)
    assert field.ids.tolist() == ["a", "b", "c"]
    assert field.operator_label.tolist() == [2, -1, -1]
    assert again.by_id().operator_label.tolist() == [2, -1, -1]  # whatever the order
    assert "a has copies with different operator labels [2, 7]" in caplog.text


def test_operator_labels_outside_the_models_classes_are_refused() -> None:
    field = FieldData(
        np.zeros((4, 2), np.float32), np.array([-1, 9, 10, 1000]), np.array(["a", "b", "c", "d"])
    )
    check_labels(field.take(np.array([0, 1])), classes=10)
    with pytest.raises(ContractError, match=r"2 field samples .* 10 classes .*: c \(10\), d"):
        check_labels(field, classes=10)
