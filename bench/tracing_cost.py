"""Ingestion throughput of the router with tracing off, sampling 1% and sampling 100%.

Each variant runs `eventrouter serve` with one catch-all route to a blackhole
sink and the EventRouter's `tracing` block set to:
- off: `exporter: none`;
- 1%: `exporter: otlp`, `samplingRatio: 0.01`;
- 100%: `exporter: otlp`, `samplingRatio: 1.0`.

The OTLP endpoint is a receiver that this script starts on 127.0.0.1: a small
HTTP server that responds 200 to `POST /v1/traces`, decodes each protobuf
request to count its spans, and discards them. The router's process runs with
every OTEL_* variable removed, so only the `tracing` block applies.

The variants alternate over the rounds, in a rotated order each round. In each
run, wrk (1 thread, 64 connections) posts batches of 50 and then single events,
each after a 1 s warm-up. The router is pinned to CPU 0; wrk and the receiver
(a thread of this process) run on CPU 1. After each traced run the script
checks that the receiver got spans, and stops with an error otherwise.

    .venv/bin/python bench/tracing_cost.py [--rounds 3] [--seconds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

sys.path.insert(0, str(Path(__file__).resolve().parent))

from payloads import BATCH_SIZE, batch_body, single_event_body
from router_harness import (
    HOST,
    SERVER_CPU,
    BenchmarkError,
    CpuWatch,
    exit_on_sigterm,
    load_average,
    machine_info,
    pin_to_load_cpu,
    print_machine,
    require_tools,
    run_wrk,
    running,
    start_router,
)

TARGET_COST = 0.05
RECEIVED = 'eventrouter_events_received_total{transport="http"}'
PACKAGES = (
    "uvicorn",
    "uvloop",
    "msgspec",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    exporter: str
    ratio: float


VARIANTS = (
    Variant("off", "off (exporter none)", "none", 0.0),
    Variant("1%", "OTLP, sampling 1%", "otlp", 0.01),
    Variant("100%", "OTLP, sampling 100%", "otlp", 1.0),
)

CONFIG = """\
apiVersion: eventrouter.io/v1alpha1
kind: EventRouter
metadata: {{name: bench}}
spec:
  tracing: {{exporter: {exporter}, endpoint: "{endpoint}", samplingRatio: {ratio}}}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventSink
