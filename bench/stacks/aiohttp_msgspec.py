"""aiohttp web server on uvloop that decodes bodies into typed msgspec Structs.

Run as a script: ``python aiohttp_msgspec.py --port 8000``.
"""

import argparse
import asyncio
from typing import Any

import msgspec
import uvloop
from aiohttp import web
from schemas import INVALID_BODY, OK_BODY, msgspec_batch_decoder, msgspec_event_decoder


def _decode_response(decoder: msgspec.json.Decoder[Any], body: bytes) -> web.Response:
    try:
        decoder.decode(body)
    except msgspec.DecodeError:
        return web.Response(body=INVALID_BODY, status=400, content_type="application/json")
    return web.Response(body=OK_BODY, content_type="application/json")


async def post_event(request: web.Request) -> web.Response:
    return _decode_response(msgspec_event_decoder, await request.read())


async def post_events(request: web.Request) -> web.Response:
    return _decode_response(msgspec_batch_decoder, await request.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    args = parser.parse_args()

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = web.Application()
    app.router.add_post("/v2/event", post_event)
    app.router.add_post("/v2/events", post_events)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
