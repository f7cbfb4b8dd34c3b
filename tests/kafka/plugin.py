"""Pytest plugin with the `kafka_broker` fixture: one real Apache Kafka broker per session.

The broker starts at first use and stops at the end of the session, also
after failures. A test that calls `kafka_broker.stop()` must start it again in
a `finally` block, because the tests after it get the same broker. Use a
topic name of your own in each test, e.g. with a uuid suffix.

tests/kafka/conftest.py imports the fixture for this folder. To use it in
other folders as well, add `pytest_plugins = ["tests.kafka.plugin"]` to
tests/conftest.py and delete that import, or each folder starts its own broker.
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
