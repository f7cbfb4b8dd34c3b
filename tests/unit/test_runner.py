"""Unit tests of SinkRunner (retries, dead letters, overflow, hand-over, stop) and RingBuffer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from eventrouter.engine import Overloaded, RingBuffer
from eventrouter.envelope import DeadLetter, Envelope
from eventrouter.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from eventrouter.metrics import Metrics
from eventrouter.resources import EventSinkSpec, RetryPolicy
from eventrouter.sinks.base import SinkRunner, backoff_delay

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_events(count: int, prefix: str = "e") -> list[Envelope]:
    return [
        Envelope(
            id=f"{prefix}{i}",
            name="purchase",
            properties={},
            timestamp=NOW,
            received_at=NOW,
            external=True,
            router="test",
        )
        for i in range(count)
    ]


def ids(events: Sequence[Envelope] | None) -> list[str]:
    assert events is not None
    return [e.id for e in events]


class FakeSink:
    """A sink whose attempts fail, succeed or block as the test sets up.

    The first `fail_times` attempts raise `error`; `fail_times=None` fails every
    attempt. With `gate` set, each attempt waits for the gate before it fails
    or succeeds, and `attempt_started` is set when an attempt begins.
    """

    def __init__(
        self,
        name: str = "primary",
        *,
        fail_times: int | None = 0,
        error: Callable[[], BaseException] = lambda: RetryableDeliveryError("unavailable"),
        gate: asyncio.Event | None = None,
        cancellable: bool = True,
    ) -> None:
        self.name = name
        self.cancellable = cancellable
        self.max_batch: int | None = None
        self.fail_times = fail_times
        self.error = error
        self.gate = gate
        self.attempts = 0
        self.attempted: list[list[str]] = []
        self.delivered: list[Envelope] = []
        self.attempt_started = asyncio.Event()
        self.started = False
        self.closed = False

    def abort(self) -> None:
        self.aborted = True

    async def start(self) -> None:
        self.started = True

    async def send(self, batch: Sequence[Envelope]) -> None:
        self.attempts += 1
        self.attempted.append(ids(batch))
        self.attempt_started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_times is None or self.attempts <= self.fail_times:
            raise self.error()
        self.delivered.extend(batch)

    async def close(self) -> None:
        self.closed = True


def make_spec(
    *,
    queue_size: int = 1000,
    batch_size: int = 1000,
    max_attempts: int = 3,
    backoff: str = "1ms",
    timeout: str = "10s",
    dead_letter_sink: str | None = None,
) -> EventSinkSpec:
    spec: dict[str, Any] = {
        "blackhole": {},
        "queueSize": queue_size,
        "batchSize": batch_size,
        "timeout": timeout,
        "retry": {
            "maxAttempts": max_attempts,
            "backoff": {"initial": backoff, "max": backoff, "jitter": 0},
        },
    }
    if dead_letter_sink is not None:
        spec["deadLetterSink"] = dead_letter_sink
    return EventSinkSpec.model_validate(spec)


class Harness:
    """Runners that share one Metrics registry and find each other by name."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.runners: dict[str, SinkRunner] = {}
        self._all: list[SinkRunner] = []

    def runner(
        self, sink: FakeSink, spec: EventSinkSpec | None = None, overflow: str = "dropNewest"
    ) -> SinkRunner:
        runner = SinkRunner(
            sink.name,
            spec or make_spec(),
            sink,
            overflow=overflow,
            metrics=self.metrics,
            find_runner=self.runners.get,
        )
        self.runners[sink.name] = runner
        self._all.append(runner)
        return runner

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def outcome(self, sink: str, outcome: str) -> float:
        return self.sample("eventrouter_sink_events_total", sink=sink, outcome=outcome)

    def dropped(self, sink: str, reason: str) -> float:
        return self.sample("eventrouter_sink_dropped_total", sink=sink, reason=reason)

    def in_flight(self, sink: str) -> float:
        return self.sample("eventrouter_sink_in_flight", sink=sink)

    def accounted(self, sink: str) -> float:
        """Return delivered + dead_lettered + dropped + in_flight, which must equal matched."""
        return (
            self.outcome(sink, "delivered")
            + self.outcome(sink, "dead_lettered")
            + self.outcome(sink, "dropped")
            + self.in_flight(sink)
        )

    async def stop_all(self) -> None:
        # NOTE: a second `stop` on a runner whose task was cancelled raises
        # CancelledError, so runners that a test stopped are skipped.
        for runner in self._all:
            if runner._task is None or not runner._task.done():
                await runner.stop(time.monotonic() + 0.1)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.stop_all()


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.001)


