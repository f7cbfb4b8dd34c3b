"""Unit tests of the filter that limits repeated log lines of a library."""

from __future__ import annotations

import logging

import pytest

from eventrouter.logs import RepeatFilter


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_repeats_held_back_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("eventrouter.logs.time.monotonic", lambda: clock[0])
    limit = RepeatFilter("aiokafka", 10.0)
    passed = [
        limit.filter(record("aiokafka.conn", "Unable connect to node %s", n)) for n in range(5)
    ]
    assert passed == [True, False, False, False, False]

    clock[0] += 10.0
    again = record("aiokafka.conn", "Unable connect to node %s", 1)
    assert limit.filter(again)
    assert again.suppressed == 4


def test_other_messages_and_loggers_pass() -> None:
    limit = RepeatFilter("aiokafka", 10.0)
    assert limit.filter(record("aiokafka.conn", "first"))
    assert limit.filter(record("aiokafka.conn", "second"))
    assert limit.filter(record("aiokafka.client", "first"))
    for _ in range(3):
        assert limit.filter(record("eventrouter.sinks.kafka", "same line"))
