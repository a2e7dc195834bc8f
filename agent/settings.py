"""The agent's settings: one ``AgentSettings``, built once in ``main()`` and passed down.

Sources, strongest first: explicit overrides (CLI flags), ``TANDEM_AGENT_*`` environment
variables (nested with ``__``, e.g. ``TANDEM_AGENT_ROUTING__THRESHOLD=0.9``), then a TOML
file (``--config agent.toml``), then the defaults below. Unknown keys in a file are errors:
a typo must not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from agent.inference.backends import BackendSettings, TFLiteSettings
from agent.inference.routing import RouteMode
from shared.identifiers import Identifier
from shared.manifest import ConfidenceMetric
from shared.mqtt import MqttSettings
from shared.settings_files import FileSettings
from shared.tls import TlsFiles
from shared.update import UpdateState


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoutingSettings(_Section):
    mode: RouteMode = "auto"
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None: the manifest's routing default"
    )
    metric: ConfidenceMetric | None = Field(default=None, description="None: the manifest's")
    temperature: float | None = Field(default=None, gt=0.0, description="None: the manifest's")
    deadline_ms: float = Field(
        default=150.0, gt=0, allow_inf_nan=False, description="default per-request budget"
    )
    max_deadline_ms: float = Field(
        default=3_600_000.0,
        gt=0,
        allow_inf_nan=False,
        description="the largest deadline a request may ask for (larger: refused as invalid)",
    )
    max_batch_rows: int = Field(
        default=32,
        ge=1,
        description="rows one request may carry (the local endpoint's max_batch_size); keep "
        "it at or below the cloud model's max_batch_size: escalated rows go in one request",
    )
    prefer_cloud_above_ms: float | None = Field(
        default=None, gt=0, description="in auto mode, escalate whenever this much budget remains"
    )
    safety_margin_ms: float = Field(default=2.0, ge=0)
    initial_cloud_estimate_ms: float = Field(default=50.0, gt=0)
    latency_window: int = Field(default=50, ge=1)
    latency_quantile: float = Field(default=0.9, gt=0, le=1)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _default_deadline_allowed(self) -> RoutingSettings:
        if self.deadline_ms > self.max_deadline_ms:
            raise ValueError(
                f"deadline_ms {self.deadline_ms} exceeds max_deadline_ms {self.max_deadline_ms}"
            )
        return self


class CloudSettings(_Section):
    url: str | None = Field(default=None, description="OIP server base URL; None: edge only")
    token: SecretStr | None = None
    model: str | None = Field(default=None, description="None: the manifest's cloud target")
    version: str | None = None
    binary: bool | Literal["auto"] = Field(
        default="auto",
        description="Triton binary tensors instead of JSON; auto: once the server's GET /v2 "
        "lists binary_tensor_data (JSON until then)",
    )
    connect_timeout_s: float = Field(default=1.0, gt=0)
    max_connections: int = Field(default=16, ge=1)
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) every HTTPS server the agent calls is verified against: "
        "the cloud, the registry, artifact hosts; None: the usual public CAs",
    )
    cert_file: Path | None = Field(
        default=None,
        description="client certificate (PEM) presented to the cloud and the registry only, "
        "for servers that require one",
    )
    key_file: Path | None = Field(
        default=None, description="cert_file's private key (PEM); None: in cert_file"
    )

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> CloudSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without a cert_file")
        return self

    @property
    def tls(self) -> TlsFiles | None:
        """What the cloud client and downloads verify and present; None: httpx's defaults."""
        if self.ca_file is None and self.cert_file is None:
            return None
        return TlsFiles(self.ca_file, self.cert_file, self.key_file)


class ServerSettings(_Section):
    enabled: bool = Field(
        default=True,
        description="`run` serves the local OIP endpoint (needs the serve extra); "
        "false: MQTT and updates only, like --no-serve",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_json_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="largest JSON document (a JSON body, a binary body's header): parsed "
        "JSON arrays take about 13 times their size in memory",
    )


