"""The cloud's hot path, counted: Python opcodes per request, bare route against binary infer.

Throughput on a shared machine swings by a third from one second to the next, so a change of
a few percent to the request path cannot be seen in ``bench_cloud.py`` without minutes of
runs. The number of Python opcodes a request executes is exact and repeatable, and on this
server it tracks CPU time closely (the interpreter is about 70% of the server's CPU): this
script drives the real ASGI app in-process (no sockets; uvicorn's share is the same for
both routes) with 32 concurrent clients and counts, with ``sys.settrace`` opcode events,
what each request runs, by function. Prints the totals and the functions that differ most,
and writes JSON.

    python scripts/opcount_cloud.py [--requests 320] [--top 30] [--out out/bench/opcount.json]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from bench_cloud import DIGITS, bodies
from results import write_json

from cloud.app import create_app
from cloud.settings import CloudSettings

INFER, BARE = "/v2/models/digits/infer", "/bench/bare"
Message = dict[str, Any]


class OpcodeCounter:
    """Opcodes executed per function (name, file, first line) while ``on``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def _global(self, frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._local

    def _local(self, frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        if event == "opcode":
            code = frame.f_code
            where = code.co_filename.split("site-packages/")[-1]
            where = where.replace(str(dataset.ROOT) + "/", "")
            self.counts[f"{code.co_name} {where}:{code.co_firstlineno}"] += 1
        return self._local

    def on(self) -> None:
        self.counts.clear()
        sys.settrace(self._global)

    def off(self) -> None:
        sys.settrace(None)


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def one_request(
    app: Callable[..., Awaitable[None]], path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    sent = False
    replies: list[Message] = []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        raise AssertionError

    async def send(message: Message) -> None:
        replies.append(message)

    await app(scope(path, headers), receive, send)
    if replies[0]["status"] != 200:
        raise SystemExit(f"{path} answered {replies[0]['status']}: {replies[1:]}")


async def client(
    app: Callable[..., Awaitable[None]],
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    n: int,
) -> None:
    for _ in range(n):
        await one_request(app, path, body, headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=320, help="per route (of 32 clients)")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/opcount.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tandem-opcount-"))
    try:
        (work / "digits" / "1").mkdir(parents=True)
        shutil.copy(DIGITS, work / "digits" / "1" / "model.onnx")
        app = create_app(CloudSettings(repo=work, testing={"bare_route": True}, repo_poll_s=0))
        body, extra = bodies("digits", dataset.load().test.x[:1])["binary"]
        headers = [(b"host", b"127.0.0.1:8000"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        counter = OpcodeCounter()
        per_request: dict[str, dict[str, float]] = {}

        async def measure(path: str) -> None:
            clients, each = 32, max(1, args.requests // 32)
            warm = [client(app, path, body, headers, 2) for _ in range(clients)]
            await asyncio.gather(*warm)  # caches filled, as in a running server
            counter.on()
            try:
                await asyncio.gather(
                    *(client(app, path, body, headers, each) for _ in range(clients))
                )
            finally:
                counter.off()
            per_request[path] = {k: v / (clients * each) for k, v in counter.counts.items()}

        async def both() -> None:
            await measure(BARE)
            await measure(INFER)

        try:  # uvicorn's loop, as the server runs (asyncio's own would count its Python)
            import uvloop

            uvloop.run(both())
        except ImportError:
            asyncio.run(both())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bare, infer = per_request[BARE], per_request[INFER]
    total_bare, total_infer = sum(bare.values()), sum(infer.values())
    print(
        f"Python opcodes per request: bare route {total_bare:.0f}, binary infer {total_infer:.0f}"
    )
    print(f"bare / infer: {total_bare / total_infer:.0%} (Python only; see the module docstring)")
    print(f"\n{'bare':>8}{'infer':>8}{'diff':>8}  function")
    names = sorted(set(bare) | set(infer), key=lambda k: -(infer.get(k, 0) - bare.get(k, 0)))
    for name in names[: args.top]:
        b, i = bare.get(name, 0.0), infer.get(name, 0.0)
        print(f"{b:8.1f}{i:8.1f}{i - b:+8.1f}  {name}")
    write_json(
        args.out,
        {"bare_total": total_bare, "infer_total": total_infer, "bare": bare, "infer": infer},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
