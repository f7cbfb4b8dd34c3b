"""The file sink under faults a user meets: a rotated or removed file, a full disk."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
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


def _documents(out: Path, **sink: object) -> list[dict[str, object]]:
    return [
        router_doc(),
        sink_doc("file", file={"path": str(out), "fsync": "never"}, **sink),
        sink_doc("dead", log={}),
        route_doc("all", ["file"]),
    ]


def _post(url: str, start: int, count: int) -> None:
    events = [{"name": "e", "properties": {"seq": str(i)}} for i in range(start, start + count)]
    reply = httpx.post(f"{url}/v2/events", json={"events": events}, timeout=10)
    assert reply.status_code == 200, reply.text


def _seqs(path: Path) -> list[int]:
    return [int(e["properties"]["seq"]) for e in read_jsonl(path)]


def test_removed_file_is_recreated(router_factory, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    router = router_factory([write_documents(tmp_path / "r.yaml", _documents(out))])
    _post(router.url, 0, 10)
    router.wait_for(lambda: len(_seqs(out)) == 10, what="the first 10 events")
    out.unlink()
    _post(router.url, 10, 10)
    router.wait_for(lambda: out.exists() and len(_seqs(out)) == 10, what="a new file")
    assert _seqs(out) == list(range(10, 20))


def test_renamed_file_is_reopened(router_factory, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    rotated = tmp_path / "events.jsonl.old"
    router = router_factory([write_documents(tmp_path / "r.yaml", _documents(out))])
    _post(router.url, 0, 10)
    router.wait_for(lambda: len(_seqs(out)) == 10, what="the first 10 events")
    out.rename(rotated)
    _post(router.url, 10, 10)
    router.wait_for(lambda: out.exists() and len(_seqs(out)) == 10, what="a new file")
    assert _seqs(rotated) == list(range(10))
    assert _seqs(out) == list(range(10, 20))


def _limit_file_size() -> None:
    # Writes past 20,000 bytes fail with EFBIG, as writes to a full disk fail
    # with ENOSPC; SIGXFSZ would otherwise kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_full_disk_keeps_whole_lines(tmp_path: Path) -> None:
    """Every event ends once in the file or the dead-letter sink; no line is torn."""
    out = tmp_path / "events.jsonl"
    documents = _documents(
        out, deadLetterSink="dead", retry={"maxAttempts": 2, "backoff": {"initial": "10ms"}}
    )
    config = write_documents(tmp_path / "r.yaml", documents)
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTROUTER_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eventrouter",
            "serve",
            "-f",
            str(config),
            "--port",
            str(port),
            "--admin-port",
            str(admin),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        preexec_fn=_limit_file_size,
    )
    try:
        router = RouterProcess(process, port, admin, tmp_path / "none.log", None)
        router.wait_for(lambda: _ready(router), what="the router to start")
        # 160 events of about 200 bytes: some fit under the limit, and the
        # dead-lettered rest (under 64 KiB) fits in the stdout pipe unread.
        for start in range(0, 160, 40):
            _post(router.url, start, 40)
        router.wait_for(
            lambda: (
                router.metric("eventrouter_sink_in_flight", sink="file") == 0
                and router.metric("eventrouter_sink_in_flight", sink="dead") == 0
                and router.metric("eventrouter_sink_events_total", sink="file", outcome="matched")
                == 160
            ),
            what="every event delivered or dead-lettered",
        )
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    raw = out.read_bytes()
    in_file = [int(json.loads(line)["properties"]["seq"]) for line in raw.splitlines()]
    dead = [int(json.loads(line)["properties"]["seq"]) for line in stdout.splitlines() if line]
    assert raw.endswith(b"\n")
    assert len(raw) <= 20_000
    assert in_file == sorted(set(in_file))
    assert dead
    assert sorted(in_file + dead) == list(range(160))


def _ready(router: RouterProcess) -> bool:
    try:
        return httpx.get(f"{router.admin_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
