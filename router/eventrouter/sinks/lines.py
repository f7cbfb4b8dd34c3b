"""Chunked line writing for the log and file sinks, stoppable between chunks.

A sink thread writes a batch as chunks of whole lines. On a pipe or FIFO each
chunk is at most PIPE_BUF bytes, which the kernel writes atomically, and the
thread waits with `select` until the pipe has room, checking for `abort`
every 50 ms. So a write to a reader that stalls never blocks the thread for
good, and after `abort` the writer reports exactly how many lines went out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import threading
import time
from collections.abc import Iterator, Sequence

__all__ = ["LineWriter", "WriteAborted", "WriteFailed"]

_POLL_SECONDS = 0.05
_FILE_CHUNK = 1024 * 1024


class WriteAborted(Exception):
    """`abort` stopped the write; `written` lines of the batch went out."""

    def __init__(self, written: int) -> None:
        self.written = written
        super().__init__(f"write stopped after {written} lines")


class WriteFailed(Exception):
    """A write failed after `written` whole lines of the batch went out."""

    def __init__(self, written: int, error: OSError) -> None:
        self.written = written
        self.error = error
        super().__init__(f"write failed after {written} lines: {error}")


def _chunks(lines: Sequence[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > limit:
            yield b"".join(chunk), len(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk), len(chunk)


class LineWriter:
    """Writes batches of lines to file descriptors; see the module docstring."""

    def __init__(self) -> None:
        self._aborted = threading.Event()

    def abort(self) -> None:
        """Make the write in progress, and every later one, stop at the next chunk."""
        self._aborted.set()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def open_fifo(self, path: str, flags: int) -> int:
        """Open a FIFO for writing, waiting for a reader without blocking for good."""
        while True:
            if self._aborted.is_set():
                raise WriteAborted(0)
            try:
                fd = os.open(path, flags | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                # No reader yet.
                time.sleep(_POLL_SECONDS)
                continue
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return fd

    def write(self, fd: int, lines: Sequence[bytes]) -> None:
        """Write every line; raise `WriteAborted` or `WriteFailed` with the count.

        On a regular file, a chunk that fails part way (a full disk) is cut off
        again with ftruncate, so the file never keeps a torn line and the lines
        counted as written are exactly those in the file.
        """
        mode = os.fstat(fd).st_mode
        is_pipe = stat.S_ISFIFO(mode)
        is_file = stat.S_ISREG(mode)
        limit = select.PIPE_BUF if is_pipe else _FILE_CHUNK
        written = 0
        for chunk, count in _chunks(lines, limit):
            view = memoryview(chunk)
            start = os.lseek(fd, 0, os.SEEK_END) if is_file else 0
            try:
                while view:
                    if self._aborted.is_set():
                        raise WriteAborted(written)
                    if is_pipe and not select.select([], [fd], [], _POLL_SECONDS)[1]:
                        continue
                    sent = os.write(fd, view)
                    view = view[sent:]
            except OSError as exc:
                if is_file:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                raise WriteFailed(written, exc) from exc
            written += count
