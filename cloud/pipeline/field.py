"""Field samples as the retraining pipeline reads them: feature rows, the operator's label
where one was given, and (for benchmarks on synthetic shifts only) the true label.

Two sources give the same ``FieldData``: the fleet's sample store
(``cloud.fleet.samples.store.SampleStore.export``, what devices uploaded) and a ``.npz`` file
(``x``, optionally ``label``: operator labels, -1 for none; optionally ``truth``: true labels,
used for reporting only, never for training; optionally ``kind``: "escalation" or "audit", as
the device captured it). NumPy only: it is written by the command's process and read by the
training process.

The training process orders the samples by id (``by_id``) before its seeded split, so a
candidate depends on which samples were captured, not on the order they arrived in (two
devices' uploads interleave differently from one run to the next).

Labels a device claimed are never used: at retrain time every sample is labelled by the
teacher (the cloud model), unless an operator labelled it (``label_source == "operator"``),
which wins.

The store is keyed on (fleet, device, id): the same payload uploaded by two devices is two
rows. ``unique`` keeps one per id before the split, so no copy of a held-out or calibration
sample is trained on (the held-out figures and the calibrated threshold, and the guarantee's
assumption of calibration data independent of training, depend on it). ``check_labels``
refuses operator labels that are not one of the model's classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ContractError

log = logging.getLogger(__name__)
OPERATOR = "operator"
#: a captured sample's ``kind`` (``shared.samples.SampleMeta.kind``); "" when not known
ESCALATION, AUDIT = "escalation", "audit"


@dataclass(frozen=True)
class FieldData:
    x: np.ndarray  # float32 [n, features]
    operator_label: np.ndarray  # int64 [n], -1: no operator label
    ids: np.ndarray  # str [n]
    truth: np.ndarray | None = None  # int64 [n]: reporting only (synthetic benchmarks)
    kind: np.ndarray | None = None  # str [n]: "escalation" | "audit" | "" (not known)

    def __len__(self) -> int:
        return len(self.x)

    def kinds(self) -> np.ndarray:
        """Each sample's kind ("" where the source did not say)."""
        return np.full(len(self), "") if self.kind is None else self.kind.astype(str)

    def take(self, index: np.ndarray | slice) -> FieldData:
        truth = None if self.truth is None else self.truth[index]
        kind = None if self.kind is None else self.kind[index]
        return FieldData(self.x[index], self.operator_label[index], self.ids[index], truth, kind)

    def newest(self, n: int) -> FieldData:
        """The last ``n`` (sources list oldest first)."""
        if len(self) <= n:
            return self
        return self.take(slice(len(self) - n, None))

    def by_id(self) -> FieldData:
        """The same samples ordered by id (a stable sort: equal ids keep their order)."""
        return self.take(np.argsort(self.ids.astype(str), kind="stable"))

    def unique(self) -> FieldData:
        """One sample per id, where each first occurs (sources list oldest first). A copy's
        operator label is kept if any copy has one; copies with different operator labels
        keep the smallest (deterministic: the same store gives the same candidate), logged
        as a warning with the id and the labels."""
        ids = self.ids.astype(str)
        _, first = np.unique(ids, return_index=True)
        if len(first) == len(self):
            return self
        keep = np.sort(first)
        labels: dict[str, set[int]] = {}
        for i, label in zip(ids.tolist(), self.operator_label.tolist()):
            if label >= 0:
                labels.setdefault(i, set()).add(int(label))
        chosen = self.operator_label[keep].copy()
        for j, i in enumerate(ids[keep].tolist()):
            if i in labels:
                chosen[j] = min(labels[i])
                if len(labels[i]) > 1:
                    log.warning(
                        "field sample %s has copies with different operator labels %s: using %d",
                        i,
                        sorted(labels[i]),
                        chosen[j],
                    )
        log.info("field samples: %d copies of %d ids dropped", len(self) - len(keep), len(keep))
        out = self.take(keep)
        return FieldData(out.x, chosen, out.ids, out.truth, out.kind)

    def save(self, path: Path) -> None:
        extra: dict[str, Any] = {} if self.truth is None else {"truth": self.truth}
        if self.kind is not None:
            extra["kind"] = self.kind.astype(str)
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
            kind = np.asarray(f["kind"]).astype(str) if "kind" in f else None
    except (OSError, KeyError, ValueError) as exc:
        raise ContractError(
            f"{path} is not a field-sample file (x[, label, truth]): {exc}"
        ) from None
    if (
        x.ndim != 2
        or len(label) != n
        or len(ids) != n
        or (truth is not None and len(truth) != n)
        or (kind is not None and len(kind) != n)
    ):
        raise ContractError(f"{path}: x must be [n, features] and label/truth/ids/kind of length n")
    return FieldData(x, label, ids, truth, kind)


def check_labels(field: FieldData, classes: int) -> None:
    """``ContractError`` naming the samples whose operator label is not one of the model's
    ``classes`` (the store accepts any label below 1024): the retrain refuses rather than
    guess what the operator meant; -1 is "no operator label"."""
    bad = (field.operator_label < -1) | (field.operator_label >= classes)
    if bad.any():
        named = ", ".join(
            f"{i} ({label})"
            for i, label in zip(field.ids[bad][:10].tolist(), field.operator_label[bad].tolist())
        )
        more = f" and {int(bad.sum()) - 10} more" if bad.sum() > 10 else ""
        raise ContractError(
            f"{int(bad.sum())} field samples have an operator label outside the model's "
            f"{classes} classes (0..{classes - 1}): {named}{more}; relabel them "
            "(PUT /fleet/samples/{device}/{id}/label) and retrain"
        )


def from_samples(samples: Sequence[Any], features: int) -> tuple[FieldData, int]:
    """``FieldSample``s of the store (duck-typed: ``cloud.fleet`` is not imported here), one
    per id (``FieldData.unique``: two devices' copies of a payload are one sample), and how
    many were skipped (encoded images, or rows that are not ``features`` long)."""
    rows, labels, ids, kinds = [], [], [], []
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
        kinds.append(str(getattr(s, "kind", "") or ""))
    if not rows:
        return FieldData(
            np.zeros((0, features), np.float32), np.zeros(0, np.int64), np.zeros(0, str)
        ), skipped
    return FieldData(
        np.stack(rows), np.asarray(labels, np.int64), np.asarray(ids), kind=np.asarray(kinds)
    ).unique(), skipped


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


def capture_weights(kinds: np.ndarray, audit_rate: float) -> np.ndarray:
    """Importance weights that make captured samples stand for the requests they came from:
    an escalation is captured whenever it happens (weight 1), an audit is a random
    ``audit_rate`` share of the confident answers, so each stands for ``1 / audit_rate`` of
    them; a sample of unknown kind counts once."""
    if not 0.0 < audit_rate <= 1.0:
        raise ValueError(f"audit_rate must be in (0, 1], got {audit_rate}")
    return np.where(np.asarray(kinds).astype(str) == AUDIT, 1.0 / audit_rate, 1.0)


def teacher_labels(field: FieldData, teacher_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label each sample trains with, and the soft targets distillation uses: the
    teacher's, or a one-hot of the operator's label where there is one (it wins)."""
    labels = teacher_probs.argmax(axis=1).astype(np.int64)
    soft = teacher_probs.astype(np.float32).copy()
    operator = field.operator_label >= 0
    labels[operator] = field.operator_label[operator]
    soft[operator] = np.eye(teacher_probs.shape[1], dtype=np.float32)[labels[operator]]
    return labels, soft
