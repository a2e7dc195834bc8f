"""``tandem-agent``: the edge agent's command line. Settings are built here and passed down.

- ``tandem-agent serve``: the local OIP endpoint (needs the ``serve`` extra);
- ``tandem-agent infer FILE``: classify the rows of a ``.npy``, ``.json`` or ``.csv`` file
  and print one JSON result per row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agent.settings import AgentSettings
from shared.errors import TandemError


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


def _infer(settings: AgentSettings, args: argparse.Namespace) -> int:
    from agent.core import Agent

    rows = read_rows(args.file)
    with Agent(settings) as agent:
        for row in rows:
            result = agent.infer(row, deadline_ms=args.deadline_ms, mode=args.mode)
            print(json.dumps(result.to_dict()))
    return 0


def _serve(settings: AgentSettings) -> int:
    try:
        import uvicorn

        from agent.server import create_app
    except ImportError:
        raise SystemExit(
            "tandem-agent serve needs the serve extra: pip install 'tandem[serve]'"
        ) from None
    from agent.core import Agent

    with Agent(settings) as agent:
        uvicorn.run(
            create_app(agent),
            host=settings.server.host,
            port=settings.server.port,
            log_level=settings.log_level.lower(),
            access_log=False,
        )
    return 0


def _run(settings: AgentSettings, serve: bool) -> int:
    """The device's main job: store, updater, MQTT, and (unless told not to) the endpoint."""
    import signal

    from agent.service import AgentService

    service = AgentService(settings)
    service.start()
    try:
        if serve:
            try:
                import uvicorn

                from agent.server import create_app
            except ImportError:
                raise SystemExit("the local endpoint needs: pip install 'tandem[serve]'") from None
            uvicorn.run(
                create_app(service.agent),
                host=settings.server.host,
                port=settings.server.port,
                log_level=settings.log_level.lower(),
                access_log=False,
            )
        else:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        service.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem-agent", description=__doc__)
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
    run.add_argument("--no-serve", action="store_true", help="no local OIP endpoint")
    infer = sub.add_parser("infer", help="classify the rows of a file")
    infer.add_argument("file", type=Path, help=".npy, .json or .csv/.txt rows of features")
    infer.add_argument("--mode", choices=["edge", "cloud", "auto"])
    infer.add_argument("--deadline-ms", type=float)
    return parser


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {}
    if args.model_dir is not None:
        overrides["model_dir"] = args.model_dir
    base = AgentSettings.load(args.config, **overrides)
    updates: dict[str, Any] = {}
    if args.cloud_url:
        updates["cloud"] = base.cloud.model_copy(update={"url": args.cloud_url})
    if getattr(args, "host", None) or getattr(args, "port", None) is not None:
        server = base.server.model_copy(
            update={k: v for k in ("host", "port") if (v := getattr(args, k)) is not None}
        )
        updates["server"] = server
    return base.model_copy(update=updates) if updates else base


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "infer":
            return _infer(settings, args)
        if args.command == "run":
            if args.no_serve:
                import signal

                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            return _run(settings, serve=not args.no_serve)
        return _serve(settings)
    except TandemError as exc:
        print(f"tandem-agent: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
