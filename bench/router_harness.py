"""Router and floor processes, wrk runs, metrics scrapes and machine facts.

Shared by latency.py, tracing_cost.py and memory.py. Everything here talks to
the router through its public interfaces only: the command line, HTTP on the
ingestion and admin ports, and the process's resident memory. Every server
listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
HOST = "127.0.0.1"
SERVER_CPU = 0
LOAD_CPU = 1
POST_LUA = HERE / "post.lua"


class BenchmarkError(Exception):
    """A run failed, or a tool or server did not behave as the benchmark requires."""


def require_tools(*tools: str) -> None:
    """Raise BenchmarkError naming the package to install when a tool is missing."""
    packages = {"wrk": "wrk", "taskset": "util-linux"}
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchmarkError(
                f"{tool} not found on PATH: install it with "
                f"`apt-get install -y {packages.get(tool, tool)}`"
            )
    if (os.cpu_count() or 1) < 2:
        raise BenchmarkError("the benchmark pins the server and the load to two CPUs; found one")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the `finally` blocks stop the servers started so far."""

    def handle(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handle)


def pin_to_load_cpu() -> None:
    """Pin this process, and the threads it starts later, to the load generator's CPU."""
    os.sched_setaffinity(0, {LOAD_CPU})


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return os.environ without OTEL_* and EVENTROUTER_* variables, plus `extra`.

    The router reads both families, so a variable left over in the caller's
    shell could turn tracing on or point an exporter at another address.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "EVENTROUTER_"))
    }
    env.update(extra or {})
    return env


def post(port: int, path: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """POST a JSON body to 127.0.0.1 and return the status and response body."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class ServerProcess:
    """A server started by the benchmark, with its ports and a log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    admin_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, probe_body: bytes, timeout: float = 30.0) -> None:
        """Wait until `POST /v2/event` with `probe_body` returns 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"{self.name} exited with code {self.process.returncode} during start-up:\n"
                    f"{self.log_tail()}"
                )
            try:
                status, _ = post(self.port, "/v2/event", probe_body, timeout=1.0)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200:
                return
            raise BenchmarkError(f"{self.name} returned {status} to the probe:\n{self.log_tail()}")
        raise BenchmarkError(f"{self.name} did not respond on port {self.port} within {timeout}s")

    def metrics(self) -> dict[str, float]:
        """Scrape the admin port's /metrics; keys are `name{label="value",...}`, labels sorted."""
        if self.admin_port is None:
            raise BenchmarkError(f"{self.name} has no admin port")
        url = f"http://{HOST}:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process and all its threads."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self, timeout: float = 30.0) -> None:
        """Send SIGTERM, wait up to `timeout` seconds, then SIGKILL."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _spawn(command: list[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )


def start_router(
    config: Path,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    grace_period: float = 30.0,
    name: str = "router",
) -> ServerProcess:
    """Start `eventrouter serve -f config` pinned to the server CPU, with free ports."""
    port, admin_port = free_port(), free_port()
    log_path = workdir / f"{name}-{port}.log"
    command = [
        PYTHON, "-m", "eventrouter", "serve",
        "-f", str(config),
        "--host", HOST,
        "--port", str(port),
        "--admin-host", HOST,
        "--admin-port", str(admin_port),
        "--log-level", "WARNING",
        "--reload-interval", "0",
        "--grace-period", str(grace_period),
    ]  # fmt: skip
    process = _spawn(command, log_path, clean_environment(env))
    return ServerProcess(name, process, port, log_path, admin_port)


def start_floor(workdir: Path) -> ServerProcess:
    """Start the floor server (bench/stacks/floor_asgi.py) pinned to the server CPU."""
    port = free_port()
    log_path = workdir / f"floor-{port}.log"
    command = [
        PYTHON, "-m", "uvicorn", "floor_asgi:app",
        "--app-dir", str(HERE / "stacks"),
        "--host", HOST,
        "--port", str(port),
        "--http", "httptools",
        "--loop", "uvloop",
        "--log-level", "warning",
        "--no-access-log",
    ]  # fmt: skip
    process = _spawn(command, log_path, clean_environment())
    return ServerProcess("floor", process, port, log_path)


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop the server when the block ends, also after an error."""
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    requests: int


_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)


