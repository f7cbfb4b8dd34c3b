"""Measure how many idle WebSocket sessions one router process holds, and their memory.

For each session count N and each compression mode, the script starts a fresh
`eventrouter serve` (one blackhole sink, no auth on loopback, maxSessions
above N, a 1 h idle timeout) and, as the baseline, a bare `websockets` echo
server. A client in a separate process opens N idle sessions to each server.
The report gives the server's resident set size (RSS, from psutil) before and
after the sessions open, and the bytes per session. It also gives the ratio of
the router's bytes per session to the echo server's, the time to open the
sessions, and the router's CPU use while they sit idle.

Compression modes: `none` makes the client offer no extension; `deflate`
makes it offer permessage-deflate, as browsers do, which both servers accept.

The server runs on CPU 0 and the client on CPU 1 when the machine has two or
more CPUs. The script raises its soft limit on open files to the hard limit,
and the servers and clients inherit it; a count that does not fit under the
hard limit is skipped with a message. Everything listens on 127.0.0.1.

Run from the repository root:

    .venv/bin/python bench/sessions.py [--counts 1000,5000,10000] \\
        [--compression none,deflate] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
CLIENT_CPU = 1
# Files a server or client needs beside its sockets: the interpreter's own,
# the listening socket, logs, and the admin connection.
FD_MARGIN = 200
WARMUP_SESSIONS = 20
READY_TIMEOUT = 30.0

ROUTER_CONFIG = """\
apiVersion: eventrouter.io/v1alpha1
kind: EventRouter
metadata: {{name: bench}}
spec:
  sessions: {{maxSessions: {max_sessions}, maxSessionsPerUser: 10000, idleTimeout: 1h}}
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


# --- processes started by this script ---------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(pid, {cpu})


def raise_open_files_limit() -> int:
    """Set the soft limit on open files to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout:.0f}s")


@dataclass
class Server:
    """A server process under test and the WebSocket URL its clients use."""

    kind: str
    process: subprocess.Popen[bytes]
    url: str
    admin_port: int | None = None

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def active_sessions(self) -> float | None:
        """Return the router's eventrouter_sessions_active, or None for the echo server."""
        if self.admin_port is None:
            return None
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("eventrouter_sessions_active "):
                    return float(line.split()[1])
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_router(workdir: Path, max_sessions: int) -> Server:
    config = workdir / "router.yaml"
    config.write_text(ROUTER_CONFIG.format(max_sessions=max_sessions))
    port, admin_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "eventrouter", "serve",
        "-f", str(config),
        "--port", str(port),
        "--admin-port", str(admin_port),
        "--reload-interval", "0",
        "--log-level", "WARNING",
    ]  # fmt: skip
    log = (workdir / "router.log").open("wb")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=workdir)
    pin(process.pid, SERVER_CPU)
    wait_for_port(port, process, READY_TIMEOUT)
    wait_for_port(admin_port, process, READY_TIMEOUT)
    return Server("router", process, f"ws://127.0.0.1:{port}/ws", admin_port)


def start_echo_server() -> Server:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "echo", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    pin(process.pid, SERVER_CPU)
    wait_for_port(port, process, READY_TIMEOUT)
    return Server("echo", process, f"ws://127.0.0.1:{port}/ws")


