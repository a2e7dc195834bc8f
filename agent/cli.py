"""``tandem-agent``: the edge agent's command line. Settings are built here and passed down.

- ``tandem-agent run``: the device's job (store, MQTT updates, telemetry, local endpoint);
- ``tandem-agent serve``: the local OIP endpoint alone (needs the ``serve`` extra);
- ``tandem-agent infer FILE...``: run the model on each file and print one JSON result per
  input: an image (``.jpg``, ``.png``) or a ``.npy`` array of the model's input (a
  ``.npz`` of arrays by input name for a model with several), and for a flat classifier
  each row of a ``.npy``, ``.json`` or ``.csv`` file of features;
- ``tandem-agent systemd-unit``: print a hardened systemd unit for ``run``.

A bad setting (flag, environment or file) is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.inference.routing import ROUTE_MODES
from agent.settings import AgentSettings
from agent.stop import StopRequest
from shared.bundle import IMAGE_SUFFIXES
from shared.errors import TandemError
from shared.log_setup import setup_logging
from shared.settings_files import SettingsError

if TYPE_CHECKING:
    from agent.inference.core import Agent

log = logging.getLogger("agent.cli")

#: Modules that dependencies import when they are installed and that an agent's process
#: never uses; each importer takes their absence as "not installed" (ImportError) and goes
#: on. Marked absent by ``run`` and ``serve`` only, before the service is imported: 4.2 MB
#: of the device's RSS (``scripts/bench_agent_rss.py``, docs/benchmarks.md).
UNUSED_MODULES = (
    "httpx._main",  # httpx's command line: rich, pygments and click, 3.2 MB
    "pydantic.v1",  # FastAPI checks routes for pydantic 1 models, of which there are none
    "uvicorn.supervisors.watchfilesreload",  # ``--reload``'s watcher (uvicorn falls back)
)


def skip_unused_modules() -> None:
    """Mark ``UNUSED_MODULES`` absent in this process (one already imported stays)."""
    for name in UNUSED_MODULES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "absent"


def read_rows(path: Path) -> np.ndarray:
    """Rows of raw features from a file; one row may be given as a flat list."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".json":
            data = np.asarray(json.loads(path.read_text()), dtype=np.float32)
        else:
            data = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=1)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tandem-agent: cannot read {path}: {exc}") from None
    data = np.asarray(data, dtype=np.float32)
    return data.reshape(1, -1) if data.ndim == 1 else data


def read_input(path: Path) -> Any:
    """What one input file holds for ``Agent.infer``: encoded image bytes, an array, or
    arrays by input name."""
    suffix = path.suffix.lower()
    try:
        if suffix in IMAGE_SUFFIXES:
            return path.read_bytes()
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {key: z[key] for key in z.files}
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SystemExit(f"tandem-agent: cannot read {path}: {exc}") from None


def _infer(settings: AgentSettings, args: argparse.Namespace) -> int:
    from agent.inference.core import Agent

    failed = 0
    with Agent(settings) as agent:
        for path in args.files:
            values: list[Any]
            if agent.model.flat and path.suffix.lower() in (".npy", ".json", ".csv", ".txt"):
                values = list(read_rows(path))
            else:
                values = [read_input(path)]
            for value in values:
                try:
                    result = agent.infer(value, deadline_ms=args.deadline_ms, mode=args.mode)
                except TandemError as exc:  # one bad file does not stop the others
                    print(json.dumps({"file": str(path), "error": exc.message}))
                    print(f"tandem-agent: {path}: {exc.message}", file=sys.stderr)
                    failed += 1
                    continue
                print(json.dumps({"file": str(path), **result.to_dict()}))
    return 1 if failed else 0


def _require_endpoint(command: str) -> None:
    """Import the endpoint's packages before anything starts: without the ``serve`` extra
    the agent must not boot, connect and only then fail."""
    try:
        for module in ("agent.server", "uvicorn"):
            importlib.import_module(module)
    except ImportError as exc:
        raise SettingsError(
            f"{command} serves the local endpoint, which needs the serve extra "
            f"(cannot import {exc.name or exc}): pip install 'tandem[serve]', "
            "or run without it (--no-serve, or server.enabled = false)"
        ) from None


