"""Prometheus metrics of one router, in a registry of its own.

Accounting: every received event is rejected, dropped at the ring buffer,
unmatched, or matched. For each sink, every matched event is delivered,
dead-lettered, dropped with a reason, or still in flight:

    sink_events_total{outcome="matched"}
        == delivered + dead_lettered + dropped + sink_in_flight
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_PREFIX = "eventrouter"


class Metrics:
    """The router's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            f"{_PREFIX}_events_received",
            "Events that reached the ingestion API, valid or not.",
            ["transport"],
            registry=r,
        )
        self.rejected = Counter(
            f"{_PREFIX}_events_rejected",
            "Events refused before the ring buffer, by reason.",
            ["reason"],
            registry=r,
        )
        self.buffer_dropped = Counter(
            f"{_PREFIX}_buffer_dropped",
            "Accepted events dropped by the ring buffer's overflow policy, by reason.",
            ["reason"],
            registry=r,
        )
        self.buffer_depth = Gauge(
            f"{_PREFIX}_buffer_depth", "Events waiting in the ring buffer.", registry=r
        )
        self.buffer_waiting = Gauge(
            f"{_PREFIX}_buffer_waiting_requests",
            "HTTP requests waiting for room in the ring buffer under the block policy.",
            registry=r,
        )
        self.buffer_capacity = Gauge(
            f"{_PREFIX}_buffer_capacity", "Slots of the ring buffer.", registry=r
        )
        self.unmatched = Counter(
            f"{_PREFIX}_events_unmatched",
            "Events that matched no route.",
            registry=r,
        )
        self.route_matches = Counter(
            f"{_PREFIX}_route_matches",
            "Events matched, by route.",
            ["route"],
            registry=r,
        )
        self.sink_events = Counter(
            f"{_PREFIX}_sink_events",
            "Events per sink by outcome: matched, delivered, dead_lettered, dropped.",
            ["sink", "outcome"],
            registry=r,
        )
        self.sink_dropped = Counter(
            f"{_PREFIX}_sink_dropped",
            "Events a sink dropped, by reason.",
            ["sink", "reason"],
            registry=r,
        )
        self.sink_retries = Counter(
            f"{_PREFIX}_sink_retries",
            "Delivery attempts after the first, counted per event.",
            ["sink"],
            registry=r,
        )
        self.sink_queue_depth = Gauge(
            f"{_PREFIX}_sink_queue_depth", "Events waiting in a sink's queue.", ["sink"], registry=r
        )
        self.sink_queue_capacity = Gauge(
            f"{_PREFIX}_sink_queue_capacity", "Slots of a sink's queue.", ["sink"], registry=r
        )
        self.sink_in_flight = Gauge(
            f"{_PREFIX}_sink_in_flight",
            "Events a sink holds and has not finished: queued, waiting for room, or being sent.",
            ["sink"],
            registry=r,
        )
        self.sink_ready = Gauge(
            f"{_PREFIX}_sink_ready",
            "1 when the sink's last attempt succeeded or none failed yet, else 0.",
            ["sink"],
            registry=r,
        )
        self.sink_latency = Histogram(
            f"{_PREFIX}_sink_delivery_seconds",
            "Time from receipt to delivery of the oldest event of each delivered batch, per sink.",
            ["sink"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.sessions_active = Gauge(
            f"{_PREFIX}_sessions_active", "Open WebSocket sessions.", registry=r
        )
        self.sessions_opened = Counter(
            f"{_PREFIX}_sessions_opened", "WebSocket sessions opened.", registry=r
        )
        self.sessions_closed = Counter(
            f"{_PREFIX}_sessions_closed",
            "WebSocket sessions closed, by the reason in their session_end event.",
            ["reason"],
            registry=r,
        )
        self.sessions_refused = Counter(
            f"{_PREFIX}_sessions_refused",
            "WebSocket connections refused or closed at once, by reason.",
            ["reason"],
            registry=r,
        )
        self.reloads = Counter(
            f"{_PREFIX}_config_reloads",
            "Configuration reloads, by result: applied, rejected, unchanged.",
            ["result"],
            registry=r,
        )
