"""A sink that writes one JSON line per event to stdout or stderr."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from eventrouter.envelope import Envelope, encode_envelope
from eventrouter.errors import PermanentDeliveryError, RetryableDeliveryError
from eventrouter.resources import LogSinkSpec


class LogSink:
    """JSON lines on a standard stream.

    Writes run on one thread of their own, in order, so a stream that blocks (a
    full pipe that nobody reads) holds only this sink and never the event loop.
    """

    # A write in progress cannot be cancelled, so the runner waits for it.
    cancellable = False

    def __init__(self, name: str, spec: LogSinkSpec) -> None:
        self.name = name
        self._stream_name = spec.stream
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{name}")

    async def start(self) -> None:
        return None

    def _write(self, data: bytes) -> None:
        stream = sys.stdout if self._stream_name == "stdout" else sys.stderr
        stream.buffer.write(data)
        stream.buffer.flush()

    async def send(self, batch: Sequence[Envelope]) -> None:
        data = b"".join(encode_envelope(e) + b"\n" for e in batch)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write, data)
        except BrokenPipeError as exc:
            raise PermanentDeliveryError(f"{self._stream_name} is closed: {exc}") from exc
        except OSError as exc:
            raise RetryableDeliveryError(f"write to {self._stream_name} failed: {exc}") from exc

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