# --- backoff_delay -------------------------------------------------------------


def make_policy(kind: str, initial: float, maximum: float, jitter: float = 0.0) -> RetryPolicy:
    return RetryPolicy.model_validate(
        {"backoff": {"type": kind, "initial": initial, "max": maximum, "jitter": jitter}}
    )


@pytest.mark.parametrize(
    ("kind", "failed_attempts", "expected"),
    [
        ("linear", 1, 0.1),
        ("linear", 2, 0.2),
        ("linear", 5, 0.5),
        ("exponential", 1, 0.1),
        ("exponential", 2, 0.2),
        ("exponential", 3, 0.4),
        ("exponential", 5, 1.6),
    ],
)
def test_backoff_delay(kind: str, failed_attempts: int, expected: float) -> None:
    policy = make_policy(kind, 0.1, 30.0)
    assert backoff_delay(policy, failed_attempts) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kind", "failed_attempts"),
    [("linear", 6), ("linear", 1000), ("exponential", 4), ("exponential", 200)],
)
def test_backoff_delay_capped(kind: str, failed_attempts: int) -> None:
    policy = make_policy(kind, 1.0, 5.0)
    assert backoff_delay(policy, failed_attempts) == 5.0


def test_backoff_delay_zero_initial() -> None:
    assert backoff_delay(make_policy("exponential", 0.0, 1.0), 3) == 0.0


@pytest.mark.parametrize(
    ("kind", "failed_attempts", "base"),
    [("exponential", 2, 2.0), ("linear", 3, 3.0)],
)
def test_backoff_jitter_bounds(kind: str, failed_attempts: int, base: float) -> None:
    policy = make_policy(kind, 1.0, 10.0, jitter=0.2)
    delays = [backoff_delay(policy, failed_attempts) for _ in range(2000)]
    assert min(delays) >= base * 0.8
    assert max(delays) <= base * 1.2
    assert min(delays) < base
    assert max(delays) > base


def test_backoff_jitter_never_exceeds_max() -> None:
    policy = make_policy("exponential", 1.0, 10.0, jitter=0.2)
    delays = [backoff_delay(policy, 10) for _ in range(2000)]
    assert max(delays) == 10.0
    assert min(delays) >= 8.0


# --- retries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail_times", "max_attempts", "expected_attempts", "delivered"),
    [
        (0, 3, 1, True),
        (1, 3, 2, True),
        (2, 3, 3, True),
        (3, 3, 3, False),
        (10, 3, 3, False),
        (0, 1, 1, True),
        (1, 1, 1, False),
        (9, 10, 10, True),
        (None, 5, 5, False),
    ],
)
async def test_retry_attempts(
    harness: Harness,
    fail_times: int | None,
    max_attempts: int,
    expected_attempts: int,
    delivered: bool,
) -> None:
    sink = FakeSink(fail_times=fail_times)
    runner = harness.runner(sink, make_spec(max_attempts=max_attempts))
    await runner.start()
    events = make_events(4)
    await runner.put(events)
    await wait_until(lambda: runner.in_flight() == 0)

    assert sink.attempts == expected_attempts
    assert sink.attempted == [ids(events)] * expected_attempts
    assert ids(sink.delivered) == (ids(events) if delivered else [])
    assert harness.outcome("primary", "delivered") == (4 if delivered else 0)
    assert harness.dropped("primary", "delivery_failed") == (0 if delivered else 4)
    assert harness.sample("eventrouter_sink_retries_total", sink="primary") == 4 * (
        expected_attempts - 1
    )
    assert runner.ready is delivered


