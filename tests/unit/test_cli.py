from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import read_rows


def test_read_rows_formats(tmp_path: Path) -> None:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "a.npy", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows.tolist()))
    np.savetxt(tmp_path / "a.csv", rows, delimiter=",")
    (tmp_path / "one.json").write_text("[1, 2, 3, 4]")
    for name in ("a.npy", "a.json", "a.csv"):
        np.testing.assert_array_equal(read_rows(tmp_path / name), rows)
    assert read_rows(tmp_path / "one.json").shape == (1, 4)


def test_unreadable_file_exits_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read"):
        read_rows(tmp_path / "bad.json")
