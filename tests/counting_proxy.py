"""A TCP proxy that counts the bytes passing each way: put it between a client and its server
(the agent and Mosquitto, the agent and the cloud) to measure what crosses the socket, with
no guess about the protocols above. Used by the wire-byte tests and
``scripts/bench_idle_bytes.py``.

Each direction is pumped by its own thread; ``chunks`` counts the reads, a rough stand-in
for TCP segments (small messages arrive one to a read).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from types import TracebackType


@dataclass
class Flow:
    """One direction: bytes and reads so far."""

    bytes: int = 0
    chunks: int = 0


class CountingProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.up = Flow()  # client -> server
        self.down = Flow()  # server -> client
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.connections += 1
                self._sockets += [client, server]
                for src, dst, flow in ((client, server, self.up), (server, client, self.down)):
                    t = threading.Thread(target=self._pump, args=(src, dst, flow), daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, flow: Flow) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    flow.bytes += len(data)
                    flow.chunks += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side ended: end the other, as a direct connection would
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def counts(self) -> tuple[int, int]:
        """(bytes client -> server, bytes server -> client) so far."""
        with self._lock:
            return self.up.bytes, self.down.bytes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):  # wakes the blocked accept() (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(timeout=5)
        self._accepter.join(timeout=5)

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
