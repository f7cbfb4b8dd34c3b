"""Import the kafka_broker fixture from tests/kafka/plugin.py for the tests in this folder."""

from tests.kafka.plugin import kafka_broker

__all__ = ["kafka_broker"]
