"""Ingestion throughput of the router against the bare-server floor, in one run.

Runs, alternating, for a few rounds:
- the floor: uvicorn with httptools and uvloop serving a raw ASGI app that
  parses the JSON body with orjson and discards it (bench/stacks/floor_asgi.py);
- the router: `eventrouter serve` with one catch-all route to a blackhole sink.

Each server is pinned to CPU 0 and wrk to CPU 1. Each figure is the median over
the rounds, and the router's figure is also given as a ratio to the floor's.

    .venv/bin/python bench/ingest.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from payloads import BATCH_SIZE, batch_body, single_event_body  # noqa: E402

PYTHON = sys.executable
CONFIG = """\
apiVersion: eventrouter.io/v1alpha1
kind: EventRouter
metadata: {name: bench}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventSink
metadata: {name: discard}
spec: {blackhole: {}}
---
apiVersion: eventrouter.io/v1alpha1
kind: EventRoute
metadata: {name: all}
spec: {router: bench, sinks: [discard]}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=single_event_body(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not respond to {path} within {timeout}s")


def start_floor(port: int) -> subprocess.Popen[bytes]:
    command = [
        "taskset",
        "-c",
        "0",
        PYTHON,
        "-m",
        "uvicorn",
        "floor_asgi:app",
        "--app-dir",
        str(HERE / "stacks"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_router(port: int, config: Path) -> subprocess.Popen[bytes]:
    command = [
        "taskset",
        "-c",
        "0",
        PYTHON,
        "-m",
        "eventrouter",
        "serve",
        "-f",
        str(config),
        "--port",
        str(port),
        "--admin-port",
        str(free_port()),
        "--log-level",
        "WARNING",
        "--reload-interval",
        "0",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_wrk(port: int, path: str, body: Path, seconds: int, script: Path) -> float:
    """Requests per second that wrk measured."""
    output = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            "-c64",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{path}",
            "--",
            str(body),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "Non-2xx" in output:
        raise RuntimeError(f"wrk saw error responses:\n{output}")
    match = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    if match is None:
        raise RuntimeError(f"cannot read wrk output:\n{output}")
    return float(match.group(1))


def measure(kind: str, body_dir: Path, seconds: int, config: Path) -> dict[str, float]:
    port = free_port()
    process = start_floor(port) if kind == "floor" else start_router(port, config)
    try:
        wait_ready(port, "/v2/event")
        script = HERE / "post.lua"
        single = run_wrk(port, "/v2/event", body_dir / "single.json", seconds, script)
        batches = run_wrk(port, "/v2/events", body_dir / "batch.json", seconds, script)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"single": single, "batched_events": batches * BATCH_SIZE}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y wrk util-linux", file=sys.stderr)
            return 2

    results: dict[str, list[dict[str, float]]] = {"floor": [], "router": []}
    with tempfile.TemporaryDirectory() as folder:
        body_dir = Path(folder)
        (body_dir / "single.json").write_bytes(single_event_body())
        (body_dir / "batch.json").write_bytes(batch_body())
        config = body_dir / "router.yaml"
        config.write_text(CONFIG)
        for round_number in range(args.rounds):
            for kind in ("floor", "router") if round_number % 2 == 0 else ("router", "floor"):
                figures = measure(kind, body_dir, args.seconds, config)
                results[kind].append(figures)
                print(f"round {round_number + 1} {kind}: {figures}", file=sys.stderr)

    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d')}; {args.rounds} rounds of {args.seconds}s each")
    print("| workload | floor | router | router / floor |")
    print("|---|---|---|---|")
    for key, label in (
        ("single", "single events, requests/s"),
        ("batched_events", "batches of 50, events/s"),
    ):
        floor = statistics.median(r[key] for r in results["floor"])
        router = statistics.median(r[key] for r in results["router"])
        print(f"| {label} | {floor:,.0f} | {router:,.0f} | {router / floor:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
