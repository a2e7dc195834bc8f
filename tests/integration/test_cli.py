"""The two command lines, run in-process with real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main as agent_main
from cloud.cli import build_parser as cloud_parser
from cloud.pipeline.data import SplitData
from tests.helpers import EDGE_INT8, ROOT


def test_agent_infer_a_file(
    tmp_path: Path, digits: SplitData, cloud_url: str, capsys: pytest.CaptureFixture[str]
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


def test_keys_and_package_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.cli import main as cloud_main
    from cloud.releases.registry import Registry
    from shared.signing import TrustStore
    from tests.helpers import EDGE_F32

    assert cloud_main(["keys", "generate", "--dir", str(tmp_path / "keys")]) == 0
    key_id = json.loads(capsys.readouterr().out)["key_id"]
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        cloud_main(["keys", "generate", "--dir", str(tmp_path / "keys")])
    trust = TrustStore.load(tmp_path / "keys" / "trust.json")
    assert key_id in trust.keys
    args = [
        "model",
        "package",
        "--edge",
        str(EDGE_F32 / "model.tflite"),
        "--template",
        str(EDGE_F32),
        "--registry",
        str(tmp_path / "reg"),
        "--key",
        str(tmp_path / "keys" / "operator.key"),
        "--cloud-model",
        "digits-cloud",
        "--cloud-version",
        "1",
        "--threshold",
        "0.9",
    ]
    assert cloud_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 1 and out["key_id"] == key_id
    manifest = Registry(tmp_path / "reg").manifest("digits", 1)
    trust.verify(manifest)
    assert (
        manifest.routing.threshold == 0.9 and manifest.edge.url == "/registry/digits/1/model.tflite"
    )
    # the same version again is refused: releases only go up
    assert cloud_main([*args, "--version", "1"]) == 1
    assert "must be higher" in capsys.readouterr().err


def test_package_refuses_a_model_that_does_not_match_its_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.cli import main as cloud_main
    from shared.manifest import Manifest
    from tests.helpers import EDGE_F32

    cloud_main(["keys", "generate", "--dir", str(tmp_path / "keys")])
    m = Manifest.load(EDGE_F32)
    wrong = m.model_copy(
        update={"golden": [g.model_copy(update={"label": (g.label + 1) % 10}) for g in m.golden]}
    )
    (tmp_path / "t.json").write_text(wrong.to_json())
    code = cloud_main(
        [
            "model",
            "package",
            "--edge",
            str(EDGE_F32 / "model.tflite"),
            "--template",
            str(tmp_path / "t.json"),
            "--registry",
            str(tmp_path / "reg"),
            "--key",
            str(tmp_path / "keys" / "operator.key"),
        ]
    )
    assert code == 1 and "golden sample 0" in capsys.readouterr().err
    assert not (tmp_path / "reg" / "digits").exists()


def test_package_refuses_an_out_of_range_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.cli import main as cloud_main
    from tests.helpers import EDGE_F32

    cloud_main(["keys", "generate", "--dir", str(tmp_path / "keys")])
    capsys.readouterr()
    argv = [
        "model",
        "package",
        "--edge",
        str(EDGE_F32 / "model.tflite"),
        "--template",
        str(EDGE_F32),
        "--registry",
        str(tmp_path / "reg"),
        "--key",
        str(tmp_path / "keys" / "operator.key"),
        "--threshold",
        "5",
    ]
    with pytest.raises(SystemExit) as caught:
        cloud_main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "threshold: Input should be less than or equal to 1" in err
    assert not (tmp_path / "reg" / "digits").exists()  # nothing signed, nothing published


#: A child process as on Python 3.10: no ``tomllib``, its backport ``tomli`` instead (here a
#: stand-in that counts its calls and parses with the real ``tomllib``).
NO_TOMLLIB = """
import json, sys, tomllib, types
calls = []
tomli = types.ModuleType("tomli")
tomli.loads = lambda text: calls.append(1) or tomllib.loads(text)
tomli.TOMLDecodeError = tomllib.TOMLDecodeError
sys.modules["tomllib"] = None
sys.modules["tomli"] = tomli
from agent.settings import AgentSettings
from cloud.cli import main
port = AgentSettings.load(sys.argv[1]).server.port
try:
    code = main(["model", "optimize", "--settings", sys.argv[2]])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"port": port, "code": code, "tomli_calls": len(calls)}))
"""


def test_settings_files_are_read_with_tomli_where_there_is_no_tomllib(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("[server]\nport = 9123\n")
    (tmp_path / "optimize.toml").write_text(
        'data = "d.npz"\nteacher = "t.onnx"\nout = "out"\nepochs = 0\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", NO_TOMLLIB, tmp_path / "agent.toml", tmp_path / "optimize.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    # both files parsed (the optimize one far enough to find its bad value), by tomli
    assert result == {"port": 9123, "code": 2, "tomli_calls": 2}
    assert "epochs: Input should be greater than or equal to 1" in done.stderr


def _infer_child(
    tmp_path: Path, digits: SplitData, cloud_url: str, **env: str
) -> subprocess.CompletedProcess[str]:
    np.save(tmp_path / "rows.npy", digits.test.x[:3])
    argv = ["--model-dir", str(EDGE_INT8), "--cloud-url", cloud_url, "infer"]
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv, str(tmp_path / "rows.npy"), "--mode", "cloud"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_cloud_requests_are_not_logged_one_by_one(
    tmp_path: Path, digits: SplitData, cloud_url: str
) -> None:
    """httpx logs each request at INFO: on a device, most of its log and its SD card's wear."""
    done = _infer_child(tmp_path, digits, cloud_url, TANDEM_AGENT_LOG_LEVEL="INFO")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["source"] for line in done.stdout.splitlines()] == ["cloud"] * 3
    assert "HTTP Request" not in done.stderr and "httpx" not in done.stderr, done.stderr
    # positive control: at DEBUG the same run does log them
    debug = _infer_child(tmp_path, digits, cloud_url, TANDEM_AGENT_LOG_LEVEL="DEBUG")
    assert debug.returncode == 0 and debug.stderr.count("INFO httpx: HTTP Request: POST") == 3
