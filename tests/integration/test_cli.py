"""The two command lines, run in-process with real models."""

from __future__ import annotations

import json
from pathlib import Path

import dataset
import numpy as np
import pytest

from agent.cli import main as agent_main
from cloud.cli import build_parser as cloud_parser
from tests.helpers import EDGE_INT8


def test_agent_infer_a_file(
    tmp_path: Path, digits: dataset.Digits, cloud_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "rows.npy", digits.test.x[:3])
    code = agent_main(
        [
            "--model-dir",
            str(EDGE_INT8),
            "--cloud-url",
            cloud_url,
            "infer",
            str(tmp_path / "rows.npy"),
            "--mode",
            "cloud",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["source"] for d in lines] == ["cloud"] * 3
    assert [d["label"] for d in lines] == [str(y) for y in digits.test.y[:3]]


def test_agent_reports_a_bad_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows.json").write_text("[[1, 2]]")
    code = agent_main(["--model-dir", str(tmp_path), "infer", str(tmp_path / "rows.json")])
    assert code == 1 and "cannot read manifest" in capsys.readouterr().err


def test_agent_reports_wrong_feature_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rows.json").write_text("[[1, 2]]")
    code = agent_main(["--model-dir", str(EDGE_INT8), "infer", str(tmp_path / "rows.json")])
    assert code == 1 and "expected 64 features" in capsys.readouterr().err


def test_cloud_cli_parses_serve() -> None:
    args = cloud_parser().parse_args(
        ["serve", "--repo", "r", "--port", "9", "--simulated-delay-ms", "5"]
    )
    assert (args.command, args.port, args.simulated_delay_ms) == ("serve", 9, 5.0)
