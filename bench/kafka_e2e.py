"""End-to-end throughput into a real Kafka broker: raw aiokafka, a naive peer, Camel and the router.

Starts one Kafka broker in KRaft mode with `KafkaBroker` from
tests/kafka/broker.py, then alternates, for a few rounds, between:
- raw: one Python process producing events with AIOKafkaProducer as fast as it
  can and awaiting every acknowledgement, one `send` call per event
  (bench/peers/raw_aiokafka.py);
- raw-batch: the same process filling record batches with `create_batch` and
  queueing each with `send_batch`, the API the router's Kafka sink uses;
- naive: uvicorn with httptools and uvloop serving a raw ASGI app that awaits
  `send_and_wait` for each event before it responds (bench/peers/naive_asgi.py);
- camel: an Apache Camel 4.22 route on the JVM, from platform-http (Vert.x) to
  camel-kafka, that splits the batch, sends the events one after the other and
  responds once Kafka has acknowledged every event (bench/peers/camel, built by
  scripts/build-camel-peer.sh);
- camel-parallel: the same route with the splitter's parallelProcessing on, so
  it sends a request's events concurrently and still responds once Kafka has
  acknowledged every event;
- router: `eventrouter serve` with one catch-all route to a Kafka sink and the
  `block` overflow policy.

Every producer uses acks all, idempotence and a linger of 5 ms, and each of the
six writes to its own topic with one partition. The servers and the raw
producer are pinned to CPU 0 and wrk to CPU 1. The broker JVM is not pinned, so
it shares both CPUs with them. wrk posts batches of 50 events of about
200 bytes (bench/payloads.py). For the router and Camel the script also
reads the topic's end offset before and after each wrk run, so only records
that reached the topic count as delivered. The router responds once an event
is queued, and Camel once Kafka has acknowledged it. Camel's JVM gets
CAMEL_WARMUP_SECONDS of discarded wrk load before each measured run, so the JIT
compiler has compiled the hot path. Figures are medians over the rounds.

    .venv/bin/python bench/kafka_e2e.py [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from tests.kafka.broker import KafkaBroker  # noqa: E402

from payloads import BATCH_SIZE, batch_body  # noqa: E402
from peers import camel_peer  # noqa: E402

PYTHON = sys.executable
KAFKA_VERSION = "4.4.0"
TOPICS = {
    "raw": "bench-raw",
    "raw-batch": "bench-raw-batch",
    "naive": "bench-naive",
    "camel": "bench-camel",
    "camel-parallel": "bench-camel-parallel",
    "router": "bench-router",
}
# Seconds without a new record on a topic after which the server's queue and
# open requests count as drained.
DRAIN_QUIET = 1.5
DRAIN_TIMEOUT = 30.0
# Seconds for the Camel peer's JVM to start and serve its first 200.
CAMEL_START_TIMEOUT = 60.0
# Seconds of wrk load on the Camel peer before each measured run, discarded.
# On the 2-CPU machine of docs/benchmarks.md, successive 5 s wrk runs on a fresh
# peer rose from about half the final rate to within 10% of it after 20 s.
CAMEL_WARMUP_SECONDS = 20

# `overflow: block` makes the router hold requests while its buffer is full
# instead of dropping events (the default, dropNewest) or responding 503
# (reject), so wrk's unlimited load measures the rate the router sustains.
ROUTER_CONFIG = """\
apiVersion: eventrouter.io/v1alpha1
kind: EventRouter
metadata: {{name: bench}}
spec: {{queue: {{overflow: block}}}}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventSink
metadata: {{name: kafka}}
spec:
  kafka:
    bootstrapServers: ["{bootstrap}"]
    topic: {topic}
    acks: all
