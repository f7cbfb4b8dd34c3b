"""The Kafka sink against a real Kafka broker on loopback.

Each test starts `eventrouter serve` as a subprocess with a Kafka sink that
points at the session's `kafka_broker`, sends events over HTTP, and reads the
topics back with an independent aiokafka consumer. The consumer assigns every
partition and reads from the first offset up to the end offsets, so a record
written twice shows up twice. Tests that stop the broker start it again in
`finally`, because the tests after them share it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord, TopicPartition

from tests.conftest import (
    RouterProcess,
    parse_metrics,
    read_jsonl,
    route_doc,
    router_doc,
    sink_doc,
    write_documents,
)
from tests.kafka.broker import KafkaBroker

RouterFactory = Callable[..., RouterProcess]

# Seconds added to a configured timeout when a test checks how long a failed
# attempt took. They cover polling every 20 ms and scheduling delays on a busy machine.
TIMING_SLACK = 0.75


# --- Kafka helpers -----------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One Kafka record with its envelope decoded from JSON."""

    topic: str
    partition: int
    offset: int
    key: str | None
    headers: dict[str, str]
    event: dict[str, Any]

    @classmethod
    def from_message(cls, message: ConsumerRecord[bytes, bytes]) -> Record:
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key.decode() if message.key is not None else None,
            headers={name: value.decode() for name, value in message.headers},
            event=json.loads(message.value or b"null"),
        )


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_topics(
    bootstrap: str, names: list[str], partitions: int, configs: dict[str, str] | None = None
) -> None:
    """Create topics with replication factor 1 and optional topic configs."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=configs or {}) for name in names]
        )
    finally:
        await admin.close()
    for entry in response.topic_errors:
        assert entry[1] == 0, f"creating topic {entry[0]} failed: {entry}"


async def read_records(
    bootstrap: str, topics: dict[str, int], timeout: float = 60.0
) -> list[Record]:
    """Read every record of `topics` (name to partition count) up to the current end offsets.

    Records come back in offset order within each partition.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    records: list[Record] = []
    try:
        partitions = [TopicPartition(t, p) for t, count in topics.items() for p in range(count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if end[tp] > 0}
        async with asyncio.timeout(timeout):
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=20_000)
                for tp, messages in batches.items():
                    records.extend(Record.from_message(m) for m in messages if m.offset < end[tp])
                    if messages and messages[-1].offset >= end[tp] - 1:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


# --- router helpers ----------------------------------------------------------------


