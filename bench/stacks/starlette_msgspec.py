"""Starlette app that decodes bodies into typed msgspec Structs."""

from typing import Any

import msgspec
from schemas import INVALID_BODY, OK_BODY, msgspec_batch_decoder, msgspec_event_decoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _decode_response(decoder: msgspec.json.Decoder[Any], body: bytes) -> Response:
    try:
        decoder.decode(body)
    except msgspec.DecodeError:
        return Response(INVALID_BODY, status_code=400, media_type="application/json")
    return Response(OK_BODY, media_type="application/json")


async def post_event(request: Request) -> Response:
    return _decode_response(msgspec_event_decoder, await request.body())


async def post_events(request: Request) -> Response:
    return _decode_response(msgspec_batch_decoder, await request.body())


app = Starlette(
    routes=[
        Route("/v2/event", post_event, methods=["POST"]),
        Route("/v2/events", post_events, methods=["POST"]),
    ]
)
