"""Run every benchmark comparison of docs/benchmarks.md with one command.

Runs the benchmark scripts one after the other, never two at once, because
each pins its servers to CPU 0 and its load generator to CPU 1:

- ingest: the router against the bare-server floor, single events and batches;
- tracing: the router with tracing off, at 1% and at 100% sampling;
- latency: acknowledgement latency at half of the router's maximum rate;
- memory: bytes per queued event and the RSS of a full buffer;
- kafka: end to end into a real Kafka broker against raw aiokafka, a naive
  Python service and Apache Camel;
- sessions (only with --with-sessions): idle WebSocket sessions per process;
- stacks (only with --with-stacks): the HTTP server and JSON stack choice,
  which needs starlette, aiohttp and granian installed.

Each script's report (its stdout) and figures (its --json file) go to --out,
and summary.md there puts the reports together with the machine, the date,
the git commit and the load average before and after each script. The
scripts start and stop their own servers and Kafka broker, all on 127.0.0.1.

    .venv/bin/python bench/run_all.py [--out DIR] [--only ingest,kafka] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: list[str]
    quick_args: list[str]
    title: str


BENCHMARKS = [
    Benchmark(
        "ingest",
        "ingest.py",
        ["--rounds", "3", "--seconds", "5"],
        ["--rounds", "1", "--seconds", "2"],
        "Ingestion into a blackhole sink",
    ),
    Benchmark(
        "tracing",
        "tracing_cost.py",
        ["--rounds", "3", "--seconds", "5"],
        ["--rounds", "1", "--seconds", "2"],
        "Tracing cost",
    ),
    Benchmark(
        "latency",
        "latency.py",
        ["--rounds", "2", "--seconds", "10"],
        ["--rounds", "1", "--seconds", "3", "--warmup", "1", "--max-seconds", "2"],
        "Acknowledgement latency at half load",
    ),
    Benchmark(
        "memory",
        "memory.py",
        ["--rounds", "3"],
        ["--rounds", "1"],
        "Memory per queued event",
    ),
    Benchmark(
        "kafka",
        "kafka_e2e.py",
        ["--rounds", "3", "--seconds", "8"],
        ["--rounds", "1", "--seconds", "3"],
        "End to end into Kafka",
    ),
    Benchmark(
        "sessions",
        "sessions.py",
        ["--counts", "1000,5000,10000"],
        ["--counts", "500"],
        "Concurrent idle sessions",
    ),
    Benchmark(
        "stacks",
        "run_stacks.py",
        [],
        ["--rounds", "1", "--duration", "2"],
        "HTTP server and JSON stack",
    ),
]
OPTIONAL = {"sessions", "stacks"}


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def run(benchmark: Benchmark, out: Path, quick: bool) -> tuple[bool, str]:
    """Run one script; return whether it succeeded and the summary section for it."""
    figures = out / f"{benchmark.name}.json"
    args = benchmark.quick_args if quick else benchmark.args
    command = [sys.executable, str(HERE / benchmark.script), *args, "--json", str(figures)]
    before = load_average()
    started = time.monotonic()
    print(f"running {benchmark.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    with (out / f"{benchmark.name}.log").open("w") as log:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    seconds = time.monotonic() - started
    (out / f"{benchmark.name}.md").write_text(result.stdout)
    ok = result.returncode == 0
    status = "done"
    if not ok:
        status = f"FAILED with exit code {result.returncode}, see {benchmark.name}.log"
    section = (
        f"## {benchmark.title}\n\n"
        f"`{' '.join(['.venv/bin/python', f'bench/{benchmark.script}', *args])}`: {status}, "
        f"{seconds:.0f} s, 1-minute load average {before} before and {load_average()} after.\n\n"
        f"{result.stdout.strip()}\n"
    )
    print(f"{benchmark.name}: {status} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return ok, section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench-results" / time.strftime("%Y%m%d-%H%M%S"),
        help="folder for the reports and figures (default bench-results/<date-time>)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated benchmarks to run, out of "
        + ", ".join(b.name for b in BENCHMARKS)
        + " (default: all but sessions and stacks)",
    )
    parser.add_argument("--with-sessions", action="store_true", help="also run sessions")
    parser.add_argument("--with-stacks", action="store_true", help="also run stacks")
    parser.add_argument(
        "--quick", action="store_true", help="one short round each, to check that all run"
    )
    args = parser.parse_args()

    names = {b.name for b in BENCHMARKS}
    if args.only:
        selected = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(selected) - names)
        if unknown:
            parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {sorted(names)}")
    else:
        selected = [b.name for b in BENCHMARKS if b.name not in OPTIONAL]
        selected += ["sessions"] if args.with_sessions else []
        selected += ["stacks"] if args.with_stacks else []
    for tool in ("wrk", "taskset", "java", "mvn"):
        if shutil.which(tool) is None:
            print(
                f"{tool} not found: apt-get install -y wrk util-linux openjdk-17-jdk-headless "
                "maven",
                file=sys.stderr,
            )
            return 2

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "# Benchmark run\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n"
        f"- machine: nproc {os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}\n"
        f"- commit: {git_commit()}\n"
        f"- mode: {'quick' if args.quick else 'full'}\n\n"
    )
    sections: list[str] = []
    failed: list[str] = []
    for benchmark in BENCHMARKS:
        if benchmark.name not in selected:
            continue
        ok, section = run(benchmark, out, args.quick)
        sections.append(section)
        if not ok:
            failed.append(benchmark.name)
        (out / "summary.md").write_text(header + "\n".join(sections))
    print(f"reports in {out}/summary.md", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
