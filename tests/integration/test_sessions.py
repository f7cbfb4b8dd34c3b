"""WebSocket sessions on `GET /ws` against a real router process.

Each test starts `eventrouter serve` with a session key and file sinks, and
drives it with the `websockets` client: load with ordering per session,
shutdown, every session limit, authentication, messages and a lost
connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

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

SINK = "events"
OTHER_KEY = "a-different-session-key-0123456789abcdef"

# Close codes from RFC 6455, section 7.4.1.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
# Nakama's error code for an invalid input, sent in `error.code`.
BAD_INPUT = 3

StartRouter = Callable[..., tuple[RouterProcess, dict[str, Path]]]


@pytest.fixture
def start_router(router_factory: Callable[..., RouterProcess], tmp_path: Path) -> StartRouter:
    """Start a router that takes session tokens, with every event in each named file sink."""

    def start(
        *,
        sessions: dict[str, Any] | None = None,
        queue: dict[str, Any] | None = None,
        sinks: tuple[str, ...] = (SINK,),
    ) -> tuple[RouterProcess, dict[str, Path]]:
        spec: dict[str, Any] = {}
        if sessions:
            spec["sessions"] = sessions
        if queue:
            spec["queue"] = queue
        outs = {name: tmp_path / f"{name}.jsonl" for name in sinks}
        documents = [router_doc(**spec)]
        documents += [sink_doc(name, file={"path": str(path)}) for name, path in outs.items()]
        documents.append(route_doc("all", list(sinks)))
        config = write_documents(tmp_path / "router.yaml", documents)
        key_file = tmp_path / "session-key"
        key_file.write_text(SESSION_KEY + "\n")
        router = router_factory([config], args=["--session-key-file", str(key_file)])
        router.extra["key_file"] = key_file
        return router, outs

    return start


def ws_url(router: RouterProcess, token: str | None = None) -> str:
    url = f"ws://127.0.0.1:{router.port}/ws"
    return f"{url}?token={token}" if token is not None else url


async def open_session(router: RouterProcess, token: str, **kwargs: Any) -> ClientConnection:
    return await connect(ws_url(router, token), open_timeout=10, ping_interval=None, **kwargs)


async def request(connection: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send one message and return the router's reply."""
    await connection.send(json.dumps(message))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(connection.recv(), 10))
    return reply


async def read_until_closed(connection: ClientConnection) -> list[dict[str, Any]]:
    """Return every message the router sends until it closes the connection."""
    replies: list[dict[str, Any]] = []
    while True:
        try:
            raw = await asyncio.wait_for(connection.recv(), 10)
        except ConnectionClosed:
            return replies
        replies.append(json.loads(raw))


