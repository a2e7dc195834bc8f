"""The cloud server's settings: one ``CloudSettings``, built in ``main()`` and passed down.

Sources, strongest first: CLI flags, ``TANDEM_CLOUD_*`` environment variables (nested with
``__``), a TOML file (``--config cloud.toml``), the defaults below.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cloud.serving.settings import OrtSettings
from shared.identifiers import Identifier
from shared.mqtt import MqttSettings
from shared.samples import MAX_SAMPLES
from shared.settings_files import FileSettings


class CloudTestingSettings(BaseModel):
    """Seams for the demo, the tests and the benchmarks: never set in production. Kept in a
    section of their own so that a production file that names one stands out."""

    model_config = ConfigDict(extra="forbid")

    simulated_delay_ms: float = Field(
        default=0.0, ge=0, description="a wide-area round trip added to every inference"
    )
    bare_route: bool = Field(
        default=False, description="POST /bench/bare: the HTTP stack alone, a benchmark's ceiling"
    )


class ServerTlsSettings(BaseModel):
    """HTTPS for ``serve``: the server's certificate, and optionally a CA whose client
    certificates it requires (devices' certificates from the fleet CA). Bearer tokens
    still authorise requests; a client certificate decides who may connect at all."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = Field(
        default=None, description="server certificate chain (PEM); None: plain HTTP"
    )
    key_file: Path | None = Field(
        default=None, description="cert_file's private key (PEM); None: in cert_file"
    )
    client_ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) of the client certificates required; None: none asked",
    )

    @model_validator(mode="after")
    def _needs_certificate(self) -> ServerTlsSettings:
        if self.cert_file is None and (self.key_file or self.client_ca_file):
            raise ValueError("key_file and client_ca_file need a cert_file (HTTPS)")
        return self


class ControllerSettings(BaseModel):
    """How rollout controllers share the work (``cloud/fleet/controller.py``): one acts at a
    time, the holder of a lease in the fleet store. A shorter time to live makes a takeover
    quicker and costs a store write per third of it. Defined here, not with the controller,
    so that loading settings does not import the rollout code."""

    model_config = ConfigDict(extra="forbid")

    run_in_server: bool = Field(
        default=False,
        description="serve runs a controller too (needs mqtt and registry): each of N "
        "instances takes part, one acts, another takes over when it dies",
    )
    lease_ttl_s: float = Field(
        default=15.0, gt=0, description="a dead controller's rollouts wait this long at most"
    )
    poll_s: float = Field(
        default=1.0, gt=0, description="how often the lease holder looks for new rollouts"
    )
    wave_poll_s: float = Field(
        default=0.2, gt=0, description="how often a wave's job states are read"
    )


class SampleSettings(BaseModel):
    """``POST /fleet/samples``, the learning loop's uploads (``cloud/fleet/samples``): the
    secret that devices' tokens are made from, the size caps, and each device's daily quota.
    Without a secret, uploads are refused (403): the store takes field data only once an
    operator has chosen to."""

    model_config = ConfigDict(extra="forbid")

    device_token_secret: SecretStr | None = Field(
        default=None,
        description="devices' upload tokens are HMACs of their ids under it (tandem-cloud "
        "fleet device-token DEVICE); None: uploads refused",
    )
    max_upload_bytes: int = Field(
        default=1024 * 1024, gt=0, description="one upload's body, compressed or not"
    )
    max_sample_bytes: int = Field(default=256 * 1024, gt=0, description="one sample's payload")
    max_samples_per_upload: int = Field(default=256, gt=0, le=MAX_SAMPLES)
    daily_quota_bytes: int = Field(
        default=5_000_000, ge=0, description="bytes stored per device and UTC day"
    )
    daily_quota_samples: int = Field(
        default=20_000, ge=0, description="samples stored per device and UTC day"
    )
    root: Path | None = Field(
        default=None, description="the samples' files; None: state_dir/samples"
    )


#: The cloud's clients' longest wait between reconnect attempts (``[mqtt] reconnect_max_s``).
CLOUD_RECONNECT_MAX_S = 2.0


