"""Server processes, response checks, CPU accounting and wrk runs for run_stacks.py."""

import dataclasses
import http.client
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from stack_candidates import HOST, Candidate

LUA_SCRIPT = Path(__file__).resolve().parent / "post.lua"
SERVER_CPU = "0"
LOAD_CPU = "1"
WRK_THREADS = 2
WRK_CONNECTIONS = 64
SERVER_START_TIMEOUT_S = 15.0
SERVER_STOP_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    path: str
    events_per_request: int
    body: bytes


@dataclasses.dataclass
class WrkResult:
    requests_per_s: float
    non_2xx: int
    socket_errors: int


@dataclasses.dataclass
class RunResult:
    """Figures from one measured run. CPU fractions are between 0 and 1."""

    events_per_s: float
    server_cpu_busy: float
    load_cpu_busy: float
    steal: float


class BenchmarkError(Exception):
    pass


# --- Server processes -------------------------------------------------------------


def pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_request(port: int, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Server:
    """Candidate server process pinned to SERVER_CPU in its own process group."""

    def __init__(self, candidate: Candidate, log_path: Path) -> None:
        self.candidate = candidate
        self.port = pick_free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, probe_body: bytes) -> None:
        command = ["taskset", "-c", SERVER_CPU, *self.candidate.command(self.port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"{self.candidate.key}: server exited with code {self.process.returncode}"
                    f" during startup. Log:\n{self.log_tail()}"
                )
            try:
                status, _ = http_request(self.port, "POST", "/v2/event", probe_body)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200:
                return
            raise BenchmarkError(
                f"{self.candidate.key}: startup probe returned HTTP {status}, expected 200"
            )
        raise BenchmarkError(
            f"{self.candidate.key}: server did not respond on port {self.port} within"
            f" {SERVER_START_TIMEOUT_S} s. Log:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Send SIGTERM to the server's process group, then SIGKILL after a timeout.

        The group matters for granian, whose worker is a child of the started process.
        """
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"  {self.candidate.key}: no exit after SIGTERM, sending SIGKILL", flush=True)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def check_responses(server: Server, workloads: list[Workload]) -> None:
    """Raise BenchmarkError unless the server accepts valid bodies and rejects bad ones.

    This catches a candidate that would look fast because it skips validation or
    answers every request with an error.
    """
    cases: list[tuple[str, str, bytes | None, int]] = [
        ("POST", workload.path, workload.body, 200) for workload in workloads
    ]
    cases += [
        ("POST", "/v2/event", b"not json", 400),
        ("GET", "/v2/event", None, 405),
    ]
    if server.candidate.validates:
        cases += [
            ("POST", "/v2/event", b'{"name":"x","properties":{"level":5}}', 400),
            ("POST", "/v2/event", b'{"properties":{}}', 400),
            ("POST", "/v2/event", b'{"name":""}', 400),
            ("POST", "/v2/event", b'{"name":"x","timestamp":"yesterday"}', 400),
            ("POST", "/v2/events", b'{"events":[]}', 400),
            ("POST", "/v2/events", b'{"events":[{"name":7}]}', 400),
        ]
    for method, path, body, expected in cases:
        status, response_body = http_request(server.port, method, path, body)
        if status != expected:
            raise BenchmarkError(
                f"{server.candidate.key}: {method} {path} with body {body!r:.60} returned"
                f" HTTP {status}, expected {expected}"
            )
        if expected == 200 and response_body != b"{}":
            raise BenchmarkError(
                f"{server.candidate.key}: {method} {path} returned body {response_body!r:.60},"
                " expected b'{}'"
            )


# --- CPU usage --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    busy: int
    steal: int
    total: int


def read_cpu_times() -> dict[str, CpuTimes]:
    """Read cumulative per-CPU times from /proc/stat, keyed by CPU number as a string."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        # user nice system idle iowait irq softirq steal. Guest time is already in user.
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
        total = user + nice + system + idle + iowait + irq + softirq + steal
        times[fields[0].removeprefix("cpu")] = CpuTimes(
            busy=total - idle - iowait, steal=steal, total=total
        )
    return times


def busy_fraction(before: dict[str, CpuTimes], after: dict[str, CpuTimes], cpu: str) -> float:
    elapsed = after[cpu].total - before[cpu].total
    return (after[cpu].busy - before[cpu].busy) / elapsed if elapsed else 0.0


def steal_fraction(before: dict[str, CpuTimes], after: dict[str, CpuTimes]) -> float:
    """Return the share of time the hypervisor gave the bench CPUs to other guests."""
    cpus = (SERVER_CPU, LOAD_CPU)
    elapsed = sum(after[cpu].total - before[cpu].total for cpu in cpus)
    stolen = sum(after[cpu].steal - before[cpu].steal for cpu in cpus)
    return stolen / elapsed if elapsed else 0.0


# --- Load generator ---------------------------------------------------------------

_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(port: int, path: str, body_file: Path, duration_s: int) -> WrkResult:
    command = [
        "taskset", "-c", LOAD_CPU,
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{WRK_CONNECTIONS}",
        f"-d{duration_s}s",
        "--timeout", "5s",
        "-s", str(LUA_SCRIPT),
        f"http://{HOST}:{port}{path}",
        "--", str(body_file),
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + 30, check=False
    )
    output = completed.stdout
    match = _REQUESTS_PER_S.search(output)
    if completed.returncode != 0 or match is None:
        raise BenchmarkError(
            f"wrk failed with code {completed.returncode}:\n{output}\n{completed.stderr}"
        )
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests_per_s=float(match.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
    )
