"""The sink protocol and the runner that delivers a sink's queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from eventrouter.envelope import DeadLetter, Envelope
from eventrouter.errors import DeliveryError, RetryableDeliveryError
from eventrouter.logs import RateLimitedLog
from eventrouter.metrics import Metrics
from eventrouter.resources import EventSinkSpec, RetryPolicy
from eventrouter.tracing import Tracing

__all__ = ["Sink", "SinkRunner", "backoff_delay", "log_undelivered"]

logger = logging.getLogger(__name__)

_LOGGED_IDS_PER_LINE = 1000
# How long a stopped write may take to report what it wrote: at most one chunk
# plus the writer's 50 ms poll.
_ABORT_WAIT_SECONDS = 1.0


def log_undelivered(where: str, events: Sequence[Envelope]) -> None:
    """Log the ids of events that will not be delivered, at most 1,000 per line."""
    for start in range(0, len(events), _LOGGED_IDS_PER_LINE):
        chunk = events[start : start + _LOGGED_IDS_PER_LINE]
        logger.error(
            "%s: %d events not delivered before the grace period ended",
            where,
            len(chunk),
            extra={"event_ids": [e.id for e in chunk]},
        )


class Sink(Protocol):
    """Writes batches of events to one destination.

    `send` raises `DeliveryError` (or a subclass) on failure; its `retryable`
    attribute decides whether the runner tries again. Any other exception is
    treated as retryable and logged with its traceback.
    """

    name: str
    cancellable: bool
    """Whether the runner may cancel `send` when the per-attempt timeout expires."""
    max_batch: int | None
    """An upper bound on batch size that the sink imposes, below spec.batchSize."""

    def abort(self) -> None:
        """Stop a `send` that cannot be cancelled, at shutdown.

        The stopped `send` raises `DeliveryError` whose `failed` lists the events
        it did not write. Sinks whose `send` can be cancelled do nothing here.
        """

    def describe(self, batch: Sequence[Envelope]) -> tuple[str, SpanKind, dict[str, Any]]:
        """Name, kind and attributes of the span of one delivery attempt."""
        ...

    async def start(self) -> None: ...

    async def send(self, batch: Sequence[Envelope]) -> None: ...

    async def close(self) -> None: ...


def backoff_delay(policy: RetryPolicy, failed_attempts: int) -> float:
    """Seconds to wait after the given number of failed attempts."""
    backoff = policy.backoff
    if backoff.type == "linear":
        delay = backoff.initial * failed_attempts
    else:
        delay = backoff.initial * (2 ** (failed_attempts - 1))
    delay = min(delay, backoff.max)
    if backoff.jitter:
        delay *= random.uniform(1 - backoff.jitter, 1 + backoff.jitter)
    delay = min(delay, backoff.max)
    return max(0.0, delay)


class SinkRunner:
    """A sink with its bounded queue, batching, retries, dead letters and accounting.

    Every event given to `put` is counted as matched and ends in exactly one of:
    delivered, dead-lettered, dropped (with a reason), or still in flight (in the
    queue or in the batch being delivered). When the queue is full, the router's
    overflow policy applies: `dropNewest` drops the incoming events, `dropOldest`
    evicts the oldest queued ones, and `reject` makes `put` wait for room, which
    stops the workers and so fills the ring buffer, where requests get 503.
    """

    def __init__(
        self,
        name: str,
        spec: EventSinkSpec,
        sink: Sink,
        *,
        overflow: str,
        metrics: Metrics,
        find_runner: Callable[[str], SinkRunner | None],
        tracing: Tracing | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.sink = sink
        self.overflow = overflow
        self.ready = True
        self.last_error: str | None = None
        self._metrics = metrics
        self._find_runner = find_runner
        self._tracing = tracing
        self._queue: deque[Envelope] = deque()
        self._capacity = spec.queue_size
        self._batch_size = min(spec.batch_size, sink.max_batch or spec.batch_size)
        self._pending: list[Envelope] = []
        # Events that `put` keeps waiting under `reject` until the queue has room.
        self._waiting = 0
        self._has_items = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._put_lock = asyncio.Lock()
        self._resumed = asyncio.Event()
        self._resumed.set()
        # Puts in `_put_waiting`, holding the lock or waiting for it. A new put
        # queues behind them even when the lock is free for a moment, between
        # one holder's release and the next waiter's turn.
        self._putting = 0
        self._interrupt = asyncio.Event()
        self._closing = False
        self._handing_over = False
        self._task: asyncio.Task[None] | None = None
        self._successor: SinkRunner | None = None
        self._handed_over = False
        self._aborted = False
        self._failures = RateLimitedLog(logger)

        self._matched = metrics.sink_events.labels(name, "matched")
        self._delivered = metrics.sink_events.labels(name, "delivered")
        self._dead_lettered = metrics.sink_events.labels(name, "dead_lettered")
        self._dropped_total = metrics.sink_events.labels(name, "dropped")
        self._retries = metrics.sink_retries.labels(name)
        self._latency = metrics.sink_latency.labels(name)
        metrics.sink_queue_capacity.labels(name).set(self._capacity)
        metrics.sink_queue_depth.labels(name).set_function(lambda: len(self._queue))
        metrics.sink_in_flight.labels(name).set_function(self.in_flight)
        metrics.sink_ready.labels(name).set_function(lambda: 1.0 if self.ready else 0.0)

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self.sink.start()
        self._task = asyncio.create_task(self._run(), name=f"sink-{self.name}")

    def in_flight(self) -> int:
        """Count events queued, waiting in `put` for room, or in the batch being delivered."""
        return len(self._queue) + self._waiting + len(self._pending)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def hand_over(self, successor: SinkRunner, timeout: float) -> None:
        """Stop this runner and move every event it has not finished to `successor`.

        An attempt in progress is allowed to finish (up to `timeout`), so an event
        is never written by both runners; a batch waiting for its next attempt
        moves without waiting.
        """
        self._handing_over = True
        self._successor = successor
        self._interrupt.set()
        self._has_items.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            if not self._task.done():
                logger.warning(
                    "sink %s: attempt still running after %.1fs; its batch stays with the old "
                    "sink and the rest moves",
                    self.name,
                    timeout,
                    extra={"sink": self.name},
                )
        leftover = list(self._queue)
        self._queue.clear()
        if self._task is not None and self._task.done():
            leftover = self._pending + leftover
            self._pending = []
        successor.take_over(leftover)
        successor.resume()
        self._handed_over = True
        # Wake producers waiting for room; they forward to the successor.
        self._has_room.set()
        await self._close_sink(timeout)

    def hold(self) -> None:
        """Queue events but deliver none until `resume`.

        A runner that replaces another on reload is held until it has taken
        over its predecessor's events, which go in front of its queue, so that
        it never delivers newer events before them.
        """
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def take_over(self, events: list[Envelope]) -> None:
        """Put events of a predecessor in front of this queue, already counted as matched."""
        if events:
            self._queue.extendleft(reversed(events))
            self._has_items.set()

    async def stop(self, deadline: float) -> list[Envelope]:
        """Deliver what is queued until `deadline` (monotonic time); return what is left."""
        self._closing = True
        self._has_items.set()
        self._resumed.set()
        if self._task is not None:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(self._task), remaining)
            except TimeoutError:
                await self._abort()
        leftover = self._pending + list(self._queue)
        self._pending = []
        self._queue.clear()
        if leftover:
            self.count_dropped(len(leftover), "shutdown")
        await self._close_sink(max(0.1, deadline - time.monotonic()))
        return leftover

    async def _abort(self) -> None:
        """Stop delivery at the deadline, keeping count of what a stopped write sent."""
        assert self._task is not None
        self._aborted = True
        if not self.sink.cancellable:
            # The write stops at its next chunk and reports what it wrote; the
            # runner records that part as delivered and keeps the rest pending.
            self.sink.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), _ABORT_WAIT_SECONDS)
        if not self._task.done():
            # Cancel without setting `_interrupt`. On Python 3.11 (seen on
            # 3.11.7), wait_for swallows a cancellation that arrives as its
            # inner wait completes, so the runner would retry without backoff.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _close_sink(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.sink.close(), timeout)
        except TimeoutError:
            logger.warning("sink %s did not close within %.1fs", self.name, timeout)
        except Exception:
            logger.exception("sink %s failed to close", self.name, extra={"sink": self.name})

    # --- intake ----------------------------------------------------------------

    async def put(self, events: list[Envelope]) -> None:
        """Queue events for delivery under the overflow policy; see the class docstring."""
        if self._successor is not None:
            await self._successor.put(events)
            return
        self._matched.inc(len(events))
        await self._enqueue(events)

    async def _enqueue(self, events: list[Envelope]) -> None:
        # Events here are already counted as matched.
        if self._successor is not None:
            await self._successor._enqueue(events)
            return
        free = self._capacity - len(self._queue)
        if len(events) <= free and not self._putting:
            self._queue.extend(events)
        elif self.overflow == "dropNewest":
            self._queue.extend(events[: max(free, 0)])
            self.count_dropped(len(events) - max(free, 0), "queue_full")
        elif self.overflow == "dropOldest":
            self._queue.extend(events)
            evicted = len(self._queue) - self._capacity
            for _ in range(evicted):
                self._queue.popleft()
            self.count_dropped(evicted, "queue_full")
        else:
            await self._put_waiting(events)
        self._has_items.set()

    async def _put_waiting(self, events: list[Envelope]) -> None:
        start = 0
        self._waiting += len(events)
        self._putting += 1
        try:
            # Puts fill the queue one at a time, in the order they came, because
            # asyncio.Lock serves waiters first come, first served. So a later
            # batch never passes the rest of an earlier one, which keeps order.
            async with self._put_lock:
                while start < len(events):
                    if self._successor is not None:
                        # The successor counts these from here on, even if it is cancelled.
                        rest = events[start:]
                        self._waiting -= len(rest)
                        start = len(events)
                        await self._successor._enqueue(rest)
                        return
                    free = self._capacity - len(self._queue)
                    if free <= 0:
                        self._has_room.clear()
                        self._has_items.set()
                        await self._has_room.wait()
                        continue
                    chunk = events[start : start + free]
                    self._queue.extend(chunk)
                    self._waiting -= len(chunk)
                    start += len(chunk)
                    self._has_items.set()
        except asyncio.CancelledError:
            # Shutdown cancelled the worker while it waited for room.
            self._waiting -= len(events) - start
            self.count_dropped(len(events) - start, "shutdown")
            log_undelivered(f"sink {self.name}", events[start:])
            raise
        finally:
            self._putting -= 1

    def discard(self, events: list[Envelope], reason: str) -> None:
        """Count events that were matched for this sink but never reached its queue."""
        self._matched.inc(len(events))
        self.count_dropped(len(events), reason)

    def count_dropped(self, count: int, reason: str) -> None:
        self._dropped_total.inc(count)
        self._metrics.sink_dropped.labels(self.name, reason).inc(count)

    # --- delivery --------------------------------------------------------------

    async def _run(self) -> None:
        spec = self.spec
        while True:
            if self._aborted:
                return
            if not self._queue:
                if self._closing or self._handing_over:
                    return
                self._has_items.clear()
                await self._has_items.wait()
                continue
            if self._handing_over:
                return
            if not self._resumed.is_set() and not self._closing:
                await self._resumed.wait()
                continue
            if spec.batch_wait > 0:
                await self._linger(spec.batch_wait)
            if len(self._queue) <= self._batch_size:
                batch = list(self._queue)
                self._queue.clear()
            else:
                popleft = self._queue.popleft
                batch = [popleft() for _ in range(self._batch_size)]
            self._pending = batch
            self._has_room.set()
            finished = await self._deliver(batch)
            if finished:
                self._pending = []
            elif self._successor is not None and self._handed_over:
                # `hand_over` gave up waiting for this attempt and has returned,
                # so the batch follows the rest of the queue to the successor.
                self._successor.take_over(self._pending)
                self._pending = []

    async def _linger(self, seconds: float) -> None:
        """Wait up to `seconds` for a full batch; shutdown or a hand-over cuts it short."""
        deadline = time.monotonic() + seconds
        while len(self._queue) < self._batch_size and not (
            self._closing or self._handing_over or self._aborted
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._has_items.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._has_items.wait()

    async def _wait_interruptible(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._interrupt.wait(), seconds)

    async def _attempt(self, batch: list[Envelope]) -> DeliveryError | None:
        try:
            if self.sink.cancellable:
                async with asyncio.timeout(self.spec.timeout):
                    await self.sink.send(batch)
            else:
                await self.sink.send(batch)
        except DeliveryError as exc:
            return exc
        except TimeoutError:
            return RetryableDeliveryError(f"attempt timed out after {self.spec.timeout:g}s")
        except Exception as exc:
            logger.exception("sink %s raised an unexpected error", self.name)
            return RetryableDeliveryError(f"unexpected error: {exc!r}")
        return None

    async def _traced_attempt(self, batch: list[Envelope], attempt: int) -> DeliveryError | None:
        """Make one attempt, in a span linked to the batch's sampled events when tracing is on."""
        tracing = self._tracing
        span = None
        links = tracing.sampled_links(batch) if tracing is not None else None
        if tracing is not None and links:
            name, kind, attributes = self.sink.describe(batch)
            attributes = {
                **attributes,
                "eventrouter.sink": self.name,
                "eventrouter.attempt": attempt,
                "messaging.batch.message_count": len(batch),
            }
            span = tracing.start_delivery(name, kind, links, attributes)
        if span is None:
            return await self._attempt(batch)
        with trace.use_span(span, end_on_exit=False):
            error = await self._attempt(batch)
        if error is not None:
            span.set_status(StatusCode.ERROR, str(error)[:256])
            span.set_attribute("error.type", type(error).__name__)
            if error.status is not None:
                span.set_attribute("http.response.status_code", error.status)
            if error.retryable and attempt < self.spec.retry.max_attempts:
                outcome = "retry"
            else:
                outcome = "dead_letter" if self.spec.dead_letter_sink else "dropped"
            span.set_attribute("eventrouter.outcome", outcome)
        span.end()
        return error

    async def _deliver(self, batch: list[Envelope]) -> bool:
        """Deliver one batch with retries; return False when it was left for a successor.

        When an attempt fails for part of the batch only, the rest counts as
        delivered and the next attempt carries the failed part.
        """
        policy = self.spec.retry
        attempt = 0
        while True:
            attempt += 1
            error = await self._traced_attempt(batch, attempt)
            if error is None:
                self._record_success(batch)
                return True
            if error.failed is not None:
                failed = set(error.failed)
                self._record_success([e for i, e in enumerate(batch) if i not in failed])
                batch = [e for i, e in enumerate(batch) if i in failed]
                self._pending = batch
                if not batch:
                    return True
            if self._aborted:
                # Shutdown stopped the write; `stop` counts the rest as undelivered.
                return False
            self._record_failure(error, attempt, len(batch))
            if not error.retryable or attempt >= policy.max_attempts:
                await self._give_up(batch, error, attempt)
                return True
            if self._handing_over:
                return False
            self._retries.inc(len(batch))
            delay = backoff_delay(policy, attempt)
            if error.retry_after is not None:
                delay = max(delay, min(error.retry_after, policy.max_retry_after))
            await self._wait_interruptible(delay)
            if self._handing_over:
                return False

    def _record_success(self, batch: list[Envelope]) -> None:
        if not batch:
            return
        self._delivered.inc(len(batch))
        # One observation per batch, for its oldest event: per event it cost
        # more than the rest of the hot path together (about 2.7 us an event).
        self._latency.observe(max(0.0, time.time() - batch[0].received_at.timestamp()))
        if not self.ready:
            logger.info("sink %s is delivering again", self.name, extra={"sink": self.name})
        self.ready = True
        self.last_error = None

    def _record_failure(self, error: DeliveryError, attempt: int, size: int) -> None:
        self.ready = False
        self.last_error = str(error)
        self._failures.log(
            logging.WARNING,
            f"{self.name}:{type(error).__name__}",
            "sink %s: attempt %d of %d failed for %s: %s",
            self.name,
            attempt,
            self.spec.retry.max_attempts,
            _count(size, "event"),
            error,
            extra={"sink": self.name, "retryable": error.retryable},
        )

    async def _give_up(self, batch: list[Envelope], error: DeliveryError, attempts: int) -> None:
        target_name = self.spec.dead_letter_sink
        target = self._find_runner(target_name) if target_name else None
        if target is None:
            self.count_dropped(len(batch), "delivery_failed")
            logger.error(
                "sink %s dropped %s after %s: %s",
                self.name,
                _count(len(batch), "event"),
                _count(attempts, "attempt"),
                error,
                extra={"sink": self.name, "event_ids": [e.id for e in batch]},
            )
            return
        letter = DeadLetter(
            sink=self.name, error=str(error)[:1024], attempts=attempts, status=error.status
        )
        self._dead_lettered.inc(len(batch))
        await target.put([msgspec.structs.replace(e, dead_letter=letter) for e in batch])


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
