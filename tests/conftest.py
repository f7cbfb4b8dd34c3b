"""Shared fixtures: real router processes on loopback, and tokens signed like Nakama's.

`router_process` starts `eventrouter serve` as a subprocess on free loopback
ports, waits for `/readyz`, and stops it at the end of the test. Every test
that needs a router uses a real process, so signals, reload and drain are
exercised as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
import pytest
import yaml

# The session-scoped `kafka_broker` fixture: a real Kafka broker on loopback.
pytest_plugins = ["tests.kafka.plugin", "tests.k8s.plugin"]

REPO = Path(__file__).resolve().parent.parent
SESSION_KEY = "test-session-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sign_token(
    uid: str = "user-1",
    usn: str = "player_one",
    *,
    key: str = SESSION_KEY,
    expires_in: float = 3600,
    tid: str | None = "session-1",
    **claims: Any,
) -> str:
    """A session token in Nakama's format (HS256, claims uid, usn, exp, tid)."""
    body: dict[str, Any] = {"uid": uid, "usn": usn, "exp": int(time.time() + expires_in)}
    if tid is not None:
        body["tid"] = tid
    body.update(claims)
    return jwt.encode(body, key, algorithm="HS256")


def write_documents(path: Path, documents: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def router_doc(name: str = "test", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "eventrouter.io/v1alpha1",
        "kind": "EventRouter",
        "metadata": {"name": name},
        "spec": spec,
    }


def sink_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "eventrouter.io/v1alpha1",
        "kind": "EventSink",
        "metadata": {"name": name},
        "spec": spec,
    }


def route_doc(name: str, sinks: list[str], router: str = "test", **match: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"router": router, "sinks": sinks}
    if match:
        spec["match"] = match
    return {
        "apiVersion": "eventrouter.io/v1alpha1",
        "kind": "EventRoute",
        "metadata": {"name": name},
        "spec": spec,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format into {'name{labels}': value}, labels sorted as exposed."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values


@dataclass
class RouterProcess:
    """A running `eventrouter serve` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    stderr_path: Path
    stdout: IO[bytes] | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.admin_url}/metrics", timeout=10).text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample; labels in any order. Missing samples are 0."""
        wanted = set(f'{k}="{v}"' for k, v in labels.items())
        for key, value in self.metrics().items():
            metric, _, rest = key.partition("{")
            found = set(rest.rstrip("}").split(",")) if rest else set()
            if metric == name and found == wanted:
                return value
        return 0.0

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"message": line})
        return lines

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = ""
    ) -> None:
        """Poll `predicate` until it holds; fail with `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                pytest.fail(
                    f"router exited with {self.process.returncode} while waiting for {what}"
                )
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout}s waiting for {what}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_router(
    tmp_path: Path,
    files: list[Path] | None = None,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    ready_timeout: float = 30.0,
    port: int | None = None,
) -> RouterProcess:
    port, admin_port = port or free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "eventrouter",
        "serve",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
    ]
    for file in files or []:
        command += ["-f", str(file)]
    command += args or []
    stderr_path = tmp_path / f"router-{port}-{admin_port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTROUTER_")}
    environment.update({"EVENTROUTER_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    environment.update(env or {})
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, env=environment, cwd=tmp_path
        )
    router = RouterProcess(
        process,
        port,
        admin_port,
        stderr_path,
        process.stdout if stdout == subprocess.PIPE else None,
    )

    def ready() -> bool:
        try:
            return httpx.get(f"{router.admin_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + ready_timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            router.terminate(5)
            pytest.fail(f"router did not become ready:\n{stderr_path.read_text()}")
        time.sleep(0.05)
    return router


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Start routers with `router_factory(files, env=..., args=...)`; all stop at teardown."""
    started: list[RouterProcess] = []

    def factory(files: list[Path] | None = None, **kwargs: Any) -> RouterProcess:
        router = start_router(tmp_path, files, **kwargs)
        started.append(router)
        return router

    yield factory
    for router in started:
        router.terminate(10)
