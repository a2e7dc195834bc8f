"""Fleet simulator: N simulated devices against the real fleet side, measured.

What is real: Mosquitto (one broker, started here), ``tandem-cloud serve`` instances (1 or 2
child processes, each with the collector, the fleet API and the registry), the fleet store
(SQLite shared by the instances, or PostgreSQL started here), the rollout controller
(``tandem-cloud fleet rollout``, a child process: canary then waves), a signed release made
by the real packaging (the float32 digits model, checked in the real interpreter), and every
byte on the wire: each device is its own paho-mqtt client and TCP connection speaking
Tandem's protocol through ``shared/`` (topics, status, telemetry, update reports, manifest
parsing and Ed25519 verification against a pinned trust store, artifact download over HTTP
with size, digest and ETag checks). The parts: ``sim_device.py`` (one device),
``sim_config.py`` (their settings), ``sim_worker.py`` (a process of devices),
``sim_cluster.py`` (the servers), ``sim_report.py`` (table and JSON), ``sim_args.py``.

What is simulated: each device's interpreter (VERIFYING waits ``--verify-ms``; the health
watch ``--health-watch-s``) and its disk (outbox and model store in memory). Devices run in
``--procs`` processes of one asyncio loop each (paho's external-loop API), not on 10,000
machines: they share this machine's two cores with the broker and the cloud, so every figure
is a floor for what separate machines would reach. Downloads of one process share a pooled
``httpx.AsyncClient`` (``--http-connections``). The broker's listener is anonymous, without
ACL (``sim_cluster.py``).

Phases (``--phases``; ``connect`` always runs first):

- ``connect``: every device connects (paced at ``--connect-rate``/s), births stored;
- ``rollout``: release 2 through the controller, canary ``--canary`` then ``--waves`` waves:
  from the command's start (and from the first manifest delivered) to every device ACTIVE;
- ``ingest``: periodic telemetry paused, then ``--burst`` messages per device put in every
  outbox at once (sent as the outbox allows: 32 unacknowledged, 50/s refill): messages/s
  from the first publish to the last row in the store (counted in the store's table);
- ``outage``: Mosquitto stopped ``--outage-s`` while devices keep reporting (every
  ``--interval`` s, queued in their outboxes), then started again: the time until the store
  holds every message made before the restart;
- ``api``: ``GET /fleet/summary`` and the device listing, ``--api-requests`` each, p50/p95;
- after each phase: VmRSS/VmHWM and CPU time of the broker, each cloud instance,
  PostgreSQL and the sim processes (``--profile``: cProfile of the sim processes).

    python scripts/fleet_sim.py --devices 1000 [--instances 1|2] [--store sqlite|postgres]
        [--phases connect rollout ingest outage api] [--outage-s 60] [--procs 2]

Results are printed and merged into ``--out`` (default out/bench/fleet_sim.json) under a key
per configuration (``n1000-i1-sqlite``), so runs of several configurations share one file.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procs import ROOT
from sim_args import parse_args
from sim_cluster import (
    CloudServer,
    SimBroker,
    SimPostgres,
    StoreProbe,
    die_with_parent,
    memory,
    prepare_releases,
    raise_fd_limit,
)
from sim_config import DeviceConfig
from sim_report import fmt, measure_api, merge_json, report
from sim_worker import Worker

FLEET = "sim"


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


class Sim:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.n: int = args.devices
        self.workers: list[Worker] = []
        self.clouds: list[CloudServer] = []
        self.broker: SimBroker | None = None
        self.pg: SimPostgres | None = None
        self.probe: StoreProbe | None = None
        self.results: dict[str, Any] = {}
        self.memory: dict[str, dict[str, dict[str, int]]] = {}
        self.env: dict[str, str] = {}
        #: telemetry messages a phase found never stored (the next phases expect them not)
        self.lost = 0

    # ------------------------------------------------------------------ set-up

    async def setup(self) -> None:
        a = self.args
        trust, registry, release1, release2 = prepare_releases(self.work)
        self.release = release2
        state_dir = self.work / "cloud"
        state_dir.mkdir()
        self.broker = SimBroker(self.work / "broker", a.max_queued, a.max_inflight)
        self.broker.start()
        self.env = {
            "TANDEM_CLOUD_MQTT__URL": self.broker.url,
            "TANDEM_CLOUD_FLEET": FLEET,
            "TANDEM_CLOUD_STATE_DIR": str(state_dir),
            "TANDEM_CLOUD_REPO_POLL_S": "0",
            "TANDEM_CLOUD_LOG_LEVEL": a.cloud_log_level,
            "PYTHONUNBUFFERED": "1",
        }
        if a.instances > 1:  # as docs/operations.md says: several instances share a group
            self.env["TANDEM_CLOUD_COLLECTOR_SHARE_GROUP"] = "collectors"
        for pair in a.cloud_env:
            key, _, value = pair.partition("=")
            self.env[key] = value
        store_url = f"sqlite:///{state_dir / 'fleet.db'}"
        if a.store == "postgres":
            from cloud.settings import CloudSettings

            if "database_url" not in CloudSettings.model_fields:
                raise SystemExit("fleet_sim: this tandem-cloud has no database URL (SQLite only)")
            self.pg = SimPostgres()
            self.pg.start()
            store_url = self.pg.url("fleet")
            self.env["TANDEM_CLOUD_DATABASE_URL"] = store_url
        self.probe = StoreProbe(store_url)
        repo = self.work / "empty-repo"  # the fleet side is measured, not ONNX inference
        repo.mkdir()
        for i in range(a.instances):
            cloud = CloudServer(
                f"cloud-{i}",
                self.env,
                ["--repo", str(repo), "--registry", str(registry)],
                self.work / f"cloud-{i}.log",
            )
            cloud.start()
            self.clouds.append(cloud)
        log(f"broker {self.broker.url}, {a.instances} cloud instance(s), store {a.store}")
        factory = self.work / "release1.json"
        factory.write_text(release1.to_json())
        device = DeviceConfig(
            fleet=FLEET,
            broker_host="127.0.0.1",
            broker_port=self.broker.port,
            registries=tuple(c.url for c in self.clouds),
            interval_s=a.interval,
            settle_s=a.settle_s,
            verify_s=a.verify_ms / 1000.0,
            health_watch_s=a.health_watch_s,
            reconnect_max_s=a.reconnect_max_s,
        )
        per = math.ceil(self.n / a.procs)
        session = int(time.time())
        for first in range(0, self.n, per):
            spec = {
                "first": first,
                "count": min(per, self.n - first),
                "device": {k: v for k, v in asdict(device).items() if k != "registries"},
                "registries": list(device.registries),
                "trust_store": str(trust),
                "factory": str(factory),
                "session": session,
                "connect_rate": a.connect_rate / a.procs,
                "http_connections": a.http_connections,
                "profile": str(a.profile) if a.profile else None,
            }
            self.workers.append(
                await Worker.spawn(
                    spec, self.work / f"worker-{first}.json", self.work / "workers.log"
                )
            )

    async def stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.ask("stats") for w in self.workers)))

    @staticmethod
    def total(stats: list[dict[str, Any]], key: str) -> int:
        return sum(int(s["counts"].get(key, 0)) for s in stats)

    async def store_count(self, until: str | None = None) -> int:
        assert self.probe is not None
        return await asyncio.to_thread(self.probe.telemetry, FLEET, until)

    def sample_memory(self, phase: str) -> None:
        procs: dict[str, int | None] = {"broker": self.broker.pid if self.broker else None}
        for c in self.clouds:
            procs[c.name] = c.pid
        for i, w in enumerate(self.workers):
            procs[f"sim-worker-{i}"] = w.proc.pid
        out = {name: memory(pid) for name, pid in procs.items() if pid}
        if self.pg is not None:
            out["postgres"] = self.pg.memory()
        self.memory[phase] = out

    # ------------------------------------------------------------------- phases

    async def connect(self) -> None:
        t0 = time.monotonic()
        await asyncio.gather(*(w.ask("start") for w in self.workers))
        deadline = t0 + self.n / self.args.connect_rate + 180
        connected_at = stored_at = None
        assert self.probe is not None
        while time.monotonic() < deadline:
            stats = await self.stats()
            now = time.monotonic()
            connected = sum(s["connected"] for s in stats)
            if connected_at is None and connected >= self.n:
                connected_at = now
            online = await asyncio.to_thread(self.probe.online, FLEET)
            if stored_at is None and online >= self.n:
                stored_at = now
            if connected_at and stored_at:
                break
            await asyncio.sleep(0.25)
        stats = await self.stats()
        self.results["connect"] = {
            "all_connected_s": None if connected_at is None else connected_at - t0,
            "births_stored_s": None if stored_at is None else stored_at - t0,
            "connected": sum(s["connected"] for s in stats),
            "connect_errors": self.total(stats, "connect_errors"),
            "connect_rate": self.args.connect_rate,
        }
        log(f"connect: {self.results['connect']}")
        self.sample_memory("connect")

    async def rollout(self) -> None:
        a = self.args
        r = self.release
        assert self.broker is not None
        cmd = [sys.executable, "-m", "cloud.cli", "fleet", "rollout", f"{r.model}@{r.version}"]
        cmd += ["--canary", a.canary, "--waves", str(a.waves), "--wave-timeout", "900"]
        cmd += ["--broker", self.broker.url, "--fleet", FLEET]
        cmd += ["--registry", str(self.work / "registry")]
        cmd += ["--state-dir", self.env["TANDEM_CLOUD_STATE_DIR"]]
        t0 = time.monotonic()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
            limit=64 * 1024 * 1024,  # an abort's line names every failed device
        )
        lines: list[tuple[float, str]] = []

        async def read() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace").rstrip()
                if len(text) > 400:
                    text = f"{text[:400]}... ({len(text):,} characters)"
                lines.append((time.monotonic() - t0, text))
                log(f"  controller: {text}")

        reader = asyncio.create_task(read())
        deadline = t0 + a.rollout_timeout
        all_active = None
        while time.monotonic() < deadline:
            stats = await self.stats()
            releases = [s["releases"].get(str(r.version), {}) for s in stats]
            if sum(x.get("active", 0) for x in releases) >= self.n:
                all_active = max(x["last_active"] for x in releases if x.get("last_active"))
                break
            if proc.returncode is not None:  # it ended (aborted) before all were ACTIVE
                break
            await asyncio.sleep(0.25)
        try:
            await asyncio.wait_for(proc.wait(), timeout=max(5.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        t_done = time.monotonic()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        await reader
        stats = await self.stats()
        releases = [s["releases"].get(str(r.version), {}) for s in stats]
        firsts = [x["first_manifest"] for x in releases if x.get("first_manifest")]
        first = min(firsts) if firsts else None
        self.results["rollout"] = {
            "release": f"{r.model}@{r.version}",
            "canary": a.canary,
            "waves": a.waves,
            "active": sum(x.get("active", 0) for x in releases),
            "publish_to_all_active_s": None if all_active is None else all_active - t0,
            "first_manifest_to_all_active_s": None
            if all_active is None or first is None
            else all_active - first,
            "command_s": t_done - t0,
            "command_rc": proc.returncode,
            "failed": self.total(stats, "job_FAILED"),
            "rejected": self.total(stats, "job_REJECTED"),
            "downloads": self.total(stats, "download_200"),
            "not_modified": self.total(stats, "download_304"),
            "download_retries": self.total(stats, "download_retries"),
            "controller": [{"t_s": round(t, 3), "line": text} for t, text in lines],
            # the controller is the only child that ends in this phase
            "controller_cpu_s": children1.ru_utime
            + children1.ru_stime
            - children0.ru_utime
            - children0.ru_stime,
        }
        log(
            "rollout: {active}/{n} ACTIVE, publish -> all ACTIVE {p} s, command {c:.1f} s".format(
                n=self.n,
                p=fmt(self.results["rollout"]["publish_to_all_active_s"]),
                c=t_done - t0,
                active=self.results["rollout"]["active"],
            )
        )
        self.sample_memory("rollout")

    async def _wait_stored(
        self, target: int, deadline: float, until: str | None = None
    ) -> tuple[float | None, int]:
        """Poll the store until it holds ``target`` telemetry rows (made at ``until`` or
        before): when it did (None: never) and the last count. Gives up at ``deadline``, or
        once nothing is on its way (every device connected, every message acknowledged by
        the broker) and the count has not moved for ``--stall-s``: the rest was lost."""
        count, moved = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_count = await self.store_count(until)
            now = time.monotonic()
            if now_count >= target:
                return now, now_count
            if now_count != count:
                count, moved = now_count, now
            elif now - moved > self.args.stall_s:
                stats = await self.stats()
                idle = all(s["pending"] == 0 and s["connected"] == s["devices"] for s in stats)
                if idle:
                    return None, count
            await asyncio.sleep(0.05)
        return None, count

    async def _caught_up(self, timeout_s: float) -> bool:
        """Wait until the store holds every telemetry message made so far (but those an
        earlier phase found lost)."""
        expected = self.total(await self.stats(), "generated") - self.lost
        done, count = await self._wait_stored(expected, time.monotonic() + timeout_s)
        if done is None:
            self.lost += max(0, expected - count)
        return done is not None

    async def _wait_acked(self, target: int, deadline: float) -> float | None:
        while time.monotonic() < deadline:
            if self.total(await self.stats(), "acked") >= target:
                return time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def ingest(self) -> None:
        a = self.args
        burst = a.burst or max(5, min(32, math.ceil(50_000 / self.n)))
        await asyncio.gather(*(w.ask("telemetry", on=False) for w in self.workers))
        settled = await self._caught_up(120)
        c0 = await self.store_count()
        acked0 = self.total(await self.stats(), "acked")
        answers = await asyncio.gather(*(w.ask("burst", count=burst) for w in self.workers))
        t_first = min(x["t_first"] for x in answers)
        messages = sum(x["messages"] for x in answers)
        deadline = time.monotonic() + a.ingest_timeout
        acked = asyncio.create_task(self._wait_acked(acked0 + messages, deadline))
        t_stored, count = await self._wait_stored(c0 + messages, deadline)
        t_acked = await acked
        await asyncio.gather(*(w.ask("telemetry", on=True) for w in self.workers))
        self.lost += c0 + messages - count if t_stored is None else 0
        self.results["ingest"] = {
            "instances": a.instances,
            "store": a.store,
            "per_device": burst,
            "messages": messages,
            "stored": count - c0,
            "lost": messages - (count - c0),
            "settled_before": settled,
            "store_msg_per_s": None if t_stored is None else messages / (t_stored - t_first),
            "broker_acked_msg_per_s": None if t_acked is None else messages / (t_acked - t_first),
            "first_publish_to_last_row_s": None if t_stored is None else t_stored - t_first,
        }
        log(f"ingest: {self.results['ingest']}")
        self.sample_memory("ingest")

    async def outage(self) -> None:
        a = self.args
        assert self.broker is not None
        await self._caught_up(120)
        g_stop = self.total(await self.stats(), "generated")
        log(f"outage: stopping Mosquitto for {a.outage_s:g} s")
        self.broker.stop()
        await asyncio.sleep(a.outage_s)
        self.broker.start()
        t_restart = time.monotonic()
        # first what was made, then the time: a message made in between counts as stored
        # early rather than never
        g_restart = self.total(await self.stats(), "generated")
        until = datetime.now(timezone.utc).isoformat()
        expected = g_restart - self.lost
        deadline = t_restart + a.outage_timeout
        reconnected = asyncio.create_task(self._wait_connected(deadline))
        caught_up, count = await self._wait_stored(expected, deadline, until)
        t_reconnected = await reconnected
        lost = max(0, expected - count)
        self.lost += lost
        self.results["outage"] = {
            "outage_s": a.outage_s,
            "queued_during_outage": g_restart - g_stop,
            "devices_reconnected_s": None if t_reconnected is None else t_reconnected - t_restart,
            "lag_s": None if caught_up is None else caught_up - t_restart,
            "lost": lost,
            "generated_before_restart": g_restart,
            "restarted_at": until,
            "device_reconnect_max_s": a.reconnect_max_s,
        }
        log(f"outage: {self.results['outage']}")
        self.sample_memory("outage")

    async def _wait_connected(self, deadline: float) -> float | None:
        while time.monotonic() < deadline:
            stats = await self.stats()
            if sum(s["connected"] for s in stats) >= self.n:
                return time.monotonic()
            await asyncio.sleep(0.1)
        return None

    async def api(self) -> None:
        a = self.args
        paths = ["/fleet/summary", "/fleet/devices", "/fleet/devices?limit=1000"]
        self.results["api"] = await measure_api(
            self.clouds[0].url, paths, a.api_requests, a.api_timeout, log
        )
        self.sample_memory("api")

    async def shutdown(self) -> None:
        for w in self.workers:
            try:
                await asyncio.wait_for(w.ask("stop"), timeout=60)
            except (asyncio.TimeoutError, RuntimeError):
                w.proc.kill()
            await w.proc.wait()
        for c in self.clouds:
            c.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.probe is not None:
            self.probe.close()
        if self.pg is not None:
            self.pg.stop()


async def run(args: argparse.Namespace) -> int:
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop what was started, then exit
        loop.add_signal_handler(sig, main_task.cancel)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=False)
        args.keep = True
    work = args.work or Path(tempfile.mkdtemp(prefix="tandem-fleet-sim-"))
    sim = Sim(args, work)
    code = 0
    try:
        await sim.setup()
        sim.sample_memory("setup")
        await sim.connect()
        for phase in args.phases:
            if phase != "connect":
                await getattr(sim, phase)()
    except Exception as exc:  # the table still shows what was measured before
        traceback.print_exc()
        log(f"failed: {type(exc).__name__}: {exc} (logs in {work})")
        code = 1
        args.keep = True
    finally:
        await sim.shutdown()
        doc = report(args, sim.n, sim.results, sim.memory)
        merge_json(args.out, f"n{args.devices}-i{args.instances}-{args.store}", doc)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0])
    hard = raise_fd_limit()
    need = args.devices + 200
    if hard < need or hard < math.ceil(args.devices / args.procs) + 200:
        raise SystemExit(f"fleet_sim: {args.devices} devices need {need} open files, limit {hard}")
    try:
        return asyncio.run(run(args))
    except asyncio.CancelledError:  # SIGTERM or ^C: what was started has been stopped
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
