"""Tests of the kafka_broker fixture: a real broker that serves aiokafka and survives an outage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from tests.kafka.broker import KafkaBroker

MESSAGE_COUNT = 1000


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def consume(bootstrap: str, topic: str, expected_count: int) -> list[tuple[int, bytes]]:
    """Read `expected_count` records from the start of `topic` in a new consumer group.

    Returns (partition, value) pairs in the order each partition delivered them.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"check-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: list[tuple[int, bytes]] = []
    try:
        async with asyncio.timeout(60):
            while len(received) < expected_count:
                batches = await consumer.getmany(timeout_ms=1000)
                for partition, records in batches.items():
                    received.extend(
                        (partition.partition, record.value or b"") for record in records
                    )
    finally:
        await consumer.stop()
    return received


async def test_broker_listens_on_loopback(kafka_broker: KafkaBroker) -> None:
    host, _, port = kafka_broker.bootstrap.rpartition(":")

    assert host == "127.0.0.1"
    assert int(port) == kafka_broker.port
    assert kafka_broker.is_running


async def test_broker_round_trip_1000_messages(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("round-trip")
    await kafka_broker.create_topic(topic, partitions=3)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=str(i % 10).encode(), value=str(i).encode())
            for i in range(MESSAGE_COUNT)
        ]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()

    assert len(sent) == MESSAGE_COUNT
    assert {metadata.partition for metadata in sent} == {0, 1, 2}

    received = await consume(kafka_broker.bootstrap, topic, MESSAGE_COUNT)

    assert len(received) == MESSAGE_COUNT
    assert sorted(int(value) for _, value in received) == list(range(MESSAGE_COUNT))

    # Kafka keeps order within a partition, and the producer sent in increasing order.
    by_partition: dict[int, list[int]] = defaultdict(list)
    for partition, value in received:
        by_partition[partition].append(int(value))
    for partition, values in by_partition.items():
        assert values == sorted(values), f"partition {partition} delivered out of order"


async def test_broker_outage_and_recovery(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("outage")
    await kafka_broker.create_topic(topic, partitions=1)
    bootstrap = kafka_broker.bootstrap

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, request_timeout_ms=2000, retry_backoff_ms=100
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")

        await kafka_broker.stop_async()
        try:
            assert not kafka_broker.is_running

            # The producer drops the batch once request_timeout_ms has passed.
            started = time.monotonic()
            with pytest.raises(KafkaError):
                await asyncio.wait_for(producer.send_and_wait(topic, b"during"), timeout=20)
            assert time.monotonic() - started < 15

            fresh_producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=2000)
            with pytest.raises(KafkaConnectionError):
                await fresh_producer.start()
            await fresh_producer.stop()
        finally:
            await kafka_broker.start_async()

        assert kafka_broker.is_running
        assert kafka_broker.bootstrap == bootstrap

        # The producer that lived through the outage reconnects by itself.
        await asyncio.wait_for(producer.send_and_wait(topic, b"after"), timeout=30)
    finally:
        await producer.stop()

    new_producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await new_producer.start()
    try:
        await new_producer.send_and_wait(topic, b"new producer")
    finally:
        await new_producer.stop()

    received = await consume(bootstrap, topic, 3)

    assert [value for _, value in received] == [b"before", b"after", b"new producer"]