async def poll(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Check `predicate` in a thread every 50 ms until it holds; fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def delivered(router: RouterProcess, sink: str = SINK) -> float:
    return router.metric("eventrouter_sink_events_total", sink=sink, outcome="delivered")


async def assert_session_works(router: RouterProcess, uid: str = "later-user") -> None:
    """Open a new session, get an ack for one event and close it normally."""
    assert router.process.poll() is None, "the router exited"
    connection = await open_session(router, sign_token(uid=uid, usn=uid))
    reply = await request(connection, {"cid": "1", "event": {"name": "later", "properties": {}}})
    await connection.close()
    assert reply["cid"] == "1"
    assert "ack" in reply, reply


def session_events(path: Path, session_id: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(path) if e.get("session_id") == session_id]


# --- load and ordering ------------------------------------------------------------

LOAD_SESSIONS = 2000
LOAD_EVENTS = 3


def test_2000_concurrent_sessions(start_router: StartRouter) -> None:
    router, outs = start_router(queue={"workers": 8}, sinks=("left", "right"))
    command = [
        sys.executable, "-m", "tests.integration.session_load",
        "--port", str(router.port),
        "--admin-port", str(router.admin_port),
        "--key-file", str(router.extra["key_file"]),
        "--sessions", str(LOAD_SESSIONS),
        "--events", str(LOAD_EVENTS),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, f"session_load exited with {result.returncode}:\n{result.stderr}"
    summary = json.loads(result.stdout)

    assert summary["failures"] == 0, summary["errors"]
    assert summary["opened"] == LOAD_SESSIONS
    assert summary["acked"] == LOAD_SESSIONS
    assert summary["active_when_all_open"] == LOAD_SESSIONS
    assert summary["closed"] == LOAD_SESSIONS
    per_sink = LOAD_SESSIONS * (LOAD_EVENTS + 2)
    for sink in outs:
        router.wait_for(
            lambda sink=sink: delivered(router, sink) == per_sink,
            timeout=60,
            what=f"{per_sink} events delivered to {sink}",
        )
    assert (
        router.metric("eventrouter_sessions_closed_total", reason="client_close") == LOAD_SESSIONS
    )
    assert router.metric("eventrouter_sessions_active") == 0

    expected_names = ["session_start", *["load_event"] * LOAD_EVENTS, "session_end"]
    expected_seqs = [str(seq) for seq in range(LOAD_EVENTS)]
    for sink, path in outs.items():
        events = read_jsonl(path)
        assert sum(e["name"] == "session_start" for e in events) == LOAD_SESSIONS, sink
        assert sum(e["name"] == "session_end" for e in events) == LOAD_SESSIONS, sink
        # Line order in the file is delivery order, so grouping by session
        # keeps each session's events in the order the sink wrote them.
        by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in events:
            by_session[event["session_id"]].append(event)
        assert len(by_session) == LOAD_SESSIONS, sink
        wrong_order = [
            sid for sid, group in by_session.items() if [e["name"] for e in group] != expected_names
        ]
        assert wrong_order == [], f"{sink}: sessions without start, events, end in that order"
        wrong_seq = [
            sid
            for sid, group in by_session.items()
            if [e["properties"]["seq"] for e in group[1:-1]] != expected_seqs
        ]
        assert wrong_seq == [], f"{sink}: sessions whose events are not in send order"
        mismatched = []
        for group in by_session.values():
            index = group[1]["properties"]["session"]
            if [e["id"] for e in group[1:-1]] != summary["ack_ids"][index]:
                mismatched.append(index)
            if {e["user_id"] for e in group} != {f"load-user-{index}"}:
                mismatched.append(index)
        assert mismatched == [], f"{sink}: sessions whose ids or user differ from the acks"
        reasons = {e["properties"]["reason"] for e in events if e["name"] == "session_end"}
        assert reasons == {"client_close"}, sink


# --- shutdown -----------------------------------------------------------------------

SHUTDOWN_SESSIONS = 100


async def test_sigterm_closes_sessions(start_router: StartRouter) -> None:
    router, outs = start_router()
    connections = await asyncio.gather(
        *(open_session(router, sign_token(uid=f"user-{i}")) for i in range(SHUTDOWN_SESSIONS))
    )
    await poll(
        lambda: router.metric("eventrouter_sessions_active") == SHUTDOWN_SESSIONS,
        f"{SHUTDOWN_SESSIONS} open sessions",
    )

    router.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in connections)), 30)
    exit_code = await asyncio.to_thread(router.process.wait, 60)

    assert exit_code == 0
    assert [c.close_code for c in connections] == [GOING_AWAY] * SHUTDOWN_SESSIONS
    assert {c.close_reason for c in connections} == {"server shutting down"}
    events = read_jsonl(outs[SINK])
    starts = [e for e in events if e["name"] == "session_start"]
    ends = [e for e in events if e["name"] == "session_end"]
    assert len(starts) == SHUTDOWN_SESSIONS
    assert len(ends) == SHUTDOWN_SESSIONS
    assert {e["properties"]["reason"] for e in ends} == {"server_shutdown"}
    assert {e["session_id"] for e in ends} == {e["session_id"] for e in starts}


# --- limits -------------------------------------------------------------------------


async def test_max_sessions(start_router: StartRouter) -> None:
    router, outs = start_router(sessions={"maxSessions": 3})
    open_connections = [await open_session(router, sign_token(uid=f"user-{i}")) for i in range(3)]
    await poll(lambda: router.metric("eventrouter_sessions_active") == 3, "3 open sessions")

    refused = await open_session(router, sign_token(uid="user-extra"))
    await asyncio.wait_for(refused.wait_closed(), 10)

    assert refused.close_code == TRY_AGAIN_LATER
    assert refused.close_reason.startswith("too many sessions"), refused.close_reason
    assert router.metric("eventrouter_sessions_refused_total", reason="max_sessions") == 1
    assert router.metric("eventrouter_sessions_active") == 3
    assert router.metric("eventrouter_sessions_opened_total") == 3
    await open_connections[0].close()
    await poll(lambda: router.metric("eventrouter_sessions_active") == 2, "one session closed")
    await assert_session_works(router)
    for connection in open_connections[1:]:
        await connection.close()
    await poll(lambda: delivered(router) == 9, "4 starts, 4 ends and 1 event in the file")
    users = {e["user_id"] for e in read_jsonl(outs[SINK])}
    assert "user-extra" not in users