def run_wrk(
    port: int, path: str, body_file: Path, seconds: float, connections: int = 64
) -> WrkResult:
    """Run wrk (1 thread, keep-alive) on the load CPU against 127.0.0.1:port.

    Raises BenchmarkError when wrk fails, or reports non-2xx responses or
    socket errors.
    """
    command = [
        "taskset", "-c", str(LOAD_CPU),
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(POST_LUA),
        f"http://{HOST}:{port}{path}",
        "--", str(body_file),
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    output = completed.stdout
    rate = _REQUESTS_PER_S.search(output)
    total = _REQUESTS_TOTAL.search(output)
    if completed.returncode != 0 or rate is None or total is None:
        raise BenchmarkError(
            f"wrk failed with exit code {completed.returncode}:\n{output}\n{completed.stderr}"
        )
    if "Non-2xx" in output or "Socket errors" in output:
        raise BenchmarkError(f"wrk saw error responses or socket errors on {path}:\n{output}")
    return WrkResult(float(rate.group(1)), int(total.group(1)))


class CpuWatch:
    """Measures how busy one CPU was with work other than the given processes.

    Reads /proc/stat for the CPU and psutil for the processes, so `finish`
    returns the share of the interval that the processes took on that CPU and
    the share that everything else (builds, tests, interrupts) took. The
    processes must be pinned to that CPU for the split to hold.
    """

    def __init__(self, cpu: int, pids: list[int]) -> None:
        self._cpu = cpu
        self._processes = [psutil.Process(pid) for pid in pids]
        self._cpu_before = _cpu_ticks(cpu)
        self._process_before = self._process_seconds()

    def _process_seconds(self) -> float:
        total = 0.0
        for process in self._processes:
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def finish(self) -> dict[str, float]:
        busy, total = _cpu_ticks(self._cpu)
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        elapsed_ticks = max(total - self._cpu_before[1], 1)
        busy_share = (busy - self._cpu_before[0]) / elapsed_ticks
        own_share = (self._process_seconds() - self._process_before) * ticks_per_s / elapsed_ticks
        return {"own": own_share, "other": max(busy_share - own_share, 0.0)}


def _cpu_ticks(cpu: int) -> tuple[int, int]:
    """Return busy and total clock ticks of one CPU from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{cpu}":
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
            total = user + nice + system + idle + iowait + irq + softirq + steal
            return total - idle - iowait, total
    raise BenchmarkError(f"cpu{cpu} not found in /proc/stat")


def load_average() -> float:
    """Return the 1-minute load average."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(packages: tuple[str, ...]) -> dict[str, object]:
    """CPU count and model, Python and package versions, and the UTC time now."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    wrk_version = "not installed"
    if shutil.which("wrk"):
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0]
    return {
        "router_code": router_code(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
        "wrk": wrk_version.strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def router_code() -> str:
    """Describe where the router processes import `eventrouter` from, with the git commit.

    The benchmark measures whatever that folder contains. With PYTHONPATH set to
    an export of one commit (`git archive HEAD router | tar -x -C DIR`, then
    PYTHONPATH=DIR/router), the figures belong to that commit even while the
    working tree changes.
    """
    probe = subprocess.run(
        [PYTHON, "-c", "import eventrouter; print(eventrouter.__file__)"],
        capture_output=True,
        text=True,
        env=clean_environment(),
        check=False,
    )
    if probe.returncode != 0:
        raise BenchmarkError(f"cannot import eventrouter: {probe.stderr.strip()}")
    package = Path(probe.stdout.strip()).parent
    git = ["git", "-C", str(package)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{package} (not a git checkout)"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    ).stdout
    state = "with uncommitted changes" if dirty.strip() else "clean"
    return f"{package} at commit {head.stdout.strip()}, {state}"


def print_machine(info: Mapping[str, object], load_before: float, load_after: float) -> None:
    packages = info["packages"]
    assert isinstance(packages, dict)
    listed = ", ".join(f"{name} {version}" for name, version in packages.items())
    print(
        f"machine: nproc {info['nproc']}, {info['cpu_model']}, Linux {info['kernel']}, "
        f"Python {info['python']}, {listed}, {info['wrk']}"
    )
    print(f"router code: {info['router_code']}")
    print(
        f"date: {info['date_utc']} UTC; 1-minute load average {load_before:.2f} before, "
        f"{load_after:.2f} after"
    )
