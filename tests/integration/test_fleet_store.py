"""The fleet store on both engines, real SQLite and real PostgreSQL, by the same tests:
every method, dedupe on (device, session, seq), leases across store objects and processes,
batched retention, and the schema's migrations (a ``fleet.db`` from before versions)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud.fleet.store import FleetStore, Rollout, open_store
from cloud.fleet.store.schema import LATEST
from shared.settings_files import SettingsError
from shared.status import DeviceStatus, ModelVersion
from shared.telemetry import CONFIDENCE_BUCKETS, Histogram, Telemetry
from shared.update import UpdateReport, UpdateState
from tests.helpers import ROOT
from tests.postgres import Postgres

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Clock:
    """A clock the test moves (lease expiry without waiting)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def store(store_url: str) -> Iterator[FleetStore]:
    s = FleetStore(store_url)
    yield s
    s.close()


def status(device: str, group: str | None = None, models: int | None = 1) -> DeviceStatus:
    return DeviceStatus(
        device=device,
        state="online",
        group=group,
        agent_version="0.1.0",
        session=3,
        models=[ModelVersion(model="digits", version=models)] if models else [],
    )


def telemetry(device: str, seq: int, session: int = 1, ts: datetime = T0) -> Telemetry:
    latency = Histogram(counts=[0, 2] + [0] * (len(Histogram().counts) - 2))
    return Telemetry(
        device=device,
        session=session,
        seq=seq,
        ts=ts,
        interval_s=10,
        requests=2,
        routes={"edge": 1, "cloud": 1},
        reasons={"confident": 2},
        errors=0,
        latency_local=latency,
        latency_cloud=Histogram(),
        latency_total=latency,
        confidence=[0] * CONFIDENCE_BUCKETS,
        offload_rate=0.5,
        rss_bytes=5_000_000_000,  # past 32 bits
    )


def report(device: str, state: UpdateState, ts: datetime, version: int = 2) -> UpdateReport:
    return UpdateReport(device=device, model="digits", version=version, state=state, ts=ts)


# --------------------------------------------------------------------------- devices


def test_devices_upsert_and_keep_models_a_bare_status_omits(store: FleetStore) -> None:
    store.record_status("f", status("dev-2", "lab"))
    store.record_status("f", status("dev-1"))
    store.record_status("other", status("dev-9", "lab"))
    store.record_status("f", status("dev-2", "lab", models=None))  # a Last Will: no models
    devices = store.devices("f")
    assert [d["device"] for d in devices] == ["dev-1", "dev-2"]
    assert devices[1]["models"] == [{"model": "digits", "version": 1}]
    assert devices[1]["group"] == "lab" and devices[1]["session"] == 3
    assert [d["device"] for d in store.devices("f", group="lab")] == ["dev-2"]
    assert store.groups("f") == ["lab"]
    assert store.dialect in ("sqlite", "postgres")


# ------------------------------------------------------------------------------ jobs


def test_jobs_keep_the_newest_report(store: FleetStore) -> None:
    store.record_job("f", report("dev-1", UpdateState.DOWNLOADING, T0))
    store.record_job("f", report("dev-1", UpdateState.ACTIVE, T0 + timedelta(seconds=2)))
    store.record_job("f", report("dev-1", UpdateState.VERIFYING, T0 + timedelta(seconds=1)))
    store.record_job("f", report("dev-2", UpdateState.FAILED, T0))
    states = store.job_states("f", "digits", 2)
    assert states == {"dev-1": (UpdateState.ACTIVE, ""), "dev-2": (UpdateState.FAILED, "")}
    assert store.job_states("f", "digits", 3) == {}
    latest = store.latest_jobs("f")
    assert latest["dev-1"]["state"] == "ACTIVE" and set(latest) == {"dev-1", "dev-2"}


# ------------------------------------------------------------------------- telemetry


