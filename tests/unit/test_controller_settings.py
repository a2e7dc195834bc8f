"""The ``[controller]`` section of the cloud settings: one definition (the fleet controller's
own settings are it), set by the file, the environment and, strongest, the fleet flags; and
loading settings does not import the rollout code."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.app import create_app
from cloud.cli import build_parser
from cloud.cli import main as cloud_main
from cloud.fleet.cli import fleet_overrides
from cloud.fleet.controller import ControllerSettings as FleetControllerSettings
from cloud.settings import CloudSettings, ControllerSettings
from shared.mqtt import MqttSettings
from shared.settings_files import SettingsError
from tests.helpers import ROOT


def test_the_fleet_controller_settings_are_the_sections() -> None:
    assert FleetControllerSettings is ControllerSettings
    ctl = CloudSettings().controller
    assert (ctl.run_in_server, ctl.lease_ttl_s, ctl.poll_s, ctl.wave_poll_s) == (
        False,
        15.0,
        1.0,
        0.2,
    )


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text("[controller]\nrun_in_server = true\nlease_ttl_s = 9\npoll_s = 3\n")
    assert CloudSettings.load(config).controller.lease_ttl_s == 9.0
    monkeypatch.setenv("TANDEM_CLOUD_CONTROLLER__LEASE_TTL_S", "4")
    settings = CloudSettings.load(config)
    assert (settings.controller.run_in_server, settings.controller.lease_ttl_s) == (True, 4.0)
    assert settings.controller.poll_s == 3.0
    args = build_parser().parse_args(["fleet", "controller", "--lease-ttl", "2"])
    flagged = CloudSettings.load(config, **fleet_overrides(args)).controller
    # the flag over the environment, the rest of the section kept
    assert (flagged.run_in_server, flagged.lease_ttl_s, flagged.poll_s) == (True, 2.0, 3.0)


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["fleet", "controller", "--lease-ttl", "0"], "controller.lease_ttl_s"),
        (["fleet", "rollout", "digits@2", "--poll", "-1"], "controller.poll_s"),
    ],
)
def test_a_bad_flag_is_a_settings_error(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cloud_main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2, err
    assert err.startswith("tandem-cloud: error: ") and f"{field}: " in err, err


def test_a_bad_environment_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CLOUD_CONTROLLER__POLL_S", "0")
    with pytest.raises(SettingsError, match=r"controller\.poll_s"):
        CloudSettings.load()


def test_loading_settings_does_not_import_the_rollout_code() -> None:
    code = (
        "import sys; from cloud.settings import CloudSettings; CloudSettings()\n"
        "print(sorted(m for m in sys.modules if m.startswith('cloud.fleet')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out


def test_the_server_runs_a_controller_only_when_asked_and_able(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No broker or no registry: nothing to run it with, said once in the log."""
    base = CloudSettings(
        repo=tmp_path, state_dir=tmp_path, repo_poll_s=0, mqtt=MqttSettings(url="mqtt://x:1")
    )
    on = ControllerSettings(run_in_server=True)
    off = create_app(base.model_copy(update={"registry": tmp_path}))
    assert off.state.controller is None
    with caplog.at_level(logging.WARNING, logger="cloud.app"):
        no_registry = create_app(base.model_copy(update={"controller": on}))
    assert no_registry.state.controller is None
    assert "controller.run_in_server needs mqtt and registry" in caplog.text
    app = create_app(base.model_copy(update={"registry": tmp_path, "controller": on}))
    controller = app.state.controller
    assert controller is not None
    assert controller.mqtt.client_id.startswith("controller-default-")
    assert controller.mqtt.settings.protocol == "5"
    assert not controller.mqtt.settings.persistent_session
    for a in (off, no_registry, app):
        a.state.store.close()
