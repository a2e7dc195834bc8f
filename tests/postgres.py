"""A real PostgreSQL for tests: Debian's server (the newest under /usr/lib/postgresql),
``initdb`` in a temporary folder, listening on 127.0.0.1 at a free port and on a unix socket
in that folder. ``fsync=off``: a test database need not survive a power cut.

PostgreSQL refuses to run as root, and the suite does: as root, the folder is given to the
``postgres`` user and the server runs as it (``runuser``). The folder is made with
``tempfile`` in /tmp, not under pytest's temporary root, which only root may enter.
Each ``database()`` is a fresh, empty database, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.helpers import free_port

USER = "postgres"


def postgres_bin() -> Path | None:
    """The bin folder of the newest installed server (``apt-get install postgresql``)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]

    def version(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", bin_dir.parent.name))

    return max(found, key=version) if found else None


class Postgres:
    """``durable``: fsync and synchronous commits on, as in production (benchmarks).
    ``options``: more ``-c name=value`` server settings, after (so over) the durability ones;
    ``preexec_fn``: run in the server's child before it starts (the simulator's
    die-with-parent)."""

    def __init__(
        self,
        durable: bool = False,
        options: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = 0
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, USER, USER)
            self._as_user = ["runuser", "-u", USER, "--"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count()
        self._durability = (
            ["-c", "fsync=on", "-c", "synchronous_commit=on"]
            if durable
            else ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        )
        self._options = [arg for option in options for arg in ("-c", option)]
        self._preexec_fn = preexec_fn

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as_user, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stdout} {done.stderr}")

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections. A port that
        ``free_port`` chose may be taken by the time the server binds it: a fresh one."""
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        for _ in range(5):
            why = self._start_once(free_port())
            if why is None:
                return
            if "already in use" not in why:
                break
        self.stop()
        raise RuntimeError(f"postgres did not start: {why}")

    def _start_once(self, port: int) -> str | None:
        """None once it accepts connections, else why not (its log's tail)."""
        import psycopg

        self.port = port
        seen = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    *self._as_user,
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(port),
                    "-k",
                    str(self.dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                    *self._durability,
                    *self._options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._preexec_fn,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return f"exited: {self._log_tail(seen)}"
            try:
                psycopg.connect(self.url(), connect_timeout=1).close()
                return None
            except psycopg.OperationalError:
                time.sleep(0.05)
        return f"did not accept connections: {self._log_tail(seen)}"

    def _log_tail(self, since: int = 0) -> str:
        if not self.log.exists():
            return "(no log)"
        return self.log.read_bytes()[since:].decode(errors="replace").strip()[-1500:]

    def database(self) -> str:
        """A fresh, empty database's URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    __call__ = database

    def restart(self) -> None:
        """Stop and start again on the same port, data kept: clients' connections are cut."""
        self._shutdown()
        why = self._start_once(self.port)
        if why is not None:
            raise RuntimeError(f"postgres did not restart: {why}")

    def stop(self) -> None:
        """Fast shutdown, then the folder."""
        self._shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _shutdown(self) -> None:
        """SIGINT to the postmaster (fast shutdown: it ends its sessions)."""
        if self._proc is not None:
            pid_file = self.data / "postmaster.pid"
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