def kafka_sink(
    name: str, bootstrap: str, topic: str, kafka: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    return sink_doc(
        name, kafka={"bootstrapServers": [bootstrap], "topic": topic, **(kafka or {})}, **spec
    )


def file_sink(name: str, path: Path) -> dict[str, Any]:
    return sink_doc(name, file={"path": str(path)})


class Admin:
    """Async reads of a router's admin API, so tests can poll while other tasks send."""

    def __init__(self, router: RouterProcess, client: httpx.AsyncClient) -> None:
        self.router = router
        self.client = client

    async def metrics(self) -> dict[str, float]:
        reply = await self.client.get(f"{self.router.admin_url}/metrics", timeout=10)
        return parse_metrics(reply.text)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample; labels in any order. A missing sample is 0."""
        return lookup(await self.metrics(), name, **labels)

    async def sink_events(self, sink: str, outcome: str) -> float:
        return await self.metric("eventrouter_sink_events_total", sink=sink, outcome=outcome)

    async def sink_health(self, sink: str) -> dict[str, Any]:
        reply = await self.client.get(f"{self.router.admin_url}/readyz", timeout=10)
        return dict(reply.json()["sinks"][sink])


def lookup(metrics: dict[str, float], name: str, **labels: str) -> float:
    expected = {f'{k}="{v}"' for k, v in labels.items()}
    for key, value in metrics.items():
        metric, _, rest = key.partition("{")
        found = set(rest.rstrip("}").split(",")) if rest else set()
        if metric == name and found == expected:
            return value
    return 0.0


async def poll(
    predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.02
) -> float:
    """Await `predicate` until it holds; return the monotonic time when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def post_events(
    client: httpx.AsyncClient, router: RouterProcess, events: list[dict[str, Any]]
) -> None:
    reply = await client.post(f"{router.url}/v2/events", json={"events": events}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["accepted"] == len(events), reply.text


def failure_lines(router: RouterProcess, sink: str) -> list[str]:
    """Messages of the log lines about failed attempts of one sink."""
    return [
        line["message"]
        for line in router.logs()
        if line.get("sink") == sink and "failed for" in line.get("message", "")
    ]


def seq_of(event: dict[str, Any]) -> int:
    return int(event["properties"]["seq"])


# --- throughput, keys, headers and order ---------------------------------------------

NAMES = ("match_start", "match_end", "purchase")
PLAYERS = 50
SENDERS = 5
BATCHES = 200
BATCH_SIZE = 500
TOTAL = BATCHES * BATCH_SIZE
PARTITIONS = 4


def load_batch(sender: int, batch: int) -> list[dict[str, Any]]:
    """One batch of a sender that owns every SENDERS-th player.

    Each player's `seq` counts up in the order the sender sends, so the
    consumer can check the order per key. No two senders share a player,
    so that order is defined even though the senders run concurrently.
    """
    players = [f"player-{k:02d}" for k in range(sender, PLAYERS, SENDERS)]
    events = []
    for index in range(BATCH_SIZE):
        n = batch * BATCH_SIZE + index
        events.append(
            {
                "name": NAMES[n % len(NAMES)],
                "properties": {
                    "player": players[n % len(players)],
                    "seq": str(n // len(players)),
                },
            }
        )
    return events


async def test_kafka_100k_events_exactly_once(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    prefix = unique_name("load")
    topics = {f"{prefix}.{name}": PARTITIONS for name in NAMES}
    await create_topics(kafka_broker.bootstrap, list(topics), PARTITIONS)
    config = write_documents(
        tmp_path / "router.yaml",
        [
            # Queues that hold the whole load, so a slow moment cannot drop events.
            router_doc(queue={"size": 131072}),
            kafka_sink(
                "kafka",
                kafka_broker.bootstrap,
                f"{prefix}.{{name}}",
                {"key": "{properties.player}", "headers": {"x-source": "load-test"}},
                queueSize=131072,
            ),
            route_doc("all", ["kafka"]),
        ],
    )
    router = router_factory([config], args=["--grace-period", "5"])

    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)

        async def send(sender: int) -> None:
            for batch in range(BATCHES // SENDERS):
                await post_events(client, router, load_batch(sender, batch))

        await asyncio.gather(*(send(s) for s in range(SENDERS)))
        sent_at = time.monotonic()

        async def all_delivered() -> bool:
            metrics = await admin.metrics()
            finished = lookup(
                metrics, "eventrouter_sink_events_total", sink="kafka", outcome="delivered"
            ) + lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome="dropped")
            return finished >= TOTAL

        delivered_at = await poll(all_delivered, 60, f"{TOTAL} events delivered", 0.1)
        metrics = await admin.metrics()

    records = await read_records(kafka_broker.bootstrap, topics)
    read_at = time.monotonic()
    print(
        f"sent {TOTAL} in {sent_at - started:.1f}s, all delivered after "
        f"{delivered_at - started:.1f}s, read back after {read_at - started:.1f}s"
    )

    assert lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome="delivered") == (
        TOTAL
    )
    assert lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome="dropped") == 0
    assert lookup(metrics, "eventrouter_buffer_dropped_total", reason="buffer_full") == 0

    ids = Counter(r.event["id"] for r in records)
    assert len(records) == TOTAL
    assert len(ids) == TOTAL
    assert ids.most_common(1)[0][1] == 1

    for record in records:
        assert record.topic == f"{prefix}.{record.event['name']}"
        assert record.key == record.event["properties"]["player"]
        assert record.headers["eventrouter-id"] == record.event["id"]
        assert record.headers["eventrouter-name"] == record.event["name"]
        assert record.headers["x-source"] == "load-test"

    # Kafka orders records per partition, and a key always maps to one
    # partition of a topic, so each (topic, key) must keep the sending order.
    by_key: dict[tuple[str, str | None], list[Record]] = defaultdict(list)
    for record in records:
        by_key[(record.topic, record.key)].append(record)
    assert len({key for _, key in by_key}) == PLAYERS
    for (topic, key), keyed in by_key.items():
        assert len({r.partition for r in keyed}) == 1, f"{key} in {topic} spans partitions"
        # The partition is the one Kafka's default partitioner picks for the key
        # (murmur2, as in the Java client), so other producers agree with it.
        expected = DefaultPartitioner()(key.encode() if key else None, list(range(PARTITIONS)), [])
        assert keyed[0].partition == expected, f"{key} in {topic} is not on partition {expected}"
        seqs = [seq_of(r.event) for r in keyed]
        assert seqs == sorted(seqs), f"{key} in {topic} is out of order"

    per_player: dict[str, set[int]] = defaultdict(set)
    for record in records:
        per_player[record.event["properties"]["player"]].add(seq_of(record.event))
    for player, player_seqs in per_player.items():
        assert player_seqs == set(range(TOTAL // PLAYERS)), f"{player} misses events"


# --- broker restart while events flow ------------------------------------------------

INTERVAL = 0.25
STOP_AT = 2.5
START_AT = 10.0
RUN_FOR = 15.0
# Seconds to keep sending after the broker is back, so that sends after the
# outage are part of the run even when the broker takes long to start.
SEND_AFTER_RETURN = 4.0
RESUME_LIMIT = 5.0


@dataclass
class Sample:
    """The Kafka sink's state at one moment of the outage test."""

    at: float
    delivered: float
    ready_gauge: float
    ready: bool
    last_error: str | None


async def test_kafka_broker_restart_recovers(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    topic = unique_name("restart")
    await create_topics(kafka_broker.bootstrap, [topic], 1)
    copy_path, dead_path = tmp_path / "copy.jsonl", tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(),
            kafka_sink(
                "kafka",
                kafka_broker.bootstrap,
                topic,
                {"requestTimeout": "2s"},
                timeout="3s",
                retry={
                    "maxAttempts": 100,
                    "backoff": {"type": "exponential", "initial": "200ms", "max": "1s"},
                },
                deadLetterSink="dead",
            ),
            file_sink("copy", copy_path),
            file_sink("dead", dead_path),
            route_doc("all", ["kafka", "copy"]),
        ],
    )
    router = router_factory([config], args=["--grace-period", "5"])

    sent: list[int] = []
    post_seconds: list[float] = []
    samples: list[Sample] = []
    sending = asyncio.Event()
    sending.set()

    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)
        start = time.monotonic()

        async def send_steadily() -> None:
            while sending.is_set():
                seq = len(sent)
                before = time.monotonic()
                reply = await client.post(
                    f"{router.url}/v2/event",
                    json={"name": "heartbeat", "properties": {"seq": str(seq)}},
                    timeout=10,
                )
                post_seconds.append(time.monotonic() - before)
                assert reply.status_code == 200, reply.text
                sent.append(seq)
                await asyncio.sleep(max(0.0, start + len(sent) * INTERVAL - time.monotonic()))

        async def sample_state() -> None:
            while True:
                metrics = await admin.metrics()
                health = await admin.sink_health("kafka")
                samples.append(
                    Sample(
                        at=time.monotonic(),
                        delivered=lookup(
                            metrics,
                            "eventrouter_sink_events_total",
                            sink="kafka",
                            outcome="delivered",
                        ),
                        ready_gauge=lookup(metrics, "eventrouter_sink_ready", sink="kafka"),
                        ready=health["ready"],
                        last_error=health.get("lastError"),
                    )
                )
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(send_steadily())
        sampler = asyncio.create_task(sample_state())
        try:
            await asyncio.sleep(max(0.0, start + STOP_AT - time.monotonic()))
            await kafka_broker.stop_async()
            stopped_at = time.monotonic()
            sent_before_stop = len(sent)
            try:

                async def kafka_not_ready() -> bool:
                    health = await admin.sink_health("kafka")
                    return not health["ready"] and bool(health.get("lastError"))

                not_ready_at = await poll(
                    kafka_not_ready, START_AT - STOP_AT, "the Kafka sink to be not ready"
                )
                outage_health = await admin.sink_health("kafka")
                outage_gauge = await admin.metric("eventrouter_sink_ready", sink="kafka")

                # The file sink on the same route keeps up while Kafka is down.
                sent_during_outage = len(sent)

                async def copy_caught_up() -> bool:
                    return await admin.sink_events("copy", "delivered") >= sent_during_outage

                await poll(copy_caught_up, 5, "the file sink to deliver during the outage")
                broker_down_while_copying = not kafka_broker.is_running
                outage_delivered = await admin.sink_events("kafka", "delivered")

                await asyncio.sleep(max(0.0, start + START_AT - time.monotonic()))
            finally:
                restarting_at = time.monotonic()
                await kafka_broker.start_async()
            back_at = time.monotonic()

            await asyncio.sleep(
                max(0.0, max(start + RUN_FOR, back_at + SEND_AFTER_RETURN) - time.monotonic())
            )
            sending.clear()
            await sender

            async def all_finished() -> bool:
                metrics = await admin.metrics()
                finished = sum(
                    lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome=o)
                    for o in ("delivered", "dead_lettered", "dropped")
                )
                return finished >= len(sent)

            finished_at = await poll(all_finished, 60, f"{len(sent)} events to finish")

            async def kafka_ready() -> bool:
                health = await admin.sink_health("kafka")
                return bool(health["ready"]) and "lastError" not in health

            await poll(kafka_ready, 10, "the Kafka sink to be ready again")
            final_gauge = await admin.metric("eventrouter_sink_ready", sink="kafka")
            metrics = await admin.metrics()
        finally:
            sending.clear()
            sampler.cancel()
            if not sender.done():
                sender.cancel()

    resumed = [s for s in samples if s.at >= stopped_at and s.delivered > outage_delivered]
    assert resumed, "the Kafka sink never delivered again after the outage"
    resume_delay = resumed[0].at - back_at
    outage_samples = [s for s in samples if not_ready_at < s.at < restarting_at]
    print(
        f"broker down from {stopped_at - start:.1f}s to {back_at - start:.1f}s "
        f"(restart began at {restarting_at - start:.1f}s); sink not ready "
        f"{not_ready_at - stopped_at:.2f}s after the stop; {len(sent)} events; "
        f"delivery resumed {resume_delay:+.2f}s after the broker was back, "
        f"all finished {finished_at - back_at:.1f}s after; slowest POST {max(post_seconds):.3f}s"
    )

    # Accepting never blocked, and the file sink kept delivering while Kafka was down.
    assert max(post_seconds) < 1.0
    assert sent_during_outage > sent_before_stop
    assert broker_down_while_copying

    # Readiness and the ready gauge show the outage and the recovery.
    assert outage_health["ready"] is False
    assert outage_health["lastError"]
    assert outage_gauge == 0
    assert outage_samples
    assert all(s.ready_gauge == 0 for s in outage_samples)
    assert final_gauge == 1
    assert resume_delay < RESUME_LIMIT

    # Every accepted event is either in Kafka or dead-lettered, exactly once.
    records = await read_records(kafka_broker.bootstrap, {topic: 1})
    dead = read_jsonl(dead_path)
    outcomes = Counter(seq_of(r.event) for r in records) + Counter(seq_of(e) for e in dead)
    duplicates = {
        seq: {
            "kafka_offsets": [r.offset for r in records if seq_of(r.event) == seq],
            "dead_letters": sum(1 for e in dead if seq_of(e) == seq),
        }
        for seq, count in outcomes.items()
        if count > 1
    }
    assert sorted(outcomes) == sent
    assert not duplicates, f"events that ended more than once: {duplicates}"
    assert len({r.event["id"] for r in records} | {e["id"] for e in dead}) == len(sent)

    delivered = lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome="delivered")
    dead_lettered = lookup(
        metrics, "eventrouter_sink_events_total", sink="kafka", outcome="dead_lettered"
    )
    assert delivered == len(records)
    assert dead_lettered == len(dead)
    assert lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome="dropped") == 0
    assert lookup(metrics, "eventrouter_sink_events_total", sink="copy", outcome="delivered") == (
        len(sent)
    )


