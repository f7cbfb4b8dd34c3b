"""Shared helpers for test servers: a launcher that ties child processes to the
test process, and free loopback ports."""

from __future__ import annotations

import concurrent.futures
import queue
import socket
import subprocess
import threading
from typing import Any

__all__ = ["HOST", "free_port", "launcher"]

HOST = "127.0.0.1"


class _Launcher:
    """Process starter that forks every child from one daemon thread, alive as long as Python.

    Linux sends a child's parent-death signal (PR_SET_PDEATHSIG in prctl(2),
    set by `setpriv --pdeathsig` in the command) when the thread that forked it
    exits, not the process. Forking from this thread means the servers are
    killed when the test process dies, even by SIGKILL, but not when a worker
    thread that started them ends.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[
            tuple[list[str], dict[str, Any], concurrent.futures.Future[subprocess.Popen[bytes]]]
        ] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="test-server-launcher", daemon=True
                )
                self._thread.start()
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._requests.put((args, kwargs, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            args, kwargs, future = self._requests.get()
            try:
                future.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)


launcher = _Launcher()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
