"""Profile the router's hot path under load with py-spy and group the samples by component.

Starts `eventrouter serve` pinned to CPU 0 with one catch-all route to a
blackhole sink, or with --sink kafka to a Kafka broker that the script starts
on 127.0.0.1. wrk, pinned to CPU 1, loads the router while `py-spy record`
samples it. The script prints the share of samples spent in each component
and in the functions with the most own time.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py --workload batch [--sink kafka] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from payloads import batch_body, single_event_body  # noqa: E402

CONFIG = """\
apiVersion: eventrouter.io/v1alpha1
kind: EventRouter
metadata: {{name: profile}}
spec: {{queue: {{overflow: {overflow}}}}}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventSink
metadata: {{name: out}}
spec: {sink}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventRoute
metadata: {{name: all}}
spec: {{router: profile, sinks: [out]}}
"""

# Components, tried in order against each frame's file and function name; the
# first match names the component of a sample's innermost frame.
COMPONENTS = [
    ("metrics (prometheus_client)", re.compile(r"prometheus_client")),
    ("tracing (opentelemetry)", re.compile(r"opentelemetry|eventrouter/tracing")),
    ("Kafka client (aiokafka)", re.compile(r"aiokafka")),
    ("Kafka sink", re.compile(r"eventrouter/sinks/kafka")),
    ("sink runner", re.compile(r"eventrouter/sinks/")),
    ("decoding (msgspec, checks)", re.compile(r"EventDecoder|msgspec")),
    ("ids and envelopes", re.compile(r"IdGenerator|_envelopes|_encode_prefix")),
    ("ingestion app", re.compile(r"eventrouter/app\.py")),
    ("ring buffer, workers, routing", re.compile(r"eventrouter/(engine|routing)")),
    ("HTTP server (uvicorn, httptools)", re.compile(r"uvicorn|httptools|h11")),
    ("event loop (asyncio, uvloop)", re.compile(r"asyncio|uvloop|runners\.py")),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(admin_port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the router's admin port {admin_port} was not ready within {timeout} s")


def component(frame: str) -> str:
    for name, pattern in COMPONENTS:
        if pattern.search(frame):
            return name
    return "other"


def summarize(raw: Path, top: int) -> str:
    """Turn py-spy's collapsed stacks into markdown tables of shares."""
    by_component: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        innermost = stack.split(";")[-1]
        by_component[component(innermost)] += count
        by_function[innermost] += count
    if total == 0:
        raise RuntimeError("py-spy recorded no samples of the router")
    lines = [f"{total} samples", "", "| component | share of samples |", "|---|---:|"]
    for name, count in by_component.most_common():
        lines.append(f"| {name} | {100 * count / total:.1f}% |")
    lines += ["", "| function (own time) | share of samples |", "|---|---:|"]
    for name, count in by_function.most_common(top):
        lines.append(f"| `{name}` | {100 * count / total:.1f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["single", "batch"], default="batch")
    parser.add_argument("--sink", choices=["blackhole", "kafka"], default="blackhole")
    parser.add_argument("--seconds", type=int, default=8, help="seconds of load (default 8)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions to list (default 15)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    for tool, path in (("wrk", shutil.which("wrk")), ("py-spy", py_spy)):
        if path is None:
            print(
                f"{tool} not found: apt-get install -y wrk, .venv/bin/pip install py-spy",
                file=sys.stderr,
            )
            return 2
    assert py_spy is not None

    broker = None
    folder = Path(tempfile.mkdtemp(prefix="eventrouter-profile-"))
    router: subprocess.Popen[bytes] | None = None
    try:
        if args.sink == "kafka":
            from tests.kafka.broker import KafkaBroker

            broker = KafkaBroker()
            broker.start()
            asyncio.run(broker.create_topic("profile", 1))
            sink = f'{{kafka: {{bootstrapServers: ["{broker.bootstrap}"], topic: profile}}}}'
            overflow = "block"
        else:
            sink = "{blackhole: {}}"
            overflow = "dropNewest"
        config = folder / "router.yaml"
        config.write_text(CONFIG.format(sink=sink, overflow=overflow))
        body = folder / "body.json"
        body.write_bytes(batch_body() if args.workload == "batch" else single_event_body())
        port, admin_port = free_port(), free_port()
        router = subprocess.Popen(
            [
                "taskset", "-c", "0", sys.executable, "-m", "eventrouter", "serve",
                "-f", str(config), "--port", str(port), "--admin-port", str(admin_port),
                "--log-level", "WARNING", "--reload-interval", "0",
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_ready(admin_port)
        path = "/v2/events" if args.workload == "batch" else "/v2/event"
        raw = folder / "samples.txt"
        spy = subprocess.Popen(
            [
                py_spy, "record", "--pid", str(router.pid), "--duration",
                str(max(1, args.seconds - 2)), "--rate", str(args.rate), "--format", "raw",
                "--output", str(raw), "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wrk = subprocess.run(
            [
                "taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}",
                f"-d{args.seconds}s", "-s", str(HERE / "post.lua"),
                f"http://127.0.0.1:{port}{path}", "--", str(body),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        spy.wait(60)
        rate = re.search(r"Requests/sec:\s+([0-9.]+)", wrk)
        print(
            f"workload {args.workload}, sink {args.sink}, {args.connections} connections: "
            f"{rate.group(1) if rate else '?'} requests/s"
        )
        print(summarize(raw, args.top))
    finally:
        if router is not None and router.poll() is None:
            router.send_signal(signal.SIGTERM)
            try:
                router.wait(30)
            except subprocess.TimeoutExpired:
                router.kill()
        if broker is not None:
            broker.close()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