metadata: {{name: discard}}
spec: {{blackhole: {{}}}}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventRoute
metadata: {{name: all}}
spec: {{router: bench, sinks: [discard]}}
"""


class SpanCounter:
    """Span counts by kind, shared between the receiver's threads and the script."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_kind: dict[str, int] = {}
        self.requests = 0
        self.errors: list[str] = []

    def add(self, request: ExportTraceServiceRequest) -> None:
        counts: dict[str, int] = {}
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    kind = Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower()
                    counts[kind] = counts.get(kind, 0) + 1
        with self._lock:
            self.requests += 1
            for kind, count in counts.items():
                self.by_kind[kind] = self.by_kind.get(kind, 0) + count

    def take(self) -> dict[str, int]:
        """Return the counts since the last call and reset them."""
        with self._lock:
            counts = dict(self.by_kind, export_requests=self.requests)
            self.by_kind = {}
            self.requests = 0
            return counts


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that counts spans and discards them."""

    def __init__(self) -> None:
        self.counter = SpanCounter()
        counter = self.counter

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                encoding = self.headers.get("Content-Encoding", "")
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                except (OSError, zlib.error, ValueError) as exc:
                    counter.errors.append(f"undecodable export request: {exc}")
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path != "/v1/traces":
                    counter.errors.append(f"export request to unexpected path {self.path}")
                counter.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://{HOST}:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="otlp-receiver", daemon=True
        )

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def measure_variant(
    variant: Variant, receiver: OtlpReceiver, workdir: Path, seconds: float
) -> dict[str, object]:
    """Run one router with this variant's tracing; return throughput and span counts."""
    config = workdir / f"router-{variant.exporter}-{variant.ratio}.yaml"
    config.write_text(
        CONFIG.format(exporter=variant.exporter, endpoint=receiver.endpoint, ratio=variant.ratio)
    )
    receiver.counter.take()
    figures: dict[str, object] = {}
    with running(start_router(config, workdir)) as router:
        router.wait_ready(single_event_body())
        for key, path, per_request in (
            ("batched_events", "/v2/events", BATCH_SIZE),
            ("single", "/v2/event", 1),
        ):
            body_file = workdir / f"{key}.json"
            run_wrk(router.port, path, body_file, 1)
            watch = CpuWatch(SERVER_CPU, [router.pid])
            result = run_wrk(router.port, path, body_file, seconds)
            cpu = watch.finish()
            figures[key] = result.requests_per_s * per_request
            figures[f"{key}_other_cpu0"] = round(cpu["other"], 3)
            # wrk stops with requests in flight, so the router's own count is
            # exact where wrk's is not.
            time.sleep(0.2)
            figures[f"{key}_received_events"] = router.metrics()[RECEIVED]

        batch_events = float(figures["batched_events_received_events"])  # type: ignore[arg-type]
        all_events = float(figures["single_received_events"])  # type: ignore[arg-type]
        # The single-event count includes the readiness probe's event.
        requests = round(batch_events / BATCH_SIZE + all_events - batch_events)

        # SIGTERM makes the router shut its tracer provider down, which exports
        # the spans still queued, so the counts are complete once it exits.
    time.sleep(0.2)

    spans = receiver.counter.take()
    figures["requests"] = requests
    figures["spans"] = spans
    if receiver.counter.errors:
        raise BenchmarkError(f"the OTLP receiver failed: {receiver.counter.errors[0]}")
    server_spans = spans.get("server", 0)
    if variant.exporter == "none" and any(n for k, n in spans.items() if k != "export_requests"):
        raise BenchmarkError(f"tracing was off but the receiver got spans: {spans}")
    if variant.exporter != "none" and server_spans == 0:
        raise BenchmarkError(
            f"{variant.label}: the receiver at {receiver.endpoint} got no ingest spans from "
            f"{requests} requests; check the router log:\n{router.log_tail()}"
        )
    return figures


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(runs: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    """Print the markdown tables and return the medians for --json."""
    medians = {
        key: {
            metric: statistics.median(float(run[metric]) for run in items)  # type: ignore[arg-type]
            for metric in ("single", "batched_events")
        }
        for key, items in runs.items()
    }

    print(
        "| tracing | batches of 50: events/s, median (min-max) | ratio to off "
        "| single events: requests/s, median (min-max) | ratio to off "
        "| ingest spans received per request | other load on CPU 0, max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        items = runs[variant.key]
        batched = [float(run["batched_events"]) for run in items]  # type: ignore[arg-type]
        single = [float(run["single"]) for run in items]  # type: ignore[arg-type]
        received = sum(run["spans"].get("server", 0) for run in items)  # type: ignore[attr-defined]
        sent = sum(int(run["requests"]) for run in items)  # type: ignore[call-overload]
        other = max(
            max(float(run["batched_events_other_cpu0"]), float(run["single_other_cpu0"]))  # type: ignore[arg-type]
            for run in items
        )
        batch_ratio = medians[variant.key]["batched_events"] / medians["off"]["batched_events"]
        single_ratio = medians[variant.key]["single"] / medians["off"]["single"]
        print(
            f"| {variant.label} | {median_range(batched)} | {batch_ratio:.3f} "
            f"| {median_range(single)} | {single_ratio:.3f} "
            f"| {received / sent:.4f} ({received:,} of {sent:,}) | {other:.0%} |"
        )

    cost = 1 - medians["1%"]["batched_events"] / medians["off"]["batched_events"]
    result = (
        f"met, {(TARGET_COST - cost) * 100:.1f} points under"
        if cost < TARGET_COST
        else f"missed by {(cost - TARGET_COST) * 100:.1f} points"
    )
    print()
    print("| target | required | measured | result |")
    print("|---|---:|---:|---|")
    print(
        f"| cost of 1% sampling on batched throughput | < {TARGET_COST:.0%} "
        f"| {cost:.1%} | {result} |"
    )
    return {"medians": medians, "cost_1_percent_batched": cost}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measured wrk run")
    parser.add_argument("--json", type=Path, help="also write the per-run figures to this file")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds above 0")
    return args


def main() -> int:
    args = parse_args()
    runs: dict[str, list[dict[str, object]]] = {v.key: [] for v in VARIANTS}
    try:
        require_tools("wrk", "taskset")
        exit_on_sigterm()
        pin_to_load_cpu()
        load_before = load_average()
        info = machine_info(PACKAGES)
        with tempfile.TemporaryDirectory() as folder, OtlpReceiver() as receiver:
            workdir = Path(folder)
            (workdir / "single.json").write_bytes(single_event_body())
            (workdir / "batched_events.json").write_bytes(batch_body())
            for round_number in range(args.rounds):
                shift = round_number % len(VARIANTS)
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    figures = measure_variant(variant, receiver, workdir, args.seconds)
                    runs[variant.key].append(figures)
                    print(f"round {round_number + 1} {variant.key}: {figures}", file=sys.stderr)
    except BenchmarkError as exc:
        print(f"tracing benchmark failed: {exc}", file=sys.stderr)
        return 1
    load_after = load_average()
    print_machine(info, load_before, load_after)
    print(f"{args.rounds} rounds of {args.seconds:g} s per workload and variant")
    print()
    summary = report(runs)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "load_average": [load_before, load_after],
                    "summary": summary,
                    "runs": runs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
