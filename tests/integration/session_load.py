"""Open many WebSocket sessions at once, send events on each, then close them all.

test_sessions.py runs this in a process of its own, so that the client and
the router each get a core:

    python -m tests.integration.session_load --port 7350 --admin-port 7351 \
        --key-file KEY --sessions 2000 --events 3

Session `i` signs in as user `load-user-<i>` and sends `--events` events
named `load_event` with the properties `session` (i) and `seq` (0, 1, ...),
pipelined, then reads one ack per event. Once every session is open and
acknowledged, the script reads `eventrouter_sessions_active` from the admin
port and closes every session with code 1000.

It prints one JSON object with these keys:
- `sessions`, `opened`, and `acked`: sessions whose every event was
  acknowledged in order;
- `closed`: sessions closed with code 1000;
- `active_when_all_open`, `open_seconds`, `close_seconds`;
- `ack_ids`: session index to the acknowledged envelope ids, in send order;
- `failures`: sessions that failed to open or to get their acks, and `errors`,
  the first few of those failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from tests.conftest import parse_metrics, sign_token

MAX_REPORTED_ERRORS = 10


class UnexpectedReply(Exception):
    """A reply to an event that is not its ack."""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="router address")
    parser.add_argument("--port", type=int, required=True, help="router ingestion port")
    parser.add_argument("--admin-port", type=int, required=True, help="router admin port")
    parser.add_argument("--key-file", type=Path, required=True, help="file with the session key")
    parser.add_argument("--sessions", type=int, required=True, help="sessions to open at once")
    parser.add_argument("--events", type=int, default=3, help="events sent on each session")
    parser.add_argument(
        "--handshakes", type=int, default=100, help="opening handshakes in progress at once"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per step of a session")
    return parser.parse_args(argv)


class LoadRun:
    """One run of the load: its settings, the open connections and the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = args.key_file.read_text().strip()
        self.url = f"ws://{args.host}:{args.port}/ws"
        self.handshakes = asyncio.Semaphore(args.handshakes)
        self.ack_ids: dict[str, list[str]] = {}
        self.errors: list[str] = []
        self.failures = 0

    def record_error(self, index: int, step: str, error: BaseException | str) -> None:
        self.failures += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(f"session {index}: {step}: {error!r}")

    async def open_session(self, index: int) -> ClientConnection | None:
        """Open session `index`, send its events and read their acks; None on failure."""
        token = sign_token(uid=f"load-user-{index}", usn=f"load_{index}", key=self.key)
        async with self.handshakes:
            try:
                connection = await connect(
                    f"{self.url}?token={token}",
                    open_timeout=self.args.timeout,
                    ping_interval=None,
                    compression=None,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.record_error(index, "connect", exc)
                return None
        try:
            await self._send_events(connection, index)
        except (OSError, TimeoutError, ValueError, WebSocketException, UnexpectedReply) as exc:
            self.record_error(index, "events", exc)
            await connection.close()
            return None
        return connection

    async def _send_events(self, connection: ClientConnection, index: int) -> None:
        count = self.args.events
        for seq in range(count):
            message = {
                "cid": str(seq + 1),
                "event": {
                    "name": "load_event",
                    "properties": {"session": str(index), "seq": str(seq)},
                },
            }
            await connection.send(orjson.dumps(message).decode())
        ids: list[str] = []
        for seq in range(count):
            raw = await asyncio.wait_for(connection.recv(), self.args.timeout)
            reply = orjson.loads(raw)
            if not isinstance(reply, dict) or reply.get("cid") != str(seq + 1):
                raise UnexpectedReply(f"expected the reply to cid {seq + 1}, got {reply}")
            ack = reply.get("ack")
            if not isinstance(ack, dict) or not isinstance(ack.get("id"), str):
                raise UnexpectedReply(f"expected an ack with an id for cid {seq + 1}, got {reply}")
            ids.append(ack["id"])
        self.ack_ids[str(index)] = ids

    def read_active_sessions(self) -> float:
        url = f"http://{self.args.host}:{self.args.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = parse_metrics(response.read().decode())
        return metrics.get("eventrouter_sessions_active", -1.0)

    async def run(self) -> dict[str, Any]:
        count = self.args.sessions
        started = time.monotonic()
        opened = await asyncio.gather(*(self.open_session(i) for i in range(count)))
        connections = [c for c in opened if c is not None]
        open_seconds = time.monotonic() - started
        active = await asyncio.to_thread(self.read_active_sessions)

        started = time.monotonic()
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
        close_seconds = time.monotonic() - started
        closed = sum(1 for c in connections if c.close_code == 1000)
        return {
            "sessions": count,
            "opened": len(connections),
            "acked": len(self.ack_ids),
            "closed": closed,
            "active_when_all_open": active,
            "ack_ids": self.ack_ids,
            "open_seconds": round(open_seconds, 3),
            "close_seconds": round(close_seconds, 3),
            "failures": self.failures,
            "errors": self.errors,
        }


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        summary = asyncio.run(LoadRun(args).run())
    else:
        summary = uvloop.run(LoadRun(args).run())
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
