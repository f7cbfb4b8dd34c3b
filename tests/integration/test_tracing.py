"""Tracing end to end: one sampling decision per request, spans, propagation and export.

Most tests build the router in this process with the SDK's InMemorySpanExporter
and drive its ASGI app through httpx, so they can read every finished span.
HTTP sinks post to a real receiver on 127.0.0.1, the Kafka test produces to the
session's real broker, and the OTLP tests run `eventrouter serve` as a
subprocess that exports over HTTP to a receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from eventrouter.app import IngestApp
from eventrouter.auth import Authenticator
from eventrouter.config import load_config
from eventrouter.engine import Engine
from eventrouter.metrics import Metrics
from eventrouter.resources import TracingSpec
from eventrouter.tracing import Tracing
from tests.conftest import (
    RouterProcess,
    read_jsonl,
    route_doc,
    router_doc,
    sink_doc,
    write_documents,
)
from tests.integration.receiver import Receiver, RecordedRequest, Reply
from tests.integration.test_kafka_sink import create_topics, read_records
from tests.kafka.broker import KafkaBroker

RouterFactory = Callable[..., RouterProcess]

CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
SAMPLED_PARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
UNSAMPLED_PARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00"
API_KEY = "tracing-test-api-key"
# Three attempts, 10 ms apart, so retry tests take milliseconds.
FAST_RETRY = {"maxAttempts": 3, "backoff": {"initial": "10ms", "max": "10ms", "jitter": 0}}


# --- in-process router -------------------------------------------------------------


@dataclass
class InProcessRouter:
    """An engine and ingestion app in this process, with their HTTP client and span exporter."""

    engine: Engine
    app: IngestApp
    client: httpx.AsyncClient
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def server_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind == SpanKind.SERVER]

    def delivery_spans(self, sink: str) -> list[ReadableSpan]:
        """Return the spans of one sink's delivery attempts, in the order they started."""
        found = [s for s in self.spans() if attributes_of(s).get("eventrouter.sink") == sink]
        return sorted(found, key=lambda s: s.start_time or 0)

    async def post(
        self,
        body: dict[str, Any] | bytes,
        *,
        path: str = "/v2/events",
        traceparent: str | None = None,
        api_key: str | None = API_KEY,
    ) -> httpx.Response:
        headers = {}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        if api_key is not None:
            headers["x-api-key"] = api_key
        if isinstance(body, bytes):
            return await self.client.post(path, content=body, headers=headers)
        return await self.client.post(path, json=body, headers=headers)


@contextlib.asynccontextmanager
async def in_process_router(
    tmp_path: Path,
    sinks: list[dict[str, Any]],
    routed: list[str],
    *,
    sampling_ratio: float = 1.0,
    environ: dict[str, str] | None = None,
) -> AsyncIterator[InProcessRouter]:
    """Run a router whose spans go to an InMemorySpanExporter; drain it on exit.

    A route sends every event to the sinks in `routed`. Requests need the
    X-Api-Key `API_KEY`, which `InProcessRouter.post` sends by default. The
    exporter keeps its spans after the drain, so tests can check them then.
    """
    documents = [
        router_doc(tracing={"samplingRatio": sampling_ratio}),
        *sinks,
        route_doc("all", routed),
    ]
    config = load_config([write_documents(tmp_path / "router.yaml", documents)])
    metrics = Metrics()
    exporter = InMemorySpanExporter()
    tracing = Tracing(
        config.router.spec.tracing, config.name, exporter=exporter, environ=environ or {}
    )
    engine = Engine(config, metrics, grace_period=10.0, tracing=tracing)
    await engine.start()
    app = IngestApp(engine, Authenticator(None, [API_KEY]), metrics)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield InProcessRouter(engine, app, client, exporter)
    finally:
        await engine.drain()
        tracing.shutdown()


def file_sink(name: str, path: Path, **spec: Any) -> dict[str, Any]:
    return sink_doc(name, file={"path": str(path)}, **spec)