async def test_unexpected_exception_retried(harness: Harness) -> None:
    sink = FakeSink(fail_times=2, error=lambda: ValueError("bug in sink"))
    runner = harness.runner(sink, make_spec(max_attempts=3))
    await runner.start()
    await runner.put(make_events(1))
    await wait_until(lambda: runner.in_flight() == 0)
    assert sink.attempts == 3
    assert harness.outcome("primary", "delivered") == 1


async def test_attempt_timeout_retried(harness: Harness) -> None:
    gate = asyncio.Event()
    sink = FakeSink(gate=gate)
    runner = harness.runner(sink, make_spec(max_attempts=2, timeout="10ms"))
    await runner.start()
    await runner.put(make_events(1))
    await wait_until(lambda: runner.in_flight() == 0)
    assert sink.attempts == 2
    assert harness.dropped("primary", "delivery_failed") == 1
    assert runner.last_error == "attempt timed out after 0.01s"


async def test_batches_split_by_batch_size(harness: Harness) -> None:
    sink = FakeSink()
    runner = harness.runner(sink, make_spec(batch_size=2))
    await runner.put(make_events(5))
    await runner.start()
    await wait_until(lambda: runner.in_flight() == 0)
    assert sink.attempted == [["e0", "e1"], ["e2", "e3"], ["e4"]]


async def test_batch_wait_ends_when_batch_fills(harness: Harness) -> None:
    spec = make_spec(batch_size=3).model_copy(update={"batch_wait": 30.0})
    sink = FakeSink()
    runner = harness.runner(sink, spec)
    await runner.start()
    await runner.put(make_events(2))
    await asyncio.sleep(0.05)
    assert sink.attempted == []
    await runner.put(make_events(1, prefix="f"))
    await wait_until(lambda: runner.in_flight() == 0)
    assert sink.attempted == [["e0", "e1", "f0"]]


async def test_batch_wait_sends_partial_batch(harness: Harness) -> None:
    spec = make_spec(batch_size=100).model_copy(update={"batch_wait": 0.1})
    sink = FakeSink()
    runner = harness.runner(sink, spec)
    await runner.start()
    await runner.put(make_events(2))
    await wait_until(lambda: runner.in_flight() == 0)
    assert sink.attempted == [["e0", "e1"]]


# --- dead letters --------------------------------------------------------------


async def test_permanent_error_dead_letters_at_once(harness: Harness) -> None:
    sink = FakeSink(
        fail_times=None, error=lambda: PermanentDeliveryError("bad payload", status=400)
    )
    runner = harness.runner(sink, make_spec(max_attempts=5, dead_letter_sink="dlq"))
    dlq_sink = FakeSink("dlq")
    dlq = harness.runner(dlq_sink)
    await dlq.start()
    await runner.start()
    events = make_events(3)
    await runner.put(events)
    await wait_until(lambda: len(dlq_sink.delivered) == 3)

    assert sink.attempts == 1
    assert ids(dlq_sink.delivered) == ids(events)
    assert dlq_sink.delivered[0].dead_letter == DeadLetter(
        sink="primary", error="bad payload", attempts=1, status=400
    )
    assert dlq_sink.delivered[0].name == events[0].name
    assert harness.outcome("primary", "dead_lettered") == 3
    assert harness.outcome("dlq", "matched") == 3
    assert harness.outcome("dlq", "delivered") == 3
    assert harness.dropped("primary", "delivery_failed") == 0


