"""The engine: ring buffer, worker pool, routing, fan-out to sink runners.

Ingestion calls `Engine.submit`, which never blocks. Workers take events from
the ring buffer in batches, match them against the routes and put them in the
queue of every sink a matching route names. `reload` swaps routes and sinks
while events flow; `drain` stops the engine within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from eventrouter.config import RouterConfig
from eventrouter.envelope import Envelope
from eventrouter.metrics import Metrics
from eventrouter.routing import RouteTable
from eventrouter.sinks import DEFAULT_SECRETS_DIR, SinkRunner, build_sink
from eventrouter.sinks.base import log_undelivered
from eventrouter.tracing import Tracing

__all__ = ["Engine", "Overloaded", "RingBuffer"]

logger = logging.getLogger(__name__)

_WORKER_BATCH = 256


class Overloaded(Exception):
    """The ring buffer has no room and the overflow policy is `reject`."""


class RingBuffer:
    """A bounded FIFO of accepted events with an overflow policy.

    `offer` never blocks: when the buffer is full, `dropNewest` drops the
    incoming events, `dropOldest` evicts the oldest ones, and `reject` and
    `block` raise `Overloaded` without taking any event of the request. Under
    `block`, HTTP requests first wait in `wait_for_room`, first come first
    served, and offer what they were granted room for.
    """

    def __init__(self, capacity: int, overflow: str, metrics: Metrics) -> None:
        self.capacity = capacity
        self.overflow = overflow
        self._items: deque[Envelope] = deque()
        self._not_empty = asyncio.Event()
        self._closed = False
        self._metrics = metrics
        self._dropped = metrics.buffer_dropped.labels("buffer_full")
        # Requests waiting for room under `block`, and the room granted to
        # requests that have not offered their events yet.
        self._room_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._granted = 0
        metrics.buffer_capacity.set_function(lambda: self.capacity)
        metrics.buffer_depth.set_function(lambda: len(self._items))
        metrics.buffer_waiting.set_function(lambda: self.waiting)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        """HTTP requests waiting for room under `block`."""
        return len(self._room_waiters)

    @property
    def free(self) -> int:
        """Room for events that have not been granted it in `wait_for_room`."""
        return self.capacity - len(self._items) - self._granted

    def offer(self, events: list[Envelope], *, force: bool = False, granted: int = 0) -> int:
        """Add events; return how many the overflow policy dropped.

        `force` takes the events even beyond capacity. It is for session_end
        events, whose number is bounded by the number of open sessions.
        `granted` is the room that `wait_for_room` gave the caller. It counts
        as free for these events, and any of it they do not use is released.
        When `offer` raises, the caller keeps it.
        """
        free = self.free + granted
        dropped = 0
        if force or len(events) <= free:
            self._items.extend(events)
        elif self.overflow in ("reject", "block"):
            raise Overloaded
        elif self.overflow == "dropNewest":
            taken = max(free, 0)
            self._items.extend(events[:taken])
            dropped = len(events) - taken
        else:
            self._items.extend(events)
            dropped = len(self._items) - self.capacity
            for _ in range(dropped):
                self._items.popleft()
        self._granted -= granted
        if dropped:
            self._dropped.inc(dropped)
        if granted and self._room_waiters:
            # Room granted for events that turned out invalid goes to the waiters.
            self._grant()
        self._not_empty.set()
        return dropped

    async def wait_for_room(self, count: int, timeout: float) -> int:
        """Wait until `count` events fit; return `count`, the room now held for the caller.

        Waiters are served in arrival order, so a large batch is not passed
        over by smaller ones. Raises `Overloaded` after `timeout` seconds or
        when the buffer closes. The caller must pass the result to `offer`
        as `granted`, or to `release`.
        """
        if self._closed or count > self.capacity:
            raise Overloaded
        if not self._room_waiters and self.free >= count:
            self._granted += count
            return count
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, future)
        self._room_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            if _granted(future):
                # Room was granted as the time ran out.
                return count
            self._forget(entry)
            raise Overloaded from None
        except Overloaded:
            # `close` removed every waiter.
            raise
        except BaseException:
            # Cancelled, as when the client goes away.
            if _granted(future):
                self.release(count)
            else:
                self._forget(entry)
            raise
        return count

    def _forget(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        with contextlib.suppress(ValueError):
            self._room_waiters.remove(entry)
        # The waiters behind it may fit in the room it was waiting for.
        self._grant()

    def stop_waiting(self) -> None:
        """Fail every request waiting for room with `Overloaded`, as at shutdown."""
        while self._room_waiters:
            _, future = self._room_waiters.popleft()
            if not future.done():
                future.set_exception(Overloaded())

    def release(self, count: int) -> None:
        """Give back room held for a request, and grant it to waiting ones."""
        self._granted -= count
        self._grant()

    def _grant(self) -> None:
        waiters = self._room_waiters
        while waiters:
            count, future = waiters[0]
            if future.done():
                waiters.popleft()
                continue
            if count > self.capacity:
                # A reload made the buffer smaller than this request.
                waiters.popleft()
                future.set_exception(Overloaded())
                continue
            if self.overflow != "block":
                # A reload switched to a policy that does not wait: the
                # request goes on and the new policy applies to its events.
                waiters.popleft()
                self._granted += count
                future.set_result(None)
                continue
            if self.free < count:
                return
            waiters.popleft()
            self._granted += count
            future.set_result(None)

    async def take(self, limit: int) -> list[Envelope] | None:
        """Wait for events and return up to `limit` of them; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._not_empty.clear()
            await self._not_empty.wait()
        if limit >= len(self._items):
            items = list(self._items)
            self._items.clear()
        else:
            popleft = self._items.popleft
            items = [popleft() for _ in range(limit)]
        if self._room_waiters:
            self._grant()
        return items

    def resize(self, capacity: int, overflow: str) -> None:
        self.capacity = capacity
        self.overflow = overflow
        self._grant()

    def close(self) -> None:
        self._closed = True
        self._not_empty.set()
        self.stop_waiting()

    def clear(self) -> list[Envelope]:
        items = list(self._items)
        self._items.clear()
        return items


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


