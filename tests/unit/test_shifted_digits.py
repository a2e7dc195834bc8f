"""``scripts/shifted_digits.py``: the shifted stream is deterministic for a seed, made only
from held-out images, and its field pool and held-out set share no source image.

The script runs as a user runs it (tests import nothing from ``scripts/``): ``--dump`` writes
the stream's arrays without loading any model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SPLIT = ROOT / "models" / "data" / "digits.npz"


def stream(tmp_path: Path, seed: int, field: int = 400) -> dict[str, np.ndarray]:
    out = tmp_path / f"stream-{seed}-{field}.npz"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "shifted_digits.py"),
            "--seed",
            str(seed),
            "--field",
            str(field),
            "--dump",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_same_seed_same_stream_other_seed_another(tmp_path: Path) -> None:
    a, b, c = stream(tmp_path / "a", 3), stream(tmp_path / "b", 3), stream(tmp_path / "c", 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["field_x"], c["field_x"])
    assert not np.array_equal(a["heldout_sources"], c["heldout_sources"])


def test_sources_are_held_out_and_disjoint(tmp_path: Path) -> None:
    s = stream(tmp_path, 15, field=2000)
    with np.load(SPLIT) as f:
        test, seen = set(f["test"].tolist()), set(f["train"].tolist()) | set(f["calib"].tolist())
    field, heldout = set(s["field_sources"].tolist()), set(s["heldout_sources"].tolist())
    assert field and heldout
    assert field | heldout <= test
    assert not (field | heldout) & seen
    assert not field & heldout
    assert len(s["field_x"]) == 2000
    assert len(field | heldout) == len(test)  # every held-out image used, once per side


def test_samples_stay_on_the_models_integer_grid(tmp_path: Path) -> None:
    s = stream(tmp_path, 15)
    for key in ("field_x", "heldout_x"):
        x = s[key]
        assert x.shape[1] == 64
        assert np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 16
    with np.load(SPLIT) as f:
        truth = f["y"]
    np.testing.assert_array_equal(s["field_y"], truth[s["field_sources"]])
    np.testing.assert_array_equal(s["heldout_y"], truth[s["heldout_sources"]])