class CloudSettings(FileSettings):
    model_config = SettingsConfigDict(
        env_prefix="TANDEM_CLOUD_", env_nested_delimiter="__", extra="forbid"
    )

    repo: Path = Field(
        default=Path("models/cloud"), description="<repo>/<model>/<version>/model.onnx"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    tls: ServerTlsSettings = Field(default_factory=lambda: ServerTlsSettings())
    registry: Path | None = Field(
        default=None, description="model bundles served under /registry; None: not served"
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_json_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="largest JSON document of an infer request (a pure JSON body, or the "
        "binary extension's header); parsed, JSON numbers take ~13x their size in memory",
    )
    ort: OrtSettings = Field(default_factory=OrtSettings)
    fleet: Identifier = "default"
    state_dir: Path = Field(default=Path("state/cloud"), description="fleet.db (SQLite)")
    database_url: SecretStr | None = Field(
        default=None,
        description="the fleet store: postgresql://user:password@host/db (several instances "
        "share it) or sqlite://PATH; None: SQLite at state_dir/fleet.db",
    )
    mqtt: MqttSettings | None = Field(
        default=None,
        description="broker for the collector and the controller; MQTT 5 unless the section "
        'says protocol = "3.1.1" (shared subscriptions need 5, or Mosquitto 2.0)',
    )
    collector_share_group: Identifier | None = Field(
        default=None,
        description="the collectors' shared subscription group ($share/<group>/...), for "
        'several instances: they split the fleet\'s telemetry; None or "": each instance '
        "takes all of it (one instance, or a broker without shared subscriptions). Off by "
        "default: Mosquitto 2.0.11 does not restore a persistent session's shared "
        "subscriptions when it restarts, so what devices send before the collectors are "
        "back is lost; a plain subscription it restores, and nothing is lost",
    )
    instance_id: Identifier | None = Field(
        default=None,
        description="this instance's name, stable across restarts and unique among the "
        "instances: the collector's MQTT client id, whose persistent session keeps the "
        "instance's share of telemetry while it restarts; None: <hostname>-<port>",
    )
    signing_key: Path | None = Field(default=None, description="for rollback releases")
    retention_days: float = Field(default=30.0, gt=0, description="telemetry kept this long")
    tokens: list[SecretStr] = Field(
        default_factory=list,
        description="bearer tokens accepted on inference, repository, registry and fleet "
        "routes; empty: no auth. Revoke by restarting with a new list",
    )
    repo_poll_s: float = Field(default=2.0, ge=0, description="rescan the repository; 0: never")
    controller: ControllerSettings = Field(default_factory=lambda: ControllerSettings())
    samples: SampleSettings = Field(default_factory=lambda: SampleSettings())
    testing: CloudTestingSettings = Field(default_factory=lambda: CloudTestingSettings())
    log_level: str = "INFO"

    @field_validator("mqtt", mode="before")
    @classmethod
    def _cloud_speaks_mqtt5(cls, value: Any) -> Any:
        """The cloud's clients speak MQTT 5 unless told otherwise (devices keep 3.1.1), and
        retry a lost broker every ``CLOUD_RECONNECT_MAX_S`` at most, not a device's 30 s:
        they are a few connections, and after a broker restart they must be back before the
        devices replay their outboxes (with a shared subscription, Mosquitto keeps nothing
        for them until they are)."""
        defaults = {"protocol": "5", "reconnect_max_s": CLOUD_RECONNECT_MAX_S}
        if isinstance(value, dict):
            return {**defaults, **value}
        if isinstance(value, MqttSettings):
            missing = {k: v for k, v in defaults.items() if k not in value.model_fields_set}
            return value.model_copy(update=missing)
        return value

    @field_validator("collector_share_group", mode="before")
    @classmethod
    def _no_group(cls, value: Any) -> Any:
        """TOML has no null: an empty name turns the shared subscription off."""
        return None if value == "" else value

    @property
    def instance(self) -> str:
        """``instance_id``, or one made of the host's name and the port (stable across
        restarts of the same service, distinct for two on one host)."""
        if self.instance_id is not None:
            return self.instance_id
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
        return f"{host}-{self.port}"
