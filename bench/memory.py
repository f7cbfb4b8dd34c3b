"""Resident memory per queued event in the router, and the RSS of a full 65,536-slot buffer.

The router runs with a ring buffer of 65,536 slots, overflow policy `reject`,
and one catch-all route to a `file` sink whose path is a FIFO that nothing
reads. The sink's writer waits for a reader that never comes, so its first
batch stays in flight and every later event stays queued. Events fill the
sink's queue first, then the workers waiting for room there (up to 8 x 256
events), then the ring buffer. Once the buffer is full, requests get 503. With the
default `dropNewest` the workers would drop events at the full sink queue
instead, and the ring buffer would stay empty.

The script posts distinct events of about 200 bytes with 5 properties
(`make_event` in bench/payloads.py) in batches of 500 until the router
returns 503. Every `--step` events it waits until the router has moved what it
accepted, then reads the router's RSS with psutil and the held events from
`/metrics`: `eventrouter_buffer_depth` (ring buffer) plus
`eventrouter_sink_in_flight` (sink queue, waiting workers and the blocked
batch). The cost per event is the least-squares slope of RSS over held
events, taken over the points where the ring buffer contains events. The sink
side's fixed costs, such as the blocked batch encoded as JSON lines, so stay
out of it. The script talks to the router only over HTTP and reads its memory from
outside, so it measures any in-memory representation of events.

The router is pinned to CPU 0 and this script to CPU 1. Each round starts a
fresh router.

    .venv/bin/python bench/memory.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from payloads import encode, make_event
from router_harness import (
    HOST,
    BenchmarkError,
    ServerProcess,
    exit_on_sigterm,
    load_average,
    machine_info,
    pin_to_load_cpu,
    print_machine,
    require_tools,
    running,
    start_router,
)

BUFFER_SLOTS = 65_536
WORKERS = 8
BATCH_EVENTS = 500  # the default spec.limits.maxBatchEvents
TARGET_BYTES_PER_EVENT = 400
TARGET_FULL_BUFFER_MIB = 64
MIB = 1 << 20
DROP_COUNTERS = ("eventrouter_buffer_dropped_total", "eventrouter_sink_dropped_total")
PACKAGES = ("msgspec", "uvicorn", "uvloop", "psutil")

CONFIG = """\
apiVersion: eventrouter.io/v1alpha1
kind: EventRouter
metadata: {{name: bench}}
spec:
  queue: {{size: {slots}, workers: {workers}, overflow: reject}}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventSink
metadata: {{name: stalled}}
spec:
  file: {{path: "{fifo}"}}
  queueSize: {sink_queue}
  batchSize: {sink_batch}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventRoute
metadata: {{name: all}}
spec: {{router: bench, sinks: [stalled]}}
"""


@dataclass(frozen=True)
class Point:
    """One reading: events the router acknowledged and holds, and its RSS."""

    accepted: int
    in_buffer: int
    in_sink: int
    rss: int

    @property
    def held(self) -> int:
        return self.in_buffer + self.in_sink


def read_point(router: ServerProcess, accepted: int, timeout: float = 30.0) -> Point:
    """Wait until the gauges count every accepted event as held, then read RSS and the gauges.

    The RSS is the median of five readings 50 ms apart, taken after the held
    count has stopped changing.
    """
    deadline = time.monotonic() + timeout
    while True:
        metrics = router.metrics()
        in_buffer = int(metrics["eventrouter_buffer_depth"])
        in_sink = int(metrics['eventrouter_sink_in_flight{sink="stalled"}'])
        dropped = sum(
            value
            for key, value in metrics.items()
            if key.startswith(
                ("eventrouter_buffer_dropped_total", "eventrouter_sink_dropped_total")
            )
        )
        if dropped:
            raise BenchmarkError(f"the router dropped {dropped:.0f} events; none may be dropped")
        if in_buffer + in_sink == accepted:
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"timed out after {timeout:g}s: the gauges count {in_buffer + in_sink} held "
                f"events (buffer {in_buffer}, sink {in_sink}), expected {accepted}"
            )
        time.sleep(0.05)
    time.sleep(0.2)
    readings = []
    for _ in range(5):
        readings.append(router.rss())
        time.sleep(0.05)
    return Point(accepted, in_buffer, in_sink, int(statistics.median(readings)))


def post_batch(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/v2/events", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def fill(router: ServerProcess, step: int, first_index: int) -> tuple[list[Point], int]:
    """Post batches until the router returns 503; return the readings and events sent."""
    points = [read_point(router, 1)]  # the readiness probe's event is held too
    accepted = 1
    index = first_index
    next_reading = step
    connection = http.client.HTTPConnection(HOST, router.port, timeout=30)
    try:
        while True:
            body = encode({"events": [make_event(i) for i in range(index, index + BATCH_EVENTS)]})
            status, reply = post_batch(connection, body)
            if status == 503:
                break
            if status != 200:
                raise BenchmarkError(f"POST /v2/events returned {status}: {reply[:300]!r}")
            figures = json.loads(reply)
            if figures.get("accepted") != BATCH_EVENTS or figures.get("dropped"):
                raise BenchmarkError(f"the router did not take the whole batch: {figures}")
            accepted += BATCH_EVENTS
            index += BATCH_EVENTS
            if accepted >= next_reading:
                points.append(read_point(router, accepted))
                next_reading += step
            if accepted > 4 * BUFFER_SLOTS:
                raise BenchmarkError(
                    f"the router took {accepted} events without returning 503; "
                    "is the sink really stalled?"
                )
    finally:
        connection.close()
    points.append(read_point(router, accepted))
    return points, index - first_index


def slope(points: list[Point]) -> float:
    """Return the least-squares slope of RSS over held events, in bytes per event."""
    xs = [p.held for p in points]
    ys = [p.rss for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return numerator / denominator


def measure_round(workdir: Path, args: argparse.Namespace, round_number: int) -> dict[str, object]:
    fifo = workdir / f"stalled-{round_number}.fifo"
    os.mkfifo(fifo)
    config = workdir / f"router-{round_number}.yaml"
    config.write_text(
        CONFIG.format(
            slots=BUFFER_SLOTS,
            workers=WORKERS,
            fifo=fifo,
            sink_queue=args.sink_queue,
            sink_batch=args.sink_batch,
        )
    )

    # A short grace period: at shutdown the blocked write is stopped and the
    # events still held are dropped, which is expected here.
    probe = encode(make_event(0))
    with running(start_router(config, workdir, grace_period=1)) as router:
        router.wait_ready(probe)
        time.sleep(1.0)
        idle = read_point(router, 1)
        points, sent = fill(router, args.step, 1)
    buffer_points = [p for p in points if p.in_buffer > 0]
    if len(buffer_points) < 3:
        raise BenchmarkError("fewer than 3 readings with events in the ring buffer; lower --step")
    full = points[-1]
    per_event = slope(buffer_points)

    return {
        "idle_rss": idle.rss,
        "full": asdict(full),
        "bytes_per_event_slope": per_event,
        "bytes_per_event_overall": (full.rss - idle.rss) / (full.held - idle.held),
        "events_sent": sent,
        "points": [asdict(p) for p in points],
    }


def report(rounds: list[dict[str, object]], event_bytes: float) -> dict[str, object]:
    slopes = [float(r["bytes_per_event_slope"]) for r in rounds]  # type: ignore[arg-type]
    overall = [float(r["bytes_per_event_overall"]) for r in rounds]  # type: ignore[arg-type]
    idle = [int(r["idle_rss"]) for r in rounds]  # type: ignore[call-overload]
    full_rss = [int(r["full"]["rss"]) for r in rounds]  # type: ignore[index]
    in_buffer = [int(r["full"]["in_buffer"]) for r in rounds]  # type: ignore[index]
    in_sink = [int(r["full"]["in_sink"]) for r in rounds]  # type: ignore[index]
    per_event = statistics.median(slopes)
    buffer_mib = per_event * BUFFER_SLOTS / MIB

    print(
        "| round | idle RSS (MiB) | RSS when full (MiB) | held: ring buffer + sink side "
        "| bytes per held event, slope over ring-buffer fill | bytes per held event, "
        "(full - idle) / held |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for number, r in enumerate(rounds, 1):
        full = r["full"]
        assert isinstance(full, dict)
        print(
            f"| {number} | {int(r['idle_rss']) / MIB:.1f} | {full['rss'] / MIB:.1f} "  # type: ignore[call-overload]
            f"| {full['in_buffer']:,} + {full['in_sink']:,} "
            f"| {float(r['bytes_per_event_slope']):,.0f} "  # type: ignore[arg-type]
            f"| {float(r['bytes_per_event_overall']):,.0f} |"  # type: ignore[arg-type]
        )

    print()
    print(f"events: {event_bytes:.0f} bytes of JSON on average, 5 properties each")
    print()
    print("| target | required | measured (median of rounds) | result |")
    print("|---|---:|---:|---|")
    print(
        f"| memory per queued event | <= {TARGET_BYTES_PER_EVENT} B | {per_event:,.0f} B "
        f"| {verdict(per_event, TARGET_BYTES_PER_EVENT, 'B')} |"
    )
    print(
        f"| events of a full {BUFFER_SLOTS:,}-slot buffer ({BUFFER_SLOTS:,} x bytes per event) "
        f"| < {TARGET_FULL_BUFFER_MIB} MiB | {buffer_mib:.1f} MiB "
        f"| {verdict(buffer_mib, TARGET_FULL_BUFFER_MIB, 'MiB')} |"
    )
    full_median = statistics.median(full_rss) / MIB
    print(
        f"| router RSS with a full buffer ({statistics.median(in_buffer):,.0f} in the buffer, "
        f"{statistics.median(in_sink):,.0f} on the sink side) | < {TARGET_FULL_BUFFER_MIB} MiB "
        f"| {full_median:.1f} MiB | {verdict(full_median, TARGET_FULL_BUFFER_MIB, 'MiB')} |"
    )
    return {
        "bytes_per_event_slope_median": per_event,
        "bytes_per_event_overall_median": statistics.median(overall),
        "full_buffer_events_mib": buffer_mib,
        "idle_rss_median": statistics.median(idle),
        "full_rss_median": statistics.median(full_rss),
    }


def verdict(measured: float, limit: float, unit: str) -> str:
    if measured <= limit:
        return f"met, {limit - measured:,.1f} {unit} under"
    return f"missed by {measured - limit:,.1f} {unit} ({measured / limit:.2f}x the target)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="routers started, one per round")
    parser.add_argument(
        "--step", type=int, default=8000, help="events posted between two RSS readings"
    )
    parser.add_argument(
        "--sink-queue", type=int, default=1024, help="spec.queueSize of the stalled sink"
    )
    parser.add_argument(
        "--sink-batch", type=int, default=1024, help="spec.batchSize of the stalled sink"
    )
    parser.add_argument("--json", type=Path, help="also write every reading to this file")
    args = parser.parse_args()
    if args.rounds < 1 or args.step < BATCH_EVENTS:
        parser.error(f"--rounds must be at least 1 and --step at least {BATCH_EVENTS}")
    return args


def main() -> int:
    args = parse_args()
    rounds = []
    try:
        require_tools("taskset")
        exit_on_sigterm()
        pin_to_load_cpu()
        load_before = load_average()
        info = machine_info(PACKAGES)
        with tempfile.TemporaryDirectory() as folder:
            for number in range(args.rounds):
                result = measure_round(Path(folder), args, number)
                rounds.append(result)
                print(
                    f"round {number + 1}: {result['bytes_per_event_slope']:,.0f} bytes per event, "
                    f"full {result['full']}",
                    file=sys.stderr,
                )
    except BenchmarkError as exc:
        print(f"memory benchmark failed: {exc}", file=sys.stderr)
        return 1
    load_after = load_average()
    print_machine(info, load_before, load_after)
    print(
        f"{args.rounds} rounds; ring buffer {BUFFER_SLOTS:,} slots, {WORKERS} workers, overflow "
        f"reject; sink queueSize {args.sink_queue}, batchSize {args.sink_batch}"
    )
    print()
    event_bytes = statistics.fmean(len(encode(make_event(i))) for i in range(10_000))
    summary = report(rounds, event_bytes)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "load_average": [load_before, load_after],
                    "summary": summary,
                    "rounds": rounds,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