def test_telemetry_dedupes_on_device_session_seq_and_marks_the_device_seen(
    store: FleetStore,
) -> None:
    clock = Clock()
    store._clock = clock  # the times the store writes: last_seen, received
    store.record_status("f", status("dev-1"))
    assert store.record_telemetry("f", telemetry("dev-1", 1))
    clock.advance(60)
    assert not store.record_telemetry("f", telemetry("dev-1", 1))  # a duplicate
    assert store.devices("f")[0]["last_seen"] == T0.isoformat(timespec="microseconds")
    assert store.record_telemetry("f", telemetry("dev-1", 2))  # stored: the device is seen
    seen = (T0 + timedelta(seconds=60)).isoformat(timespec="microseconds")
    assert store.devices("f")[0]["last_seen"] == seen
    assert store.record_telemetry("f", telemetry("dev-1", 1, session=2))  # a new session
    assert store.record_telemetry("g", telemetry("dev-1", 1))  # another fleet
    assert store.telemetry_seqs("f", "dev-1", 1) == [1, 2]
    assert store.telemetry_seqs("f", "dev-1", 2) == [1]


def test_a_batch_of_telemetry_says_which_messages_were_new(store: FleetStore) -> None:
    clock = Clock()
    store._clock = clock
    store.record_status("f", status("dev-1"))
    assert store.record_telemetry("f", telemetry("dev-1", 2))
    clock.advance(60)
    batch = [telemetry("dev-1", seq) for seq in (1, 2, 3, 3, 4)]  # 2 stored, 3 twice
    assert store.record_telemetry_many("f", batch) == [True, False, True, False, True]
    assert store.record_telemetry_many("f", []) == []
    assert store.telemetry_seqs("f", "dev-1", 1) == [1, 2, 3, 4]
    seen = (T0 + timedelta(seconds=60)).isoformat(timespec="microseconds")
    assert store.devices("f")[0]["last_seen"] == seen


def test_telemetry_series_and_latest(store: FleetStore) -> None:
    for seq in range(1, 6):
        store.record_telemetry("f", telemetry("dev-1", seq, ts=T0 + timedelta(seconds=seq)))
    store.record_telemetry("f", telemetry("dev-2", 1, ts=T0))
    rows = store.series("f", "dev-1", limit=3)
    assert [r["seq"] for r in rows] == [3, 4, 5]  # the newest, oldest first
    assert "body" not in rows[0]
    assert rows[0]["rss_bytes"] == 5_000_000_000 and rows[0]["p99_ms"] is not None
    since = (T0 + timedelta(seconds=4)).isoformat()
    assert [r["seq"] for r in store.series("f", "dev-1", since=since)] == [4, 5]
    assert len(store.series("f")) == 6
    latest = store.latest_telemetry("f")
    assert latest["dev-1"]["seq"] == 5 and latest["dev-2"]["seq"] == 1
    assert "body" not in latest["dev-1"]


