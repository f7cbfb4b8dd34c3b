"""Naive peer: a raw ASGI app that produces each event to Kafka before it responds.

This is the straightforward Python service that the router is compared with.
`POST /v2/events` parses the JSON body with the standard library and awaits
`send_and_wait` for each event in turn, so a request gets its 200 only after
Kafka has acknowledged all its events. `POST /v2/event` does the same for one
event. The producer uses the router's Kafka sink defaults: acks all,
idempotence on and a linger of 5 ms.

Run it with uvicorn, configured by two environment variables:

    KAFKA_BOOTSTRAP=127.0.0.1:9092 KAFKA_TOPIC=events \\
        uvicorn naive_asgi:app --app-dir bench/peers --host 127.0.0.1
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]

producer: AIOKafkaProducer | None = None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def _run_lifespan(receive: Receive, send: Send) -> None:
    global producer
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            producer = AIOKafkaProducer(
                bootstrap_servers=os.environ["KAFKA_BOOTSTRAP"],
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
            )
            await producer.start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if producer is not None:
                await producer.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _run_lifespan(receive, send)
        return
    path = scope["path"]
    if path not in ("/v2/event", "/v2/events"):
        await _respond(send, 404, b'{"error":"not found"}')
        return
    if scope["method"] != "POST":
        await _respond(send, 405, b'{"error":"method not allowed"}')
        return
    try:
        document = json.loads(await _read_body(receive))
    except ValueError:
        await _respond(send, 400, b'{"error":"the body is not valid JSON"}')
        return
    events = document["events"] if path == "/v2/events" else [document]
    assert producer is not None
    topic = os.environ["KAFKA_TOPIC"]
    for event in events:
        await producer.send_and_wait(topic, json.dumps(event).encode())
    await _respond(send, 200, b"{}")
