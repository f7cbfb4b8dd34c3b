"""A sink that writes one JSON line per event to stdout or stderr."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.trace import SpanKind

from eventrouter.envelope import Envelope, encode_envelope
from eventrouter.errors import PermanentDeliveryError, RetryableDeliveryError
from eventrouter.resources import LogSinkSpec
from eventrouter.sinks.lines import LineWriter, WriteAborted, WriteFailed


class LogSink:
    """JSON lines on a standard stream.

    Writes run on one thread of their own, in order, so a stream that blocks (a
    full pipe with no reader) stalls only this sink and never the event loop;
    `abort` stops such a write at shutdown (see `LineWriter`).
    """

    # A write in progress is stopped with `abort`, not cancelled.
    cancellable = False
    max_batch: int | None = None

    def __init__(self, name: str, spec: LogSinkSpec) -> None:
        self.name = name
        self._stream_name = spec.stream
        self._writer = LineWriter()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{name}")

    def describe(self, batch: Sequence[Envelope]) -> tuple[str, SpanKind, dict[str, Any]]:
        return f"deliver {self.name}", SpanKind.INTERNAL, {"eventrouter.sink.type": "log"}

    async def start(self) -> None:
        return None

    def abort(self) -> None:
        self._writer.abort()

    def _write(self, lines: list[bytes]) -> None:
        stream = sys.stdout if self._stream_name == "stdout" else sys.stderr
        # Anything written through the text layer goes out first. The stream is
        # None when the process started with that descriptor closed.
        if stream is not None:
            stream.flush()
        self._writer.write(1 if self._stream_name == "stdout" else 2, lines)

    async def send(self, batch: Sequence[Envelope]) -> None:
        lines = [encode_envelope(e) + b"\n" for e in batch]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write, lines)
        except WriteAborted as exc:
            raise RetryableDeliveryError(
                "write stopped by shutdown", failed=range(exc.written, len(batch))
            ) from None
        except WriteFailed as exc:
            if isinstance(exc.error, BrokenPipeError):
                raise PermanentDeliveryError(
                    f"{self._stream_name} is closed: {exc.error}",
                    failed=range(exc.written, len(batch)),
                ) from exc
            raise RetryableDeliveryError(
                f"write to {self._stream_name} failed: {exc.error}",
                failed=range(exc.written, len(batch)),
            ) from exc
        except BrokenPipeError as exc:
            raise PermanentDeliveryError(f"{self._stream_name} is closed: {exc}") from exc
        except OSError as exc:
            raise RetryableDeliveryError(f"write to {self._stream_name} failed: {exc}") from exc

    async def close(self) -> None:
        self._writer.abort()
        self._executor.shutdown(wait=False)
