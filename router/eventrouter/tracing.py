"""OpenTelemetry tracing, shaped for a hot path.

The sampling decision is made once per request, before the SDK is touched: a
W3C `traceparent` from the client decides (parent-based), and otherwise a random
draw against the sampling ratio. An unsampled request costs one header lookup
and one random number; its client trace context still travels with its events.
A sampled request gets one SERVER span, whose context every event of the request
carries in its envelope. Sinks make one span per delivery attempt, linked to
the ingest spans of the sampled events in the batch, never one span per event.

Configuration: the EventRouter's `tracing` block, overridden by the standard
variables OTEL_TRACES_EXPORTER (otlp, console, none), OTEL_TRACES_SAMPLER_ARG
(the ratio) and OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from eventrouter import __version__
from eventrouter.envelope import Envelope
from eventrouter.resources import TracingSpec

__all__ = ["MAX_LINKS", "Tracing", "parse_traceparent"]

_TRACEPARENT_OF = attrgetter("traceparent")

logger = logging.getLogger(__name__)

# Links per delivery span; a batch with more sampled events links the first ones.
MAX_LINKS = 128

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(value: str | None) -> SpanContext | None:
    """Parse a W3C traceparent into a remote span context, or None if it is invalid."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    trace_id = int(match.group(1), 16)
    span_id = int(match.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match.group(3), 16))
    )


def format_traceparent(context: SpanContext) -> str:
    flags = "01" if context.trace_flags.sampled else "00"
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}"


_OTLP_DEFAULT = "http://localhost:4318/v1/traces (the exporter's default)"
# Seconds that shutdown waits for the last spans to be exported.
_SHUTDOWN_SECONDS = 3.0


def _otlp_endpoint(configured: str | None, env: Mapping[str, str]) -> str | None:
    """Return the OTLP/HTTP traces URL, where the standard variables override `configured`.

    The variables are resolved here because an explicit endpoint would win over
    the exporter's own reading of them. None leaves the exporter's default,
    http://localhost:4318/v1/traces.
    """
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or configured
    if base and not base.rstrip("/").endswith("/v1/traces"):
        return base.rstrip("/") + "/v1/traces"
    return base


class Tracing:
    """The router's tracer, or nothing at all when tracing is off."""

    def __init__(
        self,
        spec: TracingSpec,
        router: str,
        *,
        exporter: SpanExporter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        kind = env.get("OTEL_TRACES_EXPORTER", spec.exporter).split(",")[0].strip() or "none"
        ratio = spec.sampling_ratio
        if "OTEL_TRACES_SAMPLER_ARG" in env:
            try:
                ratio = min(1.0, max(0.0, float(env["OTEL_TRACES_SAMPLER_ARG"])))
            except ValueError:
                logger.warning(
                    "ignoring OTEL_TRACES_SAMPLER_ARG=%r: not a number between 0 and 1",
                    env["OTEL_TRACES_SAMPLER_ARG"],
                )
        self.ratio = ratio
        self.provider: TracerProvider | None = None
        self.destination = "none"
        self.tracer: trace.Tracer | None = None
        if exporter is None and kind == "none":
            return
        resource = Resource.create(
            {
                "service.name": env.get("OTEL_SERVICE_NAME", "eventrouter"),
                "service.version": __version__,
                "eventrouter.router": router,
            }
        )
        # Sampling is decided in `start_ingest`; spans that reach the SDK are kept.
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        self.destination = "console" if kind == "console" else "custom exporter"
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif kind == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif kind == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = _otlp_endpoint(spec.endpoint, env)
            self.destination = endpoint or _OTLP_DEFAULT
            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
            )
        else:
            logger.warning("unknown trace exporter %r; tracing is off", kind)
            self.provider = None
            return
        self.tracer = self.provider.get_tracer("eventrouter", __version__)
        logger.info(
            "tracing on: exporter %s to %s, sampling ratio %g",
            kind if exporter is None else "custom",
            self.destination,
            ratio,
        )

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def start_ingest(
        self, traceparent: str | None, name: str, attributes: dict[str, Any]
    ) -> tuple[trace.Span | None, str | None]:
        """Decide sampling for one request; return its span (if sampled) and the
        traceparent its events carry."""
        parent = parse_traceparent(traceparent)
        if self.tracer is None:
            return None, format_traceparent(parent) if parent else None
        if parent is not None:
            sampled = parent.trace_flags.sampled
        else:
            sampled = self.ratio >= 1.0 or (self.ratio > 0.0 and random.random() < self.ratio)
        if not sampled:
            return None, format_traceparent(parent) if parent else None
        context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
        span = self.tracer.start_span(
            name, context=context, kind=SpanKind.SERVER, attributes=attributes
        )
        return span, format_traceparent(span.get_span_context())

    def sampled_links(self, events: Sequence[Envelope]) -> list[Link]:
        """Links to the distinct sampled traces that the events carry, at most MAX_LINKS.

        The scans run in C (map with attrgetter; `any` first, because most
        batches carry no traceparent at all).
        """
        if self.tracer is None or not any(map(_TRACEPARENT_OF, events)):
            return []
        links: list[Link] = []
        for value in dict.fromkeys(map(_TRACEPARENT_OF, events)):
            if value is None or not value.endswith("-01"):
                continue
            context = parse_traceparent(value)
            if context is not None:
                links.append(Link(context))
                if len(links) >= MAX_LINKS:
                    break
        return links

    def start_delivery(
        self, name: str, kind: SpanKind, links: list[Link], attributes: dict[str, Any]
    ) -> trace.Span | None:
        """Start the span of one delivery attempt, linked to sampled events; None without links."""
        if self.tracer is None or not links:
            return None
        return self.tracer.start_span(
            name,
            context=trace.set_span_in_context(trace.INVALID_SPAN),
            kind=kind,
            links=links,
            attributes=attributes,
        )

    def shutdown(self, timeout: float = _SHUTDOWN_SECONDS) -> None:
        """Export the spans still queued, waiting at most `timeout` seconds.

        The SDK's exporter retries an unreachable endpoint for longer than a
        pod's termination grace period, so the wait runs in a daemon thread
        and the process does not wait for it past `timeout`.
        """
        provider = self.provider
        if provider is None:
            return
        worker = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            logger.warning(
                "tracing: spans still queued were not exported to %s within %.0f s of shutdown",
                self.destination,
                timeout,
            )
