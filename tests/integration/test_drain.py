"""SIGTERM drains what the router accepted, or logs every event it could not deliver.

The only sink is a `file` sink on a FIFO that the test reads at 50 lines per
second, so a backlog of 1,000 events takes about 20 seconds to deliver.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RouterProcess, route_doc, router_doc, sink_doc, write_documents
from tests.integration.slow_reader import SlowFifoReader

EVENT_COUNT = 1000
READ_RATE = 50.0
# Time from SIGTERM to exit that goes beyond the grace period: closing the
# ingestion listener before the drain starts, and stopping the admin server
# and the interpreter after it.
EXIT_MARGIN = 1.5

StartSlowRouter = Callable[[float], tuple[RouterProcess, SlowFifoReader]]


@pytest.fixture
def slow_router(router_factory, tmp_path: Path) -> Iterator[StartSlowRouter]:
    """Start a router whose only sink is a FIFO read at READ_RATE lines per second."""
    readers: list[SlowFifoReader] = []
    routers: list[RouterProcess] = []

    def start(grace_period: float) -> tuple[RouterProcess, SlowFifoReader]:
        reader = SlowFifoReader(tmp_path / f"slow-{len(readers)}.fifo", READ_RATE)
        readers.append(reader)
        config = write_documents(
            tmp_path / f"router-{len(readers)}.yaml",
            [
                router_doc(),
                sink_doc("slow", file={"path": str(reader.path)}),
                route_doc("all", ["slow"]),
            ],
        )
        router = router_factory([config], args=["--grace-period", str(grace_period)])
        routers.append(router)
        return router, reader

    yield start
    # Stop the routers while the readers still read, so no write blocks forever.
    for router in routers:
        router.terminate(10)
    for reader in readers:
        reader.stop()


def post_events(router: RouterProcess, seqs: range) -> None:
    """Post one event per seq, one request each, and require 200 for every one."""
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for seq in seqs:
            reply = client.post(
                "/v2/event", json={"name": "drain", "properties": {"seq": str(seq)}}
            )
            assert reply.status_code == 200, f"seq {seq}: {reply.status_code} {reply.text}"


def stop_and_time(router: RouterProcess, timeout: float = 90.0) -> tuple[int, float]:
    """Send SIGTERM; return the exit status and the seconds until the process exited."""
    started = time.monotonic()
    router.process.send_signal(signal.SIGTERM)
    try:
        status = router.process.wait(timeout)
    except subprocess.TimeoutExpired:
        router.process.kill()
        router.process.wait()
        pytest.fail(f"router did not exit within {timeout}s of SIGTERM")
    return status, time.monotonic() - started


def undelivered_ids(logs: list[dict[str, Any]]) -> list[str]:
    """Return the ids of every error log line's `event_ids`, in log order."""
    ids: list[str] = []
    for line in logs:
        if line.get("level") == "error":
            ids.extend(line.get("event_ids", []))
    return ids


def test_drain_delivers_every_accepted_event(slow_router: StartSlowRouter) -> None:
    grace_period = 30.0
    router, reader = slow_router(grace_period)
    post_events(router, range(EVENT_COUNT))
    assert router.metric("eventrouter_events_received_total", transport="http") == EVENT_COUNT
    backlog = EVENT_COUNT - len(reader)
    assert backlog / READ_RATE < grace_period - 5, "the backlog must fit in the grace period"
    assert backlog / READ_RATE > 10, "the drain must take long enough to be a test"

    status, elapsed = stop_and_time(router)
    lines = reader.finish()

    assert status == 0
    assert elapsed <= grace_period, f"exited {elapsed:.1f}s after SIGTERM"
    assert reader.malformed == []
    seqs = [int(line["properties"]["seq"]) for line in lines]
    assert sorted(seqs) == list(range(EVENT_COUNT)), "every seq exactly once"
    assert len({line["id"] for line in lines}) == EVENT_COUNT
    logs = router.logs()
    assert undelivered_ids(logs) == []
    messages = [line["message"] for line in logs]
    assert any(m.startswith("router stopped; every accepted event was delivered") for m in messages)


