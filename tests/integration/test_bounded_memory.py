"""Resident memory stays bounded while input outruns a blocked sink.

A router with the default ring buffer of 65,536 events and eight workers routes
every event to one file sink that writes to a FIFO with no reader. Four client
threads send 1,000,000 events in batches of 500 as fast as they can. The test
samples the router's RSS throughout and checks that it levels off below a bound
derived from the queue sizes, that the overflow policy counts every event it
sheds, and that the router delivers what it holds once the sink is released.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import RouterProcess, route_doc, router_doc, sink_doc, write_documents
from tests.integration.faults import BlockedFifo

TOTAL_EVENTS = 1_000_000
BATCH_EVENTS = 500  # the default spec.limits.maxBatchEvents
BATCHES = TOTAL_EVENTS // BATCH_EVENTS
CLIENT_THREADS = 4

BUFFER_SIZE = 65_536
WORKERS = 8
SINK_QUEUE_SIZE = 16_384
SINK_BATCH_SIZE = 1_024
SINK = "file"

# Under `reject` each worker can hold one batch it took from the ring buffer
# while it waits for room in the sink queue. The engine takes up to 256 events
# at a time.
WORKER_BATCH = 256
MAX_HELD_EVENTS = BUFFER_SIZE + SINK_QUEUE_SIZE + SINK_BATCH_SIZE + WORKERS * WORKER_BATCH

MIB = 1 << 20
# Memory budget per held event, with headroom over the measured cost. On x86-64
# Linux with CPython 3.11, an event of this shape (envelope struct, ULID, name,
# a dict of five properties and its ten strings) took about 990 bytes under
# tracemalloc and added about 1.1 KiB of RSS in this test.
BYTES_PER_HELD_EVENT = 1536
# Request bodies, decoded batches and allocator slack while requests are served.
REQUEST_SLACK = 16 * MIB
RSS_BOUND_ABOVE_BASE = MAX_HELD_EVENTS * BYTES_PER_HELD_EVENT + REQUEST_SLACK
# Growth allowed over the second half of the send, for allocator noise.
LATE_GROWTH_FLOOR = 4 * MIB

SAMPLE_SECONDS = 0.02
RESPONSIVE_SECONDS = 1.0
# Slowest reply allowed during the flood, measured by the client. The four client
# threads and the router share two cores, so this includes time spent waiting
# for the CPU.
MAX_REPLY_SECONDS = 2.0


def _batch_body(index: int) -> bytes:
    """Encode batch `index`: events with `seq` from index * 500, about 150 bytes each."""
    first = index * BATCH_EVENTS
    events = b",".join(
        b'{"name":"item_purchased","properties":{"seq":"%d","item":"sword_of_testing",'
        b'"price":"499","currency":"gems","level":"17"}}' % seq
        for seq in range(first, first + BATCH_EVENTS)
    )
    return b'{"events":[' + events + b"]}"


@dataclass
class BatchResult:
    """One request of the flood: when it was sent, when its reply arrived, and the reply."""

    index: int
    sent_at: float
    replied_at: float
    status: int
    accepted: int = 0
    dropped: int = 0
    retry_after: str | None = None


@dataclass
class Flood:
    """Sends batches from several threads and counts the events sent so far."""

    url: str
    next_index: Iterator[int]
    results: list[BatchResult] = field(default_factory=list)
    sent_events: list[int] = field(default_factory=lambda: [0] * CLIENT_THREADS)
    errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> float:
        """Send every remaining batch; return the elapsed seconds."""
        threads = [
            threading.Thread(target=self._send_all, args=(slot,), name=f"flood-{slot}")
            for slot in range(CLIENT_THREADS)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.monotonic() - started

    def _send_all(self, slot: int) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                while True:
                    with self._lock:
                        index = next(self.next_index)
                    if index >= BATCHES:
                        return
                    result = self._send(client, index)
                    with self._lock:
                        self.results.append(result)
                    self.sent_events[slot] += BATCH_EVENTS
        except BaseException as exc:
            self.errors.append(exc)

    @staticmethod
    def _send(client: httpx.Client, index: int) -> BatchResult:
        body = _batch_body(index)
        sent_at = time.monotonic()
        reply = client.post(
            "/v2/events", content=body, headers={"content-type": "application/json"}
        )
        result = BatchResult(index, sent_at, time.monotonic(), reply.status_code)
        if reply.status_code == 200:
            payload = reply.json()
            result.accepted = payload["accepted"]
            result.dropped = payload.get("dropped", 0)
        result.retry_after = reply.headers.get("retry-after")
        return result

    def events_sent(self) -> int:
        return sum(self.sent_events)


class RssSampler:
    """Samples a process's resident memory, paired with the events sent so far."""

    def __init__(self, pid: int, events_sent: Callable[[], int]) -> None:
        self._process = psutil.Process(pid)
        self._events_sent = events_sent
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self._events_sent(), self.rss()))
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at_events(self, count: int) -> int:
        """Return the first RSS sampled once `count` events were sent."""
        return next(rss for sent, rss in self.samples if sent >= count)

    def peak(self) -> int:
        return max(rss for _, rss in self.samples)