async def test_retries_exhausted_dead_letter(harness: Harness) -> None:
    sink = FakeSink(fail_times=None, error=lambda: RetryableDeliveryError("busy", status=503))
    runner = harness.runner(sink, make_spec(max_attempts=4, dead_letter_sink="dlq"))
    dlq_sink = FakeSink("dlq")
    dlq = harness.runner(dlq_sink)
    await dlq.start()
    await runner.start()
    await runner.put(make_events(2))
    await wait_until(lambda: len(dlq_sink.delivered) == 2)

    assert sink.attempts == 4
    assert dlq_sink.delivered[1].dead_letter == DeadLetter(
        sink="primary", error="busy", attempts=4, status=503
    )


async def test_dead_letter_error_truncated(harness: Harness) -> None:
    sink = FakeSink(fail_times=None, error=lambda: PermanentDeliveryError("x" * 5000))
    runner = harness.runner(sink, make_spec(dead_letter_sink="dlq"))
    dlq_sink = FakeSink("dlq")
    await harness.runner(dlq_sink).start()
    await runner.start()
    await runner.put(make_events(1))
    await wait_until(lambda: len(dlq_sink.delivered) == 1)
    letter = dlq_sink.delivered[0].dead_letter
    assert letter is not None
    assert len(letter.error) == 1024
    assert letter.status is None


@pytest.mark.parametrize("dead_letter_sink", [None, "missing"])
async def test_no_dead_letter_runner_drops(harness: Harness, dead_letter_sink: str | None) -> None:
    sink = FakeSink(fail_times=None, error=lambda: PermanentDeliveryError("bad payload"))
    runner = harness.runner(sink, make_spec(dead_letter_sink=dead_letter_sink))
    await runner.start()
    await runner.put(make_events(3))
    await wait_until(lambda: runner.in_flight() == 0)
    assert harness.dropped("primary", "delivery_failed") == 3
    assert harness.outcome("primary", "dropped") == 3
    assert harness.outcome("primary", "dead_lettered") == 0


# --- accounting ----------------------------------------------------------------


async def test_accounting_while_blocked(harness: Harness) -> None:
    gate = asyncio.Event()
    sink = FakeSink(gate=gate)
    runner = harness.runner(sink, make_spec(batch_size=2))
    await runner.start()
    await runner.put(make_events(5))
    await sink.attempt_started.wait()

    assert harness.outcome("primary", "matched") == 5
    assert harness.in_flight("primary") == 5
    assert harness.accounted("primary") == 5

    gate.set()
    await wait_until(lambda: runner.in_flight() == 0)
    assert harness.outcome("primary", "delivered") == 5
    assert harness.in_flight("primary") == 0
    assert harness.accounted("primary") == 5


async def test_accounting_mixed_outcomes(harness: Harness) -> None:
    # Batch 1 fails permanently (dead-lettered), batch 2 is delivered, and the
    # queue of 4 drops 2 of the 6 events.
    errors = iter([PermanentDeliveryError("bad payload")])
    sink = FakeSink(fail_times=1, error=lambda: next(errors))
    runner = harness.runner(sink, make_spec(queue_size=4, batch_size=2, dead_letter_sink="dlq"))
    dlq_sink = FakeSink("dlq")
    await harness.runner(dlq_sink).start()
    await runner.put(make_events(6))
    await runner.start()
    await wait_until(lambda: runner.in_flight() == 0 and len(dlq_sink.delivered) == 2)

    assert harness.outcome("primary", "matched") == 6
    assert harness.outcome("primary", "delivered") == 2
    assert harness.outcome("primary", "dead_lettered") == 2
    assert harness.dropped("primary", "queue_full") == 2
    assert harness.accounted("primary") == 6
    assert harness.accounted("dlq") == harness.outcome("dlq", "matched")


# --- overflow ------------------------------------------------------------------


