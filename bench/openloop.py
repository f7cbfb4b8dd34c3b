"""A constant-rate (open-loop) HTTP load generator that records per-request latency.

Request k of a run is due at `start + k / rate`, whatever happened to earlier
requests. A due request goes out at once on an idle keep-alive connection, or
waits in a backlog until a connection becomes idle. Its latency is measured from
the time it was due to the time its response was complete, so a server that
stalls is charged for every request that the stall delayed (no coordinated
omission). The scheduler also records how late it handled each due request,
as `lateness`, so a generator that falls behind is visible. That figure
leaves out the time a request waited in the backlog for a connection, which
is the server's doing.

The scheduler polls without sleeping: each event-loop iteration sends the
requests that are due and handles what the sockets received. It keeps its CPU
fully busy, which is why it should run on a CPU of its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

import httptools

HOST = "127.0.0.1"


@dataclass
class RunStats:
    """Latencies, in seconds, of the requests due after the warm-up."""

    rate: float
    seconds: float
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    missing: int = 0
    max_backlog: int = 0


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self, generator: OpenLoopGenerator) -> None:
        self._generator = generator
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.due = 0.0
        self.sent = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, so no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        self._generator.lost(self, exc)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        self._generator.complete(self, self._parser.get_status_code(), time.perf_counter())

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.sent = time.perf_counter()
        self.transport.write(request)


class OpenLoopGenerator:
    """Sends one fixed POST request at a constant rate over a pool of connections."""

    def __init__(self, port: int, path: str, body: bytes, connections: int) -> None:
        self.port = port
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.connection_count = connections
        self._idle: deque[_Connection] = deque()
        self._backlog: deque[float] = deque()
        self._record_from = 0.0
        self._stats: RunStats | None = None
        self._outstanding = 0
        self._errors: list[str] = []

    async def _connect(self) -> list[_Connection]:
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(self.connection_count):
            _, protocol = await loop.create_connection(lambda: _Connection(self), HOST, self.port)
            connections.append(protocol)
        return connections

    def complete(self, connection: _Connection, status: int, now: float) -> None:
        self._outstanding -= 1
        stats = self._stats
        if stats is not None and connection.due >= self._record_from:
            stats.latencies.append(now - connection.due)
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
        if self._backlog:
            self._outstanding += 1
            connection.send(self.request, self._backlog.popleft())
        else:
            self._idle.append(connection)

    def lost(self, connection: _Connection, exc: Exception | None) -> None:
        if self._stats is not None:
            self._errors.append(f"connection closed by the server: {exc!r}")

    async def run(
        self, rate: float, warmup: float, seconds: float, drain: float = 10.0
    ) -> RunStats:
        """Send at `rate` requests/s for `warmup + seconds`; record the last `seconds`.

        Raises RuntimeError when a connection closes or a response is missing
        `drain` seconds after the last request was due.
        """
        connections = await self._connect()
        self._idle.extend(connections)
        stats = RunStats(rate=rate, seconds=seconds)
        self._stats = stats
        interval = 1.0 / rate
        start = time.perf_counter() + 0.05
        self._record_from = start + warmup
        end = start + warmup + seconds
        sent = 0
        total = int((warmup + seconds) * rate)
        try:
            while sent < total:
                now = time.perf_counter()
                due_count = min(total, int((now - start) / interval) + 1) if now >= start else 0
                while sent < due_count:
                    due = start + sent * interval
                    if due >= self._record_from:
                        stats.lateness.append(now - due)
                    if self._idle:
                        self._outstanding += 1
                        self._idle.popleft().send(self.request, due)
                    else:
                        self._backlog.append(due)
                        stats.max_backlog = max(stats.max_backlog, len(self._backlog))
                    sent += 1
                if self._errors:
                    raise RuntimeError(self._errors[0])
                await asyncio.sleep(0)
            deadline = end + drain
            while (self._outstanding or self._backlog) and time.perf_counter() < deadline:
                if self._errors:
                    raise RuntimeError(self._errors[0])
                await asyncio.sleep(0.001)
            stats.missing = self._outstanding + len(self._backlog)
        finally:
            self._stats = None
            for connection in connections:
                if connection.transport is not None:
                    connection.transport.close()
        return stats


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list, with `fraction` from 0 to 1."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]