class Client:
    """A client process that keeps sessions open until it reads a line on stdin."""

    def __init__(self, url: str, count: int, compression: str) -> None:
        command = [
            sys.executable, str(Path(__file__).resolve()), "client",
            "--url", url, "--count", str(count), "--compression", compression,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        pin(self.process.pid, CLIENT_CPU)

    def read_report(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"client exited with {self.process.wait()} without a report")
        report: dict[str, Any] = json.loads(line)
        return report

    def close_sessions(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("close\n")
        self.process.stdin.flush()
        report = self.read_report()
        self.process.wait(60)
        return report


# --- one measurement ------------------------------------------------------------------


@dataclass
class Measurement:
    server: str
    compression: str
    sessions: int
    opened: int
    failed: int
    open_seconds: float
    rss_before: int
    rss_after: int
    active_seen: float | None
    idle_cpu_percent: float

    @property
    def bytes_per_session(self) -> float:
        return (self.rss_after - self.rss_before) / max(self.opened, 1)


def settled_rss(server: Server, timeout: float = 5.0) -> int:
    """Return the RSS once two samples 200 ms apart differ by under 1%, or after `timeout`."""
    deadline = time.monotonic() + timeout
    previous = server.rss()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        current = server.rss()
        if abs(current - previous) < 0.01 * previous:
            return current
        previous = current
    return previous


def measure(server: Server, count: int, compression: str, idle_seconds: float) -> Measurement:
    warmup = Client(server.url, WARMUP_SESSIONS, compression)
    warmup.read_report()
    warmup.close_sessions()
    if server.admin_port is not None:
        wait_until(lambda: server.active_sessions() == 0, "warm-up sessions to close")
    rss_before = settled_rss(server)

    client = Client(server.url, count, compression)
    opened = client.read_report()
    active = None
    if server.admin_port is not None:
        wait_until(
            lambda: server.active_sessions() == opened["opened"],
            f"{opened['opened']} sessions in eventrouter_sessions_active",
        )
        active = server.active_sessions()
    rss_after = settled_rss(server)
    cpu_start = server.cpu_seconds()
    time.sleep(idle_seconds)
    idle_cpu = 100 * (server.cpu_seconds() - cpu_start) / idle_seconds
    client.close_sessions()
    return Measurement(
        server=server.kind,
        compression=compression,
        sessions=count,
        opened=opened["opened"],
        failed=opened["failed"],
        open_seconds=opened["open_seconds"],
        rss_before=rss_before,
        rss_after=rss_after,
        active_seen=active,
        idle_cpu_percent=round(idle_cpu, 1),
    )


def wait_until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# --- client and echo server subcommands -----------------------------------------------


async def hold_sessions(url: str, count: int, compression: str, handshakes: int) -> None:
    """Open `count` sessions, report, wait for a line on stdin, then close them all."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import WebSocketException

    gate = asyncio.Semaphore(handshakes)
    errors: list[str] = []

    async def open_one() -> ClientConnection | None:
        async with gate:
            try:
                return await connect(
                    url,
                    open_timeout=120,
                    ping_interval=None,
                    compression="deflate" if compression == "deflate" else None,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                if len(errors) < 5:
                    errors.append(repr(exc))
                return None

    started = time.monotonic()
    results = await asyncio.gather(*(open_one() for _ in range(count)))
    connections = [c for c in results if c is not None]
    report = {
        "opened": len(connections),
        "failed": count - len(connections),
        "open_seconds": round(time.monotonic() - started, 3),
        "errors": errors,
    }
    print(json.dumps(report), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    print(json.dumps({"closed": len(connections)}), flush=True)


async def serve_echo(port: int) -> None:
    """Run a bare websockets echo server on 127.0.0.1 until SIGTERM."""
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(echo, "127.0.0.1", port, ping_interval=20, ping_timeout=20):
        await stop


def run_async(coroutine: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


# --- report ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu_model = platform.processor()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.date.today().isoformat(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def print_report(info: dict[str, Any], results: list[Measurement], out: IO[str]) -> None:
    print(
        f"{info['date']}, nproc {info['nproc']}, {info['cpu']}, Python {info['python']}, "
        f"1-minute load average {info['load_average_start']} at the start "
        f"and {info['load_average_1m']} at the end",
        file=out,
    )
    header = (
        "| sessions | compression | router RSS before → after (MiB) | router KiB/session "
        "| echo KiB/session | ratio | router open time (s) | router idle CPU (%) |"
    )
    print(header, file=out)
    print("|" + "---|" * 8, file=out)
    by_key = {(m.server, m.compression, m.sessions): m for m in results}
    for (server, compression, count), router in by_key.items():
        if server != "router":
            continue
        echo = by_key.get(("echo", compression, count))
        ratio = (
            f"{router.bytes_per_session / echo.bytes_per_session:.1f}"
            if echo and echo.bytes_per_session > 0
            else "n/a"
        )
        echo_kib = f"{echo.bytes_per_session / 1024:.1f}" if echo else "n/a"
        print(
            f"| {router.opened:,} | {compression} "
            f"| {router.rss_before / 2**20:.0f} → {router.rss_after / 2**20:.0f} "
            f"| {router.bytes_per_session / 1024:.1f} | {echo_kib} | {ratio} "
            f"| {router.open_seconds:.1f} | {router.idle_cpu_percent:.1f} |",
            file=out,
        )
    failed = [m for m in results if m.failed or m.opened != m.sessions]
    for m in failed:
        print(f"{m.server} {m.compression} {m.sessions}: {m.failed} sessions failed", file=out)


def run_benchmark(args: argparse.Namespace) -> int:
    limit = raise_open_files_limit()
    load_at_start = round(os.getloadavg()[0], 2)
    counts = [int(c) for c in args.counts.split(",")]
    modes = args.compression.split(",")
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as tmp:
        for count in counts:
            if count + FD_MARGIN > limit:
                print(
                    f"skipping {count} sessions: the open files limit is {limit}; "
                    f"raise the hard limit (ulimit -Hn) above {count + FD_MARGIN}",
                    file=sys.stderr,
                )
                continue
            for mode in modes:
                for kind in ("router", "echo"):
                    workdir = Path(tmp) / f"{kind}-{mode}-{count}"
                    workdir.mkdir()
                    server = (
                        start_router(workdir, count + 1000)
                        if kind == "router"
                        else start_echo_server()
                    )
                    try:
                        result = measure(server, count, mode, args.idle_seconds)
                    finally:
                        server.stop()
                    results.append(result)
                    print(
                        f"{kind} {mode} {count}: {result.opened} open, "
                        f"{result.bytes_per_session / 1024:.1f} KiB/session",
                        file=sys.stderr,
                    )
    info = machine() | {"load_average_start": load_at_start}
    print_report(info, results, sys.stdout)
    if args.json:
        payload = {
            "machine": info,
            "results": [asdict(m) | {"bytes_per_session": m.bytes_per_session} for m in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    parser.add_argument(
        "--counts", default="1000,5000,10000", help="session counts, comma-separated"
    )
    parser.add_argument(
        "--compression", default="none,deflate", help="modes to measure: none, deflate or both"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="seconds to measure idle CPU use"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    client = commands.add_parser("client", help="hold sessions open (used by the benchmark)")
    client.add_argument("--url", required=True)
    client.add_argument("--count", type=int, required=True)
    client.add_argument("--compression", choices=["none", "deflate"], default="none")
    client.add_argument("--handshakes", type=int, default=100)
    echo = commands.add_parser("echo", help="bare websockets echo server (the baseline)")
    echo.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    if args.command == "client":
        run_async(hold_sessions(args.url, args.count, args.compression, args.handshakes))
        return 0
    if args.command == "echo":
        run_async(serve_echo(args.port))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
