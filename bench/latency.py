"""Acknowledgement latency of the router at half its maximum throughput, against the floor.

1. Maximum throughput: wrk (1 thread, 64 connections) drives the router as
   hard as it can, for single events (`POST /v2/event`) and for batches of 50
   (`POST /v2/events`), as bench/ingest.py does.
2. Latency: the open-loop generator of bench/openloop.py sends at a fixed
   fraction (default 0.5) of each maximum and records the time from each
   request's due time to its complete response. The floor server
   (bench/stacks/floor_asgi.py) gets the same absolute rate in the same run.
   Router and floor alternate over the rounds, and the percentiles are taken
   over the pooled requests of all rounds.

Each server runs pinned to CPU 0; wrk and the generator (this process) run on
CPU 1. The router has one catch-all route to a blackhole sink, no auth on
loopback and tracing off.

    .venv/bin/python bench/latency.py [--rounds 2] [--seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import CONFIG
from openloop import OpenLoopGenerator, RunStats, percentile
from payloads import BATCH_SIZE, batch_body, single_event_body
from router_harness import (
    LOAD_CPU,
    SERVER_CPU,
    BenchmarkError,
    CpuWatch,
    ServerProcess,
    exit_on_sigterm,
    load_average,
    machine_info,
    pin_to_load_cpu,
    print_machine,
    require_tools,
    run_wrk,
    running,
    start_floor,
    start_router,
)

TARGET_P99_MS = 5.0
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
PACKAGES = ("uvicorn", "uvloop", "httptools", "msgspec")


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    path: str
    body: bytes
    events_per_request: int


WORKLOADS = (
    Workload("single", "single events", "/v2/event", single_event_body(), 1),
    Workload("batch", f"batches of {BATCH_SIZE}", "/v2/events", batch_body(), BATCH_SIZE),
)


def find_max_rates(workdir: Path, config: Path, seconds: float) -> dict[str, float]:
    """Measure the requests/s that wrk reaches against the router, per workload."""
    rates = {}
    with running(start_router(config, workdir)) as router:
        router.wait_ready(single_event_body())
        for workload in WORKLOADS:
            body_file = workdir / f"{workload.key}.json"
            run_wrk(router.port, workload.path, body_file, 1)
            result = run_wrk(router.port, workload.path, body_file, seconds)
            rates[workload.key] = result.requests_per_s
            print(
                f"max {workload.key}: {result.requests_per_s:,.0f} requests/s "
                f"({result.requests_per_s * workload.events_per_request:,.0f} events/s)",
                file=sys.stderr,
            )
    return rates


def summarize(latencies: list[float]) -> dict[str, float]:
    """Return the percentiles of `latencies` (seconds) in milliseconds."""
    ordered = sorted(latencies)
    return {name: percentile(ordered, fraction) * 1000 for name, fraction in PERCENTILES}


def measure_server(
    server: ServerProcess,
    rates: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, dict[str, object]]:
    """Run the generator against one started server for each workload."""
    server.wait_ready(single_event_body())
    results: dict[str, dict[str, object]] = {}
    for workload in WORKLOADS:
        generator = OpenLoopGenerator(server.port, workload.path, workload.body, args.connections)
        server_cpu = CpuWatch(SERVER_CPU, [server.pid])
        load_cpu = CpuWatch(LOAD_CPU, [os.getpid()])
        stats: RunStats = uvloop.run(generator.run(rates[workload.key], args.warmup, args.seconds))
        on_server_cpu = server_cpu.finish()
        on_load_cpu = load_cpu.finish()
        bad = {status: n for status, n in stats.statuses.items() if status != 200}
        if bad or stats.missing:
            raise BenchmarkError(
                f"{server.name} {workload.key}: non-200 responses {bad}, "
                f"{stats.missing} responses missing\n{server.log_tail()}"
            )
        results[workload.key] = {
            "latencies": stats.latencies,
            "lateness_p99_ms": percentile(sorted(stats.lateness), 0.99) * 1000,
            "max_backlog": stats.max_backlog,
            "requests": len(stats.latencies),
            "server_cpu": on_server_cpu["own"],
            "other_cpu0": on_server_cpu["other"],
            "generator_cpu": on_load_cpu["own"],
            "other_cpu1": on_load_cpu["other"],
        }
    return results


def run_rounds(
    workdir: Path, config: Path, rates: dict[str, float], args: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, object]]]]:
    """Alternate router and floor over the rounds; return the runs per server and workload."""
    runs: dict[str, dict[str, list[dict[str, object]]]] = {
        kind: {w.key: [] for w in WORKLOADS} for kind in ("router", "floor")
    }
    for round_number in range(args.rounds):
        order = ("router", "floor") if round_number % 2 == 0 else ("floor", "router")
        for kind in order:
            server = start_router(config, workdir) if kind == "router" else start_floor(workdir)
            with running(server):
                results = measure_server(server, rates, args)
            for key, result in results.items():
                runs[kind][key].append(result)
                figures = summarize(result["latencies"])  # type: ignore[arg-type]
                print(
                    f"round {round_number + 1} {kind} {key}: p50 {figures['p50']:.2f} ms, "
                    f"p99 {figures['p99']:.2f} ms, max {figures['max']:.2f} ms, "
                    f"generator lateness p99 {result['lateness_p99_ms']:.2f} ms, "
                    f"backlog max {result['max_backlog']}, "
                    f"server CPU {result['server_cpu']:.0%}, "
                    f"other load CPU 0 {result['other_cpu0']:.0%}, "
                    f"CPU 1 {result['other_cpu1']:.0%}",
                    file=sys.stderr,
                )
    return runs


def report(
    rates: dict[str, float],
    runs: dict[str, dict[str, list[dict[str, object]]]],
    args: argparse.Namespace,
) -> dict[str, object]:
    """Print the markdown tables and return the figures for --json."""
    print(
        "| workload | rate, requests/s (events/s) | server | p50 | p90 | p99 | p99.9 | max "
        "| requests | server CPU | generator lateness p99 | other load CPU 0 / CPU 1, max |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary: dict[str, object] = {}
    for workload in WORKLOADS:
        rate = rates[workload.key] * args.fraction
        per_server = {}
        for kind in ("router", "floor"):
            pooled = [x for run in runs[kind][workload.key] for x in run["latencies"]]  # type: ignore[attr-defined]
            figures = summarize(pooled)
            items = runs[kind][workload.key]
            lag = max(run["lateness_p99_ms"] for run in items)  # type: ignore[type-var]
            other0 = max(run["other_cpu0"] for run in items)  # type: ignore[type-var]
            other1 = max(run["other_cpu1"] for run in items)  # type: ignore[type-var]
            server_cpu = statistics.median(run["server_cpu"] for run in items)  # type: ignore[type-var]
            per_server[kind] = {"ms": figures, "requests": len(pooled)}
            cells = " | ".join(f"{figures[name]:.2f} ms" for name, _ in PERCENTILES)
            print(
                f"| {workload.label} | {rate:,.0f} ({rate * workload.events_per_request:,.0f}) "
                f"| {kind} | {cells} | {len(pooled):,} | {server_cpu:.0%} | {lag:.2f} ms "
                f"| {other0:.0%} / {other1:.0%} |"
            )
        ratio = per_server["router"]["ms"]["p99"] / per_server["floor"]["ms"]["p99"]
        per_server["router_p99_over_floor_p99"] = ratio  # type: ignore[assignment]
        summary[workload.key] = {"rate": rate, "max_rate": rates[workload.key], **per_server}
    print()
    print("| workload | router p99 / floor p99 | target p99 | router p99 | result |")
    print("|---|---:|---:|---:|---|")
    for workload in WORKLOADS:
        entry = summary[workload.key]
        assert isinstance(entry, dict)
        p99 = entry["router"]["ms"]["p99"]
        margin = TARGET_P99_MS - p99
        result = (
            f"met, {margin:.2f} ms under"
            if margin >= 0
            else f"missed by {-margin:.2f} ms ({p99 / TARGET_P99_MS:.1f}x the target)"
        )
        print(
            f"| {workload.label} | {entry['router_p99_over_floor_p99']:.2f} | "
            f"< {TARGET_P99_MS:g} ms | {p99:.2f} ms | {result} |"
        )
    return summary


def run_figures(run: dict[str, object]) -> dict[str, object]:
    """Build one run's figures for --json, with percentiles in place of the raw latencies."""
    figures = {key: value for key, value in run.items() if key != "latencies"}
    figures["ms"] = summarize(run["latencies"])  # type: ignore[arg-type]
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per latency run"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=5.0, help="seconds of each wrk maximum-rate run"
    )
    parser.add_argument(
        "--fraction", type=float, default=0.5, help="share of the maximum rate to send"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections of the generator"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or not 0 < args.fraction <= 1:
        parser.error("--rounds must be at least 1, --seconds above 0, --fraction in (0, 1]")
    return args


def main() -> int:
    args = parse_args()
    try:
        require_tools("wrk", "taskset")
        exit_on_sigterm()
        pin_to_load_cpu()
        load_before = load_average()
        info = machine_info(PACKAGES)
        with tempfile.TemporaryDirectory() as folder:
            workdir = Path(folder)
            for workload in WORKLOADS:
                (workdir / f"{workload.key}.json").write_bytes(workload.body)
            config = workdir / "router.yaml"
            config.write_text(CONFIG)
            rates = find_max_rates(workdir, config, args.max_seconds)
            target = {key: rate * args.fraction for key, rate in rates.items()}
            runs = run_rounds(workdir, config, target, args)
    except (BenchmarkError, RuntimeError, OSError) as exc:
        print(f"latency benchmark failed: {exc}", file=sys.stderr)
        return 1
    load_after = load_average()
    print_machine(info, load_before, load_after)
    print(
        f"{args.rounds} rounds; {args.warmup:g} s warm-up and {args.seconds:g} s measured per "
        f"run; {args.connections} connections; rate {args.fraction:g} x the router's maximum"
    )
    print()
    summary = report(rates, runs, args)
    if args.json:
        raw = {
            kind: {key: [run_figures(run) for run in items] for key, items in per_kind.items()}
            for kind, per_kind in runs.items()
        }
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "load_average": [load_before, load_after],
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "summary": summary,
                    "runs": raw,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
