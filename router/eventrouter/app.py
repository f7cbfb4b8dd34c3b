"""The ingestion API, a plain ASGI application on port 7350.

`POST /v2/event` takes one event exactly as Nakama clients send it and answers
200 with `{}`. `POST /v2/events` takes `{"events": [...]}` and answers with the
number accepted and one error per invalid event. Errors are JSON objects with
`error` (a stable code) and `message` (what is wrong and what to do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from opentelemetry.trace import Span, StatusCode

from eventrouter.auth import Authenticator, Principal
from eventrouter.engine import Engine, Overloaded
from eventrouter.envelope import Envelope, EventDecoder, IdGenerator, describe_decode_error
from eventrouter.errors import AuthError, IngestError
from eventrouter.logs import RateLimitedLog
from eventrouter.metrics import Metrics
from eventrouter.sessions import SessionManager

__all__ = ["IngestApp"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_EMPTY_OK = b"{}"
_SPAN_NAMES = {path: f"POST {path}" for path in ("/v2/event", "/v2/events")}
_SPAN_ATTRIBUTES = {
    path: {"http.request.method": "POST", "http.route": path, "url.path": path}
    for path in _SPAN_NAMES
}


class IngestApp:
    """ASGI application for event ingestion.

    The engine, decoder and authenticator are replaced on reload through
    `configure`, so each request uses one consistent set.
    """

    def __init__(self, engine: Engine, authenticator: Authenticator, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.accepting = True
        self._ids = IdGenerator()
        self._denied = RateLimitedLog(logger)
        self._received_http = metrics.received.labels("http")
        self.configure(authenticator)
        self.sessions = SessionManager(self, metrics)

    def new_ids(self, count: int) -> list[str]:
        """Return `count` new event ids (ULIDs, sorted in the order made)."""
        return self._ids.next_ids(count)

    def configure(self, authenticator: Authenticator) -> None:
        config = self.engine.config
        self.authenticator = authenticator
        self.decoder = EventDecoder(config.router.spec.limits)
        self.max_body = config.router.spec.limits.max_request_bytes
        self.block_timeout = config.router.spec.queue.block_timeout
        self.router_name = config.name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            if scope["path"] == "/ws":
                await self.sessions.handle(scope, receive, send)
            else:
                await receive()
                await send({"type": "websocket.close", "code": 1008, "reason": "use /ws"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in ("/v2/event", "/v2/events"):
            if scope["method"] != "POST":
                await _respond(
                    send,
                    405,
                    _error("method_not_allowed", f"use POST for {path}"),
                    [(b"allow", b"POST")],
                )
                return
            await self._ingest(scope, receive, send, batch=path == "/v2/events")
            return
        if path == "/ws":
            await _respond(
                send,
                426,
                _error(
                    "upgrade_required",
                    "GET /ws opens a WebSocket session; connect with a WebSocket client",
                ),
                [(b"upgrade", b"websocket")],
            )
            return
        await _respond(
            send,
            404,
            _error("not_found", f"no endpoint at {path}; use POST /v2/event or /v2/events"),
        )

    async def _ingest(self, scope: Scope, receive: Receive, send: Send, *, batch: bool) -> None:
        authorization, api_key, traceparent = _scan_headers(scope)
        path = scope["path"]
        span, context = self.engine.tracing.start_ingest(
            traceparent, _SPAN_NAMES[path], _SPAN_ATTRIBUTES[path]
        )
        try:
            if not self.accepting:
                raise IngestError(
                    503, "shutting_down", "the router is shutting down; retry on another replica"
                )
            principal = self._authenticate(scope, authorization, api_key)
            body = await self._read_body(scope, receive)
            room = _Room(await self._make_room(body, batch, receive))
            try:
                if batch:
                    status, payload = self._accept_batch(body, principal, context, room)
                else:
                    status, payload = self._accept_one(body, principal, context, room)
            finally:
                # Room that no event took, as when decoding failed, goes back.
                if room.granted:
                    self.engine.buffer.release(room.granted)
        except IngestError as exc:
            extra = [(b"retry-after", b"1")] if exc.status in (429, 503) else None
            if span is not None:
                _end_span(span, exc.status, exc.error)
            await _respond(send, exc.status, _error(exc.error, exc.message), extra)
            return
        except Exception as exc:
            # A bug must not cost the client a plain-text 500 or the log a
            # traceback per request, so the reply is JSON and the log line is
            # written at most once in 10 s.
            if span is not None:
                _fail_span(span, exc)
            self.metrics.rejected.labels("internal_error").inc()
            self._denied.log(
                logging.ERROR,
                f"internal:{type(exc).__name__}",
                "request to %s failed with an internal error: %r",
                path,
                exc,
            )
            await _respond(
                send,
                500,
                _error("internal_error", "the router failed to handle this request; see its log"),
            )
            return
        except BaseException as exc:
            # A cancellation ends the span too, or it is never exported.
            if span is not None:
                _fail_span(span, exc)
            raise
        if span is not None:
            # A batch whose events are all invalid gets 400 without an IngestError.
            _end_span(span, status, "invalid_event" if status >= 400 else None)
        await _respond(send, status, payload)

    def _authenticate(
        self, scope: Scope, authorization: str | None, api_key: str | None
    ) -> Principal:
        try:
            return self.authenticator.authenticate(authorization, api_key)
        except AuthError as exc:
            self.metrics.rejected.labels("unauthenticated").inc()
            client = scope.get("client")
            self._denied.log(
                logging.INFO,
                "auth",
                "rejected request from %s: %s",
                client[0] if client else "unknown",
                exc,
            )
            raise IngestError(401, "unauthenticated", str(exc)) from exc

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body
        message = await receive()
        if message["type"] == "http.disconnect":
            raise IngestError(400, "invalid_request", "client disconnected before sending the body")
        first: bytes = message.get("body", b"")
        if not message.get("more_body", False) and len(first) <= limit:
            # The whole body arrived in one message, the usual case.
            return first
        # A body in several parts: a declared length over the limit is rejected
        # before the rest is read.
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise IngestError(
                        400, "invalid_request", "Content-Length is not a number"
                    ) from None
                if declared > limit:
                    self.metrics.rejected.labels("too_large").inc()
                    raise IngestError(413, "too_large", _too_large(limit, declared))
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            if chunks:
                message = await receive()
            if message["type"] == "http.disconnect":
                raise IngestError(
                    400, "invalid_request", "client disconnected before sending the body"
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.metrics.rejected.labels("too_large").inc()
                raise IngestError(413, "too_large", _too_large(limit, size))
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _make_room(self, body: bytes, batch: bool, receive: Receive) -> int:
        """Apply `reject` and `block` before the events are decoded; return the room granted.

        Decoding and building envelopes cost most of a request, and an
        overloaded router needs its CPU to deliver what it holds, which frees
        the room. So under `reject` a request whose events do not fit gets 503
        at once, and under `block` it waits for room first. A body that is not
        a valid batch goes on to the full decoder, which reports the error.
        """
        buffer = self.engine.buffer
        if buffer.overflow not in ("reject", "block"):
            return 0
        max_events = self.decoder.limits.max_batch_events if batch else 1
        if buffer.free >= max_events and not buffer.waiting:
            # Any valid request fits, and nothing awaits before `offer` takes it.
            return 0
        count = self.decoder.count_events(body) if batch else 1
        if count is None:
            return 0
        if buffer.overflow == "block":
            try:
                return await self._wait_for_room(count, receive)
            except Overloaded:
                reason = f"no room in the router's buffer within {self.block_timeout:g} s"
        elif count > buffer.free:
            reason = "the router's buffer is full"
        else:
            return 0
        if not self.accepting:
            raise IngestError(
                503, "shutting_down", "the router is shutting down; retry on another replica"
            )
        self._received_http.inc(count)
        self.metrics.rejected.labels("overloaded").inc(count)
        raise IngestError(
            503,
            "overloaded",
            f"{reason}, so {_events_were(count)} not accepted; retry after 1 second",
        )

    async def _wait_for_room(self, count: int, receive: Receive) -> int:
        """Wait for room under `block`, and stop waiting when the client disconnects.

        The server does not cancel a request whose client went away, so the
        request watches for `http.disconnect` itself. Otherwise it would keep
        its place in the line and its events would be taken, and the client,
        which never got a reply, might send them again.
        """
        buffer = self.engine.buffer
        room = asyncio.ensure_future(buffer.wait_for_room(count, self.block_timeout))
        disconnect = asyncio.ensure_future(receive())
        try:
            await asyncio.wait((room, disconnect), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            room.cancel()
            raise
        finally:
            disconnect.cancel()
        if room.done():
            return room.result()
        room.cancel()
        with contextlib.suppress(asyncio.CancelledError, Overloaded):
            await room
        raise IngestError(400, "invalid_request", "client disconnected while waiting for room")

    def _envelopes(
        self, events: list[Any], principal: Principal, traceparent: str | None
    ) -> list[Envelope]:
        now = datetime.now(UTC)
        ids = self._ids.next_ids(len(events))
        router = self.router_name
        server = principal.server or not self.authenticator.enabled
        return [
            Envelope(
                id=ids[i],
                name=event.name,
                properties=event.properties,
                timestamp=event.timestamp or now,
                received_at=now,
                # Only server callers (or an open loopback router) choose `external`;
                # events from game clients are always external, as in Nakama.
                external=event.external if server else True,
                router=router,
                user_id=principal.user_id,
                username=principal.username,
                session_id=principal.session_id,
                traceparent=traceparent,
            )
            for i, event in enumerate(events)
        ]

    def _submit(self, envelopes: list[Envelope], room: _Room) -> int:
        try:
            dropped = self.engine.submit(envelopes, granted=room.granted)
        except Overloaded:
            self.metrics.rejected.labels("overloaded").inc(len(envelopes))
            raise IngestError(
                503,
                "overloaded",
                f"the router's buffer is full, so {_events_were(len(envelopes))} not accepted; "
                "retry after 1 second",
            ) from None
        # `offer` used the granted room, and released what the events left.
        room.granted = 0
        return dropped

    def _accept_one(
        self, body: bytes, principal: Principal, traceparent: str | None, room: _Room
    ) -> tuple[int, bytes]:
        self._received_http.inc()
        try:
            event = self.decoder.decode_one(body)
        except msgspec.DecodeError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise IngestError(400, "invalid_event", describe_decode_error(exc, "event")) from None
        self._submit(self._envelopes([event], principal, traceparent), room)
        return 200, _EMPTY_OK

    def _accept_batch(
        self, body: bytes, principal: Principal, traceparent: str | None, room: _Room
    ) -> tuple[int, bytes]:
        try:
            events, errors = self.decoder.decode_batch(body)
        except msgspec.DecodeError as exc:
            self.metrics.received.labels("http").inc()
            self.metrics.rejected.labels("invalid").inc()
            message = describe_decode_error(exc)
            if "length <=" in message:
                limit = self.decoder.limits.max_batch_events
                raise IngestError(
                    413, "too_many_events", f"{message}; send at most {limit} events per request"
                ) from None
            raise IngestError(400, "invalid_batch", message) from None
        self._received_http.inc(len(events) + len(errors))
        if errors:
            self.metrics.rejected.labels("invalid").inc(len(errors))
        dropped = (
            self._submit(self._envelopes(events, principal, traceparent), room) if events else 0
        )
        payload = {
            "accepted": len(events),
            "rejected": len(errors),
            "errors": [
                {"index": e.index, "error": "invalid_event", "message": e.message} for e in errors
            ],
        }
        if dropped:
            payload["dropped"] = dropped
        status = 400 if not events else 200
        return status, orjson.dumps(payload)


def _scan_headers(scope: Scope) -> tuple[str | None, str | None, str | None]:
    """Authorization, X-Api-Key and traceparent, in one pass over the headers."""
    authorization = api_key = traceparent = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
        elif name == b"traceparent":
            traceparent = value.decode("latin-1")
    return authorization, api_key, traceparent


def _fail_span(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(StatusCode.ERROR, str(exc)[:256])
    span.end()


def _end_span(span: Span, status: int, error: str | None) -> None:
    span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.set_attribute("error.type", error)
    if status >= 500:
        span.set_status(StatusCode.ERROR, error)
    span.end()


@dataclass
class _Room:
    """Room in the ring buffer that `block` granted one request and its events have not taken."""

    granted: int


def _events_were(count: int) -> str:
    return "1 event was" if count == 1 else f"{count} events were"


def _too_large(limit: int, size: int) -> str:
    return (
        f"request body of {size} bytes exceeds the limit of {limit} bytes; "
        "split it into smaller batches or raise spec.limits.maxRequestBytes"
    )


def _error(code: str, message: str) -> bytes:
    return orjson.dumps({"error": code, "message": message})


_EMPTY_OK_HEADERS = [*_JSON_HEADERS, (b"content-length", b"2")]


async def _respond(
    send: Send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    if status == 200 and body is _EMPTY_OK and extra_headers is None:
        # The reply to every accepted single event; uvicorn copies the list.
        await send({"type": "http.response.start", "status": 200, "headers": _EMPTY_OK_HEADERS})
        await send({"type": "http.response.body", "body": body})
        return
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
