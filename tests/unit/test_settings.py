"""Settings: defaults, TOML file, environment over file, overrides over both, typos refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.inference.backends import OnnxSettings
from agent.settings import AgentSettings
from cloud.settings import CloudSettings
from shared.settings_files import SettingsError


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
    with pytest.raises(SettingsError, match="threshhold"):
        AgentSettings.load(f)
    with pytest.raises(SettingsError, match="does not exist"):
        AgentSettings.load(tmp_path / "missing.toml")
    f.write_text("[routing\n")
    with pytest.raises(SettingsError, match="cannot read"):
        AgentSettings.load(f)


def test_cloud_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CLOUD_PORT", "9001")
    monkeypatch.setenv("TANDEM_CLOUD_ORT__INTRA_OP_THREADS", "2")
    s = CloudSettings.load()
    assert s.port == 9001 and s.ort.intra_op_threads == 2


def test_overrides_are_validated_and_merged_with_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[server]\nhost = "0.0.0.0"\n[mqtt]\nurl = "mqtt://a:1"\nusername = "dev-3"\n')
    monkeypatch.setenv("TANDEM_AGENT_MQTT__PASSWORD", "pw-env")
    s = AgentSettings.load(f, server={"port": 9000}, mqtt={"url": "mqtt://b:2"})
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9000)  # the file's host is kept
    assert s.mqtt is not None and (s.mqtt.url, s.mqtt.username) == ("mqtt://b:2", "dev-3")
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "pw-env"
    with pytest.raises(SettingsError) as caught:
        AgentSettings.load(f, server={"port": 99999}, device="no spaces")
    message = caught.value.message
    assert "\n" not in message
    assert "server.port: Input should be less than or equal to 65535 (got 99999)" in message
    assert "device: String should match pattern" in message


def test_a_bad_secret_is_not_repeated_in_the_error() -> None:
    with pytest.raises(SettingsError, match="tokens: Input should be a valid list") as caught:
        CloudSettings.load(tokens="hunter2-not-a-list")
    assert "hunter2" not in caught.value.message
