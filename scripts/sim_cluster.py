"""The fleet simulator's real servers: Mosquitto, PostgreSQL, ``tandem-cloud serve`` instances,
the signed releases they serve, a read-only probe of the fleet store, and ``/proc`` memory.

Mosquitto is configured for a fleet of 10,000 on one machine: no connection limit
(``max_connections -1``), deep queues for the collectors' persistent sessions
(``max_queued_messages``, ``max_queued_bytes 0``), persistence on (retained manifests, births,
job states and the collectors' sessions survive the outage phase's restart), no per-connect
log lines. Its listener is anonymous on 127.0.0.1 with no ACL: the simulator measures the
fleet side, not Mosquitto's password hashing (``tests/mosquitto.py`` tests the ACL).

PostgreSQL runs as in production but for ``synchronous_commit=off`` (SQLite's fleet store
runs ``synchronous=NORMAL``: both may lose the last commits at a power cut, neither corrupts).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from procs import ROOT, free_port, stop_process

from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from shared.manifest import Manifest
from shared.signing import SigningKey, TrustStore
from tests.postgres import Postgres

FACTORY = ROOT / "models/edge/digits-int8"
UPDATE = ROOT / "models/edge/digits-f32"


def die_with_parent() -> None:
    """In a child, before ``exec``: the kernel sends it SIGTERM when the simulator dies, even
    by SIGKILL (a test's timeout), so no broker, server or worker outlives a run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def raise_fd_limit() -> int:
    """The soft limit of open files raised to the hard one (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak) and Pss (shared pages divided among their sharers) of a
    process in bytes, and the CPU time it has used (``cpu_ms``); {} if it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                out[key] = int(value.split()[0]) * 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out["cpu_ms"] = (int(fields[11]) + int(fields[12])) * 1000 // ticks  # utime + stime
    except OSError:
        return {}
    return out


def children(pid: int) -> list[int]:
    """Direct children of a process (PostgreSQL's backends)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# ------------------------------------------------------------------------ releases


def prepare_releases(work: Path) -> tuple[Path, Path, Manifest, Manifest]:
    """Signing key, trust store, and a registry holding the factory model as release 1 and
    the float32 model as release 2, packaged and signed as an operator does (the real
    interpreter checks it). Returns the trust store, the registry, releases 1 and 2."""
    key = SigningKey.generate()
    key.save(work / "keys" / "operator.key")
    trust = TrustStore()
    trust.add(key.public_b64)
    trust.save(work / "keys" / "trust.json")
    registry = Registry(work / "registry")
    m = Manifest.load(FACTORY)
    url = f"/registry/{m.model}/1/{m.edge.file}"
    release1 = key.sign(m.model_copy(update={"edge": m.edge.model_copy(update={"url": url})}))
    registry.publish(release1, (FACTORY / m.edge.file).read_bytes())
    release2 = package(
        PackageRequest(edge=UPDATE / "model.tflite", template=Manifest.load(UPDATE)), key, registry
    )
    return work / "keys" / "trust.json", work / "registry", release1, release2


# -------------------------------------------------------------------------- broker


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(found).exists():
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    return found


class SimBroker:
    """Mosquitto on a free port; ``stop``/``start`` again keeps the port and its state."""

    def __init__(self, workdir: Path, max_queued: int, max_inflight: int) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "max_connections -1\n"
            f"max_queued_messages {max_queued}\n"
            "max_queued_bytes 0\n"
            f"max_inflight_messages {max_inflight}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "connection_messages false\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\n"
            "user root\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        import socket

        with (self.dir / "stderr.log").open("ab") as err:  # its run-as-root warning
            self._proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf)],
                stdout=err,
                stderr=err,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = (self.dir / "mosquitto.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"mosquitto exited: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not listen")

    def stop(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file, then exits."""
        if self._proc is None:
            return
        stop_process(self._proc, 60)
        self._proc = None


# ---------------------------------------------------------------------- PostgreSQL


#: Over tests/postgres.py's durable server: commits acknowledged before their WAL reaches the
#: disk (fsync stays on: a crash loses the last few hundred milliseconds, never consistency),
#: room for two instances' pools and the probe, and buffers for 10,000 devices' rows.
SERVER_OPTIONS = ("synchronous_commit=off", "max_connections=300", "shared_buffers=256MB")


class SimPostgres(Postgres):
    """tests/postgres.py's server (as the ``postgres`` user when root, in a folder of its own
    in /tmp) with the simulator's settings, a ``fleet`` database, and its memory."""

    def __init__(self) -> None:
        super().__init__(durable=True, options=SERVER_OPTIONS, preexec_fn=die_with_parent)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        import psycopg

        super().start()
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "fleet"')

    def memory(self) -> dict[str, int]:
        """The server's processes (postmaster and backends) summed by Pss, which counts
        their shared buffers once; VmRSS and VmHWM are then that sum too (a sum of RSS
        would count the shared buffers once per backend)."""
        if self._proc is None:
            return {}
        # runuser is the child; the postmaster is its child, the backends are the postmaster's
        postmasters = children(self._proc.pid)
        pids = {*postmasters, *(c for p in postmasters for c in children(p))}
        figures = [memory(pid) for pid in pids]
        pss = sum(f.get("Pss", 0) for f in figures)
        cpu = sum(f.get("cpu_ms", 0) for f in figures)
        return {"VmRSS": pss, "VmHWM": pss, "Pss": pss, "cpu_ms": cpu, "processes": len(pids)}


# ---------------------------------------------------------------------- the cloud


class CloudServer:
    """``tandem-cloud serve`` as a child process, configured by environment (the way an
    operator's unit file would), with the registry, the broker and the fleet store."""

    def __init__(self, name: str, env: dict[str, str], extra: list[str], log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cmd = [sys.executable, "-m", "cloud.cli", "serve"]
        self._cmd += ["--host", "127.0.0.1", "--port", str(self.port), *extra]
        self._env = {**os.environ, **env}
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 60.0) -> None:
        out = self._log.open("ab")
        self._proc = subprocess.Popen(
            self._cmd,
            cwd=ROOT,
            stdout=out,
            stderr=out,
            env=self._env,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}: {tail}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        stop_process(self._proc, 30)
        self._proc = None


# ------------------------------------------------------------------- store probe


class StoreProbe:
    """Counts read straight from the fleet store's tables (read-only), so that a figure
    does not depend on the API being measured."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pg: Any = None
        self._lite: sqlite3.Connection | None = None

    def _query(self, sql: str, args: tuple[Any, ...]) -> int:
        if self.url.startswith("postgresql://"):
            import psycopg

            if self._pg is None:
                self._pg = psycopg.connect(self.url, autocommit=True)
            row = self._pg.execute(sql.replace("?", "%s"), args).fetchone()
        else:
            if self._lite is None:
                path = self.url.removeprefix("sqlite:///")
                if not Path(path).exists():
                    return 0
                self._lite = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False
                )
            try:
                row = self._lite.execute(sql, args).fetchone()
            except sqlite3.OperationalError as exc:  # the table is not made yet
                if "no such table" in str(exc):
                    return 0
                raise
        return int(row[0]) if row else 0

    def telemetry(self, fleet: str, until: str | None = None) -> int:
        if until is None:
            return self._query("SELECT COUNT(*) FROM telemetry WHERE fleet=?", (fleet,))
        return self._query("SELECT COUNT(*) FROM telemetry WHERE fleet=? AND ts<=?", (fleet, until))

    def online(self, fleet: str) -> int:
        return self._query(
            "SELECT COUNT(*) FROM devices WHERE fleet=? AND state='online'", (fleet,)
        )

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._lite is not None:
            self._lite.close()
