"""Raw aiokafka baseline: produce events to Kafka as fast as one Python process can.

Produces events of about 200 bytes (`make_event` in bench/payloads.py) with
`AIOKafkaProducer.send`, or with record batches under `--api batch`, for
`--seconds` seconds, then waits until Kafka has acknowledged every record. The
producer uses the router's Kafka sink defaults: acks all, idempotence on, a
linger of 5 ms and record batches of up to 256 KiB. Prints one JSON object with the
record count, the seconds from the first send to the last acknowledgement and
the resulting events per second.

    python bench/peers/raw_aiokafka.py --bootstrap 127.0.0.1:9092 --topic events
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from payloads import BATCH_SIZE, encode, make_event

# Records sent between two yields to the event loop, so the sender task can
# drain full batches while the loop keeps producing.
CHUNK = 1000


async def produce(bootstrap: str, topic: str, seconds: float, api: str) -> dict[str, float]:
    values = [encode(make_event(i)) for i in range(BATCH_SIZE)]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        # Warm-up: connect to the partition leader and fetch metadata.
        await producer.send_and_wait(topic, values[0])
        start = time.perf_counter()
        if api == "send":
            events = await _send_each(producer, topic, values, start + seconds)
        else:
            events = await _send_batches(producer, topic, values, start + seconds)
        elapsed = time.perf_counter() - start
    finally:
        await producer.stop()
    return {"events": events, "seconds": elapsed, "events_per_s": events / elapsed}


async def _send_each(
    producer: AIOKafkaProducer, topic: str, values: list[bytes], deadline: float
) -> int:
    futures: list[asyncio.Future[object]] = []
    while time.perf_counter() < deadline:
        for i in range(CHUNK):
            futures.append(await producer.send(topic, values[i % BATCH_SIZE]))
        await asyncio.sleep(0)
    await asyncio.gather(*futures)
    return len(futures)


async def _send_batches(
    producer: AIOKafkaProducer, topic: str, values: list[bytes], deadline: float
) -> int:
    """Fill record batches with `create_batch` and queue each with `send_batch`.

    The producer sends each closed batch at once, and `send_batch` waits
    while the partition already has a batch queued, which paces the loop.
    """
    futures: list[asyncio.Future[object]] = []
    events = 0
    while time.perf_counter() < deadline:
        batch = producer.create_batch()
        count = 0
        while batch.append(key=None, value=values[count % BATCH_SIZE], timestamp=None):
            count += 1
        batch.close()
        futures.append(await producer.send_batch(batch, topic, partition=0))
        events += count
    await asyncio.gather(*futures)
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="bootstrap servers, host:port")
    parser.add_argument("--topic", required=True, help="topic to produce to")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of sending")
    parser.add_argument(
        "--api",
        choices=["send", "batch"],
        default="send",
        help="send: one `send` call per record (default); batch: record batches filled "
        "with `create_batch` and queued with `send_batch`",
    )
    args = parser.parse_args()
    result = asyncio.run(produce(args.bootstrap, args.topic, args.seconds, args.api))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
