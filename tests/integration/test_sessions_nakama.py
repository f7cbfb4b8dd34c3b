"""A WebSocket session of the real @heroiclabs/nakama-js client against the router.

`tests/js/session.mjs` connects with `client.createSocket(false, false)`, keeps
the socket open until the router has sent pongs for several heartbeat pings,
with a 500 ms heartbeat timeout, then calls `socket.disconnect()` and prints a JSON
summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    SESSION_KEY,
    RouterProcess,
    read_jsonl,
    route_doc,
    router_doc,
    sign_token,
    sink_doc,
    write_documents,
)

SESSION_SCRIPT = REPO / "tests" / "js" / "session.mjs"
CLIENT_MANIFEST = (
    REPO / "tests" / "js" / "node_modules" / "@heroiclabs" / "nakama-js" / "package.json"
)
SINK = "events"
HEARTBEAT_MS = 500
PONGS = 3

USER_ID = "0c6e2d4a-7b1f-4e3a-9d5c-2a8f1b6e4d90"
USERNAME = "night_owl"
TOKEN_ID = "b3f9a1c7-5e2d-4f8b-a6c0-9d1e7f3b5a24"


def run_session(router: RouterProcess, token: str) -> dict[str, Any]:
    """Run session.mjs against the router and return its summary."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node not found on PATH; install Node.js 20 and run `bash scripts/install-js.sh`"
        )
    if not CLIENT_MANIFEST.exists():
        pytest.fail(f"{CLIENT_MANIFEST} not found; run `bash scripts/install-js.sh`")
    command = [
        node, "--experimental-websocket", str(SESSION_SCRIPT),
        "--host", "127.0.0.1",
        "--port", str(router.port),
        "--token", token,
        "--heartbeat-ms", str(HEARTBEAT_MS),
        "--pongs", str(PONGS),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"session.mjs exited with {result.returncode}:\n{result.stderr}"
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def test_nakama_socket_session(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [router_doc(), sink_doc(SINK, file={"path": str(out)}), route_doc("all", [SINK])],
    )
    key_file = tmp_path / "session-key"
    key_file.write_text(SESSION_KEY + "\n")
    router = router_factory([config], args=["--session-key-file", str(key_file)])
    token = sign_token(uid=USER_ID, usn=USERNAME, tid=TOKEN_ID)

    summary = run_session(router, token)

    assert summary["errors"] == []
    assert summary["connected"] is True
    assert summary["pongs"] >= PONGS
    assert summary["heartbeat_timeouts"] == 0
    assert summary["open_before_disconnect"] is True
    assert summary["close_code"] is not None
    router.wait_for(
        lambda: router.metric("eventrouter_sink_events_total", sink=SINK, outcome="delivered") == 2,
        what="session_start and session_end in the file",
    )
    assert router.metric("eventrouter_sessions_opened_total") == 1
    assert router.metric("eventrouter_sessions_closed_total", reason="client_close") == 1
    assert router.metric("eventrouter_sessions_active") == 0

    events = read_jsonl(out)
    assert [e["name"] for e in events] == ["session_start", "session_end"]
    start, end = events
    assert start["session_id"] == end["session_id"]
    assert start["session_id"] != TOKEN_ID
    for event in events:
        assert event["user_id"] == USER_ID
        assert event["username"] == USERNAME
        assert event["external"] is False
    assert start["properties"]["token_id"] == TOKEN_ID
    assert start["properties"]["user_agent"] != ""
    assert end["properties"]["reason"] == "client_close"
    # The client waited for PONGS pongs, and it sends each ping HEARTBEAT_MS
    # after the previous pong.
    assert int(end["properties"]["duration_ms"]) >= (PONGS - 1) * HEARTBEAT_MS
    assert int(end["properties"]["duration_ms"]) <= summary["open_ms"] + 5000