# --- a send to a stopped broker -------------------------------------------------------


def hang_config(
    tmp_path: Path, bootstrap: str, topic: str, backoff: str = "2s"
) -> tuple[Path, Path, Path]:
    """Write a router file and return it with the paths of its two file sinks.

    The Kafka sink allows 2 attempts of at most 2 s each. The linear backoff
    leaves a window between the attempts, in which the tests check that the
    file sink on the same route still delivers.
    """
    copy_path, dead_path = tmp_path / "copy.jsonl", tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(),
            kafka_sink(
                "kafka",
                bootstrap,
                topic,
                {"requestTimeout": "1s"},
                timeout="2s",
                retry={
                    "maxAttempts": 2,
                    "backoff": {"type": "linear", "initial": backoff, "jitter": 0},
                },
                deadLetterSink="dead",
            ),
            file_sink("copy", copy_path),
            file_sink("dead", dead_path),
            route_doc("all", ["kafka", "copy"]),
        ],
    )
    return config, copy_path, dead_path


@dataclass
class FailedSend:
    """Timings of one event that the Kafka sink failed to deliver twice."""

    first_failure: float
    dead_lettered: float
    copy_meanwhile: bool


async def send_and_fail_twice(router: RouterProcess, seq: int) -> FailedSend:
    """Send one event that cannot reach Kafka and time its two failed attempts.

    After the first failure, three more events go to the same route. The file
    sink must deliver them before the Kafka sink gives up on the first event,
    which shows that the router accepts and delivers to its other sink meanwhile.
    """
    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)
        retries_before = await admin.metric("eventrouter_sink_retries_total", sink="kafka")
        dead_before = await admin.sink_events("kafka", "dead_lettered")
        copies_before = await admin.sink_events("copy", "delivered")

        sent_at = time.monotonic()
        await post_events(client, router, [{"name": "heartbeat", "properties": {"seq": str(seq)}}])

        async def first_attempt_failed() -> bool:
            retries = await admin.metric("eventrouter_sink_retries_total", sink="kafka")
            return retries > retries_before

        failed_at = await poll(first_attempt_failed, 10, "the first attempt to fail")

        # Between the attempts, the router accepts more events and the file sink delivers them.
        await post_events(client, router, [{"name": "ping", "properties": {"seq": "-1"}}] * 3)

        async def copies_delivered() -> bool:
            return await admin.sink_events("copy", "delivered") >= copies_before + 4

        await poll(copies_delivered, 5, "the file sink to deliver")
        copy_meanwhile = await admin.sink_events("kafka", "dead_lettered") == dead_before

        async def dead_lettered() -> bool:
            return await admin.sink_events("kafka", "dead_lettered") > dead_before

        dead_at = await poll(dead_lettered, 10, "the event to be dead-lettered")
    return FailedSend(failed_at - sent_at, dead_at - sent_at, copy_meanwhile)


