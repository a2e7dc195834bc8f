from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import build_parser as agent_parser
from agent.cli import main as agent_main
from agent.cli import read_rows, settings_from_args
from cloud.cli import build_parser as cloud_parser
from cloud.cli import main as cloud_main
from cloud.fleet.cli import fleet_overrides
from cloud.settings import CloudSettings


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


def _exit_code(
    capsys: pytest.CaptureFixture[str], main: object, argv: list[str]
) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        main(argv)  # type: ignore[operator]
    return int(caught.value.code or 0), capsys.readouterr().err


def test_an_out_of_range_flag_is_a_one_line_error_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``model_copy(update=...)`` took ``--port 99999`` as it came; the loader validates."""
    for main, argv, field in (
        (agent_main, ["serve", "--port", "99999"], "server.port"),
        (agent_main, ["run", "--no-serve", "--port", "-1"], "server.port"),
        (cloud_main, ["serve", "--port", "99999"], "port"),
        (cloud_main, ["fleet", "status", "--fleet", "not an id!"], "fleet"),
        (cloud_main, ["serve", "--simulated-delay-ms", "-5"], "simulated_delay_ms"),
    ):
        code, err = _exit_code(capsys, main, argv)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(("tandem-agent: error: ", "tandem-cloud: error: "))
        assert f"{field}: " in err, err


def test_a_bad_settings_file_is_a_one_line_error_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "agent.toml").write_text("[server]\nport = 'eighty'\n")
    (tmp_path / "rows.json").write_text("[[1, 2]]")
    argv = ["--config", str(tmp_path / "agent.toml"), "infer", str(tmp_path / "rows.json")]
    code, err = _exit_code(capsys, agent_main, argv)
    assert code == 2 and "server.port: Input should be a valid integer" in err
    argv[1] = str(tmp_path / "missing.toml")
    code, err = _exit_code(capsys, agent_main, argv)
    assert code == 2 and "missing.toml does not exist" in err


def test_flags_merge_with_the_sections_of_the_file(tmp_path: Path) -> None:
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text('[server]\nhost = "0.0.0.0"\n[cloud]\ntoken = "t"\n')
    args = agent_parser().parse_args(
        [
            "--config",
            str(agent_toml),
            "--cloud-url",
            "http://c:1",
            "run",
            "--port",
            "9",
            "--no-serve",
        ]
    )
    s = settings_from_args(args)
    assert (s.server.host, s.server.port, s.server.enabled) == ("0.0.0.0", 9, False)
    assert s.cloud.url == "http://c:1" and s.cloud.token is not None
    cloud_toml = tmp_path / "cloud.toml"
    cloud_toml.write_text('[mqtt]\nurl = "mqtt://a:1"\nusername = "controller"\npassword = "p"\n')
    args = cloud_parser().parse_args(["fleet", "status", "--broker", "mqtt://b:2", "--fleet", "f1"])
    c = CloudSettings.load(cloud_toml, **fleet_overrides(args))
    assert c.fleet == "f1" and c.mqtt is not None
    assert (c.mqtt.url, c.mqtt.username) == ("mqtt://b:2", "controller")
    assert (
        CloudSettings.load(**fleet_overrides(cloud_parser().parse_args(["fleet", "status"]))).mqtt
        is None
    )


def test_both_command_lines_keep_http_clients_quiet_below_debug(tmp_path: Path) -> None:
    import logging

    from shared.log_setup import CHATTY, setup_logging
    from shared.settings_files import SettingsError

    loggers = [logging.getLogger(name) for name in CHATTY]
    try:
        assert cloud_main(["keys", "generate", "--dir", str(tmp_path / "keys")]) == 0
        assert [lg.level for lg in loggers] == [logging.WARNING] * 2
        setup_logging("debug")
        assert [lg.level for lg in loggers] == [logging.NOTSET] * 2  # DEBUG hears them
        setup_logging("INFO")
        assert [lg.level for lg in loggers] == [logging.WARNING] * 2
        with pytest.raises(SettingsError, match="unknown level 'LOUD'"):
            setup_logging("LOUD")
    finally:
        for lg in loggers:
            lg.setLevel(logging.NOTSET)