async def test_overflow_drop_newest(harness: Harness) -> None:
    sink = FakeSink()
    runner = harness.runner(sink, make_spec(queue_size=3), overflow="dropNewest")
    await runner.put(make_events(2, "a"))
    await runner.put(make_events(3, "b"))
    await runner.start()
    await wait_until(lambda: runner.in_flight() == 0)

    assert ids(sink.delivered) == ["a0", "a1", "b0"]
    assert harness.dropped("primary", "queue_full") == 2
    assert harness.accounted("primary") == harness.outcome("primary", "matched")


async def test_overflow_drop_oldest(harness: Harness) -> None:
    sink = FakeSink()
    runner = harness.runner(sink, make_spec(queue_size=3), overflow="dropOldest")
    await runner.put(make_events(2, "a"))
    await runner.put(make_events(3, "b"))
    await runner.start()
    await wait_until(lambda: runner.in_flight() == 0)

    assert ids(sink.delivered) == ["b0", "b1", "b2"]
    assert harness.dropped("primary", "queue_full") == 2
    assert harness.accounted("primary") == harness.outcome("primary", "matched")


async def test_overflow_drop_oldest_larger_than_queue(harness: Harness) -> None:
    sink = FakeSink()
    runner = harness.runner(sink, make_spec(queue_size=3), overflow="dropOldest")
    await runner.put(make_events(5))
    await runner.start()
    await wait_until(lambda: runner.in_flight() == 0)
    assert ids(sink.delivered) == ["e2", "e3", "e4"]
    assert harness.dropped("primary", "queue_full") == 2


async def test_overflow_reject_waits(harness: Harness) -> None:
    sink = FakeSink()
    runner = harness.runner(sink, make_spec(queue_size=3, batch_size=2), overflow="reject")
    events = make_events(7)
    put = asyncio.create_task(runner.put(events))
    for _ in range(10):
        await asyncio.sleep(0)

    # The 4 events waiting in `put` for room count as in flight.
    assert not put.done()
    assert runner.queue_depth == 3
    assert harness.outcome("primary", "matched") == 7
    assert harness.in_flight("primary") == 7
    assert harness.accounted("primary") == 7

    await runner.start()
    await asyncio.wait_for(put, 2)
    await wait_until(lambda: runner.in_flight() == 0)
    assert ids(sink.delivered) == ids(events)
    assert harness.outcome("primary", "dropped") == 0
    assert harness.accounted("primary") == 7


@pytest.mark.parametrize("overflow", ["reject", "block"])
async def test_waiting_puts_keep_their_order(harness: Harness, overflow: str) -> None:
    runner = harness.runner(FakeSink(), make_spec(queue_size=3), overflow=overflow)
    first, later = make_events(5, "a"), make_events(1, "b")
    put_first = asyncio.create_task(runner.put(first))
    for _ in range(5):
        await asyncio.sleep(0)
    assert ids(list(runner._queue)) == ids(first[:3])

    # A put that is ready to run when room opens must not pass the events that
    # `first` still waits to queue, even though it would fit.
    put_later = asyncio.create_task(runner.put(later))
    taken = [runner._queue.popleft(), runner._queue.popleft()]
    runner._has_room.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert put_first.done()
    assert ids(list(runner._queue)) == ids(first[2:])

    runner._queue.popleft()
    runner._has_room.set()
    await asyncio.wait_for(put_later, 2)
    assert ids(taken) == ids(first[:2])
    assert ids(list(runner._queue)) == ids(first[3:] + later)