async def test_kafka_down_at_start_dead_letters(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    topic = unique_name("down-at-start")
    await create_topics(kafka_broker.bootstrap, [topic], 1)
    config, copy_path, dead_path = hang_config(tmp_path, kafka_broker.bootstrap, topic)

    await kafka_broker.stop_async()
    try:
        # The router starts and reports ready although its broker is down.
        router = router_factory([config], args=["--grace-period", "5"])
        async with httpx.AsyncClient() as client:
            # NOTE: not asserted. The producer connects at the first attempt,
            # so before any event the sink reports ready although its broker is down.
            initial = await Admin(router, client).sink_health("kafka")
        result = await send_and_fail_twice(router, seq=0)
        async with httpx.AsyncClient() as client:
            health = await Admin(router, client).sink_health("kafka")
            ready_gauge = await Admin(router, client).metric("eventrouter_sink_ready", sink="kafka")
        router.wait_for(lambda: len(read_jsonl(dead_path)) >= 4, 10, "4 dead letters")
    finally:
        await kafka_broker.start_async()
    print(
        f"first attempt failed after {result.first_failure:.2f}s, "
        f"dead-lettered after {result.dead_lettered:.2f}s; lastError: {health.get('lastError')}; "
        f"before any event: {initial}"
    )

    assert health["ready"] is False
    assert health["lastError"]
    assert ready_gauge == 0
    assert result.first_failure < 2.0 + TIMING_SLACK
    assert result.copy_meanwhile

    dead = read_jsonl(dead_path)
    heartbeats = [e for e in dead if e["name"] == "heartbeat"]
    assert len(heartbeats) == 1
    assert heartbeats[0]["dead_letter"]["sink"] == "kafka"
    assert heartbeats[0]["dead_letter"]["attempts"] == 2
    assert kafka_broker.bootstrap in heartbeats[0]["dead_letter"]["error"]
    assert len({e["id"] for e in dead}) == len(dead)
    assert len(read_jsonl(copy_path)) == 4
    # Repeated failures of one kind are logged once per interval, so one line is enough.
    assert failure_lines(router, "kafka")


async def test_kafka_stopped_broker_times_out(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    topic = unique_name("hang")
    await create_topics(kafka_broker.bootstrap, [topic], 1)
    config, copy_path, dead_path = hang_config(tmp_path, kafka_broker.bootstrap, topic)
    router = router_factory([config], args=["--grace-period", "5"])

    # A first event connects the producer, so the next send meets a broker
    # that went away under an open connection.
    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)
        await post_events(client, router, [{"name": "heartbeat", "properties": {"seq": "0"}}])

        async def first_delivered() -> bool:
            return await admin.sink_events("kafka", "delivered") == 1

        await poll(first_delivered, 20, "the first event in Kafka")

    await kafka_broker.stop_async()
    try:
        result = await send_and_fail_twice(router, seq=1)
        router.wait_for(lambda: len(read_jsonl(dead_path)) >= 4, 10, "4 dead letters")
    finally:
        await kafka_broker.start_async()
    print(
        f"first attempt failed after {result.first_failure:.2f}s, "
        f"dead-lettered after {result.dead_lettered:.2f}s; "
        f"failures: {failure_lines(router, 'kafka')}"
    )

    # An attempt ends within its 2 s timeout; the second starts after the 2 s backoff.
    assert result.first_failure < 2.0 + TIMING_SLACK
    assert result.dead_lettered < 2 * 2.0 + 2.0 + TIMING_SLACK
    assert result.copy_meanwhile

    dead = read_jsonl(dead_path)
    heartbeats = [e for e in dead if e["name"] == "heartbeat"]
    assert [seq_of(e) for e in heartbeats] == [1]
    assert heartbeats[0]["dead_letter"]["attempts"] == 2
    assert heartbeats[0]["dead_letter"]["error"]
    assert len(read_jsonl(copy_path)) == 5

    records = await read_records(kafka_broker.bootstrap, {topic: 1})
    assert [seq_of(r.event) for r in records] == [0]


# --- shutdown and permanent errors ----------------------------------------------------


async def test_kafka_shutdown_flushes_linger(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    topic = unique_name("flush")
    await create_topics(kafka_broker.bootstrap, [topic], 2)
    count = 2000
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(),
            kafka_sink(
                "kafka",
                kafka_broker.bootstrap,
                topic,
                {"linger": "500ms", "key": "{properties.seq}"},
            ),
            route_doc("all", ["kafka"]),
        ],
    )
    router = router_factory([config], args=["--grace-period", "20"])

    async with httpx.AsyncClient() as client:
        for start in range(0, count, 500):
            events = [
                {"name": "tick", "properties": {"seq": str(s)}} for s in range(start, start + 500)
            ]
            await post_events(client, router, events)
    stopping = time.monotonic()
    exit_code = router.terminate(30)
    stopped = time.monotonic()

    records = await read_records(kafka_broker.bootstrap, {topic: 2})
    print(f"router exited {stopped - stopping:.2f}s after SIGTERM")

    assert exit_code == 0
    assert sorted(seq_of(r.event) for r in records) == list(range(count))
    assert len({r.event["id"] for r in records}) == count
    assert not [line for line in router.logs() if "not delivered" in line.get("message", "")]