@dataclass(frozen=True)
class _Active:
    """Routes and the sink runners they name, swapped together on reload."""

    config: RouterConfig
    table: RouteTable
    runners: dict[str, SinkRunner]


class Engine:
    """Ring buffer, workers and sinks of one router."""

    def __init__(
        self,
        config: RouterConfig,
        metrics: Metrics,
        grace_period: float = 30.0,
        secrets_dir: Path = DEFAULT_SECRETS_DIR,
        tracing: Tracing | None = None,
    ) -> None:
        queue = config.router.spec.queue
        self.secrets_dir = secrets_dir
        self.tracing = tracing or Tracing(config.router.spec.tracing, config.name, environ={})
        self.metrics = metrics
        self.grace_period = grace_period
        self.buffer = RingBuffer(queue.size, queue.overflow, metrics)
        self._active = _Active(config, RouteTable(config.routes), {})
        self._workers: list[asyncio.Task[None]] = []
        self._worker_target = queue.workers
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[list[Envelope]]] = set()
        self._unmatched = metrics.unmatched
        self.started = False

    @property
    def config(self) -> RouterConfig:
        return self._active.config

    @property
    def runners(self) -> dict[str, SinkRunner]:
        return self._active.runners

    def find_runner(self, name: str) -> SinkRunner | None:
        return self._active.runners.get(name)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start every sink, then the workers; raise if a sink cannot start."""
        config = self._active.config
        runners = await self._start_runners(config, {})
        self._active = _Active(config, self._active.table, runners)
        self._resize_workers(config.router.spec.queue.workers)
        self.started = True
        logger.info(
            "engine started: %d routes, %d sinks, %d workers, buffer of %d (%s)",
            len(config.routes),
            len(runners),
            self._worker_target,
            self.buffer.capacity,
            self.buffer.overflow,
            extra={"router": config.name},
        )

    def _make_runner(self, config: RouterConfig, name: str) -> SinkRunner:
        resource = config.sinks[name]
        return SinkRunner(
            name,
            resource.spec,
            build_sink(resource, self.secrets_dir),
            overflow=config.router.spec.queue.overflow,
            metrics=self.metrics,
            find_runner=self.find_runner,
            tracing=self.tracing,
        )

    async def _start_runners(
        self, config: RouterConfig, current: dict[str, SinkRunner]
    ) -> dict[str, SinkRunner]:
        """Start runners for new or changed sinks and reuse unchanged ones."""
        overflow = config.router.spec.queue.overflow
        runners: dict[str, SinkRunner] = {}
        started: list[SinkRunner] = []
        try:
            for name, resource in config.sinks.items():
                old = current.get(name)
                if old is not None and old.spec == resource.spec:
                    runners[name] = old
                    continue
                runner = self._make_runner(config, name)
                await runner.start()
                started.append(runner)
                runners[name] = runner
        except BaseException:
            for runner in started:
                await runner.stop(time.monotonic())
            raise
        for runner in runners.values():
            runner.overflow = overflow
        return runners

    def _resize_workers(self, count: int) -> None:
        self._worker_target = count
        self._workers = [t for t in self._workers if not t.done()]
        while len(self._workers) < count:
            index = len(self._workers)
            self._workers.append(asyncio.create_task(self._work(index), name=f"worker-{index}"))

    # --- intake ------------------------------------------------------------------

    def submit(self, events: list[Envelope], *, force: bool = False, granted: int = 0) -> int:
        """Put accepted events in the ring buffer; return how many overflow dropped.

        Raises `Overloaded` when the policy is `reject` or `block` and the
        events do not fit. `granted` is room from `RingBuffer.wait_for_room`.
        """
        return self.buffer.offer(events, force=force, granted=granted)

    # --- workers -----------------------------------------------------------------

    async def _work(self, index: int) -> None:
        while index < self._worker_target:
            batch = await self.buffer.take(_WORKER_BATCH)
            if batch is None:
                return
            try:
                await self._dispatch(batch)
            except Exception:
                # A bug in routing must not kill the worker pool; the events are
                # counted so that nothing disappears uncounted.
                logger.exception("worker %d failed to route %d events", index, len(batch))
                self.metrics.buffer_dropped.labels("routing_error").inc(len(batch))

    async def _dispatch(self, batch: list[Envelope]) -> None:
        active = self._active
        table = active.table
        per_sink: dict[str, list[Envelope]] = {}
        if table.constant is not None:
            # Every event matches the same routes: the batch goes whole to each sink.
            routes, sinks = table.constant
            for route in routes:
                self.metrics.route_matches.labels(route).inc(len(batch))
            if not routes:
                self._unmatched.inc(len(batch))
            for sink in sinks:
                per_sink[sink] = batch
        else:
            self._split(table, batch, per_sink)
        pending = list(per_sink.items())
        for index, (sink, events) in enumerate(pending):
            try:
                await active.runners[sink].put(events)
            except asyncio.CancelledError:
                # Shutdown cancelled this worker while a sink queue was full; the
                # sinks it had not reached yet count their events as dropped.
                for later, rest in pending[index + 1 :]:
                    active.runners[later].discard(rest, "shutdown")
                    log_undelivered(f"sink {later}", rest)
                raise

    def _split(
        self, table: RouteTable, batch: list[Envelope], per_sink: dict[str, list[Envelope]]
    ) -> None:
        """Fill `per_sink` with the events each sink receives, in the batch's order."""
        targets = table.targets
        route_counts: dict[str, int] = {}
        unmatched = 0
        for event in batch:
            routes, sinks = targets(event)
            if not routes:
                unmatched += 1
                continue
            for route in routes:
                route_counts[route] = route_counts.get(route, 0) + 1
            for sink in sinks:
                bucket = per_sink.get(sink)
                if bucket is None:
                    per_sink[sink] = [event]
                else:
                    bucket.append(event)
        if unmatched:
            self._unmatched.inc(unmatched)
        for route, count in route_counts.items():
            self.metrics.route_matches.labels(route).inc(count)

    # --- reload ------------------------------------------------------------------

    async def reload(self, config: RouterConfig) -> None:
        """Apply a new configuration without losing or duplicating events.

        Unchanged sinks keep running. A changed sink gets a new runner, and the
        old one hands over every event it has not finished. A removed sink
        delivers the events it still has within the grace period and stops.
        """
        async with self._reload_lock:
            old = self._active
            runners = await self._start_runners(config, old.runners)
            for name, runner in runners.items():
                if old.runners.get(name) not in (None, runner):
                    # Resumed by `hand_over` once the old runner's events are in front.
                    runner.hold()
            self._active = _Active(config, RouteTable(config.routes), runners)
            queue = config.router.spec.queue
            self.buffer.resize(queue.size, queue.overflow)
            self._resize_workers(queue.workers)

            for name, runner in old.runners.items():
                successor = runners.get(name)
                if successor is runner:
                    continue
                if successor is not None:
                    await runner.hand_over(successor, timeout=min(self.grace_period, 10.0))
                    continue
                deadline = time.monotonic() + self.grace_period
                task = asyncio.create_task(runner.stop(deadline), name=f"retire-{name}")
                self._retiring.add(task)
                task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[list[Envelope]]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is None and task.result():
            log_undelivered("removed sink", task.result())

    # --- shutdown ----------------------------------------------------------------

    async def drain(self, grace_period: float | None = None) -> int:
        """Deliver everything held within the grace period; return how many were lost.

        Undelivered events are counted as dropped with reason `shutdown` and
        their ids are logged.
        """
        grace = self.grace_period if grace_period is None else grace_period
        deadline = time.monotonic() + grace
        self.buffer.close()
        lost = 0

        # Workers exit once the buffer is empty.
        pending = [t for t in self._workers if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            for task in still:
                task.cancel()
            for task in still:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = self.buffer.clear()
        if left:
            self.metrics.buffer_dropped.labels("shutdown").inc(len(left))
            log_undelivered("ring buffer", left)
            lost += len(left)

        # Sinks stop in dependency order: a dead-letter sink after the sinks
        # that may still send to it.
        for layer in _stop_order(self._active.runners):
            results = await asyncio.gather(*(r.stop(deadline) for r in layer))
            for runner, leftover in zip(layer, results, strict=True):
                if leftover:
                    log_undelivered(f"sink {runner.name}", leftover)
                    lost += len(leftover)
        for retiring in list(self._retiring):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(retiring, max(0.1, deadline - time.monotonic()))
        return lost


def _stop_order(runners: dict[str, SinkRunner]) -> list[list[SinkRunner]]:
    """Group runners so that each dead-letter target stops after its sources."""
    depth: dict[str, int] = {}

    def level(name: str, seen: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        sources = [
            n for n, r in runners.items() if r.spec.dead_letter_sink == name and n not in seen
        ]
        value = 1 + max((level(s, seen | {name}) for s in sources), default=-1)
        depth[name] = value
        return value

    for name in runners:
        level(name, frozenset())
    layers: dict[int, list[SinkRunner]] = {}
    for name, runner in runners.items():
        layers.setdefault(depth[name], []).append(runner)
    return [layers[k] for k in sorted(layers)]
