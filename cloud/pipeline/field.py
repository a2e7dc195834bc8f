"""Field samples as the retraining pipeline reads them: feature rows, the operator's label
where one was given, and (for benchmarks on synthetic shifts only) the true label.

Two sources give the same ``FieldData``: the fleet's sample store
(``cloud.fleet.samples.store.SampleStore.export``, what devices uploaded) and a ``.npz`` file
(``x``, optionally ``label``: operator labels, -1 for none; optionally ``truth``: true labels,
used for reporting only, never for training). NumPy only: it is written by the command's
process and read by the training process.

Labels a device claimed are never used: at retrain time every sample is labelled by the
teacher (the cloud model), unless an operator labelled it (``label_source == "operator"``),
which wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ContractError

OPERATOR = "operator"


@dataclass(frozen=True)
class FieldData:
    x: np.ndarray  # float32 [n, features]
    operator_label: np.ndarray  # int64 [n], -1: no operator label
    ids: np.ndarray  # str [n]
    truth: np.ndarray | None = None  # int64 [n]: reporting only (synthetic benchmarks)

    def __len__(self) -> int:
        return len(self.x)

    def newest(self, n: int) -> FieldData:
        """The last ``n`` (sources list oldest first)."""
        if len(self) <= n:
            return self
        cut = slice(len(self) - n, None)
        truth = None if self.truth is None else self.truth[cut]
        return FieldData(self.x[cut], self.operator_label[cut], self.ids[cut], truth)

    def save(self, path: Path) -> None:
        extra: dict[str, Any] = {} if self.truth is None else {"truth": self.truth}
        np.savez(path, x=self.x, label=self.operator_label, ids=self.ids, **extra)


def load_npz(path: Path) -> FieldData:
    """``x`` and optional ``label``/``truth``/``ids``; ``ContractError`` if malformed."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x = np.asarray(f["x"], dtype=np.float32)
            n = len(x)
            label = (
                np.asarray(f["label"], dtype=np.int64)
                if "label" in f
                else np.full(n, -1, dtype=np.int64)
            )
            truth = np.asarray(f["truth"], dtype=np.int64) if "truth" in f else None
            ids = (
                np.asarray(f["ids"]).astype(str)
                if "ids" in f
                else np.asarray([f"npz-{i}" for i in range(n)])
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ContractError(
            f"{path} is not a field-sample file (x[, label, truth]): {exc}"
        ) from None
    if x.ndim != 2 or len(label) != n or len(ids) != n or (truth is not None and len(truth) != n):
        raise ContractError(f"{path}: x must be [n, features] and label/truth/ids of length n")
    return FieldData(x, label, ids, truth)


def from_samples(samples: Sequence[Any], features: int) -> tuple[FieldData, int]:
    """``FieldSample``s of the store (duck-typed: ``cloud.fleet`` is not imported here), and
    how many were skipped (encoded images, or rows that are not ``features`` long)."""
    rows, labels, ids = [], [], []
    skipped = 0
    for s in samples:
        x = getattr(s, "features", None)
        if x is None or np.asarray(x).size != features:
            skipped += 1
            continue
        rows.append(np.asarray(x, dtype=np.float32).reshape(features))
        operator = getattr(s, "label_source", None) == OPERATOR and s.label is not None
        labels.append(int(s.label) if operator else -1)
        ids.append(str(s.id))
    if not rows:
        return FieldData(
            np.zeros((0, features), np.float32), np.zeros(0, np.int64), np.zeros(0, str)
        ), skipped
    return FieldData(np.stack(rows), np.asarray(labels, np.int64), np.asarray(ids)), skipped


@dataclass(frozen=True)
class FieldSplit:
    """Index arrays into the field data: ``train`` joins the training split, ``calib`` the
    calibration split, ``test`` is held out for the report."""

    train: np.ndarray
    calib: np.ndarray
    test: np.ndarray


def split_field(n: int, test_share: float, calib_share: float, seed: int) -> FieldSplit:
    """A seeded permutation cut into the three shares (sorted, so order is the file's)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_share)
    n_calib = round(n * calib_share)
    return FieldSplit(
        train=np.sort(perm[n_test + n_calib :]),
        calib=np.sort(perm[n_test : n_test + n_calib]),
        test=np.sort(perm[:n_test]),
    )


def teacher_labels(field: FieldData, teacher_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label each sample trains with, and the soft targets distillation uses: the
    teacher's, or a one-hot of the operator's label where there is one (it wins)."""
    labels = teacher_probs.argmax(axis=1).astype(np.int64)
    soft = teacher_probs.astype(np.float32).copy()
    operator = field.operator_label >= 0
    labels[operator] = field.operator_label[operator]
    soft[operator] = np.eye(teacher_probs.shape[1], dtype=np.float32)[labels[operator]]
    return labels, soft