def _serve_endpoint(
    agent: Agent, settings: AgentSettings, stop: StopRequest, on_listening: Callable[[], None]
) -> None:
    """The local endpoint in this (main) thread until a stop is requested; returns, so the
    caller's shutdown runs."""
    from agent.server import create_app
    from agent.uvicorn_runner import serve

    serve(create_app(agent), settings.server, settings.log_level, stop, on_listening)


def _serve(settings: AgentSettings, stop: StopRequest) -> int:
    from agent.device.systemd import Supervision
    from agent.inference.core import Agent

    _require_endpoint("tandem-agent serve")
    supervision = Supervision()
    with Agent(settings) as agent:
        try:
            _serve_endpoint(agent, settings, stop, lambda: supervision.ready(agent))
        finally:
            supervision.stopping()
    supervision.close()
    log.info("stopped cleanly")
    return 0


def _run(settings: AgentSettings, stop: StopRequest) -> int:
    """The device's main job: store, updater, MQTT, and (unless told not to) the endpoint.
    A stop requested during boot is served once the boot is done, with the full shutdown."""
    from agent.device.service import AgentService
    from agent.device.systemd import Supervision

    serve = settings.server.enabled
    if serve:
        _require_endpoint("tandem-agent run")
    supervision = Supervision()
    service = AgentService(settings)
    service.start()
    try:
        if serve:
            _serve_endpoint(service.agent, settings, stop, lambda: supervision.ready(service.agent))
        else:
            supervision.ready(service.agent)
            stop.wait()
    finally:
        supervision.stopping()
        service.stop()
        supervision.close()
    log.info("stopped cleanly")
    return 0


def _systemd_unit(args: argparse.Namespace) -> int:
    from agent.device.systemd import UnitOptions, unit_text

    executable = args.executable or shutil.which("tandem-agent") or "/usr/local/bin/tandem-agent"
    options = UnitOptions(
        executable=Path(executable).absolute(),
        config=(args.config or Path("/etc/tandem/agent.toml")).absolute(),
        user=args.user,
        state_dir=args.state_dir.absolute(),
        watchdog_s=args.watchdog_s,
    )
    print(unit_text(options), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem-agent", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--model-dir", type=Path, help="folder with manifest.json")
    parser.add_argument("--cloud-url", help="OIP server to escalate to")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the local OIP endpoint")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    run = sub.add_parser("run", help="run as a device: model store, MQTT updates, endpoint")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument(
        "--no-serve", action="store_true", help="no local OIP endpoint (server.enabled = false)"
    )
    infer = sub.add_parser("infer", help="run the model on files, one JSON result per input")
    infer.add_argument(
        "files",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="images (.jpg, .png), .npy/.npz arrays, or .json/.csv rows of features",
    )
    infer.add_argument("--mode", choices=ROUTE_MODES)
    infer.add_argument("--deadline-ms", type=float)
    unit = sub.add_parser(
        "systemd-unit", help="print a systemd unit running `run` with --config (see README)"
    )
    unit.add_argument(
        "--exec",
        dest="executable",
        help="the tandem-agent executable (default: the one on PATH)",
    )
    unit.add_argument("--user", default="tandem", help="the dedicated user it runs as")
    unit.add_argument("--state-dir", type=Path, default=Path("/var/lib/tandem"))
    unit.add_argument("--watchdog-s", type=int, default=30, help="WatchdogSec (0: none)")
    return parser


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    """Flags as overrides of the settings loader, so they are validated like the file and
    the environment, and a section given in part keeps the rest of the file's."""
    overrides: dict[str, Any] = {}
    if args.model_dir is not None:
        overrides["model_dir"] = args.model_dir
    if args.cloud_url:
        overrides["cloud"] = {"url": args.cloud_url}
    server = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    if getattr(args, "no_serve", False):
        server["enabled"] = False
    if server:
        overrides["server"] = server
    return AgentSettings.load(args.config, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "systemd-unit":
        return _systemd_unit(args)
    try:
        settings = settings_from_args(args)
        setup_logging(settings.log_level)
        if args.command == "infer":
            return _infer(settings, args)
        skip_unused_modules()  # a device's process: before the service is imported
        stop = StopRequest()
        stop.install()  # before anything starts: see agent/stop.py
        return _run(settings, stop) if args.command == "run" else _serve(settings, stop)
    except SettingsError as exc:
        parser.exit(2, f"tandem-agent: error: {exc.message}\n")
    except TandemError as exc:
        print(f"tandem-agent: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
