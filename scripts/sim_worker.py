"""One process of the fleet simulator: a slice of the fleet's devices on one asyncio loop.

Started by ``fleet_sim.py`` with a JSON file of its settings; takes commands as JSON lines on
stdin and answers each with one JSON line on stdout (logs go to stderr):

- ``{"cmd": "start"}``: make the devices and connect them, paced at ``connect_rate`` a second;
- ``{"cmd": "stats"}``: counters, connected devices, outboxes, per-release times;
- ``{"cmd": "telemetry", "on": bool}``: the periodic telemetry on or off;
- ``{"cmd": "burst", "count": K}``: K telemetry messages per device, built first, then put
  in every outbox at once; answers when they are queued (``t_first``: when the first went);
- ``{"cmd": "stop"}``: every device says offline and disconnects; then the process ends.

``Worker`` is the other end: how ``fleet_sim.py`` starts one and asks it.

    python scripts/sim_worker.py CONFIG.json
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sim_cluster import die_with_parent
from sim_config import DeviceConfig, HostState
from sim_device import SimDevice

from agent.device.telemetry import process_rss_bytes
from shared.manifest import Manifest
from shared.signing import TrustStore

log = logging.getLogger("sim_worker")

# httpcore asks for sniffio at every request; where it is not installed (anyio 4.16 does
# not need it) each ask is a failed import, a search of sys.path (0.3 ms). Marked absent,
# the import fails at once and httpcore takes asyncio, as it would anyway.
sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


class SimHost:
    """The devices of this process and what they share: the loop, the trust store, one
    pooled HTTP client, the connect pacer, the keepalive and telemetry tickers."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = DeviceConfig(**{**spec["device"], "registries": tuple(spec["registries"])})
        self.trust = TrustStore.load(Path(spec["trust_store"]))
        limits = httpx.Limits(
            max_connections=spec["http_connections"],
            max_keepalive_connections=spec["http_connections"],
        )
        # no pool timeout: waiting for one of the process's pooled connections is the
        # simulator's queue, not the device's (each real device has a connection of its own)
        timeout = httpx.Timeout(self.config.download_timeout_s, pool=None)
        self.http = httpx.AsyncClient(limits=limits, timeout=timeout)
        # ... and the queue is kept here: httpcore's pool rescans every queued request at
        # every change (thousands queued: 8 ms of CPU per download at 500 devices)
        self.http_slots = asyncio.Semaphore(spec["http_connections"])
        self.state = HostState()
        self.first, self.count = int(spec["first"]), int(spec["count"])
        self.factory = Manifest.from_json(Path(spec["factory"]).read_text())
        self.session = int(spec["session"])
        self.connect_rate = float(spec["connect_rate"])
        self.devices: list[SimDevice] = []
        self._connect_queue: deque[SimDevice] = deque()
        self._connect_wake = asyncio.Event()
        self.telemetry_on = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.devices = [
            SimDevice(self, i, self.factory, self.session)
            for i in range(self.first, self.first + self.count)
        ]
        for d in self.devices:
            self.request_connect(d)
        self._tasks = [
            self.loop.create_task(self._pacer()),
            self.loop.create_task(self._misc()),
            self.loop.create_task(self._ticker()),
        ]

    def request_connect(self, device: SimDevice) -> None:
        self._connect_queue.append(device)
        self._connect_wake.set()

    async def _pacer(self) -> None:
        """Connection attempts at ``connect_rate`` a second, at most, in slices of 10 ms."""
        tick = 0.01
        budget = 0.0
        last = time.monotonic()
        while True:
            if not self._connect_queue:
                self._connect_wake.clear()
                await self._connect_wake.wait()
                last = time.monotonic()
            now = time.monotonic()
            budget = min(self.connect_rate * tick * 2, budget + (now - last) * self.connect_rate)
            last = now
            while budget >= 1 and self._connect_queue:
                self._connect_queue.popleft().connect_now()
                budget -= 1
            await asyncio.sleep(tick)

    async def _misc(self) -> None:
        """paho's keepalive (PINGREQ, and the timeout of a dead connection), once a second."""
        while True:
            await asyncio.sleep(1.0)
            for d in self.devices:
                d.misc()

    async def _ticker(self) -> None:
        """Each device reports every ``interval_s``; their phases are spread evenly."""
        tick = 0.1
        n = len(self.devices)
        per_tick = n * tick / self.config.interval_s
        cursor = 0.0
        while True:
            await asyncio.sleep(tick)
            if not self.telemetry_on or not n:
                continue
            start = int(cursor)
            cursor += per_tick
            for i in range(start, int(cursor)):
                d = self.devices[i % n]
                d.put(d.telemetry())
            if cursor >= n:
                cursor -= n

    def burst(self, count: int) -> dict[str, Any]:
        built = [[d.telemetry() for _ in range(count)] for d in self.devices]
        t_first = time.monotonic()
        for d, payloads in zip(self.devices, built):
            for p in payloads:
                d.put(p)
        return {"t_first": t_first, "t_queued": time.monotonic(), "messages": count * self.count}

    def stats(self) -> dict[str, Any]:
        versions: dict[int, int] = {}
        for d in self.devices:
            versions[d.served.version] = versions.get(d.served.version, 0) + 1
        return {
            "devices": len(self.devices),
            "connected": sum(d.connected for d in self.devices),
            "pending": sum(d.pending for d in self.devices),
            "serving": versions,
            "counts": dict(self.state.counts),
            "releases": {v: t.as_dict() for v, t in self.state.versions.items()},
            "rss_bytes": process_rss_bytes(),
            "now": time.monotonic(),
        }

    async def stop(self) -> None:
        for d in self.devices:
            d.stop()
        await asyncio.sleep(0.5)  # the goodbyes go out
        for t in self._tasks:
            t.cancel()
        await self.http.aclose()


class Worker:
    """One ``sim_worker.py`` process and its command pipe (one command at a time)."""

    def __init__(self, proc: asyncio.subprocess.Process, first: int, count: int) -> None:
        self.proc = proc
        self.first, self.count = first, count
        self._lock = asyncio.Lock()

    @classmethod
    async def spawn(cls, spec: dict[str, Any], path: Path, stderr: Path) -> Worker:
        path.write_text(json.dumps(spec))
        with stderr.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(Path(__file__)),
                str(path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=16 * 1024 * 1024,
                preexec_fn=die_with_parent,
            )
        return cls(proc, spec["first"], spec["count"])

    async def ask(self, cmd: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            try:
                self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
                await self.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                line = b""
            else:
                line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sim worker {self.first} exited (rc {self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        return answer


async def serve(spec: dict[str, Any]) -> None:
    host = SimHost(spec)
    reader = asyncio.StreamReader()
    await host.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "start":
            host.start()
            answer({"ok": True, "config": asdict(host.config)})
        elif name == "stats":
            answer(host.stats())
        elif name == "telemetry":
            host.telemetry_on = bool(cmd["on"])
            answer({"ok": True})
        elif name == "burst":
            answer(host.burst(int(cmd["count"])))
        elif name == "stop":
            await host.stop()
            answer({"ok": True})
            return
        else:
            answer({"error": f"unknown command {name!r}"})


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("profile"):  # where the simulator's own time goes (fleet_sim --profile)
        import cProfile

        with cProfile.Profile() as profile:
            asyncio.run(serve(spec))
        profile.dump_stats(f"{spec['profile']}-{spec['first']}.prof")
        return 0
    asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
