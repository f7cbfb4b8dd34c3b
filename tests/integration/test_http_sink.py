"""The HTTP sink against a real webhook receiver on loopback.

Each test starts `eventrouter serve` as a subprocess and a scripted aiohttp
receiver (see `receiver.py`) that records every request with its arrival time.
Events carry a unique `seq` property, so the tests can count the attempts and
deliveries of each event exactly, and check retry gaps from the receiver's
timestamps.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    RouterProcess,
    free_port,
    read_jsonl,
    route_doc,
    router_doc,
    sink_doc,
    write_documents,
)
from tests.integration.receiver import Receiver, RecordedRequest, Reply

# Measured gaps include timer granularity and scheduling delays in both
# processes, and a loaded machine runs timers late, so each gap is checked
# within this window around its target.
EARLY = 0.02
LATE = 0.25

SECRET = "tok-3f9a1c77e2b54d0e"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def start_router(
    receiver: Receiver, router_factory: Callable[..., RouterProcess]
) -> Callable[..., RouterProcess]:
    """Start a router with a 2 s grace period.

    Requesting `receiver` first makes pytest stop the routers before the
    receiver, and the short grace period bounds the drain of a sink that still
    retries at teardown.
    """

    def start(files: list[Path], args: list[str] | None = None) -> RouterProcess:
        return router_factory(files, args=["--grace-period", "2", *(args or [])])

    return start


# --- helpers -------------------------------------------------------------------


def linear_retry(max_attempts: int, initial: str, **extra: Any) -> dict[str, Any]:
    return {
        "maxAttempts": max_attempts,
        "backoff": {"type": "linear", "initial": initial, "jitter": 0},
        **extra,
    }


def send_batch(router: RouterProcess, seqs: Iterable[int]) -> list[int]:
    """Send one `/v2/events` request with an event per seq and return the seqs."""
    seqs = list(seqs)
    events = [{"name": "match_end", "properties": {"seq": str(s)}} for s in seqs]
    reply = httpx.post(f"{router.url}/v2/events", json={"events": events}, timeout=10)
    assert reply.status_code == 200, reply.text
    return seqs


def send_one(router: RouterProcess, seq: int) -> None:
    reply = httpx.post(
        f"{router.url}/v2/event",
        json={"name": "match_end", "properties": {"seq": str(seq)}},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text


def seq_of(event: dict[str, Any]) -> int:
    return int(event["properties"]["seq"])


def attempt_times(requests: list[RecordedRequest]) -> dict[int, list[float]]:
    """Group one-event-per-request arrivals by the event's seq."""
    times: dict[int, list[float]] = {}
    for request in requests:
        times.setdefault(seq_of(request.json()), []).append(request.received_at)
    return times


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def sink_health(router: RouterProcess, sink: str) -> dict[str, Any]:
    reply = httpx.get(f"{router.admin_url}/readyz", timeout=5)
    return dict(reply.json()["sinks"][sink])


def sink_events(router: RouterProcess, sink: str, outcome: str) -> float:
    return router.metric("eventrouter_sink_events_total", sink=sink, outcome=outcome)


def finished(router: RouterProcess, sink: str) -> float:
    """Count a sink's events that reached a final outcome: delivered or dead-lettered."""
    return sink_events(router, sink, "delivered") + sink_events(router, sink, "dead_lettered")


def retries(router: RouterProcess, sink: str) -> float:
    return router.metric("eventrouter_sink_retries_total", sink=sink)


def failure_lines(router: RouterProcess, sink: str) -> list[dict[str, Any]]:
    """Return the log lines about failed attempts of one sink."""
    return [
        line
        for line in router.logs()
        if line.get("sink") == sink and "failed for" in line.get("message", "")
    ]