async def test_kafka_record_too_large_dead_letters(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    topic = unique_name("too-large")
    await create_topics(kafka_broker.bootstrap, [topic], 1, {"max.message.bytes": "2048"})
    dead_path = tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(),
            kafka_sink(
                "kafka",
                kafka_broker.bootstrap,
                topic,
                retry={"maxAttempts": 5, "backoff": {"initial": "100ms"}},
                deadLetterSink="dead",
            ),
            file_sink("dead", dead_path),
            route_doc("all", ["kafka"], names=["big", "small"]),
        ],
    )
    router = router_factory([config], args=["--grace-period", "5"])

    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)

        async def delivered(count: int) -> None:
            async def reached() -> bool:
                return await admin.sink_events("kafka", "delivered") == count

            await poll(reached, 20, f"{count} small events in Kafka")

        # A small event first, so that the producer has sent to the partition
        # before the broker rejects the large one.
        await post_events(client, router, [{"name": "small", "properties": {"seq": "0"}}])
        await delivered(1)
        await post_events(client, router, [{"name": "big", "properties": {"blob": "x" * 4000}}])

        async def dead_lettered() -> bool:
            return await admin.sink_events("kafka", "dead_lettered") == 1

        await poll(dead_lettered, 20, "the large event to be dead-lettered")

        # Records that fit still go through after the rejection.
        await post_events(client, router, [{"name": "small", "properties": {"seq": "1"}}])
        await delivered(2)
        retries = await admin.metric("eventrouter_sink_retries_total", sink="kafka")

    dead = read_jsonl(dead_path)
    records = await read_records(kafka_broker.bootstrap, {topic: 1})
    print(f"dead letter: {dead[0]['dead_letter'] if dead else None}")

    assert retries == 0
    assert len(dead) == 1
    assert dead[0]["name"] == "big"
    assert dead[0]["dead_letter"]["attempts"] == 1
    assert "MessageSizeTooLarge" in dead[0]["dead_letter"]["error"]
    assert [seq_of(r.event) for r in records] == [0, 1]


