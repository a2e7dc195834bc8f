"""A real Mosquitto broker for tests, configured as docs/operations.md recommends: generated
config, password files and ACL, free ports.

Two listeners. Devices log in on ``url`` as themselves (username = device id) with
``use_username_as_clientid``: the broker takes the username as the client id, so a device
cannot log in under another's id and push it offline. The cloud's accounts (``controller``,
``collector``) log in on ``service_url``, whose password file holds only them: they may run
several connections at once (a rollout and a ``fleet status``), which one id per account
would forbid, and no device can log in there at all. The ACL lets a device publish only its
own ``status``/``telemetry``/``update`` and read only manifests and its own commands.
``stop()``/``start()`` restart it on the same ports (for the reconnect tests).

With ``tls``, a third listener (``tls_url``, mqtts://) takes devices by X.509 certificate
alone, as docs/operations.md sets a fleet up: ``require_certificate`` (no certificate from
the fleet CA, no connection), ``use_identity_as_username`` (the certificate's CN is the
username the ACL's ``%u`` stands for, whatever the client claims) and
``use_username_as_clientid``; the same ACL.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from shared.mqtt import MqttSettings
from tests.helpers import free_port

ACL = """\
user controller
topic readwrite tandem/v1/#

user collector
topic read tandem/v1/#

pattern write tandem/v1/+/devices/%u/status
pattern write tandem/v1/+/devices/%u/telemetry
pattern write tandem/v1/+/devices/%u/update
pattern read tandem/v1/+/devices/%u/models/+/manifest
pattern read tandem/v1/+/models/+/manifest
pattern read tandem/v1/+/groups/+/models/+/manifest
pattern read tandem/v1/+/devices/%u/models/+/shadow
pattern read tandem/v1/+/models/+/shadow
pattern read tandem/v1/+/groups/+/models/+/shadow
pattern read tandem/v1/+/devices/%u/cmd/capture
pattern read tandem/v1/+/cmd/capture
pattern read tandem/v1/+/groups/+/cmd/capture
"""


@dataclass(frozen=True)
class TlsListener:
    """The broker's side of TLS: the CA whose certificates it accepts, and its own pair."""

    ca_file: Path
    cert_file: Path
    key_file: Path


#: Accounts of the cloud's own clients: they log in on the service listener.
SERVICE_USERS = frozenset({"controller", "collector"})


def mosquitto_binary() -> str | None:
    """The installed Mosquitto, if any (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


class Mosquitto:
    def __init__(
        self, workdir: Path, users: dict[str, str], *, tls: TlsListener | None = None
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.dir = workdir
        self.tls = tls
        self.users = dict(users)
        self._choose_ports()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False
        self._write_config()

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.service_port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.service_url = f"mqtt://127.0.0.1:{self.service_port}"
        self.tls_port = free_port() if self.tls else 0
        self.tls_url = f"mqtts://127.0.0.1:{self.tls_port}" if self.tls else ""

    @property
    def _ports(self) -> tuple[int, ...]:
        return (self.port, self.service_port) + ((self.tls_port,) if self.tls else ())

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("passwd-devices", "passwd-services"):
            (self.dir / name).write_text("")
        for user, password in self.users.items():
            self._add_password(user, password)
        acl = self.dir / "acl"
        acl.write_text(ACL)
        common = f"allow_anonymous false\nacl_file {acl}\n"
        (self.dir / "mosquitto.conf").write_text(
            "per_listener_settings true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "user root\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "max_queued_messages 100000\n"
            f"listener {self.port} 127.0.0.1\n"
            "use_username_as_clientid true\n"
            f"password_file {self.dir / 'passwd-devices'}\n"
            f"{common}"
            f"listener {self.service_port} 127.0.0.1\n"
            f"password_file {self.dir / 'passwd-services'}\n"
            f"{common}"
            f"{self._tls_listener(common)}"
        )

    def _tls_listener(self, common: str) -> str:
        if self.tls is None:
            return ""
        return (
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {self.tls.ca_file}\n"
            f"certfile {self.tls.cert_file}\n"
            f"keyfile {self.tls.key_file}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "use_username_as_clientid true\n"
            f"{common}"
        )

    def _add_password(self, user: str, password: str) -> None:
        name = "passwd-services" if user in SERVICE_USERS else "passwd-devices"
        subprocess.run(
            ["mosquitto_passwd", "-b", str(self.dir / name), user, password],
            check=True,
            capture_output=True,
        )

    def url_for(self, user: str) -> str:
        """The listener an account logs in on."""
        return self.service_url if user in SERVICE_USERS else self.url

    def settings_for(self, user: str, **overrides: Any) -> MqttSettings:
        """Client settings for one of its accounts, reconnecting fast (tests restart it)."""
        values: dict[str, Any] = {
            "url": self.url_for(user),
            "username": user,
            "password": SecretStr(self.users[user]),
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1,
        }
        return MqttSettings(**(values | overrides))

    def tls_settings(
        self, cert_file: Path | None, key_file: Path | None, **overrides: Any
    ) -> MqttSettings:
        """Client settings for the TLS listener: the broker's CA, this client certificate
        (no username or password: the certificate is the login)."""
        if self.tls is None:
            raise RuntimeError("this broker has no TLS listener (Mosquitto(..., tls=...))")
        values: dict[str, Any] = {
            "url": self.tls_url,
            "ca_file": self.tls.ca_file,
            "cert_file": cert_file,
            "key_file": key_file,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1,
        }
        return MqttSettings(**(values | overrides))

    def add_user(self, user: str, password: str) -> None:
        """Takes effect at the next start (tests add users before starting)."""
        self.users[user] = password
        self._add_password(user, password)

    def start(self) -> None:
        """Start it and wait until every listener accepts. The first start may find a port
        that ``free_port`` chose taken by then (another test's server, between the choice
        and the bind): it moves to fresh ports. A restart keeps its ports, which clients
        hold, and fails if they are gone."""
        for _ in range(5):
            why = self._start_once()
            if why is None:
                self._started = True
                return
            if self._started or "Address already in use" not in why:
                break
            self._choose_ports()
            self._write_config()
        raise RuntimeError(f"mosquitto did not start: {why}")

    def _start_once(self) -> str | None:
        """None once every listener accepts, else why it did not start (its log's tail)."""
        log = self.dir / "mosquitto.log"
        seen = log.stat().st_size if log.exists() else 0
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                _, raw = self._proc.communicate()  # reads and closes its stderr
                err = raw.decode(errors="replace") if raw else ""
                tail = log.read_bytes()[seen:].decode(errors="replace") if log.exists() else ""
                return f"exited: {err.strip()} {tail.strip()[-500:]}"
            try:
                for port in self._ports:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        pass
                return None
            except OSError:
                time.sleep(0.02)
        return "did not start listening"

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
