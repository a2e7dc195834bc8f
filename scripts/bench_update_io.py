"""Benchmark: the disk operations of one real model update (fsyncs, renames, opens).

One device's update, in-process and for real: the cloud server with its registry in a child
process (``tandem-cloud serve --registry``), release 2 (the digits float32 model) packaged and
signed as the fleet would, and in the measured process a real ``ModelStore`` booted from the
factory model (digits int8), a real ``Agent`` on TFLite and a real ``Updater`` taking the
manifest through every job state to ``ACTIVE`` (download over HTTP with its ETag, the slot,
verification in a fresh interpreter, the pointer, the health watch set to 0 s).

Two counts of the same update:

- **syscalls** (when ``strace`` is installed): the measured process runs under
  ``strace -f``; only the calls between two marker ``access()`` calls made around
  ``Updater.process`` count: ``fsync``/``fdatasync``, ``rename*``, and ``openat`` of paths in
  the state folder. This is what the kernel saw.
- **Python calls**, by file: ``os.fsync``, ``os.replace``/``os.rename`` and opens of paths in
  the state folder, wrapped while the update runs on the calling thread, each put down to
  the file it touched (pointer, job record, accepted versions, slot, staging, ETag). This
  says which write each fsync belongs to.

    python scripts/bench_update_io.py [--out out/bench/bench_update_io.json] [--no-strace]
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from results import write_json

FACTORY = dataset.ROOT / "models/edge/digits-int8"
UPDATE = dataset.ROOT / "models/edge/digits-f32"
BEGIN, END = "/tandem-bench-update-begin", "/tandem-bench-update-end"


# ------------------------------------------------------------------------ the release


def prepare_registry(out: Path) -> tuple[Any, Path, Path]:
    """Key, trust store and registry with the factory model as release 1 (as
    ``demo_fleet.prepare_registry``, without importing the fleet side)."""
    from cloud.releases.registry import Registry
    from shared.manifest import Manifest
    from shared.signing import SigningKey, TrustStore

    key = SigningKey.generate()
    trust = TrustStore()
    trust.add(key.public_b64)
    trust.save(out / "trust.json")
    registry = Registry(out / "registry")
    m = Manifest.load(FACTORY)
    url = f"/registry/{m.model}/1/{m.edge.file}"
    release1 = m.model_copy(update={"edge": m.edge.model_copy(update={"url": url})})
    registry.publish(key.sign(release1), (FACTORY / m.edge.file).read_bytes())
    return key, out / "trust.json", out / "registry"


# ------------------------------------------------------------------- Python-level counts


def _kind(path: str, state: str) -> str:
    """What a path in the state folder is, for the breakdown (a folder's fsync is the
    folder's: it makes the names in it durable)."""
    rel = Path(path).relative_to(state)
    name = rel.name
    if Path(path).is_dir() or not name:
        parts = ["<slot>" if p.startswith(("v", ".v")) and "-" in p else p for p in rel.parts]
        return "folder " + ("/".join(parts) or ".")
    if ".etag" in name:
        return "staging ETag"
    if rel.parent.name == "staging":
        return "staging"
    for key in ("pointer.json", "job.json", "accepted.json"):
        if key in name:
            return key
    return "slot manifest" if "manifest.json" in name else "slot file"


class IoCounter:
    """Counts fsyncs, renames and opens made by one thread, by the file they touch."""

    def __init__(self, state: Path) -> None:
        self.state = str(state.resolve())
        self.thread = threading.get_ident()
        self.events: list[tuple[str, str]] = []
        self._fd_paths: dict[int, str] = {}

    def _mine(self) -> bool:
        return threading.get_ident() == self.thread

    def _path(self, value: Any) -> str | None:
        if isinstance(value, int):
            return self._fd_paths.get(value)
        try:
            path = str(Path(os.fspath(value)).absolute())
        except TypeError:
            return None
        return path if path.startswith(self.state) else None

    @contextmanager
    def counting(self) -> Iterator[IoCounter]:
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
        real_os_open, real_io_open = os.open, io.open
        real_fdatasync = os.fdatasync

        def fd_of(f: Any) -> int:
            return f if isinstance(f, int) else int(f.fileno())

        def fsync(fd: Any) -> None:
            if self._mine():
                self.events.append(("fsync", self._fd_kind(fd_of(fd))))
            real_fsync(fd)

        def fdatasync(fd: Any) -> None:
            if self._mine():
                self.events.append(("fsync", self._fd_kind(fd_of(fd))))
            real_fdatasync(fd)

        def renamer(real: Callable[..., None]) -> Callable[..., None]:
            def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
                real(src, dst, *a, **kw)
                path = self._path(dst)
                if self._mine() and path:  # after the rename: a folder's is a folder's
                    self.events.append(("rename", _kind(path, self.state)))

            return rename

        def os_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
            fd = real_os_open(path, flags, *a, **kw)
            p = self._path(path)
            if self._mine() and p:
                self._fd_paths[fd] = p
                self.events.append(("open", _kind(p, self.state)))
            return fd

        def io_open(file: Any, *a: Any, **kw: Any) -> Any:
            f = real_io_open(file, *a, **kw)
            p = self._path(file) if not isinstance(file, int) else None
            if self._mine() and p:
                self._fd_paths[f.fileno()] = p
                self.events.append(("open", _kind(p, self.state)))
            return f  # os.fdopen of a descriptor: counted at its os.open

        os.fsync, os.fdatasync, os.open = fsync, fdatasync, os_open
        os.replace, os.rename = renamer(real_replace), renamer(real_rename)
        io.open = builtins.open = io_open
        try:
            yield self
        finally:
            os.fsync, os.fdatasync, os.open = real_fsync, real_fdatasync, real_os_open
            os.replace, os.rename = real_replace, real_rename
            io.open = builtins.open = real_io_open

    def _fd_kind(self, fd: int) -> str:
        path = self._fd_paths.get(fd)
        return _kind(path, self.state) if path else "other"

    def table(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (op, kind), n in sorted(Counter(self.events).items()):
            out.setdefault(kind, {})[op] = n
        return out


# -------------------------------------------------------------------- the measured update


def measure(work: Path, url: str, trust: Path, release_json: Path) -> dict[str, Any]:
    """One update on a fresh device (in this process); the Python-level counts."""
    import httpx

    from agent.device.store import ModelStore
    from agent.device.updater import Updater
    from agent.inference.backends import TFLiteSettings
    from agent.inference.core import Agent
    from agent.inference.model import load_model
    from agent.settings import AgentSettings, UpdateSettings
    from shared.manifest import Manifest
    from shared.signing import TrustStore
    from shared.update import UpdateReport

    state = work / "device"
    store = ModelStore(state)
    slot = store.import_dir(FACTORY)
    store.activate("digits", slot)
    backend = TFLiteSettings()
    agent = Agent(AgentSettings(model_dir=FACTORY), model=load_model(slot, backend))
    reports: list[UpdateReport] = []
    updater = Updater(
        agent,
        store,
        TrustStore.load(trust),
        UpdateSettings(health_watch_s=0.0, health_min_requests=1_000_000),
        device="bench-0",
        backend=backend,
        report=reports.append,
        http=httpx.Client(),
        registry_url=url,
    )
    release = Manifest.from_json(release_json.read_bytes())
    counter = IoCounter(state)
    with counter.counting():
        os.access(BEGIN, os.F_OK)  # the markers the strace count starts and stops at
        final = updater.process(release)
        os.access(END, os.F_OK)
    agent.close()
    states = [r.state.value for r in reports]
    if final is None or final.value != "ACTIVE":
        raise SystemExit(f"the update did not end ACTIVE: {states}")
    total = Counter(op for op, _ in counter.events)
    return {
        "states": states,
        "python": {
            "fsync": total["fsync"],
            "rename": total["rename"],
            "open": total["open"],
            "by_file": counter.table(),
            "sequence": [f"{op} {kind}" for op, kind in counter.events],
        },
    }


# ------------------------------------------------------------------------ strace's count

_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)$")


def strace_counts(trace: Path, state: Path) -> dict[str, int]:
    """fsync/fdatasync, rename* and openat under ``state`` between the two markers."""
    counts = {"fsync": 0, "rename": 0, "open": 0}
    inside = False
    for line in trace.read_text().splitlines():
        m = _CALL.match(line.strip())
        if not m:
            continue
        call, args = m.groups()
        if BEGIN in args:
            inside = True
        elif END in args:
            break
        elif not inside:
            continue
        elif call in ("fsync", "fdatasync"):
            counts["fsync"] += 1
        elif call.startswith("rename"):
            counts["rename"] += 1
        elif call in ("openat", "open") and str(state) in args:
            counts["open"] += 1
    return counts


# --------------------------------------------------------------------------- the run


def child(args: argparse.Namespace) -> None:
    doc = measure(args.work, args.url, args.trust, args.release)
    (args.work / "python.json").write_text(json.dumps(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/bench_update_io.json")
    parser.add_argument("--no-strace", action="store_true", help="Python-level counts only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--trust", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--release", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from fastapi import FastAPI

    from cloud.releases.packaging import PackageRequest, package
    from cloud.releases.registry import Registry, registry_router
    from shared.manifest import Manifest
    from tests.helpers import serve_in_thread

    strace = None if args.no_strace else shutil.which("strace")
    with tempfile.TemporaryDirectory(prefix="tandem-update-io-") as tmp:
        work = Path(tmp).resolve()
        key, trust, registry_dir = prepare_registry(work)
        release = package(
            PackageRequest(edge=UPDATE / "model.tflite", template=Manifest.load(UPDATE)),
            key,
            Registry(registry_dir),
        )
        (work / "release.json").write_bytes(release.to_json().encode())
        app = FastAPI()  # the cloud's registry routes alone: what a device downloads from
        app.include_router(registry_router(Registry(registry_dir)))
        with serve_in_thread(app) as url:
            cmd = [sys.executable, __file__, "--child", "--work", str(work), "--url", url]
            cmd += ["--trust", str(trust), "--release", str(work / "release.json")]
            trace = work / "strace.txt"
            if strace:
                calls = "fsync,fdatasync,rename,renameat,renameat2,open,openat,access,faccessat"
                cmd = [strace, "-f", "-qq", "-e", f"trace={calls}", "-o", str(trace), *cmd]
            subprocess.run(cmd, check=True, cwd=dataset.ROOT)
        doc: dict[str, Any] = json.loads((work / "python.json").read_text())
        if strace:
            doc["syscalls"] = strace_counts(trace, work / "device")
    doc.update(
        {
            "bench": "update_io",
            "update": "digits v1 (int8, factory) -> v2 (float32), one device, to ACTIVE",
            "command": "python scripts/bench_update_io.py",
        }
    )
    print(f"{'':38}{'fsync':>7}{'rename':>8}{'open':>6}")
    for source in ("syscalls", "python"):
        if source in doc:
            c = doc[source]
            print(f"{'total (' + source + ')':38}{c['fsync']:>7}{c['rename']:>8}{c['open']:>6}")
    for kind, ops in doc["python"]["by_file"].items():
        row = (ops.get("fsync", 0), ops.get("rename", 0), ops.get("open", 0))
        print(f"  {kind:36}{row[0]:>7}{row[1]:>8}{row[2]:>6}")
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