def replace_file(path: Path, text: str) -> None:
    """Replace a file with one rename, so that no reader sees a partly written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# --- body formats, headers and secrets -------------------------------------------


def test_json_format_one_request_per_event(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/events", "headers": {"X-Game": "space-race"}},
            ),
            route_doc("all", ["webhook"]),
        ],
    )
    router = start_router([config])
    sent = send_batch(router, range(5))
    router.wait_for(lambda: sink_events(router, "webhook", "delivered") == 5, 10, "5 delivered")

    requests = receiver.requests()
    assert len(requests) == 5
    assert [seq_of(r.json()) for r in requests] == sent
    for request in requests:
        assert request.method == "POST"
        assert request.path == "/events"
        assert request.header("Content-Type") == "application/json"
        assert request.header("X-Game") == "space-race"
        assert isinstance(request.json(), dict)
        assert request.json()["name"] == "match_end"
        assert request.json()["router"] == "test"


def test_array_format_one_array_per_batch(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/batch", "method": "PUT", "format": "array"},
                batchSize=3,
                batchWait="200ms",
            ),
            route_doc("all", ["webhook"]),
        ],
    )
    router = start_router([config])
    sent = send_batch(router, range(7))
    router.wait_for(lambda: sink_events(router, "webhook", "delivered") == 7, 10, "7 delivered")

    requests = receiver.requests()
    assert len(requests) == 3
    batches = [request.json() for request in requests]
    assert all(isinstance(batch, list) for batch in batches)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert [seq_of(event) for batch in batches for event in batch] == sent
    for request in requests:
        assert request.method == "PUT"
        assert request.path == "/batch"
        assert request.header("Content-Type") == "application/json"


def test_ndjson_format_one_line_per_event(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/lines", "format": "ndjson"},
                batchSize=4,
            ),
            route_doc("all", ["webhook"]),
        ],
    )
    router = start_router([config])
    sent = send_batch(router, range(6))
    router.wait_for(lambda: sink_events(router, "webhook", "delivered") == 6, 10, "6 delivered")

    requests = receiver.requests()
    assert len(requests) == 2
    assert [len(request.ndjson()) for request in requests] == [4, 2]
    assert [seq_of(event) for request in requests for event in request.ndjson()] == sent
    for request in requests:
        assert request.header("Content-Type") == "application/x-ndjson"
        assert request.body.endswith(b"\n")


def test_secret_header_sent_never_logged(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={
                    "url": f"{receiver.url}/events",
                    "secretHeaders": [
                        {
                            "name": "Authorization",
                            "valueFrom": {"file": str(token_file)},
                            "prefix": "Bearer ",
                        }
                    ],
                },
                retry=linear_retry(3, "50ms"),
            ),
            route_doc("all", ["webhook"]),
        ],
    )
    # One failed attempt, so that the failure log line is part of what is checked.
    receiver.script(Reply(500, body="try again"))
    router = start_router([config], args=["--log-level", "DEBUG"])
    send_batch(router, range(2))
    router.wait_for(lambda: sink_events(router, "webhook", "delivered") == 2, 10, "2 delivered")

    # Attempt 1 fails on event 0, and attempt 2 sends events 0 and 1.
    requests = receiver.requests()
    assert len(requests) == 3
    for request in requests:
        assert request.header("Authorization") == f"Bearer {SECRET}"
    assert len(failure_lines(router, "webhook")) == 1

    routes = httpx.get(f"{router.admin_url}/v1/routes", timeout=5).text
    assert str(token_file) in routes
    assert SECRET not in routes
    assert SECRET not in router.stderr_path.read_text()


# --- retries and dead letters ----------------------------------------------------


def test_retry_budget_then_dead_letter(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/hook"},
                # One event per batch, so that every event gets its own attempts.
                batchSize=1,
                retry=linear_retry(4, "100ms"),
                deadLetterSink="dead-letters",
            ),
            sink_doc("dead-letters", file={"path": str(dead)}),
            route_doc("all", ["webhook"]),
        ],
    )
    receiver.set_default(Reply(500, body="upstream exploded"))
    router = start_router([config])
    sent = send_batch(router, range(3))
    router.wait_for(
        lambda: sink_events(router, "dead-letters", "delivered") == 3, 15, "3 dead letters written"
    )

    times = attempt_times(receiver.requests())
    assert receiver.count() == 12
    assert sorted(times) == sent
    for seq in sent:
        assert len(times[seq]) == 4, f"event {seq} got {len(times[seq])} attempts"
        for gap, expected in zip(gaps(times[seq]), (0.1, 0.2, 0.3), strict=True):
            assert expected - EARLY <= gap <= expected + LATE, (
                f"event {seq}: gap {gap:.3f}s, expected {expected}s"
            )

    letters = read_jsonl(dead)
    assert len(letters) == 3
    assert Counter(seq_of(letter) for letter in letters) == Counter(sent)
    for letter in letters:
        dead_letter = letter["dead_letter"]
        assert dead_letter["sink"] == "webhook"
        assert dead_letter["status"] == 500
        assert dead_letter["attempts"] == 4
        assert "returned 500" in dead_letter["error"]
        assert "upstream exploded" in dead_letter["error"]

    assert retries(router, "webhook") == 9
    assert sink_events(router, "webhook", "dead_lettered") == 3
    assert sink_events(router, "webhook", "delivered") == 0
    assert sink_events(router, "webhook", "dropped") == 0
    assert router.metric("eventrouter_sink_ready", sink="webhook") == 0


def test_json_batch_retries_each_event(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            # The default batchSize, so the three events of one request form one batch.
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/hook"},
                retry=linear_retry(4, "100ms"),
                deadLetterSink="dead-letters",
            ),
            sink_doc("dead-letters", file={"path": str(dead)}),
            route_doc("all", ["webhook"]),
        ],
    )
    receiver.set_default(Reply(500, body="upstream exploded"))
    router = start_router([config])
    sent = send_batch(router, range(3))
    router.wait_for(
        lambda: sink_events(router, "dead-letters", "delivered") == 3, 15, "3 dead letters written"
    )

    times = attempt_times(receiver.requests())
    assert {seq: len(times.get(seq, [])) for seq in sent} == {seq: 4 for seq in sent}
    assert receiver.count() == 12


def test_json_permanent_error_spares_rest(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/hook"},
                retry=linear_retry(4, "50ms"),
                deadLetterSink="dead-letters",
            ),
            sink_doc("dead-letters", file={"path": str(dead)}),
            route_doc("all", ["webhook"]),
        ],
    )
    # The receiver rejects event 1 of the batch and accepts events 0 and 2.
    receiver.script(Reply(200), Reply(400, body="bad event"))
    router = start_router([config])
    send_batch(router, range(3))
    router.wait_for(lambda: finished(router, "webhook") == 3, 10, "an outcome for 3 events")

    assert [seq_of(r.json()) for r in receiver.accepted("/hook")] == [0, 2]
    assert [seq_of(letter) for letter in read_jsonl(dead)] == [1]
    assert sink_events(router, "webhook", "delivered") == 2
    assert sink_events(router, "webhook", "dead_lettered") == 1


def test_retry_after_honoured_and_capped(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    def sink(name: str, **retry: Any) -> dict[str, Any]:
        return sink_doc(
            name, http={"url": f"{receiver.url}/{name}"}, retry=linear_retry(3, "50ms", **retry)
        )

    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink("seconds"),
            sink("date"),
            sink("capped", maxRetryAfter="300ms"),
            route_doc("all", ["seconds", "date", "capped"]),
        ],
    )
    router = start_router([config])
    in_two_seconds = email.utils.formatdate(time.time() + 2, usegmt=True)
    receiver.script(Reply(429, headers={"Retry-After": "1"}), path="/seconds")
    receiver.script(Reply(503, headers={"Retry-After": in_two_seconds}), path="/date")
    receiver.script(Reply(429, headers={"Retry-After": "30"}), path="/capped")
    send_one(router, 0)
    names = ("seconds", "date", "capped")
    router.wait_for(
        lambda: all(sink_events(router, name, "delivered") == 1 for name in names),
        10,
        "one delivery per sink",
    )

    # Seconds: the 1 s requested, far more than the 50 ms backoff.
    (seconds_gap,) = gaps([r.received_at for r in receiver.requests("/seconds")])
    assert 1.0 - EARLY <= seconds_gap <= 1.0 + LATE
    # An HTTP date has whole seconds, so "now + 2 s" is between 1 and 2 s away.
    (date_gap,) = gaps([r.received_at for r in receiver.requests("/date")])
    assert 1.0 - EARLY <= date_gap <= 2.0 + LATE
    # Capped: 30 s requested, but maxRetryAfter allows 300 ms.
    (capped_gap,) = gaps([r.received_at for r in receiver.requests("/capped")])
    assert 0.3 - EARLY <= capped_gap <= 0.3 + LATE
    for name in names:
        assert retries(router, name) == 1


STATUS_CASES = [
    # sink, http fields, scripted replies, attempts, outcome, dead-letter status
    ("bad-request", {}, [Reply(400)], 1, "dead_lettered", 400),
    ("only-202-got-200", {"successStatus": [202]}, [Reply(200)], 1, "dead_lettered", 200),
    ("only-202-got-202", {"successStatus": [202]}, [Reply(202)], 1, "delivered", None),
    ("retry-409", {"retryableStatus": [409]}, [Reply(409), Reply(200)], 2, "delivered", None),
    ("no-retry-503", {"retryableStatus": [429]}, [Reply(503)], 1, "dead_lettered", 503),
    ("redirect-no-location", {}, [Reply(302)], 1, "dead_lettered", 302),
    # A client that followed this redirect would repeat the request as a GET
    # without the body, and a 2xx there would count events as delivered that
    # never reached the receiver.
    (
        "redirect-elsewhere",
        {},
        [Reply(302, headers={"Location": "/elsewhere"})],
        1,
        "dead_lettered",
        302,
    ),
]


def test_status_classes_decide_outcome(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    names = [case[0] for case in STATUS_CASES]
    documents = [router_doc(queue={"workers": 1})]
    for name, fields, replies, *_ in STATUS_CASES:
        documents.append(
            sink_doc(
                name,
                http={"url": f"{receiver.url}/{name}", **fields},
                retry=linear_retry(4, "50ms"),
                deadLetterSink="dead-letters",
            )
        )
        receiver.script(*replies, path=f"/{name}")
    documents += [
        sink_doc("dead-letters", file={"path": str(dead)}),
        route_doc("all", names),
    ]
    router = start_router([write_documents(tmp_path / "router.yaml", documents)])
    send_one(router, 0)
    expected_letters = sum(1 for case in STATUS_CASES if case[4] == "dead_lettered")
    router.wait_for(
        lambda: sink_events(router, "dead-letters", "delivered") == expected_letters,
        10,
        f"{expected_letters} dead letters written",
    )
    router.wait_for(
        lambda: all(finished(router, name) == 1 for name in names), 10, "an outcome per sink"
    )

    letters = {letter["dead_letter"]["sink"]: letter for letter in read_jsonl(dead)}
    assert len(read_jsonl(dead)) == expected_letters
    for name, _, _, attempts, outcome, status in STATUS_CASES:
        assert receiver.count(f"/{name}") == attempts, name
        assert sink_events(router, name, outcome) == 1, name
        assert retries(router, name) == attempts - 1, name
        if outcome == "dead_lettered":
            assert letters[name]["dead_letter"]["status"] == status, name
            assert letters[name]["dead_letter"]["attempts"] == 1, name
            assert f"returned {status}" in letters[name]["dead_letter"]["error"], name
        else:
            assert name not in letters
    assert receiver.count("/elsewhere") == 0


def test_attempt_timeout_retried_and_counted(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"

    def sink(name: str, max_attempts: int) -> dict[str, Any]:
        return sink_doc(
            name,
            http={"url": f"{receiver.url}/{name}"},
            timeout="300ms",
            retry=linear_retry(max_attempts, "100ms"),
            deadLetterSink="dead-letters",
        )

    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink("slow-twice", 4),
            sink("always-slow", 2),
            sink_doc("dead-letters", file={"path": str(dead)}),
            route_doc("all", ["slow-twice", "always-slow"]),
        ],
    )
    slow = Reply(200, delay=2.0)
    receiver.script(slow, slow, path="/slow-twice")
    receiver.set_default(slow, path="/always-slow")
    router = start_router([config])
    send_one(router, 0)
    router.wait_for(lambda: sink_events(router, "slow-twice", "delivered") == 1, 10, "delivered")
    router.wait_for(
        lambda: sink_events(router, "dead-letters", "delivered") == 1, 10, "1 dead letter"
    )

    # Each gap is the 300 ms timeout plus the linear backoff of 100 ms, then 200 ms.
    # The timeout runs from the start of an attempt, before the request arrives,
    # so a slow first connection makes the gap look shorter by its set-up time.
    twice = [r.received_at for r in receiver.requests("/slow-twice")]
    assert len(twice) == 3
    for gap, expected in zip(gaps(twice), (0.4, 0.5), strict=True):
        assert expected - 0.06 <= gap <= expected + LATE, f"gap {gap:.3f}s, expected {expected}s"
    assert retries(router, "slow-twice") == 2
    assert sink_events(router, "slow-twice", "dead_lettered") == 0

    assert receiver.count("/always-slow") == 2
    assert retries(router, "always-slow") == 1
    (letter,) = read_jsonl(dead)
    assert letter["dead_letter"]["sink"] == "always-slow"
    assert letter["dead_letter"]["attempts"] == 2
    assert letter["dead_letter"]["error"] == "attempt timed out after 0.3s"
    assert "status" not in letter["dead_letter"]


def test_hmac_signature_verified_by_receiver(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    key = b"whsec-5b1d0f3e9c"
    key_file = tmp_path / "signing-key"
    key_file.write_bytes(key + b"\n")
    wrong_key_file = tmp_path / "wrong-key"
    wrong_key_file.write_text("not-the-key\n")
    dead = tmp_path / "dead.jsonl"

    def sink(name: str, secret_file: Path) -> dict[str, Any]:
        return sink_doc(
            name,
            http={
                "url": f"{receiver.url}/{name}",
                "format": "array",
                "signature": {"secret": {"file": str(secret_file)}},
            },
            deadLetterSink="dead-letters",
        )

    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink("signed", key_file),
            sink("wrong-key", wrong_key_file),
            sink_doc("dead-letters", file={"path": str(dead)}),
            route_doc("all", ["signed", "wrong-key"]),
        ],
    )
    receiver.require_signature(key)
    router = start_router([config])
    send_batch(router, range(3))
    router.wait_for(lambda: sink_events(router, "signed", "delivered") == 3, 10, "3 delivered")
    router.wait_for(
        lambda: sink_events(router, "dead-letters", "delivered") == 3, 10, "3 dead letters"
    )

    (signed,) = receiver.requests("/signed")
    assert signed.signature_valid is True
    assert signed.reply.status == 200
    assert abs(int(signed.header("X-Eventrouter-Timestamp") or 0) - time.time()) < 30

    # A 401 is permanent, so the wrongly signed batch goes to the dead letters at once.
    (wrong,) = receiver.requests("/wrong-key")
    assert wrong.signature_valid is False
    assert wrong.reply.status == 401
    letters = read_jsonl(dead)
    assert len(letters) == 3
    assert all(letter["dead_letter"]["sink"] == "wrong-key" for letter in letters)
    assert all(letter["dead_letter"]["status"] == 401 for letter in letters)


# --- health ----------------------------------------------------------------------


def test_failing_sink_unready_others_flow(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    archive = tmp_path / "archive.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": f"{receiver.url}/hook"},
                retry={
                    "maxAttempts": 100,
                    "backoff": {"type": "linear", "initial": "50ms", "max": "200ms", "jitter": 0},
                },
            ),
            sink_doc("archive", file={"path": str(archive)}),
            route_doc("all", ["webhook", "archive"]),
        ],
    )
    receiver.set_default(Reply(500, body="maintenance"))
    router = start_router([config])

    send_one(router, 0)
    router.wait_for(lambda: not sink_health(router, "webhook")["ready"], 5, "webhook not ready")
    health = sink_health(router, "webhook")
    assert "returned 500" in health["lastError"]
    assert router.metric("eventrouter_sink_ready", sink="webhook") == 0
    assert sink_health(router, "archive")["ready"] is True
    assert router.metric("eventrouter_sink_ready", sink="archive") == 1

    # The failure log is rate-limited to one line per 10 s, so keep the webhook
    # failing until the second line, which carries the count of held-back lines.
    sent = [0]
    deadline = time.monotonic() + 14
    while not any("suppressed" in line for line in failure_lines(router, "webhook")):
        assert time.monotonic() < deadline, "no failure log line with a suppressed count"
        seq = len(sent)
        send_one(router, seq)
        sent.append(seq)
        # The archive sink gets every event promptly while the webhook retries.
        router.wait_for(
            lambda: len(read_jsonl(archive)) == len(sent), 1.0, f"event {seq} in the archive"
        )
        time.sleep(0.5)

    failed_attempts = receiver.count("/hook")
    lines = failure_lines(router, "webhook")
    suppressed = sum(line.get("suppressed", 0) for line in lines)
    assert failed_attempts >= 30
    assert len(lines) <= 3
    assert suppressed >= failed_attempts // 2
    assert len(lines) + suppressed <= failed_attempts
    assert sink_events(router, "webhook", "delivered") == 0

    receiver.set_default(Reply(200))
    router.wait_for(
        lambda: sink_events(router, "webhook", "delivered") == len(sent), 5, "webhook recovered"
    )
    assert sink_health(router, "webhook") == {"ready": True, "queued": 0, "inFlight": 0}
    assert router.metric("eventrouter_sink_ready", sink="webhook") == 1
    delivered = Counter(seq_of(r.json()) for r in receiver.accepted("/hook"))
    assert delivered == Counter(sent)
    assert Counter(seq_of(event) for event in read_jsonl(archive)) == Counter(sent)
    assert any("is delivering again" in line["message"] for line in router.logs())


# --- reload and secrets that change at run time -----------------------------------


@pytest.mark.parametrize("trigger", ["file-change", "sighup"])
def test_reload_moves_waiting_events(
    start_router: Callable[..., RouterProcess],
    receiver: Receiver,
    tmp_path: Path,
    trigger: str,
) -> None:
    config = tmp_path / "router.yaml"

    def write_config(url: str) -> str:
        documents = [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={"url": url, "format": "array"},
                retry={
                    "maxAttempts": 100,
                    "backoff": {"type": "linear", "initial": "1s", "max": "1s", "jitter": 0},
                },
            ),
            route_doc("all", ["webhook"]),
        ]
        write_documents(tmp_path / "next.yaml", documents)
        os.replace(tmp_path / "next.yaml", config)
        return url

    # Nothing listens on this port, so every attempt fails with connection refused.
    write_config(f"http://127.0.0.1:{free_port()}/hook")
    # File watching is off for SIGHUP, so that only the signal can cause the reload.
    args = ["--reload-interval", "0"] if trigger == "sighup" else ["--reload-interval", "1"]
    router = start_router([config], args=args)

    # A batch that fails and waits for its next attempt, and events queued behind it.
    sent = send_batch(router, range(10))
    router.wait_for(lambda: retries(router, "webhook") >= 10, 5, "a failed attempt")
    sent += send_batch(router, range(10, 15))
    assert sink_health(router, "webhook")["ready"] is False
    assert "Cannot connect to host" in sink_health(router, "webhook")["lastError"]

    # Events keep arriving during the reload, and each must be accepted.
    stop_sending = threading.Event()
    statuses: list[int] = []
    during: list[int] = []

    def keep_sending() -> None:
        with httpx.Client(base_url=router.url, timeout=5) as client:
            seq = 1000
            while not stop_sending.is_set():
                reply = client.post(
                    "/v2/event", json={"name": "match_end", "properties": {"seq": str(seq)}}
                )
                statuses.append(reply.status_code)
                if reply.status_code == 200:
                    during.append(seq)
                seq += 1
                time.sleep(0.02)

    sender = threading.Thread(target=keep_sending, name="sender", daemon=True)
    sender.start()
    try:
        write_config(f"{receiver.url}/hook")
        started = time.monotonic()
        if trigger == "sighup":
            router.process.send_signal(signal.SIGHUP)
        router.wait_for(
            lambda: any("configuration reloaded" in line["message"] for line in router.logs()),
            2.0,
            "the reload log line",
        )
        reload_seconds = time.monotonic() - started
        time.sleep(0.3)
    finally:
        stop_sending.set()
        sender.join(10)

    assert reload_seconds <= 2.0
    assert statuses, "no event was sent during the reload"
    assert set(statuses) == {200}
    sent += during
    router.wait_for(
        lambda: sink_events(router, "webhook", "delivered") == len(sent), 5, "every event delivered"
    )
    delivered = Counter(seq_of(event) for r in receiver.accepted("/hook") for event in r.json())
    assert delivered == Counter(sent)
    assert sink_events(router, "webhook", "matched") == len(sent)
    assert sink_events(router, "webhook", "dropped") == 0
    assert sink_events(router, "webhook", "dead_lettered") == 0
    assert sink_health(router, "webhook")["ready"] is True
    reason = "SIGHUP" if trigger == "sighup" else "files changed"
    assert any(f"configuration reloaded ({reason})" in line["message"] for line in router.logs())


def test_secret_file_created_later(
    start_router: Callable[..., RouterProcess], receiver: Receiver, tmp_path: Path
) -> None:
    token_file = tmp_path / "secrets" / "token"
    token_file.parent.mkdir()
    config = write_documents(
        tmp_path / "router.yaml",
        [
            router_doc(queue={"workers": 1}),
            sink_doc(
                "webhook",
                http={
                    "url": f"{receiver.url}/hook",
                    "secretHeaders": [
                        {
                            "name": "Authorization",
                            "valueFrom": {"file": str(token_file)},
                            "prefix": "Bearer ",
                        }
                    ],
                },
                retry={
                    "maxAttempts": 100,
                    "backoff": {"type": "linear", "initial": "200ms", "max": "200ms", "jitter": 0},
                },
            ),
            route_doc("all", ["webhook"]),
        ],
    )
    router = start_router([config])
    sent = send_batch(router, range(3))
    router.wait_for(lambda: retries(router, "webhook") >= 6, 5, "two retries")

    health = sink_health(router, "webhook")
    assert health["ready"] is False
    assert "secret for secretHeaders[0] is missing" in health["lastError"]
    assert router.metric("eventrouter_sink_ready", sink="webhook") == 0
    assert receiver.count() == 0

    replace_file(token_file, SECRET + "\n")
    router.wait_for(lambda: sink_events(router, "webhook", "delivered") == 3, 5, "3 delivered")
    requests = receiver.requests()
    assert len(requests) == 3
    assert [seq_of(r.json()) for r in requests] == sent
    assert all(r.header("Authorization") == f"Bearer {SECRET}" for r in requests)
    assert sink_health(router, "webhook")["ready"] is True
    assert SECRET not in router.stderr_path.read_text()
