"""The real @heroiclabs/nakama-js client against a router that checks session tokens.

`tests/js/emit.mjs` calls `client.emitEvent` and prints a JSON summary with
counts per HTTP status. Each event carries the properties `seq` (0 to count-1),
`run` (one id per emit.mjs run), `client` and `client_version`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
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

EMIT = REPO / "tests" / "js" / "emit.mjs"
CLIENT_MANIFEST = (
    REPO / "tests" / "js" / "node_modules" / "@heroiclabs" / "nakama-js" / "package.json"
)
SINK = "events"
EVENT_NAME = "match_end"
API_KEY = "game-server-api-key-0123456789"
OTHER_KEY = "a-different-session-key-0123456789abcdef"

USER_ID = "5f1c2a9e-0b7d-4c1e-9a52-3e8f6d0b7c41"
USERNAME = "dragon_slayer"
SESSION_ID = "8d0b6f3a-2c4e-4b9a-8f71-6a5d2e9c0b13"


def emit(router: RouterProcess, token: str, count: int) -> dict[str, Any]:
    """Run emit.mjs against the router and return its summary."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node not found on PATH; install Node.js 20 and run `bash scripts/install-js.sh`"
        )
    if not CLIENT_MANIFEST.exists():
        pytest.fail(f"{CLIENT_MANIFEST} not found; run `bash scripts/install-js.sh`")
    command = [
        node, str(EMIT),
        "--host", "127.0.0.1",
        "--port", str(router.port),
        "--token", token,
        "--count", str(count),
        "--name", EVENT_NAME,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"emit.mjs exited with {result.returncode}:\n{result.stderr}"
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def delivered(router: RouterProcess) -> float:
    return router.metric("eventrouter_sink_events_total", sink=SINK, outcome="delivered")


@pytest.fixture
def auth_router(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> tuple[RouterProcess, Path]:
    """A router that takes session tokens and one API key, with every event in a file."""
    out = tmp_path / "events.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [router_doc(), sink_doc(SINK, file={"path": str(out)}), route_doc("all", [SINK])],
    )
    key_file = tmp_path / "session-key"
    key_file.write_text(SESSION_KEY + "\n")
    api_keys_file = tmp_path / "api-keys"
    api_keys_file.write_text(API_KEY + "\n")
    router = router_factory(
        [config],
        args=["--session-key-file", str(key_file), "--api-keys-file", str(api_keys_file)],
    )
    return router, out


def test_emit_event_delivers_all(auth_router: tuple[RouterProcess, Path]) -> None:
    router, out = auth_router
    token = sign_token(uid=USER_ID, usn=USERNAME, tid=SESSION_ID)

    summary = emit(router, token, 1000)

    assert summary["sent"] == 1000
    assert summary["ok"] == 1000, summary["errors"]
    assert summary["failed"] == 0, summary["errors"]
    router.wait_for(lambda: delivered(router) == 1000, what="1000 events delivered to the file")
    events = read_jsonl(out)
    assert len(events) == 1000
    seqs = sorted(int(e["properties"]["seq"]) for e in events)
    assert seqs == list(range(1000))
    assert {e["properties"]["run"] for e in events} == {summary["run"]}
    assert {e["name"] for e in events} == {EVENT_NAME}
    assert [e for e in events if e["external"] is not True] == []
    assert {e["user_id"] for e in events} == {USER_ID}
    assert {e["username"] for e in events} == {USERNAME}
    assert {e["session_id"] for e in events} == {SESSION_ID}
    client_version = json.loads(CLIENT_MANIFEST.read_text())["version"]
    expected_properties = {"client": "nakama-js", "client_version": client_version}
    changed = [
        e["properties"]
        for e in events
        if set(e["properties"]) != {"seq", "run", "client", "client_version"}
        or {k: e["properties"][k] for k in expected_properties} != expected_properties
    ]
    assert changed == []
    assert len({e["id"] for e in events}) == 1000
    assert router.metric("eventrouter_sink_events_total", sink=SINK, outcome="matched") == 1000
    assert router.metric("eventrouter_sink_events_total", sink=SINK, outcome="dropped") == 0


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"expires_in": -60}, "session token expired"),
        ({"key": OTHER_KEY}, "signature is invalid"),
    ],
    ids=["expired", "other-key"],
)
def test_invalid_token_rejected(
    auth_router: tuple[RouterProcess, Path], claims: dict[str, Any], reason: str
) -> None:
    router, out = auth_router
    count = 50

    summary = emit(router, sign_token(uid=USER_ID, usn=USERNAME, **claims), count)

    assert summary["statuses"] == {"401": count}, summary["errors"]
    assert summary["ok"] == 0
    assert all(reason in error for error in summary["errors"]), summary["errors"]
    assert router.metric("eventrouter_events_rejected_total", reason="unauthenticated") == count
    # Had any rejected event been accepted, it would be in the file next to
    # this valid marker event once the marker is delivered.
    marker = {"name": "after_rejects", "properties": {}}
    valid = {"Authorization": f"Bearer {sign_token(uid=USER_ID, usn=USERNAME)}"}
    reply = httpx.post(f"{router.url}/v2/event", json=marker, headers=valid, timeout=10)
    assert reply.status_code == 200, reply.text
    router.wait_for(lambda: delivered(router) == 1, what="the marker event in the file")
    assert [e["name"] for e in read_jsonl(out)] == ["after_rejects"]


def test_token_external_false_ignored(auth_router: tuple[RouterProcess, Path]) -> None:
    router, out = auth_router
    token = sign_token(uid=USER_ID, usn=USERNAME, tid=SESSION_ID)
    body = {"name": "tutorial_complete", "properties": {"step": "9"}, "external": False}

    reply = httpx.post(
        f"{router.url}/v2/event",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )

    assert reply.status_code == 200, reply.text
    router.wait_for(lambda: delivered(router) == 1, what="the event in the file")
    [event] = read_jsonl(out)
    assert event["external"] is True
    assert event["user_id"] == USER_ID
    assert event["properties"] == {"step": "9"}


def test_api_key_external_false_kept(auth_router: tuple[RouterProcess, Path]) -> None:
    router, out = auth_router
    body = {"name": "purchase_verified", "properties": {"receipt": "valid"}, "external": False}

    reply = httpx.post(
        f"{router.url}/v2/event", json=body, headers={"X-Api-Key": API_KEY}, timeout=10
    )

    assert reply.status_code == 200, reply.text
    router.wait_for(lambda: delivered(router) == 1, what="the event in the file")
    [event] = read_jsonl(out)
    assert event["external"] is False
    assert "user_id" not in event
    assert event["properties"] == {"receipt": "valid"}
