"""Benchmark: the resident memory of ``tandem-agent run``, and where each MB goes.

1. **The device** (``run``): the real ``tandem-agent run`` in a child process, as a device
   runs it, with the local endpoint (``[server]``), the digits int8 model from
   ``models/edge`` and a real broker on 127.0.0.1 (Mosquitto when installed, else the
   embedded one; ``scripts/local_broker.py``). Its ``VmRSS`` (and the anonymous and
   file-backed parts, and the thread count) from ``/proc/PID/status``: when the endpoint
   first answers ready, and after ``--requests`` inference requests (a device that served).
2. **The imports**: a second run of the same, whose interpreter first wraps
   ``importlib._bootstrap._find_and_load`` (what every import statement and
   ``importlib.import_module`` go through) to read its own RSS around every module load:
   each module's own growth, its nested imports' excluded, summed per top-level package,
   and written out when the agent exits. The RSS before the first import is the
   interpreter's own.

The rest, the second run's RSS minus its imports, is what booting costs: the model and its
interpreters, the threads' stacks, the heap of MQTT and of the endpoint; then what the
requests added in the first run. A third run without the endpoint (``run --no-serve``)
says what the endpoint costs as a whole.

    python scripts/bench_agent_rss.py [--requests 200] [--out out/bench/bench_agent_rss.json]

The environment of the measuring process goes to the agent: ``MALLOC_ARENA_MAX=2 python
scripts/bench_agent_rss.py`` measures the agent as the systemd unit runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from local_broker import local_broker
from procs import free_port
from results import write_json

ROOT = dataset.ROOT
MODEL = ROOT / "models/edge/digits-int8"
MB = 1_000_000


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (bytes) and Threads of process ``pid``."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def _config(work: Path, broker_url: str, port: int, serve: bool) -> Path:
    """A device's settings: the factory model, the broker, a trust store (updates on), the
    endpoint."""
    from shared.signing import SigningKey, TrustStore

    trust = TrustStore()
    trust.add(SigningKey.generate().public_b64)
    trust.save(work / "trust.json")
    path = work / "agent.toml"
    lines = [
        f'model_dir = "{MODEL}"',
        'device = "rss-0"',
        'fleet = "bench-rss"',
        f'state_dir = "{work / "state"}"',
        'log_level = "INFO"',
        "[mqtt]",
        f'url = "{broker_url}"',
        "[server]",
        f"port = {port}",
        f"enabled = {str(serve).lower()}",
        "[update]",
        f'trust_store = "{work / "trust.json"}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _settled(pid: int) -> dict[str, int]:
    """The status once RSS has stopped moving (the same to 100 KB over half a second)."""
    last = status(pid)
    for _ in range(40):
        time.sleep(0.5)
        now = status(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) < 100_000:
            return now
        last = now
    return last


def run_agent(
    work: Path,
    requests: int,
    pycache: Path,
    imports_to: Path | None = None,
    serve: bool = True,
) -> dict[str, Any]:
    """``tandem-agent run`` with the endpoint; its memory at ready and after requests.
    With ``imports_to``: run by ``_WRAPPER``, which writes its import breakdown there.
    Without ``serve``: no endpoint (``server.enabled = false``), memory once connected.

    Bytecode as on a device (pip compiles it at install), kept in ``pycache``
    (``PYTHONPYCACHEPREFIX``): the checkout's own ``__pycache__`` is left alone."""
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "agent.log"
    with local_broker(workdir=work / "broker") as broker:
        start = ["-c", _WRAPPER, str(imports_to)] if imports_to else ["-m", "agent.cli"]
        config = _config(work, broker.url, port, serve)
        cmd = [sys.executable, *start, "--config", str(config), "run"]
        with log.open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            if serve:
                _wait(lambda: proc.poll() is None and _ready(url), "the endpoint")
            _wait(lambda: b"connected to" in log.read_bytes(), "MQTT", 60)
            at_ready = _settled(proc.pid)
            x = dataset.load().test.x
            with httpx.Client(base_url=url) as client:
                for i in range(requests if serve else 0):
                    row = x[i % len(x)]
                    tensor = {"name": "input", "shape": [1, row.size], "datatype": "FP32"}
                    body = {"inputs": [{**tensor, "data": row.astype(float).tolist()}]}
                    r = client.post("/v2/models/digits/infer", json=body)
                    r.raise_for_status()
            served = _settled(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"the agent exited with {proc.returncode}: {log.read_text()[-2000:]}")
    return {"at_ready": at_ready, "after_requests": served}