---
apiVersion: eventrouter.io/v1alpha1
kind: EventRoute
metadata: {{name: all}}
spec: {{router: bench, sinks: [kafka]}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_batch(port: int, body: bytes, timeout: float = 20.0) -> None:
    """POST one batch until the server responds 200, or raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/events",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last_error = exc
        time.sleep(0.2)
    raise RuntimeError(
        f"server on 127.0.0.1:{port} did not respond 200 to POST /v2/events "
        f"within {timeout:.0f} s: {last_error}"
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_naive(port: int, bootstrap: str) -> subprocess.Popen[bytes]:
    command = [
        "taskset", "-c", "0", PYTHON, "-m", "uvicorn", "naive_asgi:app",
        "--app-dir", str(HERE / "peers"),
        "--host", "127.0.0.1", "--port", str(port),
        "--http", "httptools", "--loop", "uvloop",
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    environment = {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "KAFKA_TOPIC": TOPICS["naive"]}
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL)


def start_router(port: int, config: Path) -> subprocess.Popen[bytes]:
    command = [
        "taskset", "-c", "0", PYTHON, "-m", "eventrouter", "serve",
        "-f", str(config),
        "--port", str(port), "--admin-port", str(free_port()),
        "--log-level", "WARNING", "--reload-interval", "0", "--grace-period", "5",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def run_wrk(port: int, body: Path, seconds: int) -> dict[str, float]:
    """Run wrk against POST /v2/events; return its requests/s and its 200 responses/s."""
    output = subprocess.run(
        [
            "taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(HERE / "post.lua"), f"http://127.0.0.1:{port}/v2/events", "--", str(body),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    total = re.search(r"(\d+) requests in ([0-9.]+)(m?s)", output)
    if rate is None or total is None:
        raise RuntimeError(f"cannot read the wrk output:\n{output}")
    requests = int(total.group(1))
    duration = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    failures = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx is not None:
        failures += int(non_2xx.group(1))
    timeouts = re.search(r"Socket errors:.*timeout (\d+)", output)
    if timeouts is not None:
        failures += int(timeouts.group(1))
    return {
        "requests_per_s": float(rate.group(1)),
        "ok_per_s": max(0, requests - failures) / duration,
        "failed_requests": float(failures),
    }


class EndOffsets:
    """Reads the end offset of one-partition topics, in an event loop of its own."""

    def __init__(self, bootstrap: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._consumer = self._loop.run_until_complete(self._start(bootstrap))

    @staticmethod
    async def _start(bootstrap: str) -> AIOKafkaConsumer:
        # aiokafka binds a client to the event loop running when it is created.
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        return consumer

    def read(self, topic: str) -> int:
        partition = TopicPartition(topic, 0)
        offsets = self._loop.run_until_complete(self._consumer.end_offsets([partition]))
        return int(offsets[partition])

    def close(self) -> None:
        self._loop.run_until_complete(self._consumer.stop())
        self._loop.close()


def wait_until_quiet(offsets: EndOffsets, topic: str) -> tuple[int, float]:
    """Wait until the topic's end offset stops growing; return it and the seconds waited."""
    start = time.monotonic()
    last = offsets.read(topic)
    last_change = start
    while time.monotonic() - last_change < DRAIN_QUIET:
        if time.monotonic() - start > DRAIN_TIMEOUT:
            raise RuntimeError(f"topic {topic} still grew {DRAIN_TIMEOUT:.0f} s after the load")
        time.sleep(0.25)
        current = offsets.read(topic)
        if current != last:
            last, last_change = current, time.monotonic()
    return last, last_change - start


def measure_raw(bootstrap: str, seconds: int, api: str = "send") -> dict[str, float]:
    topic = TOPICS["raw" if api == "send" else "raw-batch"]
    command = [
        "taskset", "-c", "0", PYTHON, str(HERE / "peers" / "raw_aiokafka.py"),
        "--bootstrap", bootstrap, "--topic", topic, "--seconds", str(seconds), "--api", api,
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output)
    return result


def measure_naive(bootstrap: str, body: Path, seconds: int) -> dict[str, float]:
    port = free_port()
    process = start_naive(port, bootstrap)
    try:
        post_batch(port, body.read_bytes())
        wrk = run_wrk(port, body, seconds)
    finally:
        stop_process(process)
    return {
        "events_per_s": wrk["ok_per_s"] * BATCH_SIZE,
        "failed_requests": wrk["failed_requests"],
    }


def measure_camel(
    offsets: EndOffsets,
    bootstrap: str,
    libs_dir: Path,
    body: Path,
    seconds: int,
    parallel: bool = False,
) -> dict[str, float]:
    """Measure the Camel peer with wrk and with the topic's end offsets.

    `parallel` starts the peer with the splitter's parallel processing and
    measures the camel-parallel topic. The warm-up and the rule below are the
    same in both modes.

    The peer responds 200 only after Kafka acknowledged the request's records,
    so the topic should gain at least 50 records per 200 response. It can gain
    up to 3,200 more (50 for each of wrk's 64 connections) from the requests
    still open when wrk stops.
    `events_per_s` is the smaller of the two figures.
    """
    kind = "camel-parallel" if parallel else "camel"
    topic = TOPICS[kind]
    port = free_port()
    process = camel_peer.start(libs_dir, port, bootstrap, topic, parallel=parallel)
    try:
        try:
            post_batch(port, body.read_bytes(), timeout=CAMEL_START_TIMEOUT)
        except RuntimeError as exc:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the Camel peer ({kind}) exited with code {process.returncode} before it "
                    "responded 200; its log is above"
                ) from exc
            raise
        run_wrk(port, body, CAMEL_WARMUP_SECONDS)
        # Wait until the requests still open when the warm-up's wrk stopped have completed.
        wait_until_quiet(offsets, topic)

        before = offsets.read(topic)
        start = time.monotonic()
        wrk = run_wrk(port, body, seconds)
        elapsed = time.monotonic() - start
        at_end = offsets.read(topic)
        drained, drain_seconds = wait_until_quiet(offsets, topic)
    finally:
        stop_process(process)
    acknowledged = wrk["ok_per_s"] * BATCH_SIZE
    delivered = (at_end - before) / elapsed
    return {
        "events_per_s": min(acknowledged, delivered),
        "wrk_events_per_s": acknowledged,
        "delivered_per_s": delivered,
        "delivered_after_drain": float(drained - before),
        "drain_seconds": drain_seconds,
        "failed_requests": wrk["failed_requests"],
    }


