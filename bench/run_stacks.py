"""Measure HTTP server and JSON stacks for the ``POST /v2/event`` ingestion path.

Each candidate in bench/stacks/ runs as one server process pinned to CPU 0, and wrk
pinned to CPU 1 sends keep-alive POST requests from 64 connections on 2 threads. Every
round starts each candidate once and measures single-event requests (``/v2/event``)
and 50-event batches (``/v2/events``). Rounds rotate the candidate order, so slow drift
of the machine spreads over all candidates. The report gives the median over rounds
and its ratio to the median of the floor candidate from the same invocation.

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
import statistics
import subprocess
import sys
import tempfile
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
    busy_fraction,
    check_responses,
    read_cpu_times,
    run_wrk,
    steal_fraction,
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


# --- Benchmark --------------------------------------------------------------------


def measure_candidate(
    candidate: Candidate,
    workloads: list[Workload],
    body_files: dict[str, Path],
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, RunResult]:
    """Start one candidate, measure every workload and return the figures per workload."""
    server = Server(candidate, log_dir / f"{candidate.key}.log")
    results: dict[str, RunResult] = {}
    try:
        server.start(workloads[0].body)
        check_responses(server, workloads)
        for workload in workloads:
            body_file = body_files[workload.key]
            run_wrk(server.port, workload.path, body_file, args.warmup)
            cpu_before = read_cpu_times()
            result = run_wrk(server.port, workload.path, body_file, args.duration)
            cpu_after = read_cpu_times()
            if result.non_2xx or result.socket_errors:
                raise BenchmarkError(
                    f"{candidate.key} {workload.key}: {result.non_2xx} non-2xx responses"
                    f" and {result.socket_errors} socket errors. Server log:\n"
                    f"{server.log_tail()}"
                )
            results[workload.key] = RunResult(
                events_per_s=result.requests_per_s * workload.events_per_request,
                server_cpu_busy=busy_fraction(cpu_before, cpu_after, SERVER_CPU),
                load_cpu_busy=busy_fraction(cpu_before, cpu_after, LOAD_CPU),
                steal=steal_fraction(cpu_before, cpu_after),
            )
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
        for round_index in range(args.rounds):
            shift = round_index * len(candidates) // args.rounds
            order = candidates[shift:] + candidates[:shift]
            for candidate in order:
                results = measure_candidate(candidate, workloads, body_files, args, temp_dir)
                figures = []
                for workload in workloads:
                    result = results[workload.key]
                    samples[candidate.key][workload.key].append(result)
                    figures.append(
                        f"{workload.key} {result.events_per_s:,.0f} events/s"
                        f" (CPU busy: server {result.server_cpu_busy:.0%},"
                        f" wrk {result.load_cpu_busy:.0%}, steal {result.steal:.1%})"
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


def median_events_per_s(runs: list[RunResult]) -> float:
    return statistics.median(run.events_per_s for run in runs)


def format_cell(runs: list[RunResult], floor_median: float) -> tuple[str, str]:
    values = [run.events_per_s for run in runs]
    median = statistics.median(values)
    figure = f"{median:,.0f} ({min(values):,.0f}-{max(values):,.0f})"
    return figure, f"{median / floor_median:.2f}"


def print_report(
    candidates: list[Candidate],
    workloads: list[Workload],
    samples: dict[str, dict[str, list[RunResult]]],
    args: argparse.Namespace,
    started: datetime.datetime,
    load_before: str,
    load_after: str,
) -> None:
    single, batch = workloads
    floor = samples[FLOOR]
    print()
    print(
        "| Candidate | Server | Decoding and validation "
        "| Single event: req/s, median (min-max) | Ratio "
        "| Batch of 50: events/s, median (min-max) | Ratio |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for candidate in candidates:
        single_figure, single_ratio = format_cell(
            samples[candidate.key][single.key], median_events_per_s(floor[single.key])
        )
        batch_figure, batch_ratio = format_cell(
            samples[candidate.key][batch.key], median_events_per_s(floor[batch.key])
        )
        print(
            f"| {candidate.key} | {candidate.server} | {candidate.decoding} "
            f"| {single_figure} | {single_ratio} | {batch_figure} | {batch_ratio} |"
        )
    print()
    print(f"Date: {started.strftime('%a %b %d %H:%M:%S %Z %Y')}")
    print(
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    print(f"Packages: {package_versions()}, {wrk_version()}")
    print(
        f"Settings: {args.rounds} rounds, {args.duration} s per run after {args.warmup} s"
        f" warm-up, wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} on CPU {LOAD_CPU},"
        f" server on CPU {SERVER_CPU}"
    )
    print(
        f"Single-event body {len(single.body)} bytes, batch body {len(batch.body)} bytes"
        f" ({batch.events_per_request} events)"
    )
    print(f"Load average before: {load_before}, after: {load_after}")
    print_cpu_warnings(samples)


def print_cpu_warnings(samples: dict[str, dict[str, list[RunResult]]]) -> None:
    """Print the runs whose CPU figures make the throughput figure doubtful."""
    for key, by_workload in samples.items():
        for workload_key, runs in by_workload.items():
            for index, run in enumerate(runs, start=1):
                problems = []
                if run.server_cpu_busy < 0.9:
                    problems.append(f"server CPU only {run.server_cpu_busy:.0%} busy")
                if run.load_cpu_busy > 0.95:
                    problems.append(f"wrk CPU {run.load_cpu_busy:.0%} busy, wrk may be the limit")
                if run.steal > 0.02:
                    problems.append(f"{run.steal:.1%} CPU steal")
                if problems:
                    print(f"warning: {key} {workload_key} run {index}: {', '.join(problems)}")


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
    return args


def main() -> int:
    args = parse_args()
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
    print_report(candidates, workloads, samples, args, started, load_before, load_after)
    if args.json:
        document = {
            key: {w: [dataclasses.asdict(run) for run in runs] for w, runs in by_workload.items()}
            for key, by_workload in samples.items()
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
