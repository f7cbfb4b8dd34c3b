"""A scripted HTTP receiver for webhook tests: a real aiohttp server on 127.0.0.1.

The server runs its own event loop on a thread, so a test that drives a router
subprocess with blocking calls can use it directly. It records every request
(method, path, headers, body and arrival time) and responds to each one with
the next scripted `Reply` for that path, or the path's default once the script
is used up. A reply can be delayed, to go past a client's timeout.

With `require_signature`, the receiver checks the HMAC-SHA256 signature that
the router's HTTP sink sends and responds with 401 to a request whose signature
is missing or invalid.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Receiver", "RecordedRequest", "Reply", "signature_is_valid"]

SIGNATURE_HEADER = "X-Eventrouter-Signature"
TIMESTAMP_HEADER = "X-Eventrouter-Timestamp"


@dataclass(frozen=True)
class Reply:
    """One scripted response: status, headers, body, and a delay before it is sent."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    delay: float = 0.0
    """Seconds to wait before responding."""


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the receiver saw it, with the reply it was given."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    """`time.monotonic()` when the request body had been read."""
    reply: Reply
    signature_valid: bool | None = None
    """None when no signature was required."""

    def header(self, name: str) -> str | None:
        """Return a header value by case-insensitive name, or None."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line]


def signature_is_valid(
    key: bytes,
    headers: dict[str, str],
    body: bytes,
    *,
    signature_header: str = SIGNATURE_HEADER,
    timestamp_header: str = TIMESTAMP_HEADER,
    max_skew: float = 300.0,
) -> bool:
    """Check a `sha256=<hex>` HMAC of "<timestamp>.<body>", as a webhook receiver should.

    The timestamp must be a Unix time within `max_skew` seconds of this clock,
    which is how a receiver rejects replayed requests.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    signature = lowered.get(signature_header.lower())
    stamp = lowered.get(timestamp_header.lower())
    if signature is None or stamp is None or not stamp.isdigit():
        return False
    if abs(time.time() - int(stamp)) > max_skew:
        return False
    expected = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, f"sha256={expected}")


class Receiver:
    """An HTTP server on a free loopback port that records requests and responds by script.

    Use it as a context manager, or call `start` and `stop`. Scripts and
    defaults are per path, and `path=None` sets them for every path that has
    none of its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._scripts: dict[str | None, deque[Reply]] = {}
        self._defaults: dict[str | None, Reply] = {None: Reply(200)}
        self._signature_key: bytes | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind a free port on 127.0.0.1 and serve on a thread until `stop`."""
        # Binding here, before the thread starts, means the port is known and
        # listening by the time `start` returns, with no race for a free port.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name=f"receiver-{self.port}", daemon=True
        )
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"receiver on port {self.port} did not start within 10s")

    def _serve(self, started: threading.Event) -> None:
        assert self._loop is not None
        assert self._socket is not None
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown timeout, because delayed replies may still be
        # sleeping when the test ends.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.SockSite(self._runner, self._socket)
        self._loop.run_until_complete(site.start())
        started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """Close the server and its thread, and cancel the requests still waiting for a reply."""
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            future.result(10)
        # Handlers still sleeping in a delayed reply outlive `cleanup`, so they
        # are cancelled here and the loop closes with no pending task.
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- scripting -------------------------------------------------------------

    def script(self, *replies: Reply, path: str | None = None) -> None:
        """Append replies that requests to `path` receive one by one, in order."""
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(replies)

    def set_default(self, reply: Reply, path: str | None = None) -> None:
        """Set the reply for requests to `path` once its script is used up."""
        with self._lock:
            self._defaults[path] = reply

    def require_signature(self, key: bytes) -> None:
        """Respond with 401 to every request without a valid HMAC-SHA256 signature under `key`."""
        with self._lock:
            self._signature_key = key

    def _next_reply(self, path: str) -> Reply:
        for scope in (path, None):
            script = self._scripts.get(scope)
            if script:
                return script.popleft()
        return self._defaults.get(path) or self._defaults[None]

    # --- serving ---------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received_at = time.monotonic()
        headers = dict(request.headers)
        with self._lock:
            valid: bool | None = None
            if self._signature_key is not None:
                valid = signature_is_valid(self._signature_key, headers, body)
            if valid is False:
                # The script is left for the next correctly signed request.
                reply = Reply(401, body="invalid signature")
            else:
                reply = self._next_reply(request.path)
            self._requests.append(
                RecordedRequest(
                    request.method, request.path, headers, body, received_at, reply, valid
                )
            )
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return web.Response(status=reply.status, headers=reply.headers, text=reply.body)

    # --- inspection ------------------------------------------------------------

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        """Return the requests recorded so far, optionally only those to `path`."""
        with self._lock:
            recorded = list(self._requests)
        return [r for r in recorded if path is None or r.path == path]

    def count(self, path: str | None = None) -> int:
        return len(self.requests(path))

    def accepted(self, path: str | None = None) -> list[RecordedRequest]:
        """Return the requests that got a 2xx reply without delay.

        Delayed replies are left out, because the tests delay a reply only to
        go past the sink's timeout, so the router never reads it.
        """
        return [r for r in self.requests(path) if 200 <= r.reply.status < 300 and not r.reply.delay]


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
