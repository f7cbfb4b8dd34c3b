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
from typing import BinaryIO

from eventrouter.envelope import Envelope, encode_envelope
from eventrouter.errors import PermanentDeliveryError, RetryableDeliveryError
from eventrouter.resources import FileSinkSpec


class FileSink:
    """JSON lines in `path`; at `max_bytes` the file becomes `path.1`, and so on.

    Writes run on one thread of their own, in order, so a file that blocks (a
    FIFO with no reader, a stalled network mount) holds only this sink.
    """

    # A write in progress cannot be cancelled, so the runner waits for it.
    cancellable = False

    def __init__(self, name: str, spec: FileSinkSpec) -> None:
        self.name = name
        self.path = Path(spec.path)
        self._spec = spec
        self._file: BinaryIO | None = None
        self._size = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{name}")

    async def start(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise PermanentDeliveryError(
                f"folder {parent} of file sink {self.name!r} does not exist; create it"
            )

    def _open(self) -> BinaryIO:
        if self._file is None:
            # Opening a FIFO blocks here until a reader appears; that is on the
            # sink's own thread.
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
            self._size = self._file.tell() if self.path.is_file() else 0
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        keep = self._spec.max_files
        if keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def _write(self, data: bytes) -> None:
        handle = self._open()
        limit = self._spec.max_bytes
        if limit and self._size and self._size + len(data) > limit and self.path.is_file():
            self._rotate()
            handle = self._open()
        handle.write(data)
        handle.flush()
        if self._spec.fsync == "batch" and self.path.is_file():
            os.fsync(handle.fileno())
        self._size += len(data)

    async def send(self, batch: Sequence[Envelope]) -> None:
        data = b"".join(encode_envelope(e) + b"\n" for e in batch)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write, data)
        except (PermissionError, IsADirectoryError) as exc:
            raise PermanentDeliveryError(f"cannot write {self.path}: {exc.strerror}") from exc
        except OSError as exc:
            # Drop the handle so the next attempt reopens the file.
            self._close_file()
            raise RetryableDeliveryError(f"write to {self.path} failed: {exc}") from exc

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_file)
        self._executor.shutdown(wait=False)
