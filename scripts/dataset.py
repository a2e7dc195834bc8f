"""The digits data set and its fixed split, as every script reads it.

``build_models.py`` draws the split once from scikit-learn's bundled ``load_digits`` (a fixed
seed, stratified) and writes it to ``models/data/digits.npz``; everything after that (demo,
benchmarks, evaluation, tests) reads that file, so no script needs scikit-learn and every
figure is computed on the same held-out samples.

Splits: ``train`` fits the models, ``calib`` chooses thresholds and calibration, ``test`` is
held out for every reported figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloud.pipeline.data import Split, SplitData, load_split

__all__ = ["DEFAULT_DATA", "ROOT", "Digits", "Split", "load", "make_split"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "models" / "data" / "digits.npz"
SEED = 7
TEST_FRACTION = 0.2
CALIB_SIZE = 270


#: The split's types are the model pipeline's (``cloud/pipeline/data.py``, NumPy only).
Digits = SplitData


def make_split(path: Path) -> Digits:
    """Draw the fixed split from scikit-learn's bundled data and save it (build time only)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=y, random_state=SEED)
    train, calib = train_test_split(rest, test_size=CALIB_SIZE, stratify=y[rest], random_state=SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        x=x.astype(np.uint8),
        y=y.astype(np.int64),
        train=np.sort(train),
        calib=np.sort(calib),
        test=np.sort(test),
    )
    return load(path)


def load(path: Path = DEFAULT_DATA) -> Digits:
    """The saved split; needs only NumPy."""
    return load_split(path)
