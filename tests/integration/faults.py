"""Fault injection for integration tests: a file sink that blocks until released.

A `file` sink whose path is a FIFO blocks in its writer thread, because opening a
FIFO for writing blocks until a reader opens it. `BlockedFifo.release` opens the
reader on a thread of its own and collects every line the router writes, so the
sink delivers again.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class BlockedFifo:
    """A FIFO at `path` that holds back the file sink writing to it until `release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()

    def release(self) -> None:
        """Start reading, which unblocks the writer and delivers what it holds."""
        if self._reader is None:
            self._reader = threading.Thread(
                target=self._read_all, name=f"fifo-reader-{self.path.name}", daemon=True
            )
            self._reader.start()

    def _read_all(self) -> None:
        # A blocking open returns once the router's writer has opened its end too,
        # so the first read cannot mistake "no writer yet" for end of file.
        with self.path.open("rb", buffering=0) as fifo:
            partial = b""
            while chunk := fifo.read(1 << 16):
                *complete, partial = (partial + chunk).split(b"\n")
                if complete:
                    with self._lock:
                        self._lines.extend(complete)
        self._closed.set()

    def line_count(self) -> int:
        with self._lock:
            return len(self._lines)

    def events(self) -> list[dict[str, Any]]:
        """Parse every complete line read so far as one JSON event."""
        with self._lock:
            lines = list(self._lines)
        return [json.loads(line) for line in lines]

    def wait_for_lines(self, count: int, timeout: float) -> None:
        """Wait until at least `count` lines were read; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while self.line_count() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read {self.line_count()} of {count} expected lines from {self.path} "
                    f"within {timeout}s"
                )
            time.sleep(0.02)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the reader thread; call after the router has exited.

        If the reader still waits in `open` because the router never opened the
        FIFO, a short-lived writer of our own lets it see end of file.
        """
        if self._reader is None:
            return
        if not self._closed.is_set():
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        self._reader.join(timeout)