def measure_router(offsets: EndOffsets, config: Path, body: Path, seconds: int) -> dict[str, float]:
    topic = TOPICS["router"]
    port = free_port()
    process = start_router(port, config)
    try:
        # The sink creates its producer on the first delivery, so wait until
        # this batch is on the topic before measuring.
        before_warmup = offsets.read(topic)
        post_batch(port, body.read_bytes())
        wait_until_quiet(offsets, topic)
        if offsets.read(topic) < before_warmup + BATCH_SIZE:
            raise RuntimeError(f"the router's warm-up batch did not reach topic {topic}")

        before = offsets.read(topic)
        start = time.monotonic()
        wrk = run_wrk(port, body, seconds)
        elapsed = time.monotonic() - start
        at_end = offsets.read(topic)
        drained, drain_seconds = wait_until_quiet(offsets, topic)
    finally:
        stop_process(process)
    accepted = wrk["ok_per_s"] * BATCH_SIZE
    return {
        "wrk_events_per_s": accepted,
        "delivered_per_s": (at_end - before) / elapsed,
        "delivered_after_drain": float(drained - before),
        "accepted_estimate": accepted * elapsed,
        "drain_seconds": drain_seconds,
        "failed_requests": wrk["failed_requests"],
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def run_rounds(
    broker: KafkaBroker, camel_libs: Path, rounds: int, seconds: int
) -> dict[str, list[dict[str, float]]]:
    order = ["raw", "raw-batch", "naive", "camel", "camel-parallel", "router"]
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in order}
    offsets = EndOffsets(broker.bootstrap)
    try:
        with tempfile.TemporaryDirectory() as folder:
            body = Path(folder) / "batch.json"
            body.write_bytes(batch_body())
            config = Path(folder) / "router.yaml"
            config.write_text(
                ROUTER_CONFIG.format(bootstrap=broker.bootstrap, topic=TOPICS["router"])
            )
            for round_number in range(rounds):
                # Rotate the order, so no candidate always runs first.
                shift = round_number % len(order)
                for kind in order[shift:] + order[:shift]:
                    if kind == "raw":
                        figures = measure_raw(broker.bootstrap, seconds)
                    elif kind == "raw-batch":
                        figures = measure_raw(broker.bootstrap, seconds, api="batch")
                    elif kind == "naive":
                        figures = measure_naive(broker.bootstrap, body, seconds)
                    elif kind == "camel":
                        figures = measure_camel(
                            offsets, broker.bootstrap, camel_libs, body, seconds
                        )
                    elif kind == "camel-parallel":
                        figures = measure_camel(
                            offsets, broker.bootstrap, camel_libs, body, seconds, parallel=True
                        )
                    else:
                        figures = measure_router(offsets, config, body, seconds)
                    results[kind].append(figures)
                    print(f"round {round_number + 1} {kind}: {figures}", file=sys.stderr)
    finally:
        offsets.close()
    return results