def http_sink(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return sink_doc(name, http={"url": url}, **spec)


def batch(count: int, **properties: str) -> dict[str, Any]:
    """A `POST /v2/events` body with `count` events, each with its index as a property."""
    return {
        "events": [
            {"name": "level_up", "properties": {"index": str(i), **properties}}
            for i in range(count)
        ]
    }


def context_of(span: ReadableSpan) -> SpanContext:
    context = span.get_span_context()
    assert context is not None
    return context


def attributes_of(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def traceparent_of(span: ReadableSpan) -> str:
    """Return the traceparent of a sampled span, as the router writes it."""
    context = context_of(span)
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def link_ids(span: ReadableSpan) -> list[tuple[int, int]]:
    return [(link.context.trace_id, link.context.span_id) for link in span.links]


def ids_of(span: ReadableSpan) -> tuple[int, int]:
    context = context_of(span)
    return context.trace_id, context.span_id


async def wait_until(
    predicate: Callable[[], bool], description: str, timeout: float = 10.0
) -> None:
    """Poll `predicate` every 10 ms; fail with `description` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {description}")
        await asyncio.sleep(0.01)


# --- ingest spans and sampling -----------------------------------------------------


async def test_batch_gets_one_server_span(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    async with in_process_router(tmp_path, [file_sink("file", output)], ["file"]) as router:
        reply = await router.post(batch(50), traceparent=SAMPLED_PARENT)
        assert reply.status_code == 200, reply.text
        await wait_until(lambda: bool(router.delivery_spans("file")), "the delivery span")

    servers = router.server_spans()
    assert len(servers) == 1
    server = servers[0]
    assert server.name == "POST /v2/events"
    assert server.parent is not None
    assert server.parent.is_remote
    assert f"{server.parent.trace_id:032x}" == CLIENT_TRACE_ID
    assert f"{server.parent.span_id:016x}" == CLIENT_SPAN_ID
    assert f"{context_of(server).trace_id:032x}" == CLIENT_TRACE_ID
    assert attributes_of(server)["http.request.method"] == "POST"
    assert attributes_of(server)["http.route"] == "/v2/events"
    assert attributes_of(server)["http.response.status_code"] == 200
    assert "error.type" not in attributes_of(server)
    assert server.status.status_code == StatusCode.UNSET
    # One SERVER span and one delivery span for the 50 events, not one per event.
    assert len(router.spans()) == 2


async def test_envelopes_carry_server_context(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    async with in_process_router(tmp_path, [file_sink("file", output)], ["file"]) as router:
        reply = await router.post(batch(50), traceparent=SAMPLED_PARENT)
        assert reply.status_code == 200, reply.text

    envelopes = read_jsonl(output)
    assert len(envelopes) == 50
    (server,) = router.server_spans()
    assert {e.get("traceparent") for e in envelopes} == {traceparent_of(server)}


async def test_delivery_span_per_attempt(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    # 50 events reach the sink's queue together, so it delivers 20, 20 and 10.
    sinks = [file_sink("file", output, batchSize=20)]
    async with in_process_router(tmp_path, sinks, ["file"]) as router:
        reply = await router.post(batch(50), traceparent=SAMPLED_PARENT)
        assert reply.status_code == 200, reply.text

    (server,) = router.server_spans()
    deliveries = router.delivery_spans("file")
    assert [attributes_of(s)["messaging.batch.message_count"] for s in deliveries] == [20, 20, 10]
    for span in deliveries:
        assert span.name == "deliver file"
        assert span.kind == SpanKind.INTERNAL
        assert span.parent is None
        assert link_ids(span) == [ids_of(server)]
        assert attributes_of(span)["eventrouter.sink"] == "file"
        assert attributes_of(span)["eventrouter.sink.type"] == "file"
        assert attributes_of(span)["eventrouter.attempt"] == 1
        assert "eventrouter.outcome" not in attributes_of(span)
        assert span.status.status_code == StatusCode.UNSET
    assert len(router.spans()) == 1 + len(deliveries)


async def test_unsampled_parent_makes_no_spans(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    async with in_process_router(tmp_path, [file_sink("file", output)], ["file"]) as router:
        reply = await router.post(batch(50), traceparent=UNSAMPLED_PARENT)
        assert reply.status_code == 200, reply.text

    assert router.spans() == []
    envelopes = read_jsonl(output)
    assert len(envelopes) == 50
    assert {e.get("traceparent") for e in envelopes} == {UNSAMPLED_PARENT}


@pytest.mark.parametrize(
    ("spec_ratio", "environ", "sampled"),
    [
        (0.0, {}, False),
        (1.0, {}, True),
        (1.0, {"OTEL_TRACES_SAMPLER_ARG": "0"}, False),
        (0.0, {"OTEL_TRACES_SAMPLER_ARG": "1"}, True),
    ],
    ids=["spec-0", "spec-1", "variable-0", "variable-1"],
)
async def test_ratio_without_parent(
    tmp_path: Path, spec_ratio: float, environ: dict[str, str], sampled: bool
) -> None:
    output = tmp_path / "events.jsonl"
    sinks = [file_sink("file", output)]
    async with in_process_router(
        tmp_path, sinks, ["file"], sampling_ratio=spec_ratio, environ=environ
    ) as router:
        for index in range(5):
            reply = await router.post(
                {"name": "tick", "properties": {"index": str(index)}}, path="/v2/event"
            )
            assert reply.status_code == 200, reply.text

    servers = router.server_spans()
    envelopes = read_jsonl(output)
    assert len(envelopes) == 5
    if not sampled:
        assert router.spans() == []
        assert [e.get("traceparent") for e in envelopes] == [None] * 5
        return
    assert len(servers) == 5
    assert all(s.name == "POST /v2/event" for s in servers)
    assert all(s.parent is None for s in servers)
    assert {e["traceparent"] for e in envelopes} == {traceparent_of(s) for s in servers}


async def test_ratio_within_binomial_bound(tmp_path: Path) -> None:
    requests = 2000
    ratio = 0.1
    sinks = [sink_doc("void", blackhole={})]
    async with in_process_router(tmp_path, sinks, ["void"], sampling_ratio=ratio) as router:
        for index in range(requests):
            reply = await router.post(
                {"name": "tick", "properties": {"index": str(index)}}, path="/v2/event"
            )
            assert reply.status_code == 200, reply.text

    sampled = len(router.server_spans())
    mean = requests * ratio
    deviation = math.sqrt(requests * ratio * (1 - ratio))
    # Five standard deviations: a correct sampler fails this about once in
    # 1.7 million runs.
    assert mean - 5 * deviation <= sampled <= mean + 5 * deviation, (
        f"{sampled} of {requests} requests sampled at ratio {ratio}"
    )


async def test_batch_sampled_as_whole(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    requests = 40
    sinks = [file_sink("file", output)]
    async with in_process_router(tmp_path, sinks, ["file"], sampling_ratio=0.5) as router:
        for request in range(requests):
            reply = await router.post(batch(50, request=str(request)))
            assert reply.status_code == 200, reply.text

    by_request: dict[str, set[str | None]] = defaultdict(set)
    for envelope in read_jsonl(output):
        by_request[envelope["properties"]["request"]].add(envelope.get("traceparent"))
    assert len(by_request) == requests
    mixed = {r: values for r, values in by_request.items() if len(values) != 1}
    assert mixed == {}
    contexts = [next(iter(values)) for values in by_request.values()]
    sampled = [c for c in contexts if c is not None]
    # Both outcomes occur unless 40 fair draws agree (probability 2**-39).
    assert 0 < len(sampled) < requests
    assert sorted(sampled) == sorted(traceparent_of(s) for s in router.server_spans())


@pytest.mark.parametrize(
    ("path", "body", "api_key", "status", "error"),
    [
        ("/v2/events", batch(1), None, 401, "unauthenticated"),
        ("/v2/events", b"not json", API_KEY, 400, "invalid_batch"),
        ("/v2/events", {"events": [{"nam": "typo"}]}, API_KEY, 400, "invalid_event"),
        ("/v2/event", {"nam": "typo"}, API_KEY, 400, "invalid_event"),
    ],
    ids=["missing-key", "invalid-batch", "every-event-invalid", "invalid-event"],
)
async def test_error_response_ends_span(
    tmp_path: Path,
    path: str,
    body: dict[str, Any] | bytes,
    api_key: str | None,
    status: int,
    error: str,
) -> None:
    sinks = [file_sink("file", tmp_path / "events.jsonl")]
    async with in_process_router(tmp_path, sinks, ["file"]) as router:
        reply = await router.post(body, path=path, traceparent=SAMPLED_PARENT, api_key=api_key)
        assert reply.status_code == status, reply.text

    (server,) = router.server_spans()
    assert server.name == f"POST {path}"
    assert attributes_of(server)["http.response.status_code"] == status
    assert attributes_of(server).get("error.type") == error
    # A 4xx is the client's error, so the SERVER span's status stays unset.
    assert server.status.status_code == StatusCode.UNSET
    assert router.spans() == [server]


async def test_server_error_sets_status(tmp_path: Path) -> None:
    sinks = [file_sink("file", tmp_path / "events.jsonl")]
    async with in_process_router(tmp_path, sinks, ["file"]) as router:
        router.app.accepting = False
        reply = await router.post(batch(1), traceparent=SAMPLED_PARENT)
        assert reply.status_code == 503, reply.text

    (server,) = router.server_spans()
    assert attributes_of(server)["http.response.status_code"] == 503
    assert attributes_of(server)["error.type"] == "shutting_down"
    assert server.status.status_code == StatusCode.ERROR


async def test_unexpected_error_ends_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(events: list[Any], *, force: bool = False, granted: int = 0) -> int:
        raise RuntimeError("submit failed")

    sinks = [file_sink("file", tmp_path / "events.jsonl")]
    async with in_process_router(tmp_path, sinks, ["file"]) as router:
        monkeypatch.setattr(router.engine, "submit", fail)
        reply = await router.post(batch(1), traceparent=SAMPLED_PARENT)
        assert reply.status_code == 500
        assert reply.json()["error"] == "internal_error"

    (server,) = router.server_spans()
    assert attributes_of(server)["error.type"] == "RuntimeError"
    assert "http.response.status_code" not in attributes_of(server)
    assert server.status.status_code == StatusCode.ERROR
    assert [e.name for e in server.events] == ["exception"]


@pytest.mark.parametrize(
    "traceparent",
    [
        "not-a-traceparent",
        f"00-{'0' * 32}-{CLIENT_SPAN_ID}-01",
        f"00-{CLIENT_TRACE_ID}-{'0' * 16}-01",
        f"ff-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01",
        f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-1",
        f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01-extra",
    ],
    ids=["garbage", "zero-trace-id", "zero-span-id", "version-ff", "short-flags", "extra-field"],
)
async def test_invalid_traceparent_starts_root(tmp_path: Path, traceparent: str) -> None:
    output = tmp_path / "events.jsonl"
    async with in_process_router(tmp_path, [file_sink("file", output)], ["file"]) as router:
        reply = await router.post(batch(3), traceparent=traceparent)
        assert reply.status_code == 200, reply.text

    (server,) = router.server_spans()
    assert server.parent is None
    assert f"{context_of(server).trace_id:032x}" != CLIENT_TRACE_ID
    envelopes = read_jsonl(output)
    assert {e.get("traceparent") for e in envelopes} == {traceparent_of(server)}


async def test_invalid_traceparent_not_forwarded(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    sinks = [file_sink("file", output)]
    async with in_process_router(tmp_path, sinks, ["file"], sampling_ratio=0.0) as router:
        reply = await router.post(batch(3), traceparent="00-not-a-trace-context-01")
        assert reply.status_code == 200, reply.text

    assert router.spans() == []
    envelopes = read_jsonl(output)
    assert [e.get("traceparent") for e in envelopes] == [None] * 3


# --- HTTP sink ----------------------------------------------------------------------


def traceparent_fields(request: RecordedRequest) -> tuple[str, str, str]:
    """Trace id, parent span id and flags of the `traceparent` header a receiver got."""
    header = request.header("traceparent")
    assert header is not None, f"request without traceparent: {request.headers}"
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00"
    return trace_id, span_id, flags


async def test_http_attempts_traced(tmp_path: Path) -> None:
    with Receiver() as receiver:
        receiver.script(Reply(500), Reply(500), Reply(200), path="/hook")
        url = f"{receiver.url}/hook"
        sinks = [http_sink("hook", url, retry=FAST_RETRY)]
        async with in_process_router(tmp_path, sinks, ["hook"]) as router:
            reply = await router.post(batch(1), traceparent=SAMPLED_PARENT)
            assert reply.status_code == 200, reply.text
            await wait_until(lambda: len(router.delivery_spans("hook")) == 3, "three attempts")
        requests = receiver.requests("/hook")

    (server,) = router.server_spans()
    attempts = router.delivery_spans("hook")
    assert len(attempts) == 3
    assert len(requests) == 3
    for number, (span, request) in enumerate(zip(attempts, requests, strict=True), start=1):
        assert span.name == "POST"
        assert span.kind == SpanKind.CLIENT
        assert link_ids(span) == [ids_of(server)]
        assert attributes_of(span)["eventrouter.attempt"] == number
        assert attributes_of(span)["http.request.method"] == "POST"
        assert attributes_of(span)["url.full"] == url
        assert attributes_of(span)["server.address"] == "127.0.0.1"
        assert attributes_of(span)["server.port"] == receiver.port
        # The receiver's request continues the attempt's trace.
        trace_id, parent_id, flags = traceparent_fields(request)
        assert trace_id == f"{context_of(span).trace_id:032x}"
        assert parent_id == f"{context_of(span).span_id:016x}"
        assert int(flags, 16) & 0x01, f"trace flags {flags} lack the sampled bit"
        assert request.json()["traceparent"] == traceparent_of(server)

    for span in attempts[:2]:
        assert span.status.status_code == StatusCode.ERROR
        assert attributes_of(span)["http.response.status_code"] == 500
        assert attributes_of(span)["eventrouter.outcome"] == "retry"
    last = attempts[2]
    # OpenTelemetry leaves the status of a successful span unset rather than OK.
    assert last.status.status_code == StatusCode.UNSET
    assert attributes_of(last)["http.response.status_code"] == 200
    assert "eventrouter.outcome" not in attributes_of(last)
    assert "error.type" not in attributes_of(last)


async def test_dead_letter_links_ingest_span(tmp_path: Path) -> None:
    dead_letters = tmp_path / "dead-letters.jsonl"
    with Receiver() as receiver:
        receiver.set_default(Reply(503), path="/hook")
        sinks = [
            http_sink(
                "hook",
                f"{receiver.url}/hook",
                retry={**FAST_RETRY, "maxAttempts": 2},
                deadLetterSink="dlq",
            ),
            file_sink("dlq", dead_letters),
        ]
        async with in_process_router(tmp_path, sinks, ["hook"]) as router:
            reply = await router.post(batch(1), traceparent=SAMPLED_PARENT)
            assert reply.status_code == 200, reply.text
            await wait_until(lambda: bool(router.delivery_spans("dlq")), "the dead-letter span")

    (server,) = router.server_spans()
    attempts = router.delivery_spans("hook")
    assert [attributes_of(s)["eventrouter.outcome"] for s in attempts] == ["retry", "dead_letter"]
    last = attempts[-1]
    assert last.status.status_code == StatusCode.ERROR
    assert attributes_of(last)["http.response.status_code"] == 503
    (dead_letter_span,) = router.delivery_spans("dlq")
    assert dead_letter_span.name == "deliver dlq"
    assert link_ids(dead_letter_span) == [ids_of(server)]
    (envelope,) = read_jsonl(dead_letters)
    assert envelope["traceparent"] == traceparent_of(server)
    assert envelope["dead_letter"]["attempts"] == 2


@pytest.mark.parametrize(
    ("status", "dead_letter", "attempts", "outcome"),
    [(500, False, 2, "dropped"), (400, True, 1, "dead_letter")],
    ids=["retries-used-up", "permanent-error"],
)
async def test_last_attempt_outcome(
    tmp_path: Path, status: int, dead_letter: bool, attempts: int, outcome: str
) -> None:
    extra = {"deadLetterSink": "dlq"} if dead_letter else {}
    with Receiver() as receiver:
        receiver.set_default(Reply(status), path="/hook")
        sinks = [
            http_sink(
                "hook", f"{receiver.url}/hook", retry={**FAST_RETRY, "maxAttempts": 2}, **extra
            ),
            file_sink("dlq", tmp_path / "dead-letters.jsonl"),
        ]
        async with in_process_router(tmp_path, sinks, ["hook"]) as router:
            reply = await router.post(batch(1), traceparent=SAMPLED_PARENT)
            assert reply.status_code == 200, reply.text
            await wait_until(
                lambda: len(router.delivery_spans("hook")) == attempts, f"{attempts} attempts"
            )

    spans = router.delivery_spans("hook")
    assert len(spans) == attempts
    last = spans[-1]
    assert attributes_of(last)["eventrouter.outcome"] == outcome
    assert attributes_of(last)["http.response.status_code"] == status
    assert last.status.status_code == StatusCode.ERROR


# --- Kafka sink ---------------------------------------------------------------------


async def test_kafka_records_carry_traceparent(tmp_path: Path, kafka_broker: KafkaBroker) -> None:
    topic = f"tracing-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_broker.bootstrap, [topic], 1)
    sinks = [
        sink_doc("kafka", kafka={"bootstrapServers": [kafka_broker.bootstrap], "topic": topic})
    ]
    async with in_process_router(tmp_path, sinks, ["kafka"]) as router:
        reply = await router.post(batch(5, sampled="yes"), traceparent=SAMPLED_PARENT)
        assert reply.status_code == 200, reply.text
        await wait_until(lambda: bool(router.delivery_spans("kafka")), "the producer span", 60)
        # Sent after the first batch was produced, so it is a batch of its own.
        reply = await router.post(batch(3, sampled="no"), traceparent=UNSAMPLED_PARENT)
        assert reply.status_code == 200, reply.text

    records = await read_records(kafka_broker.bootstrap, {topic: 1})
    assert len(records) == 8
    (server,) = router.server_spans()
    for record in records:
        assert record.headers["traceparent"] == record.event["traceparent"]
    sampled = [r for r in records if r.event["properties"]["sampled"] == "yes"]
    unsampled = [r for r in records if r.event["properties"]["sampled"] == "no"]
    assert {r.headers["traceparent"] for r in sampled} == {traceparent_of(server)}
    assert {r.headers["traceparent"] for r in unsampled} == {UNSAMPLED_PARENT}

    # The unsampled batch makes no span.
    (span,) = router.delivery_spans("kafka")
    assert span.name == f"publish {topic}"
    assert span.kind == SpanKind.PRODUCER
    assert link_ids(span) == [ids_of(server)]
    assert attributes_of(span)["messaging.system"] == "kafka"
    assert attributes_of(span)["messaging.destination.name"] == topic
    assert attributes_of(span)["messaging.batch.message_count"] == 5
    assert attributes_of(span)["eventrouter.attempt"] == 1


# --- OTLP export from a router process ----------------------------------------------


@dataclass(frozen=True)
class ExportedSpan:
    """A span decoded from an OTLP export request, with its resource's attributes."""

    resource: dict[str, Any]
    span: OtlpSpan

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: any_value(a.value) for a in self.span.attributes}


def any_value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    return getattr(value, field) if field is not None else None


def exported_spans(collector: Receiver) -> list[ExportedSpan]:
    """Decode every span that reached the collector's POST /v1/traces."""
    found: list[ExportedSpan] = []
    for request in collector.requests("/v1/traces"):
        assert request.method == "POST"
        assert request.header("content-type") == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(request.body)
        for resource_spans in message.resource_spans:
            resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                found.extend(ExportedSpan(resource, span) for span in scope_spans.spans)
    return found


def check_exported(spans: list[ExportedSpan], service: str) -> None:
    """Check for the SERVER span of one `POST /v2/event` and its linked file delivery span."""
    servers = [s for s in spans if s.span.kind == OtlpSpan.SPAN_KIND_SERVER]
    deliveries = [s for s in spans if s.span.name == "deliver file"]
    assert len(servers) == 1, [s.span.name for s in spans]
    assert len(deliveries) == 1, [s.span.name for s in spans]
    server, delivery = servers[0], deliveries[0]
    assert server.span.name == "POST /v2/event"
    assert server.attributes["http.response.status_code"] == 200
    assert delivery.span.kind == OtlpSpan.SPAN_KIND_INTERNAL
    assert delivery.attributes["eventrouter.sink"] == "file"
    links = [(link.trace_id, link.span_id) for link in delivery.span.links]
    assert links == [(server.span.trace_id, server.span.span_id)]
    for span in (server, delivery):
        assert span.resource["service.name"] == service
        assert span.resource["eventrouter.router"] == "test"


def otlp_router_files(tmp_path: Path, tracing: dict[str, Any]) -> list[Path]:
    documents = [
        router_doc(tracing=tracing),
        file_sink("file", tmp_path / "events.jsonl"),
        route_doc("all", ["file"]),
    ]
    return [write_documents(tmp_path / "router.yaml", documents)]


def post_one_event(router: RouterProcess, output: Path) -> None:
    reply = httpx.post(f"{router.url}/v2/event", json={"name": "purchase"}, timeout=10)
    assert reply.status_code == 200, reply.text
    router.wait_for(lambda: len(read_jsonl(output)) == 1, what="the event in the file")


@pytest.mark.parametrize("source", ["variables", "spec"])
def test_sigterm_flushes_spans(tmp_path: Path, router_factory: RouterFactory, source: str) -> None:
    output = tmp_path / "events.jsonl"
    with Receiver() as collector:
        # The batch processor would wait 10 minutes, so only the flush at
        # shutdown can send these spans.
        env = {"OTEL_BSP_SCHEDULE_DELAY": "600000"}
        if source == "variables":
            files = otlp_router_files(tmp_path, {})
            env |= {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}/v1/traces",
                "OTEL_TRACES_SAMPLER_ARG": "1",
                "OTEL_SERVICE_NAME": "game-events",
            }
            service = "game-events"
        else:
            tracing = {"exporter": "otlp", "endpoint": collector.url, "samplingRatio": 1}
            files = otlp_router_files(tmp_path, tracing)
            service = "eventrouter"
        router = router_factory(files, env=env)
        post_one_event(router, output)
        assert collector.count() == 0

        assert router.terminate() == 0
        spans = exported_spans(collector)

    check_exported(spans, service)


