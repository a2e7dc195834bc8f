"""The split file every pipeline step reads: one ``.npz`` with ``x`` (raw features), ``y``
(integer labels) and the index arrays ``train``, ``calib`` and ``test``.

``train`` fits models, ``calib`` chooses temperatures and thresholds, ``test`` is held out for
every figure reported. ``scripts/dataset.py`` writes the digits split in this format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import ContractError


@dataclass(frozen=True)
class Split:
    """Raw features as float32 and their labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class SplitData:
    train: Split
    calib: Split
    test: Split

    @property
    def classes(self) -> int:
        return int(max(self.train.y.max(), self.calib.y.max(), self.test.y.max())) + 1


def load_split(path: Path) -> SplitData:
    """The three splits of ``path``; ``ContractError`` if the file is not in this format."""
    try:
        with np.load(path) as f:
            x = f["x"].astype(np.float32)
            y = f["y"].astype(np.int64)
            parts = [Split(x[f[name]], y[f[name]]) for name in ("train", "calib", "test")]
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ContractError(
            f"{path} is not a split file (x, y, train, calib, test): {exc}"
        ) from None
    return SplitData(*parts)
