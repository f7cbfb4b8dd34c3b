"""Several routers share one ingestion port with --reuse-port, each with exact counts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import (
    RouterProcess,
    free_port,
    read_jsonl,
    route_doc,
    router_doc,
    sink_doc,
    write_documents,
)

EVENTS = 400


def _config(tmp_path: Path, index: int) -> tuple[Path, Path]:
    out = tmp_path / f"events-{index}.jsonl"
    config = write_documents(
        tmp_path / f"router-{index}.yaml",
        [router_doc(), sink_doc("file", file={"path": str(out)}), route_doc("all", ["file"])],
    )
    return config, out


def _post_each_on_new_connection(url: str, seqs: range) -> None:
    # A new connection per event, so the kernel picks a listener for each.
    for seq in seqs:
        reply = httpx.post(
            f"{url}/v2/event", json={"name": "tick", "properties": {"seq": str(seq)}}
        )
        assert reply.status_code == 200, reply.text


def _seqs(path: Path) -> list[int]:
    return [int(event["properties"]["seq"]) for event in read_jsonl(path)]


def test_reuse_port_spreads_and_drains(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    port = free_port()
    (config_a, out_a), (config_b, out_b) = _config(tmp_path, 0), _config(tmp_path, 1)
    first = router_factory([config_a], port=port, args=["--reuse-port"])
    second = router_factory([config_b], port=port, args=["--reuse-port"])

    _post_each_on_new_connection(first.url, range(EVENTS))

    received = [
        r.metric("eventrouter_events_received_total", transport="http") for r in (first, second)
    ]
    assert all(count > 0 for count in received), f"one router got every connection: {received}"
    assert sum(received) == EVENTS

    # SIGTERM drains the first router. The second keeps the port and takes the rest.
    assert first.terminate(30) == 0
    _post_each_on_new_connection(second.url, range(EVENTS, EVENTS + 100))
    second.wait_for(
        lambda: (
            second.metric("eventrouter_sink_events_total", sink="file", outcome="delivered")
            == received[1] + 100
        ),
        what="the second router's events in its file",
    )
    assert second.terminate(30) == 0

    seqs_a, seqs_b = _seqs(out_a), _seqs(out_b)
    assert len(seqs_a) == received[0]
    assert len(seqs_b) == received[1] + 100
    assert sorted(seqs_a + seqs_b) == list(range(EVENTS + 100))
    assert all(seq < EVENTS for seq in seqs_a)


def test_reuse_port_needed_by_every_router(
    router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    port = free_port()
    config, _ = _config(tmp_path, 0)
    router_factory([config], port=port)
    command = [
        sys.executable, "-m", "eventrouter", "serve", "-f", str(config),
        "--port", str(port), "--admin-port", str(free_port()), "--reuse-port",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "every router on this port needs --reuse-port" in result.stderr