async def test_max_sessions_per_user(start_router: StartRouter) -> None:
    router, outs = start_router(sessions={"maxSessionsPerUser": 2})
    token = sign_token(uid="busy-user")
    open_connections = [await open_session(router, token) for _ in range(2)]
    await poll(lambda: router.metric("eventrouter_sessions_active") == 2, "2 open sessions")

    refused = await open_session(router, token)
    await asyncio.wait_for(refused.wait_closed(), 10)

    assert refused.close_code == TRY_AGAIN_LATER
    assert refused.close_reason.startswith("too many sessions for this user"), refused.close_reason
    assert router.metric("eventrouter_sessions_refused_total", reason="max_sessions_per_user") == 1
    # Another user is not limited by busy-user's sessions.
    await assert_session_works(router, uid="other-user")
    await open_connections[0].close()
    await poll(lambda: router.metric("eventrouter_sessions_active") == 1, "one session closed")
    await assert_session_works(router, uid="busy-user")
    await open_connections[1].close()
    await poll(lambda: delivered(router) == 10, "4 starts, 4 ends and 2 events in the file")
    starts = [e for e in read_jsonl(outs[SINK]) if e["name"] == "session_start"]
    assert [e["user_id"] for e in starts].count("busy-user") == 3


async def test_max_message_bytes(start_router: StartRouter) -> None:
    limit = 1024
    router, outs = start_router(sessions={"maxMessageBytes": limit})
    connection = await open_session(router, sign_token())
    big = {"cid": "1", "event": {"name": "big", "properties": {"blob": "x" * (2 * limit)}}}

    await connection.send(json.dumps(big))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(connection.recv(), 10)

    assert connection.close_code == MESSAGE_TOO_BIG
    assert "exceeds limit" in connection.close_reason, connection.close_reason
    await poll(
        lambda: router.metric("eventrouter_sessions_closed_total", reason="message_too_large") == 1,
        "the session closed as message_too_large",
    )
    await assert_session_works(router)
    await poll(lambda: delivered(router) == 5, "2 starts, 2 ends and 1 event in the file")
    first = read_jsonl(outs[SINK])[0]
    events = session_events(outs[SINK], first["session_id"])
    assert [e["name"] for e in events] == ["session_start", "session_end"]
    assert events[-1]["properties"]["reason"] == "message_too_large"


async def test_max_events_per_second(start_router: StartRouter) -> None:
    rate = 5
    sent = 40
    router, outs = start_router(sessions={"maxEventsPerSecond": rate})
    connection = await open_session(router, sign_token())
    for cid in range(1, sent + 1):
        event = {"name": "spam", "properties": {"n": str(cid)}}
        await connection.send(json.dumps({"cid": str(cid), "event": event}))
    replies = await read_until_closed(connection)
    acked = [reply["cid"] for reply in replies if "ack" in reply]

    assert len(acked) == len(replies), replies
    assert connection.close_code == POLICY_VIOLATION
    assert connection.close_reason.startswith("rate limit exceeded"), connection.close_reason
    # The burst allowance is twice the rate; a few more tokens may refill
    # while the messages arrive.
    assert 2 * rate <= len(acked) < sent
    assert acked == [str(cid) for cid in range(1, len(acked) + 1)]
    await poll(
        lambda: router.metric("eventrouter_sessions_closed_total", reason="rate_limited") == 1,
        "the session closed as rate_limited",
    )
    assert router.metric("eventrouter_events_rejected_total", reason="rate_limited") == 1
    await assert_session_works(router)
    await poll(
        lambda: delivered(router) == len(acked) + 5,
        "the acked events, 2 starts, 2 ends and 1 event in the file",
    )
    first = read_jsonl(outs[SINK])[0]
    events = session_events(outs[SINK], first["session_id"])
    assert [e["name"] for e in events] == ["session_start", *["spam"] * len(acked), "session_end"]
    assert events[-1]["properties"]["reason"] == "rate_limited"


