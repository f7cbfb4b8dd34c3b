"""A slow consumer for file sinks: a FIFO read at a fixed number of lines per second.

A `file` sink that writes to a FIFO delivers only as fast as the reader reads,
because a write into a full pipe blocks. The pipe is shrunk to one page, so
the router cannot count more than about a dozen events as delivered before
the reader has them.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_PIPE_BYTES = 4096
_POLL_SECONDS = 0.005


class SlowFifoReader:
    """Create a FIFO at `path` and read JSON lines from it at `lines_per_second`.

    The reader opens the FIFO before the router does, so the router's open
    never blocks. Call `finish` once every writer is gone for good (the router
    has exited): the reader then reads the rest at full speed and stops at
    end of file. `stop` ends the thread without waiting for end of file.
    """

    def __init__(self, path: Path, lines_per_second: float) -> None:
        self.path = path
        self.lines_per_second = lines_per_second
        self.lines: list[dict[str, Any]] = []
        self.malformed: list[bytes] = []
        os.mkfifo(path)
        # O_NONBLOCK lets the open return before any writer exists; reads then
        # return b"" while no writer has the FIFO open.
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        self._finish = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"fifo-{path.name}", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self.lines)

    def snapshot(self) -> list[dict[str, Any]]:
        """Return a copy of the lines read so far."""
        with self._lock:
            return list(self.lines)

    def finish(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Read what is left at full speed until end of file; return every line read."""
        self._finish.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"FIFO {self.path} did not reach end of file within {timeout}s")
        return self.snapshot()

    def stop(self) -> None:
        """End the reading thread and close the FIFO, even if data is still in the pipe."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        pending = b""
        first_byte_at: float | None = None
        try:
            while not self._stop.is_set():
                fast = self._finish.is_set()
                if not fast and first_byte_at is not None:
                    allowed = self.lines_per_second * (time.monotonic() - first_byte_at)
                    if len(self.lines) >= allowed:
                        time.sleep(_POLL_SECONDS)
                        continue
                try:
                    # Small reads keep the pipe full between lines, so the
                    # router's writes block at the reader's pace, not in bursts.
                    chunk = os.read(self._fd, 65536 if fast else 128)
                except BlockingIOError:
                    time.sleep(_POLL_SECONDS)
                    continue
                if not chunk:
                    if fast:
                        break
                    time.sleep(_POLL_SECONDS)
                    continue
                if first_byte_at is None:
                    first_byte_at = time.monotonic()
                pending += chunk
                *complete, pending = pending.split(b"\n")
                self._store(complete)
            if pending:
                self.malformed.append(pending)
        finally:
            os.close(self._fd)

    def _store(self, raw_lines: list[bytes]) -> None:
        parsed = []
        for raw in raw_lines:
            try:
                parsed.append(json.loads(raw))
            except json.JSONDecodeError:
                self.malformed.append(raw)
        with self._lock:
            self.lines.extend(parsed)