@pytest.mark.parametrize("overflow", ["reject", "block"])
async def test_put_waits_behind_next_waiter(harness: Harness, overflow: str) -> None:
    runner = harness.runner(FakeSink(), make_spec(queue_size=3), overflow=overflow)
    first, second, third = make_events(4, "a"), make_events(1, "b"), make_events(1, "c")
    puts = [asyncio.create_task(runner.put(first))]
    for _ in range(5):
        await asyncio.sleep(0)
    puts.append(asyncio.create_task(runner.put(second)))
    for _ in range(5):
        await asyncio.sleep(0)
    # Room for `first`'s last event and one more. `third` is scheduled right
    # behind `first`, so it runs after `first` frees the lock and before
    # `second`, which waited for the lock, gets its turn.
    runner._queue.popleft()
    runner._queue.popleft()
    runner._has_room.set()
    puts.append(asyncio.create_task(runner.put(third)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert puts[0].done()
    runner._queue.popleft()
    runner._has_room.set()
    await asyncio.wait_for(asyncio.gather(*puts), 2)
    assert ids(list(runner._queue)) == ids(first[3:] + second + third)


async def test_reject_cancelled_counts_shutdown(harness: Harness) -> None:
    runner = harness.runner(FakeSink(), make_spec(queue_size=3), overflow="reject")
    put = asyncio.create_task(runner.put(make_events(5)))
    for _ in range(10):
        await asyncio.sleep(0)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert harness.dropped("primary", "shutdown") == 2
    assert harness.accounted("primary") == 5


# --- hand-over -----------------------------------------------------------------


async def test_hand_over_moves_queued_and_retrying(harness: Harness) -> None:
    old_sink = FakeSink(fail_times=None)
    old = harness.runner(old_sink, make_spec(batch_size=2, max_attempts=5, backoff="10s"))
    await old.start()
    events = make_events(5)
    await old.put(events)
    await old_sink.attempt_started.wait()

    new_sink = FakeSink()
    new = harness.runner(new_sink)
    await new.start()
    await asyncio.wait_for(old.hand_over(new, timeout=1.0), 1.0)
    await wait_until(lambda: new.in_flight() == 0 and len(new_sink.delivered) == 5)

    assert old_sink.attempts == 1
    assert old_sink.delivered == []
    assert old_sink.closed is True
    assert ids(new_sink.delivered) == ids(events)
    assert harness.outcome("primary", "matched") == 5
    assert harness.outcome("primary", "delivered") == 5
    assert harness.accounted("primary") == 5


async def test_hand_over_waits_for_attempt(harness: Harness) -> None:
    gate = asyncio.Event()
    old_sink = FakeSink(gate=gate)
    old = harness.runner(old_sink, make_spec(batch_size=2))
    await old.start()
    events = make_events(5)
    await old.put(events)
    await old_sink.attempt_started.wait()

    new_sink = FakeSink()
    new = harness.runner(new_sink)
    await new.start()
    handing_over = asyncio.create_task(old.hand_over(new, timeout=2.0))
    await asyncio.sleep(0.01)
    assert not handing_over.done()
    gate.set()
    await asyncio.wait_for(handing_over, 2.0)
    await wait_until(lambda: len(new_sink.delivered) == 3)

    assert ids(old_sink.delivered) == ["e0", "e1"]
    assert ids(new_sink.delivered) == ["e2", "e3", "e4"]
    assert harness.outcome("primary", "delivered") == 5
    assert harness.accounted("primary") == 5


async def test_held_successor_delivers_after_taken_over(harness: Harness) -> None:
    gate = asyncio.Event()
    old_sink = FakeSink(gate=gate)
    old = harness.runner(old_sink, make_spec(batch_size=2))
    await old.start()
    await old.put(make_events(5, "old"))
    await old_sink.attempt_started.wait()

    # As on reload: the successor is held, and new events reach it while the
    # old runner's attempt still runs.
    new_sink = FakeSink("primary")
    new = harness.runner(new_sink)
    new.hold()
    await new.start()
    handing_over = asyncio.create_task(old.hand_over(new, timeout=2.0))
    await old.put(make_events(2, "new"))
    await asyncio.sleep(0.05)
    assert new_sink.delivered == []

    gate.set()
    await asyncio.wait_for(handing_over, 2.0)
    await wait_until(lambda: len(new_sink.delivered) == 5)
    assert ids(old_sink.delivered) == ["old0", "old1"]
    assert ids(new_sink.delivered) == ["old2", "old3", "old4", "new0", "new1"]


async def test_hand_over_timeout_moves_failed_batch(harness: Harness) -> None:
    # The attempt outlasts the hand-over timeout and then fails, so its batch
    # follows the rest to the successor instead of being retried by the old runner.
    gate = asyncio.Event()
    old_sink = FakeSink(fail_times=None, gate=gate)
    old = harness.runner(old_sink, make_spec(batch_size=2, max_attempts=5))
    await old.start()
    events = make_events(5)
    await old.put(events)
    await old_sink.attempt_started.wait()

    new_sink = FakeSink()
    new = harness.runner(new_sink)
    await new.start()
    await old.hand_over(new, timeout=0.01)
    await wait_until(lambda: len(new_sink.delivered) == 3)
    assert ids(new_sink.delivered) == ["e2", "e3", "e4"]

    gate.set()
    await wait_until(lambda: len(new_sink.delivered) == 5)
    assert old_sink.attempts == 1
    assert sorted(ids(new_sink.delivered)) == ids(events)
    assert harness.outcome("primary", "delivered") == 5
    assert harness.accounted("primary") == 5


async def test_put_after_hand_over_forwards(harness: Harness) -> None:
    old = harness.runner(FakeSink())
    await old.start()
    new_sink = FakeSink()
    new = harness.runner(new_sink)
    await new.start()
    await old.hand_over(new, timeout=1.0)
    await old.put(make_events(2))
    await wait_until(lambda: len(new_sink.delivered) == 2)
    assert harness.outcome("primary", "matched") == 2
    assert harness.accounted("primary") == 2


# --- stop ----------------------------------------------------------------------


async def test_stop_delivers_queue(harness: Harness) -> None:
    sink = FakeSink()
    runner = harness.runner(sink, make_spec(batch_size=2))
    await runner.put(make_events(5))
    await runner.start()
    leftover = await runner.stop(time.monotonic() + 2.0)
    assert leftover == []
    assert len(sink.delivered) == 5
    assert sink.closed is True
    assert harness.dropped("primary", "shutdown") == 0


async def test_stop_deadline_returns_leftovers(harness: Harness) -> None:
    gate = asyncio.Event()
    sink = FakeSink(gate=gate)
    runner = harness.runner(sink, make_spec(batch_size=2))
    await runner.start()
    events = make_events(5)
    await runner.put(events)
    await sink.attempt_started.wait()

    leftover = await runner.stop(time.monotonic() + 0.05)
    assert ids(leftover) == ids(events)
    assert sink.delivered == []
    assert sink.closed is True
    assert harness.dropped("primary", "shutdown") == 5
    assert harness.in_flight("primary") == 0
    assert harness.accounted("primary") == 5


async def test_stop_during_backoff(harness: Harness) -> None:
    sink = FakeSink(fail_times=None)
    runner = harness.runner(sink, make_spec(batch_size=2, max_attempts=5, backoff="10s"))
    await runner.start()
    events = make_events(3)
    await runner.put(events)
    await sink.attempt_started.wait()

    leftover = await asyncio.wait_for(runner.stop(time.monotonic() + 0.05), 2.0)
    assert ids(leftover) == ids(events)
    assert sink.attempts == 1
    assert harness.dropped("primary", "shutdown") == 3
    assert harness.dropped("primary", "delivery_failed") == 0
    assert harness.accounted("primary") == 3


async def test_stop_never_started(harness: Harness) -> None:
    runner = harness.runner(FakeSink())
    await runner.put(make_events(2))
    leftover = await runner.stop(time.monotonic() + 0.05)
    assert ids(leftover) == ["e0", "e1"]
    assert harness.dropped("primary", "shutdown") == 2


# --- RingBuffer ----------------------------------------------------------------


def buffer_dropped(metrics: Metrics, reason: str = "buffer_full") -> float:
    value = metrics.registry.get_sample_value(
        "eventrouter_buffer_dropped_total", {"reason": reason}
    )
    return 0.0 if value is None else value


async def test_buffer_offer_within_capacity() -> None:
    metrics = Metrics()
    buffer = RingBuffer(3, "reject", metrics)
    assert buffer.offer(make_events(3)) == 0
    assert len(buffer) == 3
    assert metrics.registry.get_sample_value("eventrouter_buffer_depth") == 3
    assert metrics.registry.get_sample_value("eventrouter_buffer_capacity") == 3


async def test_buffer_drop_newest() -> None:
    metrics = Metrics()
    buffer = RingBuffer(3, "dropNewest", metrics)
    buffer.offer(make_events(2, "a"))
    assert buffer.offer(make_events(3, "b")) == 2
    assert ids(await buffer.take(10)) == ["a0", "a1", "b0"]
    assert buffer_dropped(metrics) == 2


async def test_buffer_drop_newest_when_full() -> None:
    buffer = RingBuffer(2, "dropNewest", Metrics())
    buffer.offer(make_events(2, "a"))
    assert buffer.offer(make_events(1, "b")) == 1
    assert ids(buffer.clear()) == ["a0", "a1"]


async def test_buffer_drop_oldest() -> None:
    metrics = Metrics()
    buffer = RingBuffer(3, "dropOldest", metrics)
    buffer.offer(make_events(2, "a"))
    assert buffer.offer(make_events(3, "b")) == 2
    assert ids(await buffer.take(10)) == ["b0", "b1", "b2"]
    assert buffer_dropped(metrics) == 2


async def test_buffer_drop_oldest_larger_than_capacity() -> None:
    buffer = RingBuffer(3, "dropOldest", Metrics())
    assert buffer.offer(make_events(5)) == 2
    assert ids(buffer.clear()) == ["e2", "e3", "e4"]


async def test_buffer_reject_takes_nothing() -> None:
    metrics = Metrics()
    buffer = RingBuffer(3, "reject", metrics)
    buffer.offer(make_events(2, "a"))
    with pytest.raises(Overloaded):
        buffer.offer(make_events(2, "b"))
    assert ids(buffer.clear()) == ["a0", "a1"]
    assert buffer_dropped(metrics) == 0


async def test_buffer_take_limit_fifo() -> None:
    buffer = RingBuffer(10, "reject", Metrics())
    buffer.offer(make_events(5))
    assert ids(await buffer.take(2)) == ["e0", "e1"]
    assert ids(await buffer.take(10)) == ["e2", "e3", "e4"]
    assert len(buffer) == 0


async def test_buffer_take_waits_for_offer() -> None:
    buffer = RingBuffer(10, "reject", Metrics())
    taking = asyncio.create_task(buffer.take(10))
    await asyncio.sleep(0.01)
    assert not taking.done()
    buffer.offer(make_events(1))
    assert ids(await asyncio.wait_for(taking, 1.0)) == ["e0"]


async def test_buffer_close_drains_then_none() -> None:
    buffer = RingBuffer(10, "reject", Metrics())
    buffer.offer(make_events(2))
    buffer.close()
    assert buffer.closed is True
    assert ids(await buffer.take(10)) == ["e0", "e1"]
    assert await buffer.take(10) is None


async def test_buffer_close_wakes_take() -> None:
    buffer = RingBuffer(10, "reject", Metrics())
    taking = asyncio.create_task(buffer.take(10))
    await asyncio.sleep(0.01)
    buffer.close()
    assert await asyncio.wait_for(taking, 1.0) is None


async def test_buffer_clear() -> None:
    buffer = RingBuffer(10, "reject", Metrics())
    buffer.offer(make_events(3))
    assert ids(buffer.clear()) == ["e0", "e1", "e2"]
    assert len(buffer) == 0


def test_delivery_error_types() -> None:
    assert RetryableDeliveryError("x").retryable is True
    assert PermanentDeliveryError("x").retryable is False
    assert DeliveryError("x", status=503).status == 503
