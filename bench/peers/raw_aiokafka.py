"""Raw aiokafka baseline: produce events to Kafka as fast as one Python process can.

Produces events of about 200 bytes (`make_event` in bench/payloads.py) with
`AIOKafkaProducer.send` for `--seconds` seconds, then waits until Kafka has
acknowledged every record. The producer uses the router's Kafka sink defaults:
acks all, idempotence on and a linger of 5 ms. Prints one JSON object with the
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


async def produce(bootstrap: str, topic: str, seconds: float) -> dict[str, float]:
    values = [encode(make_event(i)) for i in range(BATCH_SIZE)]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        # Warm-up: connect to the partition leader and fetch metadata.
        await producer.send_and_wait(topic, values[0])
        futures: list[asyncio.Future[object]] = []
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for i in range(CHUNK):
                futures.append(await producer.send(topic, values[i % BATCH_SIZE]))
            await asyncio.sleep(0)
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - start
    finally:
        await producer.stop()
    return {"events": len(futures), "seconds": elapsed, "events_per_s": len(futures) / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="bootstrap servers, host:port")
    parser.add_argument("--topic", required=True, help="topic to produce to")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of sending")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(produce(args.bootstrap, args.topic, args.seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