class ImageSettings(_Section):
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="largest picture decoded (width x height, from its header, refused before "
        "any pixel is decoded): a 20,000 x 20,000 PNG of a few kilobytes would otherwise take "
        "400 MB or more; 40 MP (about 120 MB as RGB) admits a phone's photo",
    )


class DownloadSettings(_Section):
    attempts: int = Field(default=5, ge=1, description="tries, each resuming the last")
    backoff_s: float = Field(default=0.5, ge=0, description="first wait; doubles per try")
    timeout_s: float = Field(default=30.0, gt=0, description="per read/connect")
    disk_margin_bytes: int = Field(default=1024 * 1024, ge=0, description="left free after")
    deadline_s: float = Field(
        default=900.0, gt=0, description="for the whole download, all tries: then FAILED"
    )
    fsync_every_bytes: int = Field(
        default=4 * 1024 * 1024, gt=0, description="partial file forced to disk this often"
    )


class UpdateSettings(_Section):
    trust_store: Path | None = Field(
        default=None, description="pinned trust store (JSON); None: updates are refused"
    )
    registry_url: str | None = Field(
        default=None, description="base for relative artifact URLs; None: cloud.url"
    )
    settle_s: float = Field(default=0.3, ge=0, description="collect retained manifests first")
    max_manifest_bytes: int = Field(
        default=1024 * 1024, gt=0, description="larger manifest messages are refused unread"
    )
    health_watch_s: float = Field(default=30.0, ge=0)
    health_min_requests: int = Field(default=20, ge=1, description="before rates are judged")
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_unsure_rate: float | None = Field(
        default=0.9, ge=0, le=1, description="share of answers below the threshold"
    )
    download: DownloadSettings = Field(default_factory=DownloadSettings)


class AgentTestingSettings(_Section):
    """Fault injection for the tests (``kill -9`` at a chosen job state, in a child process):
    never set on a device. A section of its own, so a device file naming it stands out."""

    hold_update_state: UpdateState | None = Field(
        default=None, description="pause for hold_s after entering this job state"
    )
    hold_s: float = Field(default=0.0, ge=0)


class ShadowSettings(_Section):
    """Shadow mode (``agent.inference.shadow``): a candidate the fleet delivers on the shadow
    topic runs beside the serving model, off the request path, and never answers."""

    sample_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="share of classifier answers the candidate is also run on (audited "
        "answers always are)",
    )
    max_pending: int = Field(
        default=256, ge=1, description="observations waiting for the candidate; more: dropped"
    )
    audit_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="while a shadow is installed, share of confident answers audited for it "
        "(the higher of this and capture.audit_rate; the extra ones are not captured): the "
        "gate's labels on requests the serving model is sure of; canary devices only, for "
        "the shadow phase, pay these cloud calls",
    )


class TelemetrySettings(_Section):
    interval_s: float = Field(
        default=60.0,
        gt=0,
        description="one message per interval; at 60 s an idle device moves about 1.7 MB a "
        "day over TLS, framing and keepalive included (scripts/bench_idle_bytes.py)",
    )
    daily_budget_bytes: int | None = Field(
        default=2_000_000,
        ge=1,
        description="the device's own MQTT bytes per UTC day (births, telemetry, job states, "
        "manifests, the connection; not downloads or escalations): once spent, telemetry "
        "comes every over_budget_interval_s until the day ends, each message covering the "
        "whole interval; births and job states are never held back. None: no budget",
    )
    over_budget_interval_s: float = Field(
        default=3600.0, gt=0, description="telemetry interval once the day's budget is spent"
    )
    outbox_max_rows: int = Field(default=10_000, ge=1)
    outbox_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    replay_per_s: float = Field(default=50.0, gt=0, description="backlog sent after reconnect")
    window: int = Field(default=32, ge=1, description="unacknowledged messages at most")


