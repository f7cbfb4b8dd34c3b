"""Fixtures for tests against a real Apache Kafka broker.

`kafka_broker` is session-scoped, so the tests in this folder share one
broker, started at first use and stopped at the end of the session, also after
failures. A test that calls `kafka_broker.stop()` must start it again in a
`finally` block, because the tests after it get the same broker. Use a topic
name of your own in each test, e.g. with a uuid suffix.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kafka.broker import KafkaBroker


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A running single-node Kafka broker. Clients connect to `kafka_broker.bootstrap`."""
    broker = KafkaBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.close()
