"""``tandem-cloud``: the cloud's command line. Settings are built here and passed down."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cloud.settings import CloudSettings


def _serve(settings: CloudSettings) -> int:
    import uvicorn

    from cloud.app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem-cloud", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve an ONNX model repository over OIP (KServe v2)")
    serve.add_argument("--repo", type=Path, help="<repo>/<model>/<version>/model.onnx")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--simulated-delay-ms", type=float, help="demo only: add a wide-area round trip"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key in ("repo", "host", "port", "simulated_delay_ms")
        if (value := getattr(args, key, None)) is not None
    }
    settings = CloudSettings.load(args.config, **overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        return _serve(settings)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
