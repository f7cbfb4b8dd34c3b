"""Hot reload while events flow: nothing lost, nothing duplicated, bad files rejected.

The router watches its -f file every 0.2 seconds and reloads on SIGHUP. The
test rewrites the file with os.replace, as a Kubernetes ConfigMap volume
does, so the router never reads half a file.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from eventrouter.config import load_config
from tests.conftest import (
    RouterProcess,
    read_jsonl,
    route_doc,
    router_doc,
    sink_doc,
    write_documents,
)
from tests.integration.slow_reader import SlowFifoReader

RELOAD_INTERVAL = 0.2
PHASE_SECONDS = 1.2
# The stream sends about 250 events/s and the `main` sink delivers 100/s, so
# its queue contains a few hundred events whenever a reload hands it over.
SEND_PAUSE = 0.003
MAIN_READ_RATE = 100.0


@dataclass(frozen=True)
class Sent:
    """One request of the stream and its outcome."""

    seq: int
    sent_at: float
    responded_at: float
    outcome: int | str


class EventStream:
    """Post events with increasing `seq` from a thread, one request at a time."""

    def __init__(self, url: str) -> None:
        self.sent: list[Sent] = []
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-stream")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join(30)
        return self.sent

    def _run(self) -> None:
        seq = 0
        with httpx.Client(base_url=self._url, timeout=10) as client:
            while not self._stop.is_set():
                sent_at = time.monotonic()
                body = {"name": "reload", "properties": {"seq": str(seq)}}
                try:
                    outcome: int | str = client.post("/v2/event", json=body).status_code
                except httpx.TransportError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                self.sent.append(Sent(seq, sent_at, time.monotonic(), outcome))
                seq += 1
                time.sleep(SEND_PAUSE)


def replace_documents(
    path: Path, documents: list[dict[str, Any]], *, keep_mtime: bool = False
) -> None:
    """Write `documents` to a staging file and rename it over `path`.

    With `keep_mtime`, the new file gets the old one's modification time. If
    its size is also unchanged, the router's file watcher does not see the
    change, and only SIGHUP makes the router read it.
    """
    staging = path.with_name(path.name + ".staging")
    write_documents(staging, documents)
    if keep_mtime:
        old = path.stat()
        os.utime(staging, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(staging, path)


def routes_document(router: RouterProcess) -> dict[str, Any]:
    reply = httpx.get(f"{router.admin_url}/v1/routes", timeout=10)
    assert reply.status_code == 200
    result: dict[str, Any] = reply.json()
    return result


def wait_for_digest(router: RouterProcess, digest: str, what: str) -> float:
    """Poll /v1/routes until it shows `digest`; return when it did (monotonic time)."""
    router.wait_for(lambda: routes_document(router)["digest"] == digest, timeout=15, what=what)
    return time.monotonic()


@dataclass(frozen=True)
class Phase:
    """One configuration of the stream test and how it is applied."""

    name: str
    main_path: Path
    main_batch_size: int
    main_batch_wait: str
    extra_path: Path | None
    by_sighup: bool = False

    def documents(self) -> list[dict[str, Any]]:
        main = sink_doc(
            "main",
            file={"path": str(self.main_path)},
            batchSize=self.main_batch_size,
            batchWait=self.main_batch_wait,
        )
        documents = [router_doc(), main]
        sinks = ["main"]
        if self.extra_path is not None:
            documents.append(sink_doc("extra", file={"path": str(self.extra_path)}))
            sinks.append("extra")
        documents.append(route_doc("all", sinks))
        return documents

    @property
    def sinks(self) -> set[str]:
        return {"main", "extra"} if self.extra_path is not None else {"main"}


@pytest.fixture
def fifo_readers() -> Iterator[Callable[[Path, float], SlowFifoReader]]:
    """Start slow FIFO readers with `fifo_readers(path, lines_per_second)`.

    Every reader stops at teardown.
    """
    readers: list[SlowFifoReader] = []

    def start(path: Path, lines_per_second: float) -> SlowFifoReader:
        reader = SlowFifoReader(path, lines_per_second)
        readers.append(reader)
        return reader

    yield start
    for reader in readers:
        reader.stop()


def phase_of(item: Sent, applied_at: list[float], changed_at: list[float]) -> int | None:
    """Return the phase whose routes must have handled `item`, or None near a reload.

    A request sent after the router showed phase k and completed before the
    file changed again is routed by phase k. Other requests raced a reload, so
    either phase may have routed them.
    """
    for index, start in enumerate(applied_at):
        end = changed_at[index + 1] if index + 1 < len(changed_at) else float("inf")
        if item.sent_at >= start and item.responded_at <= end:
            return index
    return None


def test_reload_under_stream(router_factory, fifo_readers, tmp_path: Path) -> None:
    main_fifos = [
        fifo_readers(tmp_path / "main-1.fifo", MAIN_READ_RATE),
        fifo_readers(tmp_path / "main-2.fifo", MAIN_READ_RATE),
    ]
    extra_path = tmp_path / "extra.jsonl"
    first, second = main_fifos[0].path, main_fifos[1].path
    phases = [
        Phase("initial", first, 50, "100ms", None),
        Phase("add sink extra", first, 50, "100ms", extra_path),
        Phase("move main to another path", second, 50, "100ms", extra_path),
        # Same file size as the phase before, so only SIGHUP can apply it.
        Phase("change main batching", second, 80, "250ms", extra_path, by_sighup=True),
        Phase("remove sink extra", second, 80, "250ms", None),
    ]
    config = tmp_path / "router.yaml"
    write_documents(config, phases[0].documents())
    router = router_factory(
        [config], args=["--reload-interval", str(RELOAD_INTERVAL), "--grace-period", "60"]
    )
    stream = EventStream(router.url)
    try:
        digests = [routes_document(router)["digest"]]
        assert digests[0] == load_config([config]).digest
        applied_at = [float("-inf")]
        changed_at = [float("-inf")]
        stream.start()
        for phase in phases[1:]:
            time.sleep(PHASE_SECONDS)
            size_before = config.stat().st_size
            changed_at.append(time.monotonic())
            replace_documents(config, phase.documents(), keep_mtime=phase.by_sighup)
            if phase.by_sighup:
                assert config.stat().st_size == size_before, "the watcher would see this change"
                router.process.send_signal(signal.SIGHUP)
            digests.append(load_config([config]).digest)
            assert digests[-1] != digests[-2], f"{phase.name}: the digest should change"
            applied_at.append(wait_for_digest(router, digests[-1], phase.name))
            active = routes_document(router)
            sinks = {sink["metadata"]["name"]: sink["spec"] for sink in active["sinks"]}
            assert set(sinks) == phase.sinks, phase.name
            assert sinks["main"]["file"]["path"] == str(phase.main_path), phase.name
            assert sinks["main"]["batchSize"] == phase.main_batch_size, phase.name
        time.sleep(PHASE_SECONDS)
    finally:
        sent = stream.stop()

    assert router.metric("eventrouter_config_reloads_total", result="applied") == len(phases) - 1
    assert router.metric("eventrouter_config_reloads_total", result="rejected") == 0
    status = router.terminate(90)
    main_lines = [line for fifo in main_fifos for line in fifo.finish()]
    main_second = {int(line["properties"]["seq"]) for line in main_fifos[1].snapshot()}
    extra_lines = read_jsonl(extra_path)
    logs = router.logs()

    assert status == 0
    failed = [item for item in sent if item.outcome != 200]
    assert failed == [], f"{len(failed)} requests did not get 200, first: {failed[:3]}"
    reasons = [
        line["message"].partition("(")[2].partition(")")[0]
        for line in logs
        if line["message"].startswith("configuration reloaded")
    ]
    assert reasons == ["files changed", "files changed", "SIGHUP", "files changed"]
    assert [fifo.malformed for fifo in main_fifos] == [[], []]

    main_counts = Counter(int(line["properties"]["seq"]) for line in main_lines)
    extra_counts = Counter(int(line["properties"]["seq"]) for line in extra_lines)
    every_seq = [item.seq for item in sent]
    missing_main = [seq for seq in every_seq if main_counts[seq] == 0]
    twice_main = sorted(seq for seq, count in main_counts.items() if count > 1)
    assert missing_main == [], f"main lost {len(missing_main)} of {len(every_seq)} events"
    assert twice_main == [], f"main delivered {len(twice_main)} events more than once"
    assert sorted(main_counts) == every_seq
    twice_extra = sorted(seq for seq, count in extra_counts.items() if count > 1)
    assert twice_extra == [], f"extra delivered {len(twice_extra)} events more than once"

    by_phase: dict[int | None, list[int]] = {}
    for item in sent:
        by_phase.setdefault(phase_of(item, applied_at, changed_at), []).append(item.seq)
    for index, phase in enumerate(phases):
        seqs = by_phase.get(index, [])
        assert len(seqs) > 50, f"{phase.name}: only {len(seqs)} events were sent in the phase"
        if "extra" in phase.sinks:
            absent = [seq for seq in seqs if seq not in extra_counts]
            assert absent == [], f"{phase.name}: {len(absent)} events missing from extra"
        else:
            present = [seq for seq in seqs if seq in extra_counts]
            assert present == [], f"{phase.name}: {len(present)} events reached extra"
        if phase.main_path == second:
            on_first = [seq for seq in seqs if seq not in main_second]
            assert on_first == [], f"{phase.name}: {len(on_first)} events on the old path"

    # The first runner of `main` had a backlog when it was replaced, so the
    # second one delivered events accepted before the move.
    moved = [seq for seq in by_phase[1] if seq in main_second]
    assert moved, "the hand-over to the new runner of main moved no events"

    assert [line for line in logs if "event_ids" in line] == []
    messages = [line["message"] for line in logs]
    assert any(m.startswith("router stopped; every accepted event was delivered") for m in messages)


def test_invalid_reload_keeps_running(router_factory, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    valid = [router_doc(), sink_doc("main", file={"path": str(out)}), route_doc("all", ["main"])]
    config = write_documents(tmp_path / "router.yaml", valid)
    router = router_factory([config], args=["--reload-interval", str(RELOAD_INTERVAL)])
    digest = routes_document(router)["digest"]

    def post(seq: int) -> None:
        body = {"name": "reload", "properties": {"seq": str(seq)}}
        reply = httpx.post(f"{router.url}/v2/event", json=body, timeout=10)
        assert reply.status_code == 200

    post(0)
    invalid = [*valid, route_doc("broken", ["main", "missing"])]
    replace_documents(config, invalid)
    router.wait_for(
        lambda: router.metric("eventrouter_config_reloads_total", result="rejected") == 1,
        timeout=15,
        what="the invalid file to be rejected",
    )
    rejected = [
        line for line in router.logs() if line["message"].startswith("configuration rejected")
    ]
    assert len(rejected) == 1
    assert rejected[0]["level"] == "error"
    expected_error = (
        f"{config}: document 3 (EventRoute broken): spec.sinks[1]: sink 'missing' not found; "
        "define an EventSink named 'missing' or remove the reference"
    )
    assert rejected[0]["errors"] == [expected_error]
    assert routes_document(router)["digest"] == digest

    # The old configuration keeps delivering, and the watcher does not retry
    # the same invalid file.
    for seq in range(1, 11):
        post(seq)
    router.wait_for(lambda: len(read_jsonl(out)) == 11, what="11 events in the file")
    time.sleep(RELOAD_INTERVAL * 5)
    assert router.metric("eventrouter_config_reloads_total", result="rejected") == 1
    assert router.metric("eventrouter_config_reloads_total", result="applied") == 0
    assert sorted(int(e["properties"]["seq"]) for e in read_jsonl(out)) == list(range(11))

    # A corrected file is applied, and /v1/routes shows it.
    fixed = [*valid, sink_doc("second", blackhole={}), route_doc("broken", ["main", "second"])]
    replace_documents(config, fixed)
    new_digest = load_config([config]).digest
    assert new_digest != digest
    wait_for_digest(router, new_digest, "the corrected file to be applied")
    active = routes_document(router)
    assert sorted(route["metadata"]["name"] for route in active["routes"]) == ["all", "broken"]
    assert sorted(sink["metadata"]["name"] for sink in active["sinks"]) == ["main", "second"]
    assert router.metric("eventrouter_config_reloads_total", result="applied") == 1