def report(results: dict[str, list[dict[str, float]]]) -> None:
    raw = statistics.median(r["events_per_s"] for r in results["raw"])
    raw_batch = statistics.median(r["events_per_s"] for r in results["raw-batch"])
    naive = statistics.median(r["events_per_s"] for r in results["naive"])
    camel = statistics.median(r["events_per_s"] for r in results["camel"])
    camel_parallel = statistics.median(r["events_per_s"] for r in results["camel-parallel"])
    router_wrk = statistics.median(r["wrk_events_per_s"] for r in results["router"])
    router = statistics.median(r["delivered_per_s"] for r in results["router"])
    print("| candidate | events/s, median (min-max) |")
    print("|---|---:|")
    rows = (
        ("raw aiokafka producer", [r["events_per_s"] for r in results["raw"]]),
        (
            "raw aiokafka producer, batch API (create_batch, send_batch)",
            [r["events_per_s"] for r in results["raw-batch"]],
        ),
        (
            "naive peer (uvicorn, send_and_wait per event)",
            [r["events_per_s"] for r in results["naive"]],
        ),
        (
            "Camel (platform-http to camel-kafka, split per event)",
            [r["events_per_s"] for r in results["camel"]],
        ),
        (
            "Camel, parallel splitter (parallelProcessing on)",
            [r["events_per_s"] for r in results["camel-parallel"]],
        ),
        ("router, 200 responses (wrk)", [r["wrk_events_per_s"] for r in results["router"]]),
        ("router, records on the topic", [r["delivered_per_s"] for r in results["router"]]),
    )
    for label, values in rows:
        print(
            f"| {label} | {statistics.median(values):,.0f} "
            f"({min(values):,.0f}-{max(values):,.0f}) |"
        )
    print()
    print(f"router (delivered) / raw aiokafka: {router / raw:.2f}")
    print(f"router (delivered) / raw aiokafka, batch API: {router / raw_batch:.2f}")
    print(f"router (delivered) / naive peer: {router / naive:.2f}")
    print(f"router (delivered) / Camel: {router / camel:.2f}")
    print(f"router (delivered) / Camel parallel: {router / camel_parallel:.2f}")
    print(f"router (wrk) / raw aiokafka: {router_wrk / raw:.2f}")
    print(f"router (wrk) / naive peer: {router_wrk / naive:.2f}")
    print(f"router (wrk) / Camel: {router_wrk / camel:.2f}")
    print(f"router (wrk) / Camel parallel: {router_wrk / camel_parallel:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--seconds", type=int, default=8, help="seconds per measured run (default 8)"
    )
    parser.add_argument("--json", type=Path, help="also write the per-round figures to this file")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y wrk util-linux", file=sys.stderr)
            return 2

    # Build before the broker starts, so a failed Maven build costs no broker start-up.
    camel_libs = camel_peer.build()

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load_average()
    broker = KafkaBroker()
    try:
        broker.start()
        for topic in TOPICS.values():
            asyncio.run(broker.create_topic(topic, 1))
        results = run_rounds(broker, camel_libs, args.rounds, args.seconds)
    finally:
        broker.close()
    load_after = load_average()

    print(
        f"machine: nproc {os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}, "
        f"Kafka {KAFKA_VERSION}"
    )
    print(
        f"started {started}; 1-minute load average {load_before} before, {load_after} after; "
        f"{args.rounds} rounds of {args.seconds} s"
    )
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
