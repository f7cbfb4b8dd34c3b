"""Measure HTTP server and JSON stacks for the ``POST /v2/event`` ingestion path.

Each candidate in bench/stacks/ runs as one server process pinned to CPU 0, and wrk
pinned to CPU 1 sends keep-alive POST requests from 64 connections on 2 threads. Every
round starts each candidate once and measures single-event requests (``/v2/event``)
and 50-event batches (``/v2/events``). Rounds rotate the candidate order, so slow drift
of the machine spreads over all candidates. The report gives the median over rounds
and its ratio to the median of the floor candidate from the same invocation, once for
throughput and once for throughput per second of CPU time the server used.

Each run also records how much of each CPU the server, wrk and other processes used.
A run in which other processes used more than 10% of a bench CPU is repeated, at most
twice per run and --retries times per invocation, and the report lists every run it
still doubts.

Run from the repository root:

    .venv/bin/python bench/run_stacks.py

Requirements: wrk and taskset on PATH, at least 2 CPUs, and the packages starlette,
aiohttp and granian in the virtualenv. All servers listen on 127.0.0.1 only.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import payloads
from stack_candidates import CANDIDATES, FLOOR, Candidate
from stack_harness import (
    LOAD_CPU,
    SERVER_CPU,
    WRK_CONNECTIONS,
    WRK_THREADS,
    BenchmarkError,
    RunResult,
    Server,
    Workload,
    check_responses,
    measure_run,
    wait_for_idle_cpus,
)

PACKAGES = [
    "uvicorn",
    "httptools",
    "uvloop",
    "msgspec",
    "orjson",
    "pydantic",
    "pydantic-core",
    "starlette",
    "aiohttp",
    "granian",
]


# Share of a bench CPU that other processes may use before a run counts as disturbed.
MAX_OTHER_CPU = 0.1
# Maximum time to wait for other processes to leave the bench CPUs before a repeat.
IDLE_WAIT_S = 10.0
MAX_REPEATS_PER_RUN = 2


# --- Benchmark --------------------------------------------------------------------


@dataclasses.dataclass
class RetryBudget:
    """Number of disturbed runs that may still be repeated in this invocation.

    The budget is shared by all runs so that a busy machine cannot stretch the
    benchmark without bound.
    """

    remaining: int


def is_disturbed(run: RunResult) -> bool:
    return max(run.server_cpu_other, run.wrk_cpu_other) > MAX_OTHER_CPU


def describe_problems(run: RunResult) -> list[str]:
    """Return the reasons to doubt a run's throughput figure, or an empty list."""
    problems = []
    if run.server_cpu < 0.9:
        problems.append(f"server used only {run.server_cpu:.0%} of CPU {SERVER_CPU}")
    if run.wrk_cpu > 0.9:
        problems.append(f"wrk used {run.wrk_cpu:.0%} of CPU {LOAD_CPU}, so it may be the limit")
    for cpu, other in ((SERVER_CPU, run.server_cpu_other), (LOAD_CPU, run.wrk_cpu_other)):
        if other > MAX_OTHER_CPU:
            problems.append(f"other processes used {other:.0%} of CPU {cpu}")
    if run.steal > 0.02:
        problems.append(f"{run.steal:.1%} CPU steal")
    return problems


def measure_candidate(
    candidate: Candidate,
    workloads: list[Workload],
    body_files: dict[str, Path],
    args: argparse.Namespace,
    log_dir: Path,
    retry_budget: RetryBudget,
) -> dict[str, RunResult]:
    """Start one candidate, measure every workload and return the figures per workload.

    A run that other processes disturbed is repeated up to MAX_REPEATS_PER_RUN times
    while the retry budget lasts, and the last attempt is kept.
    """
    server = Server(candidate, log_dir / f"{candidate.key}.log")
    results: dict[str, RunResult] = {}
    try:
        server.start(workloads[0].body)
        check_responses(server, workloads)
        for workload in workloads:
            body_file = body_files[workload.key]
            measure_run(server, workload, body_file, args.warmup)
            result = measure_run(server, workload, body_file, args.duration)
            repeats = 0
            while (
                is_disturbed(result)
                and repeats < MAX_REPEATS_PER_RUN
                and retry_budget.remaining > 0
            ):
                repeats += 1
                retry_budget.remaining -= 1
                print(
                    f"repeating {candidate.key} {workload.key}:"
                    f" {', '.join(describe_problems(result))}",
                    flush=True,
                )
                if not wait_for_idle_cpus(MAX_OTHER_CPU, IDLE_WAIT_S):
                    print(f"bench CPUs still busy after {IDLE_WAIT_S:.0f} s, repeating anyway")
                result = measure_run(server, workload, body_file, args.duration)
            results[workload.key] = result
    finally:
        server.stop()
    return results