@pytest.fixture
def blocked_router(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> Iterator[Callable[[str], tuple[RouterProcess, BlockedFifo]]]:
    """Start a router with default-sized queues whose only sink is a FIFO without a reader."""
    started: list[tuple[RouterProcess, BlockedFifo]] = []

    def start(policy: str) -> tuple[RouterProcess, BlockedFifo]:
        fifo = BlockedFifo(tmp_path / "events.fifo")
        config = write_documents(
            tmp_path / "router.yaml",
            [
                router_doc(queue={"size": BUFFER_SIZE, "workers": WORKERS, "overflow": policy}),
                sink_doc(
                    SINK,
                    file={"path": str(fifo.path)},
                    queueSize=SINK_QUEUE_SIZE,
                    batchSize=SINK_BATCH_SIZE,
                ),
                route_doc("all", [SINK]),
            ],
        )
        router = router_factory([config], args=["--grace-period", "10"])
        started.append((router, fifo))
        return router, fifo

    yield start
    for router, fifo in started:
        fifo.release()
        router.terminate(30)
        fifo.close()


def _sink_metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    return _metric(metrics, name, sink=SINK, **labels)


def _metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Read one sample from a scrape; labels in any order, missing samples are 0."""
    expected_labels = {f'{key}="{value}"' for key, value in labels.items()}
    for key, value in metrics.items():
        metric, _, rest = key.partition("{")
        found = set(rest.rstrip("}").split(",")) if rest else set()
        if metric == name and found == expected_labels:
            return value
    return 0.0


def _assert_accounting(metrics: dict[str, float]) -> None:
    """Check, on one scrape, that every received event is in exactly one place."""
    received = _metric(metrics, "eventrouter_events_received_total", transport="http")
    rejected = _metric(metrics, "eventrouter_events_rejected_total", reason="overloaded")
    buffer_dropped = _metric(metrics, "eventrouter_buffer_dropped_total", reason="buffer_full")
    buffered = _metric(metrics, "eventrouter_buffer_depth")
    matched = _sink_metric(metrics, "eventrouter_sink_events_total", outcome="matched")
    delivered = _sink_metric(metrics, "eventrouter_sink_events_total", outcome="delivered")
    sink_dropped = _sink_metric(metrics, "eventrouter_sink_events_total", outcome="dropped")
    in_flight = _sink_metric(metrics, "eventrouter_sink_in_flight")
    assert received == rejected + buffer_dropped + buffered + matched
    assert matched == delivered + sink_dropped + in_flight


def _send_first_batch(router: RouterProcess) -> None:
    """Send batch 0 alone and wait until the sink's writer thread is blocked on it."""
    reply = httpx.post(
        f"{router.url}/v2/events",
        content=_batch_body(0),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert reply.status_code == 200
    router.wait_for(
        lambda: (
            router.metric("eventrouter_sink_in_flight", sink=SINK) == BATCH_EVENTS
            and router.metric("eventrouter_sink_queue_depth", sink=SINK) == 0
        ),
        timeout=10,
        what="batch 0 in flight in the blocked writer",
    )


def _assert_responsive(router: RouterProcess) -> None:
    """Check that the admin endpoints respond quickly while the sink is blocked."""
    for path, expected in (("/healthz", 200), ("/readyz", 200), ("/metrics", 200)):
        started = time.monotonic()
        reply = httpx.get(f"{router.admin_url}{path}", timeout=10)
        elapsed = time.monotonic() - started
        assert reply.status_code == expected, f"{path}: {reply.status_code}"
        assert elapsed < RESPONSIVE_SECONDS, f"{path} took {elapsed:.2f}s"


def _delivered_per_batch(fifo: BlockedFifo) -> tuple[Counter[int], int]:
    """Count delivered events per batch index; also return how many lines were read."""
    seqs = [int(event["properties"]["seq"]) for event in fifo.events()]
    assert len(seqs) == len(set(seqs)), "an event was delivered twice"
    return Counter(seq // BATCH_EVENTS for seq in seqs), len(seqs)


@pytest.mark.parametrize("policy", ["dropNewest", "dropOldest", "reject"])
def test_blocked_sink_memory_bounded(blocked_router, policy: str) -> None:
    router, fifo = blocked_router(policy)
    flood = Flood(router.url, itertools.count(1))
    sampler = RssSampler(router.process.pid, flood.events_sent)
    base_rss = sampler.rss()

    _send_first_batch(router)
    flood.sent_events[0] = BATCH_EVENTS
    with sampler:
        elapsed = flood.run()
        time.sleep(0.5)
    assert flood.errors == []
    assert len(flood.results) == BATCHES - 1

    # Memory levels off: the second half of the send adds little to the first.
    half_rss = sampler.at_events(TOTAL_EVENTS // 2)
    end_rss = sampler.rss()
    first_half_growth = half_rss - base_rss
    second_half_growth = end_rss - half_rss
    figures = (
        f"{policy}: sent {TOTAL_EVENTS} in {elapsed:.1f}s; RSS base {base_rss / MIB:.1f} MiB, "
        f"half {half_rss / MIB:.1f} MiB, end {end_rss / MIB:.1f} MiB, "
        f"peak {sampler.peak() / MIB:.1f} MiB, bound {(base_rss + RSS_BOUND_ABOVE_BASE) / MIB:.1f}"
        " MiB"
    )
    print(figures)
    assert second_half_growth <= max(LATE_GROWTH_FLOOR, first_half_growth / 4), figures
    assert sampler.peak() <= base_rss + RSS_BOUND_ABOVE_BASE, figures

    # Every event sent is accounted for, and the replies agree with the counters.
    statuses = Counter(result.status for result in flood.results)
    assert set(statuses) <= {200, 503}, statuses
    acknowledged = BATCH_EVENTS + sum(r.accepted for r in flood.results if r.status == 200)
    shed_by_503 = BATCH_EVENTS * statuses[503]
    assert acknowledged + shed_by_503 == TOTAL_EVENTS
    metrics = router.metrics()
    _assert_accounting(metrics)
    assert _metric(metrics, "eventrouter_events_received_total", transport="http") == TOTAL_EVENTS
    assert _metric(metrics, "eventrouter_events_rejected_total", reason="overloaded") == shed_by_503
    buffer_dropped = _metric(metrics, "eventrouter_buffer_dropped_total", reason="buffer_full")
    assert buffer_dropped == sum(result.dropped for result in flood.results)
    sink_dropped = _sink_metric(metrics, "eventrouter_sink_dropped_total", reason="queue_full")
    events_held = _metric(metrics, "eventrouter_buffer_depth") + _sink_metric(
        metrics, "eventrouter_sink_in_flight"
    )
    assert events_held <= MAX_HELD_EVENTS
    assert _sink_metric(metrics, "eventrouter_sink_queue_depth") == SINK_QUEUE_SIZE
    if policy == "reject":
        assert statuses[503] > 0
        assert all(r.retry_after is not None for r in flood.results if r.status == 503)
        assert all(r.retry_after.isdigit() for r in flood.results if r.retry_after)
        assert buffer_dropped == 0
        assert sink_dropped == 0
        assert events_held == acknowledged
        assert events_held >= BUFFER_SIZE - BATCH_EVENTS + SINK_QUEUE_SIZE
    else:
        assert statuses[503] == 0
        assert acknowledged == TOTAL_EVENTS
        assert events_held + buffer_dropped + sink_dropped == TOTAL_EVENTS
        assert events_held >= SINK_QUEUE_SIZE
    slowest_reply = max(r.replied_at - r.sent_at for r in flood.results)
    print(f"{policy}: slowest reply during the flood {slowest_reply * 1000:.0f} ms")
    assert slowest_reply < MAX_REPLY_SECONDS
    _assert_responsive(router)

    # Released, the sink delivers exactly the events the router held, once each.
    fifo.release()
    released_at = time.monotonic()
    router.wait_for(
        lambda: (
            router.metric("eventrouter_sink_events_total", sink=SINK, outcome="delivered")
            == events_held
        ),
        timeout=60,
        what=f"{events_held:.0f} held events delivered",
    )
    drain_seconds = time.monotonic() - released_at
    fifo.wait_for_lines(int(events_held), timeout=30)
    metrics = router.metrics()
    _assert_accounting(metrics)
    assert _metric(metrics, "eventrouter_buffer_depth") == 0
    assert _sink_metric(metrics, "eventrouter_sink_in_flight") == 0
    per_batch, lines = _delivered_per_batch(fifo)
    assert lines == events_held
    print(f"{policy}: {events_held:.0f} events held, delivered in {drain_seconds:.1f}s")

    # Which events survived: batch 0 was in flight, so it is always delivered.
    assert per_batch[0] == BATCH_EVENTS
    by_index = {result.index: result for result in flood.results}
    kept_batches = [by_index[i] for i in per_batch if i != 0]
    lost_batches = [r for r in flood.results if r.index not in per_batch]
    partial = [i for i, count in per_batch.items() if count != BATCH_EVENTS]
    if policy == "reject":
        # Exactly the acknowledged batches, each whole.
        assert partial == []
        assert sorted(r.index for r in kept_batches) == sorted(
            r.index for r in flood.results if r.status == 200
        )
    elif policy == "dropNewest":
        # The earliest events survive: no kept batch was sent after a lost one
        # got its reply, and only the last kept batch may be cut.
        assert len(partial) <= 1
        assert max(r.sent_at for r in kept_batches) <= min(r.replied_at for r in lost_batches)
    else:
        # The newest events survive: no lost batch was sent after a kept one got
        # its reply, and only the oldest kept batch may be cut.
        assert len(partial) <= 1
        assert max(r.sent_at for r in lost_batches) <= min(r.replied_at for r in kept_batches)

    # The router takes and delivers new events again.
    reply = httpx.post(
        f"{router.url}/v2/event",
        json={"name": "after_release", "properties": {"seq": str(TOTAL_EVENTS)}},
        timeout=10,
    )
    assert reply.status_code == 200
    fifo.wait_for_lines(int(events_held) + 1, timeout=10)
    assert fifo.events()[-1]["name"] == "after_release"