async def test_kafka_large_record_in_batch(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    """The broker rejects a whole record batch for one large record; only that record fails."""
    topic = unique_name("large-in-batch")
    await create_topics(kafka_broker.bootstrap, [topic], 1, {"max.message.bytes": "2048"})
    dead_path = tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(),
            # A linger long enough that the three records share one record batch.
            kafka_sink(
                "kafka",
                kafka_broker.bootstrap,
                topic,
                {"linger": "100ms"},
                retry={"maxAttempts": 5, "backoff": {"initial": "100ms"}},
                deadLetterSink="dead",
            ),
            file_sink("dead", dead_path),
            route_doc("all", ["kafka"], names=["big", "small"]),
        ],
    )
    router = router_factory([config], args=["--grace-period", "5"])

    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)
        await post_events(
            client,
            router,
            [
                {"name": "small", "properties": {"seq": "0"}},
                {"name": "big", "properties": {"blob": "x" * 4000}},
                {"name": "small", "properties": {"seq": "1"}},
            ],
        )

        async def all_finished() -> bool:
            metrics = await admin.metrics()
            finished = sum(
                lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome=o)
                for o in ("delivered", "dead_lettered", "dropped")
            )
            return finished >= 3

        await poll(all_finished, 20, "3 events to finish")
        retries = await admin.metric("eventrouter_sink_retries_total", sink="kafka")

    dead = read_jsonl(dead_path)
    records = await read_records(kafka_broker.bootstrap, {topic: 1})
    print(
        f"dead letters: {[(e['name'], e['dead_letter']) for e in dead]}; "
        f"in Kafka: {[r.event['name'] for r in records]}"
    )

    assert retries == 0
    assert [e["name"] for e in dead] == ["big"]
    assert dead[0]["dead_letter"]["attempts"] == 1
    assert "MessageSizeTooLarge" in dead[0]["dead_letter"]["error"]
    assert [seq_of(r.event) for r in records] == [0, 1]