def run_rounds(
    candidates: list[Candidate], workloads: list[Workload], args: argparse.Namespace
) -> dict[str, dict[str, list[RunResult]]]:
    """Measure every candidate once per round and return the figures of every run."""
    samples: dict[str, dict[str, list[RunResult]]] = {
        c.key: {w.key: [] for w in workloads} for c in candidates
    }
    with tempfile.TemporaryDirectory(prefix="run_stacks-") as temp:
        temp_dir = Path(temp)
        body_files = {}
        for workload in workloads:
            body_files[workload.key] = temp_dir / f"{workload.key}.json"
            body_files[workload.key].write_bytes(workload.body)
        retry_budget = RetryBudget(args.retries)
        for round_index in range(args.rounds):
            shift = round_index * len(candidates) // args.rounds
            order = candidates[shift:] + candidates[:shift]
            for candidate in order:
                results = measure_candidate(
                    candidate, workloads, body_files, args, temp_dir, retry_budget
                )
                figures = []
                for workload in workloads:
                    result = results[workload.key]
                    samples[candidate.key][workload.key].append(result)
                    figures.append(
                        f"{workload.key} {result.events_per_s:,.0f} events/s"
                        f" (CPU {SERVER_CPU}: server {result.server_cpu:.0%},"
                        f" other {result.server_cpu_other:.0%}; CPU {LOAD_CPU}:"
                        f" wrk {result.wrk_cpu:.0%}, other {result.wrk_cpu_other:.0%};"
                        f" steal {result.steal:.1%})"
                    )
                print(
                    f"round {round_index + 1}/{args.rounds} {candidate.key}: " + ", ".join(figures),
                    flush=True,
                )
    return samples


# --- Report -----------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_versions() -> str:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ", ".join(versions)


def wrk_version() -> str:
    completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first_line = (completed.stdout + completed.stderr).splitlines()[0]
    return " ".join(first_line.split()[:2])


@dataclasses.dataclass(frozen=True)
class Metric:
    """Figure of a run that a results table shows, with its column headings."""

    value: Callable[[RunResult], float]
    single_heading: str
    batch_heading: str


THROUGHPUT = Metric(
    lambda run: run.events_per_s,
    "Single event: req/s, median (min-max)",
    "Batch of 50: events/s, median (min-max)",
)
THROUGHPUT_PER_SERVER_CPU = Metric(
    lambda run: run.events_per_server_cpu_s,
    "Single event: req per server CPU-s, median (min-max)",
    "Batch of 50: events per server CPU-s, median (min-max)",
)


def format_cell(runs: list[RunResult], floor_runs: list[RunResult], metric: Metric) -> list[str]:
    """Format the median and range of a metric over runs, and its ratio to the floor.

    The figure gets a trailing asterisk when describe_problems doubts any of the runs.
    """
    values = [metric.value(run) for run in runs]
    median = statistics.median(values)
    floor_median = statistics.median(metric.value(run) for run in floor_runs)
    figure = f"{median:,.0f} ({min(values):,.0f}-{max(values):,.0f})"
    if any(describe_problems(run) for run in runs):
        figure += " *"
    return [figure, f"{median / floor_median:.2f}"]


