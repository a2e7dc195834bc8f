"""A real Mosquitto broker for tests: generated config, password file and ACL, a free port.

Every device logs in as itself (username = device id); the ACL lets a device publish only
its own ``status``/``telemetry``/``update`` and read only manifests and its own commands;
``controller`` and ``collector`` have their own accounts. ``stop()``/``start()`` restart it
on the same port (for the reconnect tests).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from procs import free_port
from pydantic import SecretStr

from shared.mqtt import MqttSettings

ACL = """\
user controller
topic readwrite tandem/v1/#

user collector
topic read tandem/v1/#

pattern write tandem/v1/+/devices/%u/status
pattern write tandem/v1/+/devices/%u/telemetry
pattern write tandem/v1/+/devices/%u/update
pattern read tandem/v1/+/devices/%u/models/+/manifest
pattern read tandem/v1/+/devices/%u/cmd/+
pattern read tandem/v1/+/models/+/manifest
pattern read tandem/v1/+/groups/+/models/+/manifest
"""


class Mosquitto:
    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        self.users = dict(users)
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        passwd = self.dir / "passwd"
        passwd.write_text("")
        for user, password in self.users.items():
            subprocess.run(
                ["mosquitto_passwd", "-b", str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        (self.dir / "acl").write_text(ACL)
        (self.dir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"acl_file {self.dir / 'acl'}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "user root\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "max_queued_messages 100000\n"
        )

    def settings_for(self, user: str, **overrides: Any) -> MqttSettings:
        """Client settings for one of its accounts, reconnecting fast (tests restart it)."""
        values: dict[str, Any] = {
            "url": self.url,
            "username": user,
            "password": SecretStr(self.users[user]),
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1,
        }
        return MqttSettings(**(values | overrides))

    def add_user(self, user: str, password: str) -> None:
        """Takes effect at the next start (tests add users before starting)."""
        self.users[user] = password
        subprocess.run(
            ["mosquitto_passwd", "-b", str(self.dir / "passwd"), user, password],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
