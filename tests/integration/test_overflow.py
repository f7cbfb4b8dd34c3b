"""Overflow policies of the ring buffer and a sink queue, with exact accounting.

Each test runs a router with a ring buffer of 100 events, one worker, and one
file sink with a queue of 50 events and batches of 10. The sink writes to a FIFO
with no reader, so its first batch blocks in the writer thread. The test then
sends events with a unique `seq` property, singly and in batches, releases the
sink, and checks which events arrived against what the policy promises. Every
event sent must be delivered, dropped by a counter, or rejected with 503.

The router is left idle between steps (ring buffer empty, or the one worker
known to be waiting), so that the expected numbers do not depend on timing.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RouterProcess, route_doc, router_doc, sink_doc, write_documents
from tests.integration.faults import BlockedFifo

BUFFER_SIZE = 100
SINK_QUEUE_SIZE = 50
SINK_BATCH_SIZE = 10
SINK = "file"


@dataclass
class Ledger:
    """Events sent and what the router replied about them."""

    client: httpx.Client
    next_seq: int = 0
    sent: list[int] = field(default_factory=list)
    shed_by_503: list[int] = field(default_factory=list)
    acknowledged: list[int] = field(default_factory=list)
    dropped_by_replies: int = 0

    def _take(self, count: int) -> list[int]:
        seqs = list(range(self.next_seq, self.next_seq + count))
        self.next_seq += count
        self.sent.extend(seqs)
        return seqs

    def _record(self, reply: httpx.Response, seqs: list[int]) -> httpx.Response:
        if reply.status_code == 503:
            self.shed_by_503.extend(seqs)
        elif reply.is_success:
            self.acknowledged.extend(seqs)
        else:
            pytest.fail(f"unexpected reply {reply.status_code}: {reply.text}")
        return reply

    def send_one(self) -> httpx.Response:
        (seq,) = self._take(1)
        reply = self.client.post("/v2/event", json=_event(seq))
        return self._record(reply, [seq])

    def send_singles(self, count: int) -> list[httpx.Response]:
        return [self.send_one() for _ in range(count)]

    def send_batch(self, count: int) -> httpx.Response:
        seqs = self._take(count)
        reply = self.client.post("/v2/events", json={"events": [_event(s) for s in seqs]})
        self._record(reply, seqs)
        if reply.is_success:
            self.dropped_by_replies += reply.json().get("dropped", 0)
        return reply


def _event(seq: int) -> dict[str, Any]:
    return {"name": "overflow", "properties": {"seq": str(seq)}}


@pytest.fixture
def blocked_router(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> Iterator[Callable[[str], tuple[RouterProcess, BlockedFifo, Ledger]]]:
    """Start a router whose only sink is held back by a FIFO without a reader."""
    started: list[tuple[RouterProcess, BlockedFifo, httpx.Client]] = []

    def start(policy: str, **queue: Any) -> tuple[RouterProcess, BlockedFifo, Ledger]:
        fifo = BlockedFifo(tmp_path / "events.fifo")
        whole = policy in ("reject", "block")
        config = write_documents(
            tmp_path / "router.yaml",
            [
                router_doc(
                    queue={"size": BUFFER_SIZE, "workers": 1, "overflow": policy, **queue},
                    # A batch may be larger than the buffer under the drop policies.
                    limits={"maxBatchEvents": BUFFER_SIZE if whole else 500},
                ),
                sink_doc(
                    SINK,
                    file={"path": str(fifo.path)},
                    queueSize=SINK_QUEUE_SIZE,
                    batchSize=SINK_BATCH_SIZE,
                ),
                route_doc("all", [SINK]),
            ],
        )
        router = router_factory([config], args=["--grace-period", "5"])
        client = httpx.Client(base_url=router.url, timeout=10)
        started.append((router, fifo, client))
        return router, fifo, Ledger(client)

    yield start
    for router, fifo, client in started:
        client.close()
        # Released, the sink can finish its write, so the router stops within its grace period.
        fifo.release()
        router.terminate(30)
        fifo.close()


def _sink_metric(router: RouterProcess, name: str, **labels: str) -> float:
    return router.metric(name, sink=SINK, **labels)


def _wait_first_batch_in_flight(router: RouterProcess) -> None:
    """Wait until the sink took one full batch and its writer thread is blocked on it."""
    router.wait_for(
        lambda: (
            _sink_metric(router, "eventrouter_sink_in_flight") == SINK_BATCH_SIZE
            and _sink_metric(router, "eventrouter_sink_queue_depth") == 0
        ),
        timeout=10,
        what=f"a batch of {SINK_BATCH_SIZE} in flight and an empty sink queue",
    )


def _assert_sink_accounting(router: RouterProcess) -> None:
    """Check that every event matched for the sink is finished or counted as in flight."""
    outcomes = {
        outcome: _sink_metric(router, "eventrouter_sink_events_total", outcome=outcome)
        for outcome in ("matched", "delivered", "dead_lettered", "dropped")
    }
    in_flight = _sink_metric(router, "eventrouter_sink_in_flight")
    finished = outcomes["delivered"] + outcomes["dead_lettered"] + outcomes["dropped"]
    assert outcomes["matched"] == finished + in_flight, f"{outcomes}, in flight {in_flight}"


def _wait_buffer_empty(router: RouterProcess) -> None:
    router.wait_for(
        lambda: router.metric("eventrouter_buffer_depth") == 0,
        timeout=10,
        what="an empty ring buffer",
    )


def _release_and_read(router: RouterProcess, fifo: BlockedFifo, expected: int) -> list[int]:
    """Release the sink, wait for `expected` deliveries, return the `seq` of each line."""
    fifo.release()
    router.wait_for(
        lambda: (
            _sink_metric(router, "eventrouter_sink_events_total", outcome="delivered") >= expected
            and _sink_metric(router, "eventrouter_sink_in_flight") == 0
        ),
        timeout=30,
        what=f"{expected} events delivered and nothing left in the sink",
    )
    fifo.wait_for_lines(expected, timeout=10)
    assert router.metric("eventrouter_buffer_depth") == 0
    _assert_sink_accounting(router)
    return [int(event["properties"]["seq"]) for event in fifo.events()]


def _assert_counters(
    router: RouterProcess,
    ledger: Ledger,
    *,
    delivered: int,
    buffer_dropped: int,
    sink_dropped: int,
    rejected: int,
) -> None:
    """Check the counters against the expected figures and the figures against each other."""
    sent = len(ledger.sent)
    assert delivered + buffer_dropped + sink_dropped + rejected == sent
    assert router.metric("eventrouter_events_received_total", transport="http") == sent
    assert router.metric("eventrouter_buffer_dropped_total", reason="buffer_full") == buffer_dropped
    assert buffer_dropped == ledger.dropped_by_replies
    assert router.metric("eventrouter_events_rejected_total", reason="overloaded") == rejected
    assert rejected == len(ledger.shed_by_503)
    matched = sent - rejected - buffer_dropped
    assert _sink_metric(router, "eventrouter_sink_events_total", outcome="matched") == matched
    assert _sink_metric(router, "eventrouter_sink_events_total", outcome="delivered") == delivered
    assert _sink_metric(router, "eventrouter_sink_events_total", outcome="dropped") == sink_dropped
    assert (
        _sink_metric(router, "eventrouter_sink_dropped_total", reason="queue_full") == sink_dropped
    )
    assert _sink_metric(router, "eventrouter_sink_events_total", outcome="dead_lettered") == 0
    assert router.metric("eventrouter_events_unmatched_total") == 0


def _send_drop_scenario(router: RouterProcess, ledger: Ledger) -> None:
    """Send 405 events in five steps; see the expectations in each drop test."""
    # Step 1, seq 0-9: the sink takes them as one batch and blocks writing it.
    assert ledger.send_batch(SINK_BATCH_SIZE).json() == {
        "accepted": 10,
        "rejected": 0,
        "errors": [],
    }
    _wait_first_batch_in_flight(router)

    # Step 2, seq 10-69: singles that fill the sink queue (50) and overflow it by 10.
    for reply in ledger.send_singles(60):
        assert reply.status_code == 200
        assert reply.json() == {}
    _wait_buffer_empty(router)
    assert _sink_metric(router, "eventrouter_sink_queue_depth") == SINK_QUEUE_SIZE

    # Step 3, seq 70-319: a batch larger than the ring buffer, which sheds 150 of
    # it at once. The worker then moves the other 100 into the full sink queue.
    reply = ledger.send_batch(250)
    assert reply.status_code == 200
    assert reply.json() == {"accepted": 250, "rejected": 0, "errors": [], "dropped": 150}
    _wait_buffer_empty(router)

    # Step 4, seq 320-399: a batch that fits the ring buffer but not the sink queue.
    reply = ledger.send_batch(80)
    assert reply.status_code == 200
    assert reply.json() == {"accepted": 80, "rejected": 0, "errors": []}
    _wait_buffer_empty(router)

    # Step 5, seq 400-404: singles into the full sink queue.
    for reply in ledger.send_singles(5):
        assert reply.status_code == 200
    _wait_buffer_empty(router)

    assert len(ledger.sent) == 405
    assert ledger.shed_by_503 == []
    assert _sink_metric(router, "eventrouter_sink_queue_depth") == SINK_QUEUE_SIZE
    assert _sink_metric(router, "eventrouter_sink_in_flight") == SINK_BATCH_SIZE + SINK_QUEUE_SIZE
    _assert_sink_accounting(router)


def test_drop_newest_keeps_earliest(blocked_router) -> None:
    router, fifo, ledger = blocked_router("dropNewest")
    _send_drop_scenario(router, ledger)

    delivered = _release_and_read(router, fifo, 60)

    # The batch in flight (0-9) and the first 50 queued behind it (10-59), in order.
    assert delivered == list(range(60))
    # Dropped at the ring buffer: 170-319 of step 3. Dropped at the sink queue:
    # 60-69 (step 2), 70-169 (step 3), 320-399 (step 4), 400-404 (step 5).
    _assert_counters(router, ledger, delivered=60, buffer_dropped=150, sink_dropped=195, rejected=0)


def test_drop_oldest_keeps_newest(blocked_router) -> None:
    router, fifo, ledger = blocked_router("dropOldest")
    _send_drop_scenario(router, ledger)

    delivered = _release_and_read(router, fifo, 60)

    # The batch in flight (0-9) cannot be evicted, then the newest 50 events.
    assert delivered == list(range(10)) + list(range(355, 405))
    # Dropped at the ring buffer: 70-219 of step 3. Evicted from the sink queue:
    # 10-19 (step 2), 20-69 and 220-269 (step 3), 270-349 (step 4), 350-354 (step 5).
    _assert_counters(router, ledger, delivered=60, buffer_dropped=150, sink_dropped=195, rejected=0)


def _assert_overloaded(reply: httpx.Response) -> None:
    assert reply.status_code == 503
    assert reply.json()["error"] == "overloaded"
    retry_after = reply.headers.get("retry-after")
    assert retry_after is not None
    assert retry_after.isdigit()
    assert int(retry_after) >= 1


def test_reject_answers_503_when_full(blocked_router) -> None:
    router, fifo, ledger = blocked_router("reject")

    # Step 1, seq 0-9: in flight in the blocked writer thread.
    assert ledger.send_batch(SINK_BATCH_SIZE).status_code == 200
    _wait_first_batch_in_flight(router)

    # Step 2, seq 10-59: fill the sink queue.
    for reply in ledger.send_singles(SINK_QUEUE_SIZE):
        assert reply.status_code == 200
    _wait_buffer_empty(router)
    assert _sink_metric(router, "eventrouter_sink_queue_depth") == SINK_QUEUE_SIZE

    # Step 3, seq 60: the worker takes it from the ring buffer and waits for room
    # in the sink queue, so from now on nothing leaves the ring buffer.
    assert ledger.send_one().status_code == 200
    _wait_buffer_empty(router)
    router.wait_for(
        lambda: _sink_metric(router, "eventrouter_sink_events_total", outcome="matched") == 61,
        timeout=10,
        what="the worker to hand seq 60 to the sink",
    )
    # Seq 60 is matched but waits outside the sink queue, and still counts as in flight.
    _assert_sink_accounting(router)
    assert _sink_metric(router, "eventrouter_sink_in_flight") == 61

    # Step 4, seq 61-120: fits in the empty ring buffer.
    assert ledger.send_batch(60).json() == {"accepted": 60, "rejected": 0, "errors": []}
    assert router.metric("eventrouter_buffer_depth") == 60

    # Step 5, seq 121-170: 50 events do not fit in the 40 free slots, so the whole
    # request is rejected and none of it is taken.
    _assert_overloaded(ledger.send_batch(50))
    assert router.metric("eventrouter_buffer_depth") == 60

    # Step 6, seq 171-210: exactly fills the ring buffer.
    assert ledger.send_batch(40).json() == {"accepted": 40, "rejected": 0, "errors": []}
    assert router.metric("eventrouter_buffer_depth") == BUFFER_SIZE
    _assert_sink_accounting(router)

    # Step 7, seq 211 and 212-221: a single event and a batch, both rejected.
    _assert_overloaded(ledger.send_one())
    _assert_overloaded(ledger.send_batch(10))

    accepted = list(range(121)) + list(range(171, 211))
    assert ledger.acknowledged == accepted
    assert ledger.shed_by_503 == list(range(121, 171)) + list(range(211, 222))
    assert router.metric("eventrouter_sink_dropped_total", sink=SINK, reason="queue_full") == 0

    delivered = _release_and_read(router, fifo, len(accepted))

    # Every acknowledged event arrives once and in order, and no rejected one does.
    assert delivered == accepted
    assert set(delivered).isdisjoint(ledger.shed_by_503)
    _assert_counters(router, ledger, delivered=161, buffer_dropped=0, sink_dropped=0, rejected=61)

    # With room again, the router takes events and delivers them.
    assert ledger.send_batch(5).status_code == 200
    fifo.wait_for_lines(166, timeout=10)
    assert [int(e["properties"]["seq"]) for e in fifo.events()][-5:] == list(range(222, 227))


def _fill_until_worker_waits(router: RouterProcess, ledger: Ledger) -> None:
    """Block the sink, fill its queue, and leave the worker waiting for room with seq 60.

    From then on nothing leaves the ring buffer until the sink is released.
    """
    assert ledger.send_batch(SINK_BATCH_SIZE).status_code == 200
    _wait_first_batch_in_flight(router)
    for reply in ledger.send_singles(SINK_QUEUE_SIZE):
        assert reply.status_code == 200
    assert ledger.send_one().status_code == 200
    _wait_buffer_empty(router)
    router.wait_for(
        lambda: _sink_metric(router, "eventrouter_sink_events_total", outcome="matched") == 61,
        timeout=10,
        what="the worker to hand seq 60 to the sink",
    )


def _post_in_thread(
    router: RouterProcess, path: str, body: dict[str, Any]
) -> tuple[threading.Thread, list[httpx.Response]]:
    replies: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=router.url, timeout=60) as client:
            replies.append(client.post(path, json=body))

    thread = threading.Thread(target=post)
    thread.start()
    return thread, replies


def test_block_holds_requests_until_room(blocked_router) -> None:
    router, fifo, ledger = blocked_router("block", blockTimeout="60s")
    _fill_until_worker_waits(router, ledger)

    # Seq 61-160 fill the ring buffer exactly.
    assert ledger.send_batch(BUFFER_SIZE).json() == {"accepted": 100, "rejected": 0, "errors": []}
    assert router.metric("eventrouter_buffer_depth") == BUFFER_SIZE

    # Seq 161-190, then seq 191: both wait, in this order, for room.
    batch_seqs = list(range(161, 191))
    waiting_batch = _post_in_thread(
        router, "/v2/events", {"events": [_event(seq) for seq in batch_seqs]}
    )
    router.wait_for(
        lambda: router.metric("eventrouter_buffer_waiting_requests") == 1,
        timeout=10,
        what="the batch to wait for room",
    )
    waiting_single = _post_in_thread(router, "/v2/event", _event(191))
    router.wait_for(
        lambda: router.metric("eventrouter_buffer_waiting_requests") == 2,
        timeout=10,
        what="the single event to wait behind the batch",
    )
    # Neither gets a response or is counted while it waits.
    assert waiting_batch[1] == []
    assert waiting_single[1] == []
    assert router.metric("eventrouter_events_received_total", transport="http") == 161

    delivered = _release_and_read(router, fifo, 192)
    for thread, _ in (waiting_batch, waiting_single):
        thread.join(30)
    assert waiting_batch[1][0].status_code == 200
    assert waiting_batch[1][0].json() == {"accepted": 30, "rejected": 0, "errors": []}
    assert waiting_single[1][0].status_code == 200

    # Every event arrives once, the waiting requests in the order they came.
    assert delivered == list(range(192))
    assert router.metric("eventrouter_buffer_waiting_requests") == 0
    assert router.metric("eventrouter_events_rejected_total", reason="overloaded") == 0
    assert router.metric("eventrouter_sink_dropped_total", sink=SINK, reason="queue_full") == 0


def test_block_timeout_answers_503(blocked_router) -> None:
    router, fifo, ledger = blocked_router("block", blockTimeout="300ms")
    _fill_until_worker_waits(router, ledger)
    assert ledger.send_batch(BUFFER_SIZE).status_code == 200

    # Seq 161-170: no room comes within 300 ms, so none of them is taken.
    started = time.monotonic()
    reply = ledger.send_batch(10)
    waited = time.monotonic() - started
    _assert_overloaded(reply)
    assert "within 0.3 s" in reply.json()["message"]
    assert waited >= 0.3
    assert router.metric("eventrouter_buffer_waiting_requests") == 0
    assert router.metric("eventrouter_buffer_depth") == BUFFER_SIZE

    delivered = _release_and_read(router, fifo, 161)
    assert delivered == list(range(161))
    assert ledger.shed_by_503 == list(range(161, 171))
    assert router.metric("eventrouter_events_rejected_total", reason="overloaded") == 10
    assert router.metric("eventrouter_events_received_total", transport="http") == 171


def test_block_disconnected_client_leaves_line(blocked_router) -> None:
    router, fifo, ledger = blocked_router("block", blockTimeout="60s")
    _fill_until_worker_waits(router, ledger)
    assert ledger.send_batch(BUFFER_SIZE).status_code == 200

    # A client sends seq 161, waits for room, then goes away without a reply.
    body = json.dumps(_event(161)).encode()
    request = (
        f"POST /v2/event HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", router.port)) as client:
        client.sendall(request)
        router.wait_for(
            lambda: router.metric("eventrouter_buffer_waiting_requests") == 1,
            timeout=10,
            what="the request to wait for room",
        )
    router.wait_for(
        lambda: router.metric("eventrouter_buffer_waiting_requests") == 0,
        timeout=10,
        what="the router to notice the disconnect",
    )

    # Its event is neither taken nor counted, and no room stays granted to it.
    delivered = _release_and_read(router, fifo, 161)
    assert delivered == list(range(161))
    assert router.metric("eventrouter_events_received_total", transport="http") == 161
    assert ledger.send_batch(BUFFER_SIZE).status_code == 200


def test_block_sigterm_answers_shutting_down(blocked_router) -> None:
    router, _fifo, ledger = blocked_router("block", blockTimeout="60s")
    _fill_until_worker_waits(router, ledger)
    assert ledger.send_batch(BUFFER_SIZE).status_code == 200
    thread, replies = _post_in_thread(router, "/v2/event", _event(161))
    router.wait_for(
        lambda: router.metric("eventrouter_buffer_waiting_requests") == 1,
        timeout=10,
        what="the request to wait for room",
    )

    started = time.monotonic()
    router.process.send_signal(signal.SIGTERM)
    thread.join(10)
    answered = time.monotonic() - started

    assert replies[0].status_code == 503
    assert replies[0].json()["error"] == "shutting_down"
    assert answered < 3.0
    assert router.terminate(30) == 0
    tracebacks = [line for line in router.logs() if "Traceback" in str(line)]
    assert tracebacks == []