def print_table(
    candidates: list[Candidate],
    workloads: list[Workload],
    samples: dict[str, dict[str, list[RunResult]]],
    metric: Metric,
) -> None:
    """Print one metric as a Markdown table with ratios to the floor candidate."""
    single, batch = workloads
    floor = samples[FLOOR]
    print(
        f"| Candidate | Server | Decoding and validation | {metric.single_heading} | Ratio "
        f"| {metric.batch_heading} | Ratio |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for candidate in candidates:
        cells = [candidate.key, candidate.server, candidate.decoding]
        for workload in (single, batch):
            runs = samples[candidate.key][workload.key]
            cells += format_cell(runs, floor[workload.key], metric)
        print(f"| {' | '.join(cells)} |")
    all_runs = [
        run for by_workload in samples.values() for runs in by_workload.values() for run in runs
    ]
    if any(describe_problems(run) for run in all_runs):
        print()
        print("* At least one run of this figure is doubtful. The warnings at the end say why.")


def print_environment(
    workloads: list[Workload],
    args: argparse.Namespace,
    started: datetime.datetime,
    load_before: str,
    load_after: str,
) -> None:
    single, batch = workloads
    print(f"Date: {started.strftime('%a %b %d %H:%M:%S %Z %Y')}")
    print(
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    print(f"Packages: {package_versions()}, {wrk_version()}")
    print(
        f"Settings: {args.rounds} rounds, {args.duration} s per run after {args.warmup} s"
        f" warm-up, up to {args.retries} repeated runs ({MAX_REPEATS_PER_RUN} per run),"
        f" wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} on CPU {LOAD_CPU},"
        f" server on CPU {SERVER_CPU}"
    )
    print(
        f"Single-event body {len(single.body)} bytes, batch body {len(batch.body)} bytes"
        f" ({batch.events_per_request} events)"
    )
    print(f"Load average before: {load_before}, after: {load_after}")


def print_cpu_warnings(samples: dict[str, dict[str, list[RunResult]]]) -> None:
    """Print the runs whose CPU figures make the throughput figure doubtful."""
    for key, by_workload in samples.items():
        for workload_key, runs in by_workload.items():
            for index, run in enumerate(runs, start=1):
                problems = describe_problems(run)
                if problems:
                    print(f"warning: {key} {workload_key} run {index}: {', '.join(problems)}")


def run_to_json(run: RunResult) -> dict[str, float]:
    return {**dataclasses.asdict(run), "events_per_server_cpu_s": run.events_per_server_cpu_s}


def check_environment() -> None:
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise BenchmarkError(
            f"{', '.join(missing)} not found on PATH. Install them, for example with"
            " apt-get install wrk util-linux."
        )
    available = os.sched_getaffinity(0)
    if not {int(SERVER_CPU), int(LOAD_CPU)} <= available:
        raise BenchmarkError(
            f"CPUs {SERVER_CPU} and {LOAD_CPU} must both be available to this process,"
            f" but only {sorted(available)} are."
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure HTTP server and JSON stacks for POST /v2/event.",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="number of runs per candidate (default: 3)"
    )
    parser.add_argument(
        "--duration", type=int, default=6, help="length of each measured run in s (default: 6)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="length of the unmeasured run before each measured run in s (default: 1)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=10,
        help="maximum number of runs repeated because other processes used more than"
        f" {MAX_OTHER_CPU:.0%} of a bench CPU, in total over all candidates, at most"
        f" {MAX_REPEATS_PER_RUN} per run (default: 10)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[c.key for c in CANDIDATES if c.key != FLOOR],
        help="candidates to measure in addition to the floor (default: all)",
    )
    parser.add_argument(
        "--json", type=Path, help="also write the per-run figures to this JSON file"
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.duration < 1 or args.warmup < 1:
        parser.error("--rounds, --duration and --warmup must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be at least 0")
    return args


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


def main() -> int:
    args = parse_args()
    # Turn SIGINT and SIGTERM into exceptions, so that the finally blocks stop the
    # servers, which run in their own sessions. A shell starts background jobs with
    # SIGINT ignored, and Python keeps it ignored unless the handler is set here.
    signal.signal(signal.SIGINT, exit_on_signal)
    signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        check_environment()
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    candidates = [c for c in CANDIDATES if c.key == FLOOR or not args.only or c.key in args.only]
    workloads = [
        Workload("single", "/v2/event", 1, payloads.single_event_body()),
        Workload("batch", "/v2/events", payloads.BATCH_SIZE, payloads.batch_body()),
    ]
    started = datetime.datetime.now().astimezone()
    load_before = Path("/proc/loadavg").read_text().strip()
    try:
        samples = run_rounds(candidates, workloads, args)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    load_after = Path("/proc/loadavg").read_text().strip()
    print()
    print_table(candidates, workloads, samples, THROUGHPUT)
    print()
    print_table(candidates, workloads, samples, THROUGHPUT_PER_SERVER_CPU)
    print()
    print_environment(workloads, args, started, load_before, load_after)
    print_cpu_warnings(samples)
    if args.json:
        document = {
            key: {w: [run_to_json(run) for run in runs] for w, runs in by_workload.items()}
            for key, by_workload in samples.items()
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
