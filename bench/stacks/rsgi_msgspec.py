"""Granian RSGI app that decodes bodies into typed msgspec Structs.

RSGI is granian's native interface. It skips the ASGI message dicts, so comparing it
with granian's ASGI mode shows what that translation costs.
"""

from typing import Any

import msgspec
from schemas import INVALID_BODY, OK_BODY, msgspec_batch_decoder, msgspec_event_decoder

JSON_HEADERS = [("content-type", "application/json")]
DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "/v2/event": msgspec_event_decoder,
    "/v2/events": msgspec_batch_decoder,
}


async def app(scope: Any, protocol: Any) -> None:
    if scope.proto != "http":
        return
    decoder = DECODERS.get(scope.path)
    if decoder is None:
        protocol.response_bytes(404, JSON_HEADERS, b'{"error":"not found"}')
        return
    if scope.method != "POST":
        protocol.response_bytes(405, JSON_HEADERS, b'{"error":"method not allowed"}')
        return
    body = await protocol()
    try:
        decoder.decode(body)
    except msgspec.DecodeError:
        protocol.response_bytes(400, JSON_HEADERS, INVALID_BODY)
        return
    protocol.response_bytes(200, JSON_HEADERS, OK_BODY)
