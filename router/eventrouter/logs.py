"""Structured logging: JSON lines when stderr is not a terminal, text otherwise.

Fields passed with `extra={...}` (event ids, sink, route, file) appear as JSON
keys. `RateLimitedLog` collapses repeated failure lines into one line per
interval with a count of the lines it held back.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "RateLimitedLog", "configure_logging"]

# Attributes that every LogRecord has; anything else came from `extra`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "color_message"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        }
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Send logs to stderr in JSON (`json`), text (`text`), or by terminal (`auto`)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    formatter_handler: list[logging.Handler] = [handler]
    root = logging.getLogger()
    root.handlers = formatter_handler
    root.setLevel(level.upper())
    # The router logs its own start and stop lines; uvicorn's would repeat them.
    for noisy in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiokafka logs each failed connection and metadata request, about 20,000
    # lines a second while a broker is down. The Kafka sink reports outages
    # itself, so aiokafka's lines are limited to one per message per 10 s.
    handler.addFilter(RepeatFilter("aiokafka", 10.0))


class RepeatFilter(logging.Filter):
    """Pass one record per logger and message format per interval, for loggers under `prefix`.

    The next record that passes carries the count of those held back in its
    `suppressed` attribute. Records of other loggers always pass.
    """

    def __init__(self, prefix: str, interval: float) -> None:
        super().__init__()
        self._prefix = prefix
        self._interval = interval
        self._last: dict[tuple[str, object], float] = {}
        self._suppressed: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) >= 1024:
            self._last.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.suppressed = suppressed
        return True


class RateLimitedLog:
    """Log at most one line per key and interval; count what is held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(
        self, level: int, key: str, msg: str, *args: Any, extra: dict[str, Any] | None = None
    ) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        fields = dict(extra or {})
        if held:
            fields["suppressed"] = held
        self._logger.log(level, msg, *args, extra=fields)