def test_drain_logs_undelivered_after_grace(slow_router: StartSlowRouter) -> None:
    grace_period = 2.0
    router, reader = slow_router(grace_period)
    post_events(router, range(EVENT_COUNT))

    status, elapsed = stop_and_time(router)
    lines = reader.finish()
    logs = router.logs()

    assert reader.malformed == []
    delivered = {line["id"]: int(line["properties"]["seq"]) for line in lines}
    assert len(delivered) == len(lines), "an event was delivered twice"
    logged = undelivered_ids(logs)
    assert len(set(logged)) == len(logged), "an id was logged twice"
    assert logged, "no event was logged as not delivered, so the grace period was long enough"
    both = sorted(set(logged) & delivered.keys())
    assert both == [], (
        f"{len(both)} events were delivered and also logged as not delivered, "
        f"seqs {sorted(delivered[i] for i in both)[:20]}..."
    )
    assert len(delivered) + len(logged) == EVENT_COUNT

    # Ids are ULIDs that one router makes in order, and the events were sent
    # one after another, so sorting every id puts each at the index of its seq.
    # That recovers the seq of each logged id.
    rank = {event_id: index for index, event_id in enumerate(sorted([*delivered, *logged]))}
    assert all(rank[event_id] == seq for event_id, seq in delivered.items())
    logged_seqs = {rank[event_id] for event_id in logged}
    assert logged_seqs == set(range(EVENT_COUNT)) - set(delivered.values())

    summary = f"router stopped; {len(logged)} deliveries were not made at shutdown"
    assert any(line["message"].startswith(summary) for line in logs)
    assert status == 0
    assert elapsed <= grace_period + EXIT_MARGIN, f"exited {elapsed:.1f}s after SIGTERM"


def test_sigterm_stops_accepting(slow_router: StartSlowRouter) -> None:
    router, reader = slow_router(30.0)
    # A backlog of a few seconds keeps the router draining while new requests arrive.
    post_events(router, range(200))

    results: list[tuple[int, float, int | str]] = []
    stop_sending = threading.Event()

    def send_continuously() -> None:
        seq = 200
        with httpx.Client(base_url=router.url, timeout=5) as client:
            while not stop_sending.is_set():
                sent_at = time.monotonic()
                body = {"name": "drain", "properties": {"seq": str(seq)}}
                try:
                    outcome: int | str = client.post("/v2/event", json=body).status_code
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                results.append((seq, sent_at, outcome))
                seq += 1
                time.sleep(0.002)

    sender = threading.Thread(target=send_continuously)
    sender.start()
    try:
        time.sleep(0.5)
        router.process.send_signal(signal.SIGTERM)
        draining_since = None
        deadline = time.monotonic() + 10
        while draining_since is None and time.monotonic() < deadline:
            reply = httpx.get(f"{router.admin_url}/readyz", timeout=5)
            if reply.status_code == 503 and reply.json()["status"] == "draining":
                draining_since = time.monotonic()
            time.sleep(0.01)
        assert draining_since is not None, "/readyz never reported draining"
        time.sleep(1.0)
    finally:
        stop_sending.set()
        sender.join()
    assert router.process.poll() is None, "the drain should still be running"

    status = router.process.wait(60)
    lines = reader.finish()

    after = [(seq, outcome) for seq, sent_at, outcome in results if sent_at >= draining_since]
    assert len(after) >= 10, "too few requests were sent while draining"
    accepted_after = [seq for seq, outcome in after if outcome == 200]
    assert accepted_after == [], "requests sent while draining got 200"
    statuses_after = {outcome for _, outcome in after if isinstance(outcome, int)}
    assert statuses_after <= {503}
    errors_after = {outcome for _, outcome in after if isinstance(outcome, str)}
    assert errors_after <= {"ConnectError", "RemoteProtocolError", "ReadError"}

    # Every event that got 200, also just before SIGTERM, is delivered.
    accepted = set(range(200)) | {seq for seq, _, outcome in results if outcome == 200}
    delivered = sorted(int(line["properties"]["seq"]) for line in lines)
    assert delivered == sorted(accepted)
    assert status == 0