def test_otlp_exports_while_running(tmp_path: Path, router_factory: RouterFactory) -> None:
    output = tmp_path / "events.jsonl"
    with Receiver() as collector:
        env = {
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}/v1/traces",
            "OTEL_TRACES_SAMPLER_ARG": "1",
        }
        router = router_factory(otlp_router_files(tmp_path, {}), env=env)
        post_one_event(router, output)
        router.wait_for(lambda: len(exported_spans(collector)) == 2, what="two exported spans")
        spans = exported_spans(collector)

    check_exported(spans, "eventrouter")


@pytest.mark.parametrize(
    ("variable", "path"),
    [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "")],
)
def test_variable_overrides_spec_endpoint(
    tmp_path: Path, router_factory: RouterFactory, variable: str, path: str
) -> None:
    output = tmp_path / "events.jsonl"
    with Receiver() as collector, Receiver() as unused:
        tracing = {"exporter": "otlp", "endpoint": unused.url, "samplingRatio": 1}
        env = {"OTEL_BSP_SCHEDULE_DELAY": "50", variable: collector.url + path}
        router = router_factory(otlp_router_files(tmp_path, tracing), env=env)
        post_one_event(router, output)
        router.wait_for(lambda: len(exported_spans(collector)) == 2, what="two exported spans")
        assert unused.count() == 0

    check_exported(exported_spans(collector), "eventrouter")


def test_shutdown_bounded_when_endpoint_hangs(caplog: pytest.LogCaptureFixture) -> None:
    # A listener that never accepts: connections complete in its backlog and
    # the exporter's request waits for a reply that never comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tracing = Tracing(
            TracingSpec(exporter="otlp", endpoint=endpoint, sampling_ratio=1.0), "r", environ={}
        )
        span, _ = tracing.start_ingest(None, "POST /v2/event", {})
        assert span is not None
        span.end()

        started = time.monotonic()
        tracing.shutdown(timeout=0.5)
        waited = time.monotonic() - started

    assert waited < 2.0
    assert any(
        "not exported to" in record.getMessage() and endpoint in record.getMessage()
        for record in caplog.records
    )
