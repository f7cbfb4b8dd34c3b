"""Client WebSocket sessions on `GET /ws`, with session_start and session_end events.

A game client opens `/ws?token=<session token>` (or sends the token in an
`Authorization: Bearer` header), as Nakama clients do. Opening emits
`session_start`; closing emits `session_end` with the duration and the reason.
Both go through the ring buffer like any event, so a session's end reaches each
sink after its start.

Messages are JSON text. `{"cid": "1", "ping": {}}` is answered with
`{"cid": "1", "pong": {}}`, which keeps Nakama clients' heartbeat alive. An event
is sent as `{"cid": "2", "event": {...}}` (or as a bare event object) and is
answered with `{"cid": "2", "ack": {"id": ...}}` or `{"cid": "2", "error":
{"code": 3, "message": ...}}`; code 3 is Nakama's code for a bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec
import orjson

from eventrouter.auth import Principal
from eventrouter.engine import Overloaded
from eventrouter.envelope import Envelope, describe_decode_error
from eventrouter.errors import AuthError
from eventrouter.logs import RateLimitedLog
from eventrouter.metrics import Metrics

if TYPE_CHECKING:
    from eventrouter.app import IngestApp, Message, Receive, Scope, Send

__all__ = ["CloseReason", "SessionManager"]

logger = logging.getLogger(__name__)

_BAD_INPUT = 3


class CloseReason:
    """Values of the `reason` property of session_end, and the close codes the server sends."""

    CLIENT = "client_close"
    SHUTDOWN = "server_shutdown"
    IDLE = "idle_timeout"
    TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limited"
    NETWORK = "network_error"

    # Close codes from RFC 6455, section 7.4.1.
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013


@dataclass
class _Session:
    id: str
    principal: Principal
    send: Send
    opened_at: float
    client: str
    user_agent: str
    close_reason: str | None = None
    tokens: float = 0.0
    refilled_at: float = field(default_factory=time.monotonic)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class SessionManager:
    """Accepts, tracks and closes the WebSocket sessions of one router."""

    def __init__(self, app: IngestApp, metrics: Metrics) -> None:
        self.app = app
        self._sessions: dict[str, _Session] = {}
        self._per_user: dict[str, int] = {}
        self._denied = RateLimitedLog(logger)
        self._active = metrics.sessions_active
        self._opened = metrics.sessions_opened
        self._closed = metrics.sessions_closed
        self._refused = metrics.sessions_refused
        self._received = metrics.received.labels("websocket")
        # session_start and session_end, which the router makes itself.
        self._received_lifecycle = metrics.received.labels("session")
        self._rejected = metrics.rejected
        self._active.set_function(lambda: len(self._sessions))

    @property
    def count(self) -> int:
        return len(self._sessions)

    # --- opening ------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one WebSocket connection from handshake to close."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        spec = self.app.engine.config.router.spec.sessions
        if not spec.enabled:
            await _deny(scope, send, 404, "not_found", "sessions are turned off on this router")
            return
        if not self.app.accepting:
            await _deny(scope, send, 503, "shutting_down", "the router is shutting down")
            return
        try:
            principal = self._authenticate(scope)
        except AuthError as exc:
            self._refused.labels("unauthenticated").inc()
            client = scope.get("client")
            self._denied.log(
                logging.INFO,
                "ws-auth",
                "refused session from %s: %s",
                client[0] if client else "unknown",
                exc,
            )
            await _deny(scope, send, 401, "unauthenticated", str(exc))
            return

        user = principal.user_id or ""
        limit_reason = None
        if len(self._sessions) >= spec.max_sessions:
            limit_reason = (
                "max_sessions",
                f"too many sessions on this router ({spec.max_sessions})",
            )
        elif user and self._per_user.get(user, 0) >= spec.max_sessions_per_user:
            limit_reason = (
                "max_sessions_per_user",
                f"too many sessions for this user ({spec.max_sessions_per_user})",
            )
        await send({"type": "websocket.accept"})
        if limit_reason is not None:
            # Accept, then close with a code and reason the client can read; no
            # session events are emitted for a session that never started.
            self._refused.labels(limit_reason[0]).inc()
            await send(
                {
                    "type": "websocket.close",
                    "code": CloseReason.TRY_AGAIN_LATER,
                    "reason": limit_reason[1],
                }
            )
            return

        try:
            session = self._open(scope, principal, send, spec.max_events_per_second)
        except Overloaded:
            self._refused.labels("overloaded").inc()
            self._rejected.labels("overloaded").inc()
            self._denied.log(
                logging.WARNING,
                "ws-overloaded",
                "refused session of user %s: the buffer is full and the overflow policy is %s",
                principal.user_id or "(none)",
                self.app.engine.buffer.overflow,
            )
            await send(
                {
                    "type": "websocket.close",
                    "code": CloseReason.TRY_AGAIN_LATER,
                    "reason": "the router's buffer is full; retry later",
                }
            )
            return
        try:
            await self._serve(session, receive, spec.idle_timeout)
        finally:
            self._finish(session)

    def _authenticate(self, scope: Scope) -> Principal:
        token = None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            token = query["token"][0]
        authorization = f"Bearer {token}" if token else None
        api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
        return self.app.authenticator.authenticate(authorization, api_key)

    def _open(self, scope: Scope, principal: Principal, send: Send, rate: float) -> _Session:
        client = scope.get("client")
        user_agent = ""
        for name, value in scope["headers"]:
            if name == b"user-agent":
                user_agent = value.decode("latin-1")[:256]
        session_id = self.app.new_ids(1)[0]
        session = _Session(
            id=session_id,
            principal=principal,
            send=send,
            opened_at=time.monotonic(),
            client=f"{client[0]}:{client[1]}" if client else "",
            user_agent=user_agent,
            tokens=2 * rate,
        )
        properties = {"client_address": session.client, "user_agent": user_agent}
        if principal.session_id:
            properties["token_id"] = principal.session_id
        # Emitted before the session is registered: under the `reject` policy a
        # full buffer raises Overloaded here, and the session never opens.
        self._received_lifecycle.inc()
        self._emit(session, "session_start", properties, force=False)
        self._sessions[session_id] = session
        if principal.user_id:
            self._per_user[principal.user_id] = self._per_user.get(principal.user_id, 0) + 1
        self._opened.inc()
        return session

    # --- messages -------------------------------------------------------------------

    async def _serve(self, session: _Session, receive: Receive, idle_timeout: float) -> None:
        while True:
            try:
                message = await asyncio.wait_for(receive(), idle_timeout or None)
            except TimeoutError:
                await self._close(session, CloseReason.IDLE, CloseReason.GOING_AWAY, "idle timeout")
                # The close handshake still ends in websocket.disconnect.
                continue
            kind = message["type"]
            if kind == "websocket.disconnect":
                if session.close_reason is None:
                    session.close_reason = _reason_for_disconnect(message)
                return
            if kind != "websocket.receive" or session.close_reason is not None:
                continue
            # Every message counts against the rate, pings and invalid ones
            # too, so that no kind of message can flood the router.
            if not self._take_token(session):
                await self._close_rate_limited(session)
                continue
            text = message.get("text")
            if text is None:
                self._count_invalid()
                await self._reply(
                    session, None, error="binary messages are not supported; send JSON text"
                )
                continue
            await self._handle_text(session, text)

    def _count_invalid(self) -> None:
        """Count a message that is not a JSON object as one invalid event, as HTTP does."""
        self._received.inc()
        self._rejected.labels("invalid").inc()

    async def _handle_text(self, session: _Session, text: str) -> None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self._count_invalid()
            await self._reply(session, None, error=f"invalid JSON: {exc}")
            return
        if not isinstance(body, dict):
            self._count_invalid()
            await self._reply(session, None, error="expected a JSON object")
            return
        cid = body.get("cid")
        cid = cid if isinstance(cid, str) else None
        if "ping" in body:
            await self._send(session, {"cid": cid, "pong": {}} if cid else {"pong": {}})
            return
        event_body = body.get("event", body)
        self._received.inc()
        try:
            event = self.app.decoder.decode_one(orjson.dumps(event_body))
        except (orjson.JSONEncodeError, RecursionError):
            # orjson encodes less nesting than it decodes.
            self._rejected.labels("invalid").inc()
            await self._reply(session, cid, error="event: JSON is nested too deeply")
            return
        except msgspec.DecodeError as exc:
            self._rejected.labels("invalid").inc()
            await self._reply(session, cid, error=describe_decode_error(exc, "event"))
            return
        server = session.principal.server or not self.app.authenticator.enabled
        try:
            envelope = self._emit(
                session,
                event.name,
                event.properties,
                timestamp=event.timestamp,
                external=event.external if server else True,
            )
        except Overloaded:
            self._rejected.labels("overloaded").inc()
            await self._reply(
                session, cid, error="the router's buffer is full; retry after 1 second"
            )
            return
        await self._send(
            session,
            {"cid": cid, "ack": {"id": envelope.id}} if cid else {"ack": {"id": envelope.id}},
        )

    async def _close_rate_limited(self, session: _Session) -> None:
        self._rejected.labels("rate_limited").inc()
        spec = self.app.engine.config.router.spec.sessions
        await self._close(
            session,
            CloseReason.RATE_LIMITED,
            CloseReason.POLICY,
            f"rate limit exceeded: more than {spec.max_events_per_second:g} messages per second",
        )

    def _take_token(self, session: _Session) -> bool:
        rate = self.app.engine.config.router.spec.sessions.max_events_per_second
        now = time.monotonic()
        session.tokens = min(2 * rate, session.tokens + (now - session.refilled_at) * rate)
        session.refilled_at = now
        if session.tokens < 1:
            return False
        session.tokens -= 1
        return True

    async def _reply(self, session: _Session, cid: str | None, *, error: str) -> None:
        payload: dict[str, Any] = {"error": {"code": _BAD_INPUT, "message": error}}
        if cid:
            payload["cid"] = cid
        await self._send(session, payload)

    async def _send(self, session: _Session, payload: dict[str, Any]) -> None:
        if session.close_reason is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            await session.send({"type": "websocket.send", "text": orjson.dumps(payload).decode()})

    # --- closing --------------------------------------------------------------------

    async def _close(self, session: _Session, reason: str, code: int, text: str) -> None:
        if session.close_reason is not None:
            return
        session.close_reason = reason
        with contextlib.suppress(OSError, RuntimeError):
            await session.send({"type": "websocket.close", "code": code, "reason": text})

    def _finish(self, session: _Session) -> None:
        if session.closed.is_set():
            return
        reason = session.close_reason or CloseReason.NETWORK
        duration = time.monotonic() - session.opened_at
        self._sessions.pop(session.id, None)
        user = session.principal.user_id
        if user:
            left = self._per_user.get(user, 1) - 1
            if left:
                self._per_user[user] = left
            else:
                self._per_user.pop(user, None)
        self._closed.labels(reason).inc()
        # session_end is never shed by the overflow policy: there is at most one
        # per open session, and without it the start would have no end.
        self._received_lifecycle.inc()
        self._emit(
            session,
            "session_end",
            {
                "client_address": session.client,
                "user_agent": session.user_agent,
                "reason": reason,
                "duration_ms": str(round(duration * 1000)),
            },
            force=True,
        )
        session.closed.set()

    def _emit(
        self,
        session: _Session,
        name: str,
        properties: dict[str, str],
        *,
        force: bool = False,
        timestamp: datetime | None = None,
        external: bool = False,
    ) -> Envelope:
        now = datetime.now(UTC)
        principal = session.principal
        envelope = Envelope(
            id=self.app.new_ids(1)[0],
            name=name,
            properties=properties,
            timestamp=timestamp or now,
            received_at=now,
            external=external,
            router=self.app.router_name,
            user_id=principal.user_id,
            username=principal.username,
            session_id=session.id,
        )
        self.app.engine.submit([envelope], force=force)
        return envelope

    async def close_all(self, timeout: float) -> None:
        """Close every session with the shutdown reason and wait for their session_end."""
        sessions = list(self._sessions.values())
        if not sessions:
            return
        logger.info("closing %d sessions for shutdown", len(sessions))
        await asyncio.gather(
            *(
                self._close(s, CloseReason.SHUTDOWN, CloseReason.GOING_AWAY, "server shutting down")
                for s in sessions
            )
        )
        waits = [asyncio.ensure_future(s.closed.wait()) for s in sessions]
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for task in pending:
            task.cancel()
        # A session whose client sent no close frame back gets its end now.
        for session in sessions:
            if not session.closed.is_set():
                self._finish(session)


def _reason_for_disconnect(message: Message) -> str:
    code = message.get("code", 1005)
    if code == CloseReason.TOO_BIG:
        return CloseReason.TOO_LARGE
    if code in (1006, 1011, 1012, 1014, 1015):
        return CloseReason.NETWORK
    # uvicorn 0.55 (websockets-sansio) reports a connection lost without a close
    # frame as code 1005 with no `reason` key. A received close frame always
    # carries `reason`, empty when the client sent none.
    if code == 1005 and "reason" not in message:
        return CloseReason.NETWORK
    return CloseReason.CLIENT


async def _deny(scope: Scope, send: Send, status: int, error: str, message: str) -> None:
    """Refuse the handshake with an HTTP response, or a close where that is unsupported."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = orjson.dumps({"error": error, "message": message})
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
