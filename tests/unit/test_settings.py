"""Settings: defaults, TOML file, environment over file, overrides over both, typos refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.backends import OnnxSettings
from agent.settings import AgentSettings
from cloud.settings import CloudSettings


def test_defaults_need_no_file() -> None:
    s = AgentSettings.load()
    assert s.routing.mode == "auto" and s.cloud.url is None and s.backend.kind == "tflite"


def test_toml_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        'model_dir = "/opt/model"\n[routing]\nthreshold = 0.7\nmode = "edge"\n'
        '[cloud]\nurl = "http://cloud:8000"\ntoken = "t0k"\n[backend]\nkind = "onnx"\n'
    )
    s = AgentSettings.load(f)
    assert s.model_dir == Path("/opt/model") and s.routing.threshold == 0.7
    assert isinstance(s.backend, OnnxSettings)
    assert s.cloud.token is not None and s.cloud.token.get_secret_value() == "t0k"
    assert "t0k" not in repr(s)  # secrets never printed
    monkeypatch.setenv("TANDEM_AGENT_ROUTING__THRESHOLD", "0.9")
    assert AgentSettings.load(f).routing.threshold == 0.9
    assert AgentSettings.load(f, model_dir=Path("/x")).model_dir == Path("/x")


def test_typos_in_a_file_are_errors(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("[routing]\nthreshhold = 0.7\n")
    with pytest.raises(ValidationError, match="threshhold"):
        AgentSettings.load(f)
    with pytest.raises(FileNotFoundError):
        AgentSettings.load(tmp_path / "missing.toml")


def test_cloud_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CLOUD_PORT", "9001")
    monkeypatch.setenv("TANDEM_CLOUD_ORT__INTRA_OP_THREADS", "2")
    s = CloudSettings.load()
    assert s.port == 9001 and s.ort.intra_op_threads == 2
