"""Raw ASGI application shared by the uvicorn and granian candidates.

Among the uvicorn candidates only the two decode functions differ, so differences
between their results come from JSON parsing and validation alone.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from schemas import INVALID_BODY, OK_BODY

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Decode = Callable[[bytes], object]

JSON_HEADERS = [(b"content-type", b"application/json")]


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def _run_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_app(
    decode_event: Decode,
    decode_batch: Decode,
    decode_errors: tuple[type[Exception], ...],
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Build an ASGI app that serves ``POST /v2/event`` and ``POST /v2/events``.

    The app decodes the body with the given function and discards the result. It
    responds 200 ``{}`` on success, 400 when the function raises one of
    ``decode_errors``, 404 for other paths and 405 for methods other than POST.
    """
    routes = {"/v2/event": decode_event, "/v2/events": decode_batch}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _run_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        decode = routes.get(scope["path"])
        if decode is None:
            await _respond(send, 404, b'{"error":"not found"}')
            return
        if scope["method"] != "POST":
            await _respond(send, 405, b'{"error":"method not allowed"}')
            return
        body = await _read_body(receive)
        try:
            decode(body)
        except decode_errors:
            await _respond(send, 400, INVALID_BODY)
            return
        await _respond(send, 200, OK_BODY)

    return app