# ----------------------------------------------------------------------- import breakdown

#: ``python -c _WRAPPER OUT ARGS...``: ``tandem-agent ARGS...`` whose every module load is
#: weighed (RSS before and after, per thread: the service's threads import too); at exit,
#: JSON to OUT: the RSS before any import and each module's own growth.
_WRAPPER = r"""
import importlib._bootstrap as b, atexit, json, os, sys, threading
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
start, own, stacks, real = rss(), {}, {}, b._find_and_load
def find_and_load(name, import_):
    stack = stacks.setdefault(threading.get_ident(), [])
    before = rss()
    stack.append(0)
    try:
        return real(name, import_)
    finally:
        grown = rss() - before
        nested = stack.pop()
        own[name] = own.get(name, 0) + grown - nested
        if stack:
            stack[-1] += grown
b._find_and_load = find_and_load
out = sys.argv.pop(1)
def dump():
    b._find_and_load = real
    with open(out, "w") as f:
        json.dump({"interpreter": start, "own": own}, f)
atexit.register(dump)
from agent.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def import_breakdown(path: Path) -> dict[str, Any]:
    """Per package, from what ``_WRAPPER`` wrote."""
    doc: dict[str, Any] = json.loads(path.read_text())
    by_package: dict[str, int] = {}
    for module, grown in doc["own"].items():
        package = module.split(".")[0]
        by_package[package] = by_package.get(package, 0) + grown
    doc["by_package"] = dict(sorted(by_package.items(), key=lambda kv: -kv[1]))
    own = doc.pop("own")
    doc["modules"] = len(own)
    doc["total"] = sum(own.values())
    doc["largest_modules"] = dict(sorted(own.items(), key=lambda kv: -kv[1])[:40])
    return doc


# ------------------------------------------------------------------------------ the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench/bench_agent_rss.json")
    parser.add_argument(
        "--pycache", type=Path, default=ROOT / "out/bench/pycache", help="bytecode folder"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tandem-rss-") as tmp:
        work = Path(tmp)
        run_agent(work / "warm", 0, args.pycache)  # compiles what is not compiled yet
        run = run_agent(work / "a", args.requests, args.pycache)
        weighed = run_agent(work / "b", 0, args.pycache, imports_to=work / "imports.json")
        imports = import_breakdown(work / "imports.json")
        headless = run_agent(work / "c", 0, args.pycache, serve=False)
    rss = run["after_requests"]["VmRSS"]
    doc = {
        "bench": "agent_rss",
        "command": "python scripts/bench_agent_rss.py",
        "model": "digits-int8 (models/edge)",
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OPENBLAS"))},
        "run": run,
        "imports": imports,
        "weighed_run": weighed,
        "without_endpoint": headless["at_ready"],
    }
    print(f"tandem-agent run, endpoint on, digits int8, {args.requests} requests served")
    for when in ("at_ready", "after_requests"):
        s = run[when]
        print(
            f"  {when:15} VmRSS {s['VmRSS'] / MB:6.1f} MB  (anon {s['RssAnon'] / MB:5.1f}, "
            f"file {s['RssFile'] / MB:5.1f})  threads {s['Threads']}"
        )
    s = headless["at_ready"]
    print(f"  {'no endpoint':15} VmRSS {s['VmRSS'] / MB:6.1f} MB  (run --no-serve)")
    print("where it goes                 MB")
    print(f"  {'interpreter (no import)':26}{imports['interpreter'] / MB:6.1f}")
    for package, grown in imports["by_package"].items():
        if grown >= 0.3 * MB:
            print(f"  {'import ' + package:26}{grown / MB:6.1f}")
    small = sum(g for g in imports["by_package"].values() if g < 0.3 * MB)
    print(f"  {'imports under 0.3 MB each':26}{small / MB:6.1f}")
    booted = weighed["at_ready"]["VmRSS"] - imports["interpreter"] - imports["total"]
    print(f"  {'booted (model, threads..)':26}{booted / MB:6.1f}")
    served = run["after_requests"]["VmRSS"] - run["at_ready"]["VmRSS"]
    print(f"  {f'{args.requests} requests served':26}{served / MB:6.1f}")
    print(f"  {'total':26}{rss / MB:6.1f}")
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
