"""The fleet store's schema, versioned: table ``schema_version`` holds the versions applied,
and ``migrate()`` applies the missing ones on start, in one transaction under the
database's migration lock (two instances starting at once: the second waits, then finds
nothing to do).

Version 1 is the schema as it was before it had versions (``CREATE ... IF NOT EXISTS``), so a
``fleet.db`` made by that code upgrades in place: its tables are kept, version 1 is recorded,
and the later versions are applied. Types are spelled so both engines read them the same
way: ``BIGINT`` and ``DOUBLE PRECISION`` (SQLite's integer and real affinities; PostgreSQL's
``REAL`` would be 4-byte), timestamps ISO-8601 ``TEXT`` in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from cloud.fleet.store.backend import Backend, Dialect
from shared.settings_files import SettingsError


@dataclass(frozen=True)
class Migration:
    version: int
    #: statements both engines run; ``{serial}`` is the backend's auto-numbered key
    common: tuple[str, ...]
    #: statements one engine spells its own way (a trigger), after the common ones
    dialect: dict[Dialect, tuple[str, ...]] = field(default_factory=dict)

    def statements(self, backend: Backend) -> list[str]:
        common = [s.replace("{serial}", backend.serial_key) for s in self.common]
        return common + list(self.dialect.get(backend.dialect, ()))


_V1 = Migration(
    1,
    (
        "CREATE TABLE IF NOT EXISTS devices ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, grp TEXT, state TEXT NOT NULL,"
        " agent_version TEXT, session BIGINT, models TEXT NOT NULL DEFAULT '[]',"
        " last_seen TEXT NOT NULL, PRIMARY KEY (fleet, device))",
        "CREATE TABLE IF NOT EXISTS jobs ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,"
        " version BIGINT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',"
        " ts TEXT NOT NULL, PRIMARY KEY (fleet, device, model, version))",
        "CREATE TABLE IF NOT EXISTS rollouts ("
        " id {serial}, fleet TEXT NOT NULL, model TEXT NOT NULL,"
        " version BIGINT NOT NULL, target_kind TEXT NOT NULL, target TEXT,"
        " canary TEXT NOT NULL, waves BIGINT NOT NULL, max_failure_rate DOUBLE PRECISION NOT NULL,"
        " wave_timeout_s DOUBLE PRECISION NOT NULL, state TEXT NOT NULL,"
        " current_wave BIGINT NOT NULL DEFAULT 0, wave_started TEXT,"
        " detail TEXT NOT NULL DEFAULT '', created TEXT NOT NULL, updated TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS telemetry ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, session BIGINT NOT NULL,"
        " seq BIGINT NOT NULL, ts TEXT NOT NULL, received TEXT NOT NULL,"
        " requests BIGINT NOT NULL, edge BIGINT NOT NULL, cloud BIGINT NOT NULL,"
        " errors BIGINT NOT NULL, offload_rate DOUBLE PRECISION NOT NULL,"
        " p50_ms DOUBLE PRECISION, p95_ms DOUBLE PRECISION, p99_ms DOUBLE PRECISION,"
        " local_p50_ms DOUBLE PRECISION, cloud_p50_ms DOUBLE PRECISION, rss_bytes BIGINT,"
        " cpu_temp_c DOUBLE PRECISION, dropped BIGINT, body TEXT NOT NULL,"
        " PRIMARY KEY (fleet, device, session, seq))",
        "CREATE INDEX IF NOT EXISTS telemetry_ts ON telemetry (fleet, ts)",
        "CREATE TABLE IF NOT EXISTS rollout_devices ("
        " rollout BIGINT NOT NULL, wave BIGINT NOT NULL, device TEXT NOT NULL,"
        " published BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (rollout, device))",
    ),
)

_V2 = Migration(
    2,
    (
        # one rollout controller at a time across instances (FleetStore.try_lease)
        "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires TEXT NOT NULL)",
        # retention deletes by age across fleets; each device's latest job report
        "CREATE INDEX telemetry_age ON telemetry (ts)",
        "CREATE INDEX jobs_by_ts ON jobs (fleet, ts)",
    ),
    {
        # A stored telemetry message marks its device seen, in the same statement as the
        # insert (one round trip per message at ingest); a duplicate, not inserted, does not.
        "sqlite": (
            "CREATE TRIGGER telemetry_seen AFTER INSERT ON telemetry BEGIN"
            " UPDATE devices SET last_seen = NEW.received"
            " WHERE fleet = NEW.fleet AND device = NEW.device; END",
        ),
        # PostgreSQL's fires once per statement, over the rows it inserted: a batch of
        # messages updates each device once (row by row, a device's row would be rewritten
        # once per message, each version on the previous one's chain).
        "postgres": (
            "CREATE FUNCTION tandem_telemetry_seen() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN UPDATE devices d SET last_seen = n.received"
            " FROM (SELECT fleet, device, MAX(received) AS received FROM inserted"
            " GROUP BY fleet, device) n"
            " WHERE d.fleet = n.fleet AND d.device = n.device; RETURN NULL; END $$",
            "CREATE TRIGGER telemetry_seen AFTER INSERT ON telemetry"
            " REFERENCING NEW TABLE AS inserted"
            " FOR EACH STATEMENT EXECUTE FUNCTION tandem_telemetry_seen()",
        ),
    },
)

_V3 = Migration(
    3,
    (
        # the learning loop's field samples: the index (the bytes are files beside the
        # store, cloud/fleet/samples), deduplicated on (fleet, device, id = sha256 of them)
        "CREATE TABLE samples ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, id TEXT NOT NULL,"
        " model TEXT NOT NULL, version BIGINT NOT NULL, kind TEXT NOT NULL,"
        " ts TEXT NOT NULL, received TEXT NOT NULL, encoding TEXT NOT NULL,"
        " shape TEXT NOT NULL, media_type TEXT, size BIGINT NOT NULL,"
        " edge_index BIGINT NOT NULL, edge_conf DOUBLE PRECISION NOT NULL,"
        " cloud_index BIGINT, cloud_conf DOUBLE PRECISION, cloud_model TEXT,"
        " threshold DOUBLE PRECISION, label BIGINT, label_source TEXT, path TEXT NOT NULL,"
        " PRIMARY KEY (fleet, device, id))",
        "CREATE INDEX samples_by_model ON samples (fleet, model, version, received)",
        "CREATE INDEX samples_by_received ON samples (fleet, received)",
        # what each device uploaded per UTC day, against its quota
        "CREATE TABLE sample_quota ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, day TEXT NOT NULL,"
        " bytes BIGINT NOT NULL, samples BIGINT NOT NULL, PRIMARY KEY (fleet, device, day))",
    ),
)

_V4 = Migration(
    4,
    (
        # telemetry's shadow and audit sections, one row per message: its key, stored in the
        # telemetry row's transaction and only when that row was new (a redelivery adds
        # nothing); ``received`` is the store's clock (a rollout's gate counts what came
        # since its shadow phase began, whatever the devices' clocks say)
        "CREATE TABLE shadow_stats ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, session BIGINT NOT NULL,"
        " seq BIGINT NOT NULL, ts TEXT NOT NULL, received TEXT NOT NULL,"
        " model TEXT NOT NULL, version BIGINT NOT NULL,"
        " serving_version BIGINT, samples BIGINT NOT NULL, agree_serving BIGINT NOT NULL,"
        " labelled BIGINT NOT NULL, agree_cloud BIGINT NOT NULL,"
        " serving_agree_cloud BIGINT NOT NULL, shadow_only_right BIGINT NOT NULL,"
        " serving_only_right BIGINT NOT NULL, would_escalate BIGINT NOT NULL,"
        " dropped BIGINT NOT NULL, PRIMARY KEY (fleet, device, session, seq))",
        "CREATE INDEX shadow_by_version ON shadow_stats (fleet, model, version, received)",
        "CREATE TABLE audit_stats ("
        " fleet TEXT NOT NULL, device TEXT NOT NULL, session BIGINT NOT NULL,"
        " seq BIGINT NOT NULL, ts TEXT NOT NULL, received TEXT NOT NULL,"
        " model TEXT NOT NULL, version BIGINT NOT NULL,"
        " audited BIGINT NOT NULL, wrong BIGINT NOT NULL,"
        # the manifest's guarantee the device checked against (NULL: the release has none)
        " epsilon DOUBLE PRECISION, delta DOUBLE PRECISION,"
        " PRIMARY KEY (fleet, device, session, seq))",
        "CREATE INDEX audit_by_version ON audit_stats (fleet, model, version, received)",
        # retention deletes them with their telemetry, by age
        "CREATE INDEX shadow_age ON shadow_stats (ts)",
        "CREATE INDEX audit_age ON audit_stats (ts)",
        # a rollout's shadow phase and field-accuracy gate (cloud/fleet/gate.py): phase
        # 'shadow' (the candidate on the canary's shadow topics) then 'waves'; the gate's
        # last decision (its state and figures, JSON) is written before it is acted on
        "ALTER TABLE rollouts ADD COLUMN shadow BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE rollouts ADD COLUMN gate_min_samples BIGINT NOT NULL DEFAULT 300",
        "ALTER TABLE rollouts ADD COLUMN gate_margin DOUBLE PRECISION NOT NULL DEFAULT 0.02",
        "ALTER TABLE rollouts ADD COLUMN shadow_timeout_s DOUBLE PRECISION NOT NULL DEFAULT 3600",
        "ALTER TABLE rollouts ADD COLUMN phase TEXT NOT NULL DEFAULT 'waves'",
        "ALTER TABLE rollouts ADD COLUMN shadow_started TEXT",
        "ALTER TABLE rollouts ADD COLUMN gate TEXT",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3, _V4)
LATEST = MIGRATIONS[-1].version


def migrate(backend: Backend) -> int:
    """Apply the missing migrations; the schema's version afterwards. A database newer
    than this code is refused rather than written with an older idea of its tables."""
    with backend.transaction(exclusive=True) as tx:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version BIGINT PRIMARY KEY, applied TEXT NOT NULL)"
        )
        current = int(tx.query("SELECT MAX(version) AS v FROM schema_version")[0]["v"] or 0)
        if current > LATEST:
            raise SettingsError(
                f"the fleet database has schema version {current}, newer than this "
                f"tandem-cloud knows ({LATEST}): upgrade tandem-cloud"
            )
        for m in MIGRATIONS[current:]:
            for statement in m.statements(backend):
                tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                (m.version, datetime.now(timezone.utc).isoformat()),
            )
    return max(current, LATEST)