class CaptureSettings(_Section):
    """Field data for the learning loop (``agent.device.capture``, ``.audit``,
    ``.uploader``). Privacy: no sample leaves the device unless capture is enabled, by
    this file (``enabled = true``) or, when ``enabled`` is left unset, by the fleet's
    retained capture switch (off until it says on). ``enabled = false`` is the device
    owner's choice and the fleet cannot override it. Auditing (asking the cloud about a
    random ``audit_rate`` share of the edge's confident answers, to check its error live)
    runs whenever a cloud is configured and ``audit_rate`` > 0, even with capture off: it
    sends those inputs to the cloud the device already escalates to, but stores and
    uploads nothing. Uploads share ``telemetry.daily_budget_bytes`` with telemetry,
    telemetry first (``agent.device.uploader.UploadBudget``)."""

    enabled: bool | None = Field(
        default=None,
        description="None: follow the fleet's capture switch (off until it says on); "
        "true/false: fixed here, the switch is ignored",
    )
    audit_rate: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="share of confident edge answers also asked of the cloud, off the "
        "request path (0: no audit); the fleet's switch may set another",
    )
    max_spool_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="samples kept on disk; oldest dropped"
    )
    upload_interval_s: float = Field(
        default=600.0,
        gt=0,
        description="at most this between uploads (sooner when max_batch are waiting); an "
        "upload's HTTP request and answer cost about 0.5 kB whatever it carries, so 60 s "
        "would spend 30 kB an hour on them alone",
    )
    upload_url: str | None = Field(
        default=None, description="base URL of POST /fleet/samples; None: cloud.url"
    )
    token: SecretStr | None = Field(
        default=None,
        description="this device's upload token (tandem-cloud fleet device-token DEVICE)",
    )
    max_batch: int = Field(default=64, ge=1, description="samples per upload at most")
    include_probs: bool = Field(
        default=False,
        description="send both models' probability vectors with each sample (off: the "
        "cloud relabels every sample with its teacher model at retrain time, so the "
        "vectors serve nobody and cost more than the digits' 64-byte sample)",
    )
    max_samples_per_hour: int | None = Field(
        default=240,
        ge=1,
        description="samples captured an hour at most, escalations and audits together, "
        "audits first (a token bucket; the rest counted skipped_rate; None: no limit). 240 "
        "keeps a device at 1 request/s on the shifted digits stream (about 1,400 "
        "escalations an hour) near 20 kB an hour (docs/benchmarks.md); a 2,000-sample "
        "retrain cycle then takes "
        "2000 / (240 N) hours for a fleet of N capturing devices: 8.3 h for 1, 50 min for "
        "10, 5 min for 100",
    )
    seed: int | None = Field(
        default=None,
        description="seed of the audit's random draw (None: random), so that a benchmark's "
        "capture of the same stream can be repeated exactly",
    )
    max_pending: int = Field(
        default=1024, ge=1, description="observations and audits waiting for a thread"
    )
    audit_timeout_s: float = Field(default=5.0, gt=0, description="one audit's cloud call")
    max_backoff_s: float = Field(
        default=300.0, gt=0, description="longest wait between failed uploads"
    )


class AgentSettings(FileSettings):
    model_config = SettingsConfigDict(
        env_prefix="TANDEM_AGENT_", env_nested_delimiter="__", extra="forbid"
    )

    model_dir: Path = Field(
        default=Path("models/edge/digits-int8"),
        description="the factory model: manifest.json + artifact, imported into the store once",
    )
    device: Identifier = Field(default="dev-0", description="this device's id (MQTT user)")
    fleet: Identifier = "default"
    group: Identifier | None = None
    state_dir: Path = Field(
        default=Path("state/agent"), description="model store, anti-rollback record, session"
    )
    mqtt: MqttSettings | None = Field(default=None, description="None: no broker, no updates")
    update: UpdateSettings = Field(default_factory=UpdateSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    backend: BackendSettings = Field(default_factory=TFLiteSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    cloud: CloudSettings = Field(default_factory=CloudSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    testing: AgentTestingSettings = Field(default_factory=AgentTestingSettings)
    log_level: str = "INFO"
