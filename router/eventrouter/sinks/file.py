"""A sink that appends JSON lines to a file, rotated by size.

Durability: with `fsync: batch` (the default) each batch is fsynced before it
counts as delivered, so a delivered event survives a power loss. With `fsync:
never` it is in the operating system's page cache and survives a crash of the
router but not of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind

from eventrouter.envelope import Envelope, encode_envelope
from eventrouter.errors import PermanentDeliveryError, RetryableDeliveryError
from eventrouter.resources import FileSinkSpec
from eventrouter.sinks.lines import LineWriter, WriteAborted, WriteFailed


class FileSink:
    """JSON lines in `path`; at `max_bytes` the file becomes `path.1`, and so on.

    Writes run on one thread of their own, in order. A path that is a FIFO is
    written without ever blocking that thread for good (see `LineWriter`), so
    shutdown can stop a write to a stalled reader and count what went out.
    """

    # A write in progress is stopped with `abort`, not cancelled.
    cancellable = False
    max_batch: int | None = None

    def __init__(self, name: str, spec: FileSinkSpec) -> None:
        self.name = name
        self.path = Path(spec.path)
        self._spec = spec
        self._fd: int | None = None
        self._size = 0
        self._writer = LineWriter()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{name}")

    def describe(self, batch: Sequence[Envelope]) -> tuple[str, SpanKind, dict[str, Any]]:
        return f"deliver {self.name}", SpanKind.INTERNAL, {"eventrouter.sink.type": "file"}

    async def start(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise PermanentDeliveryError(
                f"folder {parent} of file sink {self.name!r} does not exist; create it"
            )

    def abort(self) -> None:
        self._writer.abort()

    def _open(self) -> int:
        if self._fd is not None and not self._still_at_path(self._fd):
            # The file was removed or renamed (by logrotate, say): writing on
            # would put events in a file that no longer has this name.
            self._close_file()
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            if self.path.is_fifo():
                self._fd = self._writer.open_fifo(str(self.path), flags)
            else:
                self._fd = os.open(self.path, flags, 0o644)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _still_at_path(self, fd: int) -> bool:
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

    def _rotate(self) -> None:
        self._close_file()
        keep = self._spec.max_files
        if keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def _write(self, lines: list[bytes]) -> None:
        fd = self._open()
        size = sum(len(line) for line in lines)
        limit = self._spec.max_bytes
        if limit and self._size and self._size + size > limit and self.path.is_file():
            self._rotate()
            fd = self._open()
        self._writer.write(fd, lines)
        if self._spec.fsync == "batch" and self.path.is_file():
            os.fsync(fd)
        self._size += size

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
            # The lines before the failure are in the file; only the rest is retried.
            self._close_file()
            raise RetryableDeliveryError(
                f"write to {self.path} failed: {exc.error}", failed=range(exc.written, len(batch))
            ) from exc
        except (PermissionError, IsADirectoryError) as exc:
            raise PermanentDeliveryError(f"cannot write {self.path}: {exc.strerror}") from exc
        except OSError as exc:
            # Drop the descriptor so the next attempt reopens the file.
            self._close_file()
            raise RetryableDeliveryError(f"write to {self.path} failed: {exc}") from exc

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def close(self) -> None:
        self._writer.abort()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_file)
        self._executor.shutdown(wait=False)
