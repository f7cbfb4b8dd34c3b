"""The README's commands and the quickstart example, run as a reader would run them."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, RouterProcess, read_jsonl

README = REPO / "README.md"
SERVE_COMMAND = ".venv/bin/eventrouter serve"
TEST_COMMAND = "bash scripts/test.sh"
DEFAULT_PORT = 7350
DEFAULT_ADMIN_PORT = 7351

# Request bodies as a reader would pass them to `curl -d`. The first is the README's example.
README_EVENTS = [
    {"name": "level_up", "properties": {"level": "5"}},
    {"name": "purchase", "properties": {"sku": "gems_100", "price": "4.99"}},
    {"name": "session_end", "properties": {"reason": "logout", "duration_s": "312"}},
]


def first_command() -> str:
    """Return the text of the README's first ```sh block."""
    match = re.search(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    assert match is not None, f"{README} has no ```sh block"
    return match.group(1).strip()


def require_free_port(port: int) -> None:
    # SO_REUSEADDR as uvicorn sets it, so that connections of an earlier run in
    # TIME_WAIT do not count and only a listening socket fails the check.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            pytest.fail(
                f"port {port} on 127.0.0.1 is in use ({exc.strerror}); this test runs "
                f"`{SERVE_COMMAND}` on its default ports {DEFAULT_PORT} and {DEFAULT_ADMIN_PORT}, "
                "so stop the process listening there (another router?) and rerun"
            )


def post_like_curl(url: str, body: dict[str, object]) -> httpx.Response:
    # `curl -d` sends the text as is, with a form content type that the router ignores.
    return httpx.post(
        url,
        content=json.dumps(body),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )


def sink_delivered(router: RouterProcess, sink: str) -> float:
    return router.metric("eventrouter_sink_events_total", sink=sink, outcome="delivered")


def ready_check(router: RouterProcess) -> Callable[[], bool]:
    def ready() -> bool:
        if router.process.poll() is not None:
            pytest.fail(
                f"`{SERVE_COMMAND}` exited with {router.process.returncode}:\n"
                f"{router.stderr_path.read_text()}"
            )
        try:
            return httpx.get(f"{router.admin_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


def test_readme_first_command() -> None:
    assert first_command().endswith(SERVE_COMMAND), first_command()


def test_readme_test_command() -> None:
    assert TEST_COMMAND in README.read_text()


def test_default_serve_prints_events(tmp_path: Path) -> None:
    require_free_port(DEFAULT_PORT)
    require_free_port(DEFAULT_ADMIN_PORT)
    command = shlex.split(first_command().split("&&")[-1])
    assert command == shlex.split(SERVE_COMMAND)
    executable = REPO / command[0]
    if not executable.exists():
        pytest.fail(f"{executable} not found; create the venv with `{TEST_COMMAND}`")
    stderr_path = tmp_path / "serve.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTROUTER_")}
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=stderr
        )
    router = RouterProcess(process, DEFAULT_PORT, DEFAULT_ADMIN_PORT, stderr_path, process.stdout)
    try:
        router.wait_for(ready_check(router), what=f"`{SERVE_COMMAND}` to answer /readyz")

        for body in README_EVENTS:
            reply = post_like_curl(f"{router.url}/v2/event", body)
            assert reply.status_code == 200, reply.text
            assert reply.json() == {}
        router.wait_for(
            lambda: sink_delivered(router, "log") == len(README_EVENTS),
            what=f"{len(README_EVENTS)} events delivered to the log sink",
        )

        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        router.terminate(10)

    assert process.returncode == 0, stderr_path.read_text()
    lines = stdout.decode().splitlines()
    assert len(lines) == len(README_EVENTS), stdout.decode()
    events = [json.loads(line) for line in lines]
    printed = sorted((e["name"], e["properties"]) for e in events)
    posted = sorted((e["name"], e["properties"]) for e in README_EVENTS)
    assert printed == posted
    assert [e["router"] for e in events] == ["default"] * len(README_EVENTS)
    assert len({e["id"] for e in events}) == len(README_EVENTS)


def test_quickstart_routes_events(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    # The router runs in tmp_path, so the example's relative file paths land there.
    router = router_factory([REPO / "examples" / "quickstart"])
    purchase = {
        "name": "purchase",
        "properties": {"sku": "com.example.mygame.gems_100", "currency": "USD", "price": "4.99"},
    }
    events = [
        purchase,
        # price fails atLeast 0.01, so only the catch-all route takes it.
        {
            "name": "purchase",
            "properties": {"sku": "com.example.mygame.daily_gift", "currency": "USD", "price": "0"},
        },
        {"name": "session_start", "properties": {"platform": "android"}},
        {"name": "tutorial_step_3", "properties": {}},
        {"name": "level_up", "properties": {"level": "12"}},
    ]
    reply = httpx.post(f"{router.url}/v2/events", json={"events": events}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["accepted"] == len(events)

    expected = {"console": 5, "purchases": 1, "sessions": 1, "ad-attribution": 1}
    router.wait_for(
        lambda: all(sink_delivered(router, s) == n for s, n in expected.items()),
        what=f"deliveries {expected}",
    )

    purchases = read_jsonl(tmp_path / "purchases.jsonl")
    assert [(e["name"], e["properties"]) for e in purchases] == [
        (purchase["name"], purchase["properties"])
    ]
    sessions = read_jsonl(tmp_path / "sessions.jsonl")
    assert [e["name"] for e in sessions] == ["session_start"]
    assert not (tmp_path / "purchases-dead-letter.jsonl").exists()


def test_quickstart_dead_letters_purchases(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    # A folder in place of purchases.jsonl makes every write fail permanently.
    (tmp_path / "purchases.jsonl").mkdir()
    router = router_factory([REPO / "examples" / "quickstart"])
    purchase = {
        "name": "purchase",
        "properties": {"sku": "com.example.mygame.gems_500", "currency": "EUR", "price": "19.99"},
    }

    reply = httpx.post(f"{router.url}/v2/event", json=purchase, timeout=10)

    assert reply.status_code == 200, reply.text
    router.wait_for(
        lambda: sink_delivered(router, "purchases-dead-letter") == 1,
        what="the purchase in the dead-letter file",
    )
    dead_lettered = router.metric(
        "eventrouter_sink_events_total", sink="purchases", outcome="dead_lettered"
    )
    assert dead_lettered == 1
    [event] = read_jsonl(tmp_path / "purchases-dead-letter.jsonl")
    assert event["properties"] == purchase["properties"]
    assert event["dead_letter"]["sink"] == "purchases"
    assert "purchases.jsonl" in event["dead_letter"]["error"]