async def test_idle_timeout(start_router: StartRouter) -> None:
    router, outs = start_router(sessions={"idleTimeout": "1s"})
    idle = await open_session(router, sign_token(uid="idle-user"))
    chatty = await open_session(router, sign_token(uid="chatty-user"))

    # Pings every 200 ms keep the second session open past the idle timeout.
    for cid in range(1, 9):
        reply = await request(chatty, {"cid": str(cid), "ping": {}})
        assert reply == {"cid": str(cid), "pong": {}}
        await asyncio.sleep(0.2)
    await asyncio.wait_for(idle.wait_closed(), 10)

    assert idle.close_code == GOING_AWAY
    assert idle.close_reason == "idle timeout"
    assert chatty.close_code is None, "the session that sent pings was closed"
    await chatty.close()
    await poll(
        lambda: router.metric("eventrouter_sessions_closed_total", reason="idle_timeout") == 1,
        "the idle session closed as idle_timeout",
    )
    await assert_session_works(router)
    await poll(lambda: delivered(router) == 7, "3 starts, 3 ends and 1 event in the file")
    ends = {
        e["user_id"]: e["properties"] for e in read_jsonl(outs[SINK]) if e["name"] == "session_end"
    }
    assert ends["idle-user"]["reason"] == "idle_timeout"
    assert int(ends["idle-user"]["duration_ms"]) >= 1000
    assert ends["chatty-user"]["reason"] == "client_close"


async def test_full_buffer_refuses_session(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    # The only sink writes to a FIFO that no process reads until the end, so a
    # ring buffer of 4 fills up and the `reject` policy rejects new events.
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(
                queue={"size": 4, "workers": 1, "overflow": "reject"},
                limits={"maxBatchEvents": 1},
            ),
            sink_doc(SINK, file={"path": str(fifo)}, queueSize=1, batchSize=1),
            route_doc("all", [SINK]),
        ],
    )
    key_file = tmp_path / "session-key"
    key_file.write_text(SESSION_KEY + "\n")
    router = router_factory([config], args=["--session-key-file", str(key_file)])
    headers = {"Authorization": f"Bearer {sign_token(uid='http-user')}"}
    body = {"name": "filler", "properties": {}}
    statuses = []
    async with httpx.AsyncClient(base_url=router.url, headers=headers, timeout=10) as client:
        for _ in range(100):
            statuses.append((await client.post("/v2/event", json=body)).status_code)
            if statuses[-1] == 503:
                break
    assert statuses[-1] == 503, statuses

    refused = await open_session(router, sign_token(uid="refused-user"))
    await asyncio.wait_for(refused.wait_closed(), 10)

    assert refused.close_code == TRY_AGAIN_LATER
    assert "buffer is full" in refused.close_reason, refused.close_reason
    assert router.metric("eventrouter_sessions_refused_total", reason="overloaded") == 1
    assert router.metric("eventrouter_sessions_active") == 0
    assert router.metric("eventrouter_sessions_opened_total") == 0
    reader = asyncio.create_task(asyncio.to_thread(fifo.read_bytes))
    await poll(lambda: router.metric("eventrouter_buffer_depth") == 0, "the buffer to drain")
    await assert_session_works(router)
    assert await asyncio.to_thread(router.terminate) == 0
    lines = (await asyncio.wait_for(reader, 30)).decode().splitlines()
    events = [json.loads(line) for line in lines]
    lifecycle = [e for e in events if e["name"].startswith("session_")]
    assert [e["name"] for e in lifecycle] == ["session_start", "session_end"]
    assert {e["user_id"] for e in lifecycle} == {"later-user"}


# --- authentication -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "missing"),
        ("not-a-token", "invalid session token"),
        (sign_token(expires_in=-60), "session token expired"),
        (sign_token(key=OTHER_KEY), "signature"),
    ],
    ids=["missing", "malformed", "expired", "other-key"],
)
async def test_bad_token_gets_401(
    start_router: StartRouter, token: str | None, message: str
) -> None:
    router, outs = start_router()

    with pytest.raises(InvalidStatus) as raised:
        await connect(ws_url(router, token), open_timeout=10)

    response = raised.value.response
    assert response.status_code == 401
    body = json.loads(bytes(response.body or b""))
    assert body["error"] == "unauthenticated"
    assert message in body["message"].lower(), body
    assert router.metric("eventrouter_sessions_refused_total", reason="unauthenticated") == 1
    assert router.metric("eventrouter_sessions_opened_total") == 0
    await assert_session_works(router)
    await poll(lambda: delivered(router) == 3, "the later session in the file")
    assert {e["user_id"] for e in read_jsonl(outs[SINK])} == {"later-user"}


