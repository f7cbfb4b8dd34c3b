"""Server processes, response checks, CPU accounting and wrk runs for run_stacks.py."""

import dataclasses
import http.client
import os
import re
import resource
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
    """Figures from one measured run.

    CPU figures are fractions of the run's wall time on one CPU. ``server_cpu`` and
    ``wrk_cpu`` count only those processes, and the ``other`` figures count everything
    else busy on the same CPU, such as other programs and unattributed interrupts.
    """

    events_per_s: float
    server_cpu: float
    server_cpu_other: float
    wrk_cpu: float
    wrk_cpu_other: float
    steal: float

    @property
    def events_per_server_cpu_s(self) -> float:
        """Events per second of CPU time that the server used.

        Other processes on CPU 0 lower ``events_per_s`` but change this figure less,
        because the server's share of the CPU is divided out. It is an estimate: a
        server that shares its CPU also loses cache contents and batches less work
        per event loop iteration.
        """
        return self.events_per_s / self.server_cpu if self.server_cpu > 0 else 0.0


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
    responds to every request with an error.
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

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    """Cumulative times of one CPU from /proc/stat, in clock ticks."""

    busy: int
    steal: int
    total: int


@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    cpus: dict[str, CpuTimes]
    server_ticks: int
    children_s: float


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


def wait_for_idle_cpus(max_busy: float, timeout_s: float) -> bool:
    """Wait until both bench CPUs were at most ``max_busy`` busy over half a second.

    Returns False if that did not happen within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        before = read_cpu_times()
        time.sleep(0.5)
        after = read_cpu_times()
        busy = [
            (after[cpu].busy - before[cpu].busy) / max(after[cpu].total - before[cpu].total, 1)
            for cpu in (SERVER_CPU, LOAD_CPU)
        ]
        if max(busy) <= max_busy:
            return True
        if time.monotonic() >= deadline:
            return False


def process_group_ticks(pgid: int) -> int:
    """Return the user and system time of every process in a process group, in clock ticks.

    The sum includes the time of children that have exited and been reaped.
    """
    ticks = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # The process exited after the directory listing.
        # Fields after the parenthesised command name, which may contain spaces, start
        # at field 3 (state). pgrp is field 5 and utime, stime, cutime, cstime are 14-17.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks


def take_snapshot(server_pgid: int) -> CpuSnapshot:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSnapshot(
        cpus=read_cpu_times(),
        server_ticks=process_group_ticks(server_pgid),
        children_s=children.ru_utime + children.ru_stime,
    )


def cpu_figures(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Compute the CPU fields of RunResult from snapshots around one wrk run.

    wrk time comes from RUSAGE_CHILDREN, which grows only when a child is reaped, so the
    interval must contain exactly one finished child process: the wrk run.
    """

    def elapsed(cpu: str) -> int:
        return max(after.cpus[cpu].total - before.cpus[cpu].total, 1)

    def busy(cpu: str) -> float:
        return (after.cpus[cpu].busy - before.cpus[cpu].busy) / elapsed(cpu)

    server = (after.server_ticks - before.server_ticks) / elapsed(SERVER_CPU)
    wrk_ticks = (after.children_s - before.children_s) * CLOCK_TICKS_PER_S
    wrk = wrk_ticks / elapsed(LOAD_CPU)
    cpus = (SERVER_CPU, LOAD_CPU)
    stolen = sum(after.cpus[cpu].steal - before.cpus[cpu].steal for cpu in cpus)
    return {
        "server_cpu": server,
        "server_cpu_other": max(busy(SERVER_CPU) - server, 0.0),
        "wrk_cpu": wrk,
        "wrk_cpu_other": max(busy(LOAD_CPU) - wrk, 0.0),
        "steal": stolen / sum(elapsed(cpu) for cpu in cpus),
    }


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


def measure_run(server: Server, workload: Workload, body_file: Path, duration_s: int) -> RunResult:
    """Run wrk once against a started server and return throughput and CPU figures.

    Raises BenchmarkError when any response was not 2xx or a socket error occurred.
    """
    assert server.process is not None, "start the server before measuring it"
    before = take_snapshot(server.process.pid)
    result = run_wrk(server.port, workload.path, body_file, duration_s)
    after = take_snapshot(server.process.pid)
    if result.non_2xx or result.socket_errors:
        raise BenchmarkError(
            f"{server.candidate.key} {workload.key}: {result.non_2xx} non-2xx responses"
            f" and {result.socket_errors} socket errors. Server log:\n{server.log_tail()}"
        )
    return RunResult(
        events_per_s=result.requests_per_s * workload.events_per_request,
        **cpu_figures(before, after),
    )
