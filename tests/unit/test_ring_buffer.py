"""Unit tests of the ring buffer's room grants under the `block` overflow policy."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from eventrouter.engine import Overloaded, RingBuffer
from eventrouter.envelope import Envelope
from eventrouter.metrics import Metrics

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def events(count: int) -> list[Envelope]:
    return [
        Envelope(
            id=f"{i:026d}",
            name="e",
            properties={},
            timestamp=NOW,
            received_at=NOW,
            external=True,
            router="test",
        )
        for i in range(count)
    ]


def buffer(capacity: int = 10) -> RingBuffer:
    return RingBuffer(capacity, "block", Metrics())


async def test_room_granted_at_once_when_free() -> None:
    ring = buffer()
    assert await ring.wait_for_room(4, 1.0) == 4
    assert ring.free == 6
    assert ring.offer(events(4), granted=4) == 0
    assert len(ring) == 4
    assert ring.free == 6


async def test_granted_room_not_taken_by_others() -> None:
    ring = buffer()
    await ring.wait_for_room(8, 1.0)
    # Only 2 slots are free for anyone else while the 8 are held.
    with pytest.raises(Overloaded):
        ring.offer(events(3))
    assert ring.offer(events(8), granted=8) == 0


async def test_unused_room_released_on_offer() -> None:
    ring = buffer()
    await ring.wait_for_room(5, 1.0)
    ring.offer(events(2), granted=5)
    assert ring.free == 8


async def test_waiters_served_in_arrival_order() -> None:
    ring = buffer()
    ring.offer(events(10))
    order: list[str] = []

    async def wait(label: str, count: int) -> None:
        await ring.wait_for_room(count, 5.0)
        order.append(label)
        ring.offer(events(count), granted=count)

    large = asyncio.create_task(wait("large", 6))
    await asyncio.sleep(0)
    small = asyncio.create_task(wait("small", 1))
    await asyncio.sleep(0)

    # Two free slots fit the small request but not the large one, which came first.
    await ring.take(2)
    await asyncio.sleep(0)
    assert order == []
    await ring.take(8)
    await asyncio.gather(large, small)
    assert order == ["large", "small"]
    assert len(ring) == 7


async def test_wait_times_out_with_overloaded() -> None:
    ring = buffer()
    ring.offer(events(10))
    with pytest.raises(Overloaded):
        await ring.wait_for_room(1, 0.05)
    # The timed-out request has left the line.
    await ring.take(1)
    assert ring.free == 1
    assert await ring.wait_for_room(1, 0.05) == 1


async def test_cancelled_waiter_leaves_the_line() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(5, 5.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ring.take(10)
    assert ring.free == 10


async def test_cancelled_after_grant_releases_room() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(5, 5.0))
    await asyncio.sleep(0)
    await ring.take(10)
    # The grant is made, but the waiting task is cancelled before it resumes.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ring.free == 10


async def test_close_fails_waiters() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(1, 5.0))
    await asyncio.sleep(0)
    ring.close()
    with pytest.raises(Overloaded):
        await task
    with pytest.raises(Overloaded):
        await ring.wait_for_room(1, 5.0)


async def test_larger_capacity_grants_waiters() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(3, 5.0))
    await asyncio.sleep(0)
    ring.resize(20, "block")
    assert await task == 3
    assert ring.free == 7


async def test_timed_out_head_lets_others_in() -> None:
    ring = buffer()
    ring.offer(events(5))
    # The first waiter needs more than the 5 free slots; the second fits.
    first = asyncio.create_task(ring.wait_for_room(10, 0.05))
    await asyncio.sleep(0)
    second = asyncio.create_task(ring.wait_for_room(1, 5.0))
    with pytest.raises(Overloaded):
        await first
    assert await asyncio.wait_for(second, 1.0) == 1


async def test_stop_waiting_fails_waiters_only() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(1, 5.0))
    await asyncio.sleep(0)
    ring.stop_waiting()
    with pytest.raises(Overloaded):
        await task
    assert ring.waiting == 0
    assert not ring.closed


async def test_smaller_capacity_fails_waiter_that_cannot_fit() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(8, 5.0))
    await asyncio.sleep(0)
    ring.resize(5, "block")
    with pytest.raises(Overloaded):
        await asyncio.wait_for(task, 1.0)
    with pytest.raises(Overloaded):
        await ring.wait_for_room(6, 5.0)


async def test_policy_switch_releases_waiters() -> None:
    ring = buffer()
    ring.offer(events(10))
    task = asyncio.create_task(ring.wait_for_room(3, 5.0))
    await asyncio.sleep(0)
    ring.resize(10, "dropNewest")
    granted = await asyncio.wait_for(task, 1.0)
    # The buffer is still full, so the new policy drops the newest events.
    assert ring.offer(events(3), granted=granted) == 3
    assert len(ring) == 10
    assert ring.free == 0