def test_ingest_from_many_threads_stores_each_message_once(store: FleetStore) -> None:
    """paho's thread, the API's and the controller's share a store: no message is lost or
    doubled when several write at once (each thread also re-sends the others' messages)."""
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def ingest(start: int) -> None:
        barrier.wait()
        for seq in range(1, 51):
            stored = store.record_telemetry("f", telemetry("dev-1", seq, session=start % 2 + 1))
            with lock:
                results.append(stored)

    threads = [threading.Thread(target=ingest, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 100  # two sessions of 50, each written by two threads
    assert store.telemetry_seqs("f", "dev-1", 1) == list(range(1, 51))
    assert store.telemetry_seqs("f", "dev-1", 2) == list(range(1, 51))


def test_retention_deletes_exactly_the_old_rows_in_batches(store: FleetStore) -> None:
    for seq in range(1, 24):  # 23 rows, one a minute
        store.record_telemetry("f", telemetry("dev-1", seq, ts=T0 + timedelta(minutes=seq)))
    store.record_telemetry("g", telemetry("dev-2", 1, ts=T0))  # every fleet's rows expire
    # older, though its text (02:17+02:00) sorts after the cutoff's: stored in UTC
    east = (T0 + timedelta(minutes=17)).astimezone(timezone(timedelta(hours=2)))
    store.record_telemetry("f", telemetry("dev-3", 1, ts=east))
    cutoff = T0 + timedelta(minutes=18)  # seqs 1..17, dev-3's and fleet g's rows are older
    statements: list[int] = []
    execute = store._db.execute

    def counting(sql: str, args: object = ()) -> int:
        n = execute(sql, args)  # type: ignore[arg-type]
        statements.append(n)
        return n

    store._db.execute = counting  # type: ignore[method-assign]
    assert store.expire_telemetry(cutoff, batch=5) == 19
    assert statements == [5, 5, 5, 4]  # in batches, not row by row nor all at once
    assert store.telemetry_seqs("f", "dev-1", 1) == list(range(18, 24))
    assert store.telemetry_seqs("g", "dev-2", 1) == []
    assert store.telemetry_seqs("f", "dev-3", 1) == []
    assert store.expire_telemetry(cutoff.isoformat()) == 0  # the collector passes text
    with pytest.raises(ValueError, match="batch"):
        store.expire_telemetry(cutoff, batch=0)


# -------------------------------------------------------------------------- rollouts


def test_rollouts_and_their_waves(store: FleetStore) -> None:
    first = store.create_rollout("f", "digits", 2, "group", "lab", "1", 2, 0.1, 30.0)
    second = store.create_rollout("f", "digits", 3, "fleet", None, "10%", 3, 0.0, 5.5)
    assert second > first
    r = store.rollout(first)
    assert r == Rollout(
        first, "f", "digits", 2, "group", "lab", "1", 2, 0.1, 30.0, "PLANNED", 0, None, ""
    )
    assert store.unfinished_rollout("f", "digits", 2) == r
    store.update_rollout(first, state="RUNNING", current_wave=1, wave_started="x")
    assert store.rollout(first).current_wave == 1 and store.rollout(first).state == "RUNNING"
    store.update_rollout(first, state="COMPLETED", wave_started=None)
    assert store.unfinished_rollout("f", "digits", 2) is None
    assert [x.id for x in store.rollouts("f")] == [first, second]
    assert store.rollouts("other") == []
    with pytest.raises(KeyError):
        store.rollout(second + 100)
    with pytest.raises(ValueError, match="not a rollout field"):
        store.update_rollout(first, **{"state=state; --": "x"})
    store.plan_waves(first, [["dev-1"], ["dev-2", "dev-3"]])
    store.plan_waves(first, [["dev-1"], ["dev-2", "dev-3"]])  # a restarted controller
    store.mark_published(first, "dev-2")
    assert store.waves(first) == [[("dev-1", False)], [("dev-2", True), ("dev-3", False)]]
    assert store.waves(second) == []


# ---------------------------------------------------------------------------- leases


def test_a_lease_has_one_holder_expires_after_its_ttl_and_is_renewed(store_url: str) -> None:
    clock = Clock()
    a, b = FleetStore(store_url, clock=clock), FleetStore(store_url, clock=clock)
    try:
        assert a.lease_holder("rollouts") is None
        assert a.try_lease("rollouts", "a", 10)
        assert not b.try_lease("rollouts", "b", 10)
        assert b.lease_holder("rollouts") == "a"
        clock.advance(8)
        assert a.try_lease("rollouts", "a", 10)  # renewed: now until t0+18
        clock.advance(9)  # t0+17: the first term is over, the renewed one is not
        assert not b.try_lease("rollouts", "b", 10)
        assert b.try_lease("other", "b", 10)  # leases are independent
        clock.advance(2)  # t0+19: expired
        assert a.lease_holder("rollouts") is None
        assert b.try_lease("rollouts", "b", 10)
        assert not a.try_lease("rollouts", "a", 10)
        a.release_lease("rollouts", "a")  # not a's: left alone
        assert a.lease_holder("rollouts") == "b"
        b.release_lease("rollouts", "b")
        assert a.lease_holder("rollouts") is None
        assert a.try_lease("rollouts", "a", 10)  # free at once, no waiting for expiry
        with pytest.raises(ValueError):
            a.try_lease("rollouts", "a", 0)
    finally:
        a.close()
        b.close()


def test_of_instances_racing_for_a_lease_exactly_one_wins(store_url: str) -> None:
    stores = [FleetStore(store_url) for _ in range(2)]
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if stores[i % 2].try_lease("rollouts", f"holder-{i}", 30):
            wins.append(f"holder-{i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert stores[0].lease_holder("rollouts") == wins[0]
    finally:
        for s in stores:
            s.close()


def _lease_in_process(url: str, name: str, holder: str) -> bool:
    """try_lease (30 s) from another process: another instance."""
    code = (
        "import sys; from cloud.fleet.store import FleetStore; s = FleetStore(sys.argv[1]);"
        " print(s.try_lease(sys.argv[2], sys.argv[3], 30)); s.close()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, url, name, holder],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return done.stdout.strip() == "True"


def test_a_lease_holds_across_processes_until_released_or_expired(store_url: str) -> None:
    store = FleetStore(store_url)
    # a holder whose clock runs a minute behind: its 30 s lease is over by everyone else's
    late = FleetStore(store_url, clock=lambda: datetime.now(timezone.utc) - timedelta(minutes=1))
    try:
        assert store.try_lease("rollouts", "here", 30)
        assert not _lease_in_process(store_url, "rollouts", "there")
        assert store.lease_holder("rollouts") == "here"
        store.release_lease("rollouts", "here")
        assert _lease_in_process(store_url, "rollouts", "there")
        assert store.lease_holder("rollouts") == "there"
        assert not store.try_lease("rollouts", "here", 30)
        assert late.try_lease("expired", "late", 30)
        assert _lease_in_process(store_url, "expired", "there")
        assert store.lease_holder("expired") == "there"
    finally:
        store.close()
        late.close()


def test_postgres_store_carries_on_after_the_server_restarts() -> None:
    """Pooled connections cut by a restart are replaced: the next calls succeed (a server
    of its own: restarting the session's would cut the other tests')."""
    server = Postgres()
    try:
        server.start()
        store = FleetStore(server.database())
        try:
            barrier = threading.Barrier(3)

            def hold() -> None:  # three connections in the pool, all cut by the restart
                barrier.wait()
                store.query("SELECT 1 AS one")

            threads = [threading.Thread(target=hold) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert store.record_telemetry("f", telemetry("dev-1", 1))
            server.restart()
            assert store.record_telemetry("f", telemetry("dev-1", 2))
            assert store.record_telemetry_many("f", [telemetry("dev-1", 3)]) == [True]
            assert store.telemetry_seqs("f", "dev-1", 1) == [1, 2, 3]
            assert store.try_lease("rollouts", "a", 10)
        finally:
            store.close()
    finally:
        server.stop()


# ---------------------------------------------------------------- SQL for other modules


def test_query_execute_and_epoch_sql(store: FleetStore) -> None:
    store.record_status("f", status("dev-1"))
    store.record_status("f", status("dev-2"))
    assert store.execute("UPDATE devices SET state=? WHERE fleet=?", ("offline", "f")) == 2
    rows = store.query(
        "SELECT device, 'a?b%c' AS lit FROM devices WHERE fleet=? AND device LIKE 'dev-%'"
        " ORDER BY device",
        ("f",),
    )
    assert rows == [{"device": "dev-1", "lit": "a?b%c"}, {"device": "dev-2", "lit": "a?b%c"}]
    store.execute("UPDATE devices SET last_seen=?", ("2026-01-01T00:00:01.250000+00:00",))
    epoch = store.query(f"SELECT {store.epoch_sql('last_seen')} AS e FROM devices")[0]["e"]
    assert isinstance(epoch, float)
    assert epoch == pytest.approx(T0.timestamp() + 1.25, abs=1e-3)


# ------------------------------------------------------------------------ migrations

#: The schema as the store made it before it had versions (commit c4fd606).
LEGACY_SCHEMA = """
CREATE TABLE devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, grp TEXT, state TEXT NOT NULL,
    agent_version TEXT, session INTEGER, models TEXT NOT NULL DEFAULT '[]',
    last_seen TEXT NOT NULL, PRIMARY KEY (fleet, device));
CREATE TABLE jobs (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', ts TEXT NOT NULL,
    PRIMARY KEY (fleet, device, model, version));
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fleet TEXT NOT NULL, model TEXT NOT NULL,
    version INTEGER NOT NULL, target_kind TEXT NOT NULL, target TEXT,
    canary TEXT NOT NULL, waves INTEGER NOT NULL, max_failure_rate REAL NOT NULL,
    wave_timeout_s REAL NOT NULL, state TEXT NOT NULL, current_wave INTEGER NOT NULL DEFAULT 0,
    wave_started TEXT, detail TEXT NOT NULL DEFAULT '', created TEXT NOT NULL,
    updated TEXT NOT NULL);
CREATE TABLE telemetry (
    fleet TEXT NOT NULL, device TEXT NOT NULL, session INTEGER NOT NULL, seq INTEGER NOT NULL,
    ts TEXT NOT NULL, received TEXT NOT NULL, requests INTEGER NOT NULL, edge INTEGER NOT NULL,
    cloud INTEGER NOT NULL, errors INTEGER NOT NULL, offload_rate REAL NOT NULL,
    p50_ms REAL, p95_ms REAL, p99_ms REAL, local_p50_ms REAL, cloud_p50_ms REAL,
    rss_bytes INTEGER, cpu_temp_c REAL, dropped INTEGER, body TEXT NOT NULL,
    PRIMARY KEY (fleet, device, session, seq));
CREATE INDEX telemetry_ts ON telemetry (fleet, ts);
CREATE TABLE rollout_devices (
    rollout INTEGER NOT NULL, wave INTEGER NOT NULL, device TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout, device));
"""


def test_a_fleet_db_from_before_versions_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    old = sqlite3.connect(path)
    old.executescript(LEGACY_SCHEMA)
    old.execute(
        "INSERT INTO devices VALUES ('f','dev-1','lab','online','0.1.0',2,?,?)",
        (json.dumps([{"model": "digits", "version": 1}]), "2025-01-01T00:00:00+00:00"),
    )
    old.execute("INSERT INTO jobs VALUES ('f','dev-1','digits',2,'ACTIVE','','2025-01-01')")
    old.execute(
        "INSERT INTO rollouts (fleet, model, version, target_kind, canary, waves,"
        " max_failure_rate, wave_timeout_s, state, created, updated)"
        " VALUES ('f','digits',2,'fleet','1',2,0.1,30,'RUNNING','2025','2025')"
    )
    old.execute("INSERT INTO rollout_devices VALUES (1, 0, 'dev-1', 1)")
    old.commit()
    old.close()
    store = FleetStore(path)  # the SQLite path form, as before URLs
    try:
        assert store.schema_version == LATEST
        versions = store.query("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in versions] == list(range(1, LATEST + 1))
        assert store.devices("f")[0]["models"] == [{"model": "digits", "version": 1}]
        assert store.job_states("f", "digits", 2) == {"dev-1": (UpdateState.ACTIVE, "")}
        assert store.rollout(1).state == "RUNNING"
        assert store.waves(1) == [[("dev-1", True)]]
        assert store.create_rollout("f", "digits", 3, "fleet", None, "1", 1, 0, 1) == 2
        # what the later versions added works on the upgraded file
        assert store.record_telemetry("f", telemetry("dev-1", 1))
        assert store.devices("f")[0]["last_seen"] != "2025-01-01T00:00:00+00:00"
        assert store.try_lease("rollouts", "a", 10)
    finally:
        store.close()
    reopened = FleetStore(path)  # nothing left to apply, nothing applied twice
    try:
        assert len(reopened.query("SELECT version FROM schema_version")) == LATEST
        assert reopened.telemetry_seqs("f", "dev-1", 1) == [1]
    finally:
        reopened.close()


def _start_at_once(target: str | Path, n: int = 4) -> tuple[list[FleetStore], list[BaseException]]:
    """``n`` instances opening one store at the same moment: the stores, and the errors."""
    stores: list[FleetStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(FleetStore(target))
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stores, errors


def test_instances_starting_at_once_migrate_once(store_url: str) -> None:
    stores, errors = _start_at_once(store_url)
    try:
        assert errors == []
        versions = stores[0].query("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in versions] == list(range(1, LATEST + 1))
    finally:
        for s in stores:
            s.close()


def test_processes_opening_a_new_sqlite_file_at_once_all_start(tmp_path: Path) -> None:
    """The switch to WAL answers "locked" at once, busy timeout or not, while another
    connection opens the file: 60 rounds of 4 at once (about one round in 20 failed)."""
    for round_ in range(60):
        stores, errors = _start_at_once(tmp_path / f"fleet-{round_}.db")
        for s in stores:
            s.close()
        assert errors == []


def test_a_database_newer_than_the_code_is_refused(store_url: str) -> None:
    store = FleetStore(store_url)
    store.execute(
        "INSERT INTO schema_version (version, applied) VALUES (?, ?)", (LATEST + 1, "later")
    )
    store.close()
    with pytest.raises(SettingsError, match="newer"):
        FleetStore(store_url)


# ---------------------------------------------------------------------- open_store


def test_open_store_picks_the_engine_from_the_url(tmp_path: Path, postgres: Postgres) -> None:
    default = open_store(None, tmp_path / "state")
    assert default.dialect == "sqlite" and (tmp_path / "state" / "fleet.db").exists()
    default.close()
    url_file = tmp_path / "elsewhere" / "fleet.db"
    by_url = open_store(f"sqlite://{url_file}", tmp_path)
    assert by_url.dialect == "sqlite" and url_file.exists()
    by_url.close()
    pg = open_store(postgres.database(), tmp_path)
    assert pg.dialect == "postgres"
    assert pg.query("SHOW timezone") == [{"TimeZone": "UTC"}]
    pg.close()
    tuned = open_store(f"{postgres.database()}?options=-c%20statement_timeout%3D12345", tmp_path)
    assert tuned.query("SHOW statement_timeout") == [{"statement_timeout": "12345ms"}]
    assert tuned.query("SHOW timezone") == [{"TimeZone": "UTC"}]
    tuned.close()
    with pytest.raises(SettingsError, match="'mysql'"):
        open_store("mysql://u:secret@host/db", tmp_path)
    with pytest.raises(SettingsError, match="cannot connect") as refused:
        open_store(f"postgresql://postgres:secret@127.0.0.1:{postgres.port}/missing", tmp_path)
    assert "secret" not in str(refused.value)


def test_the_cloud_settings_name_the_database(
    tmp_path: Path, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud.settings import CloudSettings

    monkeypatch.setenv("TANDEM_CLOUD_DATABASE_URL", postgres.database())
    settings = CloudSettings(state_dir=tmp_path)
    assert "postgresql://" not in repr(settings)  # a password in it stays out of logs
    store = open_store(settings.database_url, settings.state_dir)
    assert store.dialect == "postgres"
    store.close()
    monkeypatch.delenv("TANDEM_CLOUD_DATABASE_URL")
    store = open_store(CloudSettings(state_dir=tmp_path).database_url, tmp_path)
    assert store.dialect == "sqlite" and (tmp_path / "fleet.db").exists()
    store.close()