async def test_kafka_oversized_event_in_batch(
    kafka_broker: KafkaBroker, router_factory: RouterFactory, tmp_path: Path
) -> None:
    """An event over the producer's 1 MiB request limit fails alone; its batch neighbours land."""
    topic = unique_name("oversized")
    await create_topics(kafka_broker.bootstrap, [topic], 1)
    dead_path = tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(
                limits={
                    "maxRequestBytes": 4 * 1024 * 1024,
                    "maxPropertyValueLength": 65536,
                    "maxProperties": 32,
                }
            ),
            kafka_sink(
                "kafka",
                kafka_broker.bootstrap,
                topic,
                retry={"maxAttempts": 5, "backoff": {"initial": "100ms"}},
                deadLetterSink="dead",
            ),
            file_sink("dead", dead_path),
            route_doc("all", ["kafka"], names=["huge", "small"]),
        ],
    )
    router = router_factory([config], args=["--grace-period", "5"])
    huge = {f"part{i}": "x" * 65536 for i in range(20)}

    async with httpx.AsyncClient() as client:
        admin = Admin(router, client)
        await post_events(
            client,
            router,
            [
                {"name": "small", "properties": {"seq": "0"}},
                {"name": "huge", "properties": huge},
                {"name": "small", "properties": {"seq": "1"}},
            ],
        )

        async def all_finished() -> bool:
            metrics = await admin.metrics()
            return (
                sum(
                    lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome=o)
                    for o in ("delivered", "dead_lettered", "dropped")
                )
                >= 3
            )

        await poll(all_finished, 20, "3 events to finish")
        metrics = await admin.metrics()

    dead = read_jsonl(dead_path)
    records = await read_records(kafka_broker.bootstrap, {topic: 1})
    print(
        f"dead letters: {[(e['name'], e['dead_letter']) for e in dead]}; "
        f"in Kafka: {[r.event['name'] for r in records]}"
    )

    assert [e["name"] for e in dead] == ["huge"]
    assert dead[0]["dead_letter"]["attempts"] == 1
    assert "MessageSizeTooLarge" in dead[0]["dead_letter"]["error"]
    assert sorted(seq_of(r.event) for r in records) == [0, 1]
    assert lookup(metrics, "eventrouter_sink_events_total", sink="kafka", outcome="delivered") == 2
    dead_lettered = lookup(
        metrics, "eventrouter_sink_events_total", sink="kafka", outcome="dead_lettered"
    )
    assert dead_lettered == 1
