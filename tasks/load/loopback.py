"""A small, real HTTP/1.1 server for calibrating the load generator from the other side.

It counts what it receives and measures its own latency (request parsed -> response
written) in an HDR histogram, so tests and benchmarks can check the generator's counts
and percentiles against the server's. Delays, errors, dropped connections and hangs are
configurable server-wide or per request through the query string:

    GET /?delay_ms=20&status=503&close=1&hang=1

`GET /__stats` returns the counters as JSON (with the encoded histogram) and
`POST /__reset` clears them; neither is counted. Run it in a thread
(`LoopbackServer().start()`) or as its own process (`python -m tasks.load.loopback`), so
a benchmark's server does not share the generator's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from hdrh.histogram import HdrHistogram

_REASONS = {
    200: "OK",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _new_histogram() -> HdrHistogram:
    # Microseconds, 1 us .. 1 h, 3 significant digits: the generator's own layout.
    return HdrHistogram(1, 3_600_000_000, 3)


@dataclass
class ServerStats:
    """What the server saw. Latencies are server-side: request parsed -> response written."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    closed: int = 0  # connections dropped on purpose (close=1)
    hung: int = 0  # requests never answered (hang=1)
    max_concurrent: int = 0
    arrivals: list[float] = field(default_factory=list)  # perf_counter at parse time
    histogram: HdrHistogram = field(default_factory=_new_histogram)

    def percentile_ms(self, q: float) -> float:
        return self.histogram.get_value_at_percentile(q) / 1000.0

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "closed": self.closed,
            "hung": self.hung,
            "max_concurrent": self.max_concurrent,
            "histogram": self.histogram.encode().decode("ascii"),
        }


class _Connection(asyncio.Protocol):
    def __init__(self, server: LoopbackServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # one request at a time per connection (no pipelining)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _next(self) -> None:
        if self.busy or self.transport is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        parts = lines[0].split(" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("GET", "/")
        keep_alive = headers.get("connection", "").lower() != "close"
        self.busy = True
        self.server._handle(self, method, target, keep_alive, time.perf_counter())

    def respond(self, status: int, body: bytes, keep_alive: bool, received: float) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        if received > 0:
            self.server._record(status, time.perf_counter() - received)
        if not keep_alive:
            self.transport.close()
            return
        self._next()


class LoopbackServer:
    """HTTP/1.1 keep-alive server on an asyncio loop of its own (a thread or a process).

    ``delay_ms`` is a fixed delay or a ``(low, high)`` uniform range; ``error_rate`` answers
    that fraction of requests with ``error_status``. Both may be changed while it runs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay_ms: float | tuple[float, float] = 0.0,
        error_rate: float = 0.0,
        error_status: int = 500,
        seed: int | None = 0,
        record_arrivals: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.delay_ms = delay_ms
        self.error_rate = error_rate
        self.error_status = error_status
        self.record_arrivals = record_arrivals
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = ServerStats()
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    # --- counters ---------------------------------------------------------------------

    def stats(self) -> ServerStats:
        """A consistent copy of the counters."""
        with self._lock:
            s = self._stats
            copy = ServerStats(
                requests=s.requests,
                statuses=Counter(s.statuses),
                closed=s.closed,
                hung=s.hung,
                max_concurrent=s.max_concurrent,
                arrivals=list(s.arrivals),
            )
            copy.histogram.add(s.histogram)
            return copy

    def reset(self) -> None:
        with self._lock:
            self._stats = ServerStats()

    def _record(self, status: int, seconds: float) -> None:
        with self._lock:
            self._stats.statuses[status] += 1
            self._stats.histogram.record_value(max(1, round(seconds * 1e6)))
        self._in_flight -= 1

    # --- request handling (on the server's loop) ----------------------------------------

    def _handle(
        self, conn: _Connection, method: str, target: str, keep_alive: bool, received: float
    ) -> None:
        url = urlsplit(target)
        if url.path == "/__stats":
            conn.respond(200, json.dumps(self.stats().as_json()).encode(), keep_alive, 0.0)
            return
        if url.path == "/__reset":
            self.reset()
            conn.respond(200, b"{}", keep_alive, 0.0)
            return
        query = dict(parse_qsl(url.query))
        self._in_flight += 1
        with self._lock:
            self._stats.requests += 1
            self._stats.max_concurrent = max(self._stats.max_concurrent, self._in_flight)
            if self.record_arrivals:
                self._stats.arrivals.append(received)
        if query.get("hang"):
            with self._lock:
                self._stats.hung += 1
            self._in_flight -= 1
            return  # never answered: the client's timeout must fire
        if query.get("close"):
            with self._lock:
                self._stats.closed += 1
            self._in_flight -= 1
            assert conn.transport is not None
            conn.transport.abort()
            return
        if "status" in query:
            status = int(query["status"])
        elif self.error_rate > 0 and self._rng.random() < self.error_rate:
            status = self.error_status
        else:
            status = 200
        if "delay_ms" in query:
            delay = float(query["delay_ms"]) / 1000.0
        elif isinstance(self.delay_ms, tuple):
            delay = self._rng.uniform(*self.delay_ms) / 1000.0
        else:
            delay = self.delay_ms / 1000.0
        body = b'{"ok":true}' if status < 400 else b'{"ok":false}'
        if delay <= 0:
            conn.respond(status, body, keep_alive, received)
        else:
            assert self._loop is not None
            self._loop.call_later(delay, conn.respond, status, body, keep_alive, received)

    # --- life cycle ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve on the running loop until cancelled (the process mode)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=4096, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> LoopbackServer:
        """Serve from a daemon thread; returns once the port is bound."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_quietly()), name="loopback-server", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback server did not start within 10 s")
        return self

    async def _serve_quietly(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.serve()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._server is not None and not loop.is_closed():

            def _cancel_all() -> None:
                for t in asyncio.all_tasks(loop):
                    t.cancel()

            loop.call_soon_threadsafe(_cancel_all)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fetch_stats(url: str) -> dict[str, Any]:
    """Read ``/__stats`` of a server running elsewhere (another process)."""
    import httpx

    response = httpx.get(url.rstrip("/") + "/__stats", timeout=10)
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--delay-ms",
        type=float,
        nargs="+",
        default=[0.0],
        help="a fixed delay, or LOW HIGH for a uniform range",
    )
    parser.add_argument("--error-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    delay: float | tuple[float, float] = (
        (args.delay_ms[0], args.delay_ms[1]) if len(args.delay_ms) > 1 else args.delay_ms[0]
    )
    server = LoopbackServer(
        args.host, args.port, delay_ms=delay, error_rate=args.error_rate, record_arrivals=False
    )

    async def run() -> None:
        task_ = asyncio.create_task(server.serve())
        await asyncio.get_running_loop().run_in_executor(None, server._ready.wait)
        print(json.dumps({"url": server.url}), flush=True)  # the parent reads the port here
        await task_

    asyncio.run(run())


if __name__ == "__main__":
    main()