async def test_authorization_header_token(start_router: StartRouter) -> None:
    router, outs = start_router()
    token = sign_token(uid="header-user", usn="header_name", tid="token-7")

    connection = await connect(
        ws_url(router),
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=10,
    )
    reply = await request(connection, {"cid": "1", "ping": {}})
    await connection.close()

    assert reply == {"cid": "1", "pong": {}}
    await poll(lambda: delivered(router) == 2, "session_start and session_end in the file")
    start, end = read_jsonl(outs[SINK])
    assert start["name"] == "session_start"
    assert start["user_id"] == "header-user"
    assert start["username"] == "header_name"
    assert start["properties"]["token_id"] == "token-7"
    assert end["name"] == "session_end"
    assert end["properties"]["reason"] == "client_close"


# --- messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"properties": {"level": "3"}}, "event.name"),
        ({"name": "level_up", "properties": {"level": 3}}, "event.properties"),
        ({"name": "level_up", "properties": {}, "timestamp": "yesterday"}, "event.timestamp"),
    ],
    ids=["missing-name", "number-property", "bad-timestamp"],
)
async def test_invalid_event_error(
    start_router: StartRouter, event: dict[str, Any], field: str
) -> None:
    router, outs = start_router()
    connection = await open_session(router, sign_token())

    reply = await request(connection, {"cid": "9", "event": event})
    still_open = await request(connection, {"cid": "10", "ping": {}})
    await connection.close()

    assert reply["cid"] == "9"
    assert "ack" not in reply
    assert reply["error"]["code"] == BAD_INPUT
    assert reply["error"]["message"].startswith(field), reply
    assert still_open == {"cid": "10", "pong": {}}
    assert router.metric("eventrouter_events_rejected_total", reason="invalid") == 1
    await poll(lambda: delivered(router) == 2, "session_start and session_end in the file")
    assert [e["name"] for e in read_jsonl(outs[SINK])] == ["session_start", "session_end"]


@pytest.mark.parametrize(
    "message", ["not json", "[1, 2]", b"\x00binary"], ids=["text", "array", "binary"]
)
async def test_non_object_message_counted_invalid(
    start_router: StartRouter, message: str | bytes
) -> None:
    router, _ = start_router()
    connection = await open_session(router, sign_token())
    await connection.send(message)
    reply = json.loads(await connection.recv())
    await connection.close()

    assert reply["error"]["code"] == BAD_INPUT
    assert router.metric("eventrouter_events_received_total", transport="websocket") == 1
    assert router.metric("eventrouter_events_rejected_total", reason="invalid") == 1


async def test_event_ack_matches_file(start_router: StartRouter) -> None:
    router, outs = start_router()
    connection = await open_session(router, sign_token(uid="acked-user", usn="acked"))

    wrapped = await request(
        connection,
        {
            "cid": "1",
            "event": {"name": "level_up", "properties": {"level": "4"}, "external": False},
        },
    )
    bare = await request(connection, {"name": "quest_done", "properties": {"quest": "q1"}})
    await connection.close()

    assert wrapped["cid"] == "1"
    assert set(wrapped) == {"cid", "ack"}
    assert set(bare) == {"ack"}
    await poll(lambda: delivered(router) == 4, "2 events, start and end in the file")
    start, level_up, quest_done, end = read_jsonl(outs[SINK])
    assert [start["name"], end["name"]] == ["session_start", "session_end"]
    assert level_up["id"] == wrapped["ack"]["id"]
    assert quest_done["id"] == bare["ack"]["id"]
    assert level_up["name"] == "level_up"
    assert level_up["properties"] == {"level": "4"}
    # A game client cannot mark its events as coming from the server.
    assert level_up["external"] is True
    assert quest_done["properties"] == {"quest": "q1"}
    for event in (level_up, quest_done):
        assert event["session_id"] == start["session_id"]
        assert event["user_id"] == "acked-user"
        assert event["username"] == "acked"


# --- network failure ---------------------------------------------------------------------


async def test_network_error_reason(start_router: StartRouter) -> None:
    router, outs = start_router()
    connection = await open_session(router, sign_token(uid="lost-user"))
    await poll(lambda: router.metric("eventrouter_sessions_active") == 1, "one open session")

    # Drop the TCP connection without a close frame, as a lost network does.
    connection.transport.abort()

    await poll(lambda: router.metric("eventrouter_sessions_active") == 0, "the session to close")
    assert router.metric("eventrouter_sessions_closed_total", reason="network_error") == 1
    assert router.metric("eventrouter_sessions_closed_total", reason="client_close") == 0
    await poll(lambda: delivered(router) == 2, "session_start and session_end in the file")
    start, end = read_jsonl(outs[SINK])
    assert end["name"] == "session_end"
    assert end["session_id"] == start["session_id"]
    assert end["properties"]["reason"] == "network_error"
    await assert_session_works(router)
