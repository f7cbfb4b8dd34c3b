"""docs/openapi.yaml is a valid OpenAPI 3.1 document, and real responses match it.

Each case below makes a router return one documented (method, path, status)
and checks the response against the document: media type, required headers
and the JSON schema of the body. The set of cases must equal the set of
responses that the document lists, so an undocumented response or an
untested one fails `test_every_documented_response_has_case`.

Routers run as real processes. The module shares one open and one secured
router, and each case that fills a router's buffer or needs other settings
gets its own from `router_factory`. Cases marked "in process" call the ASGI
application of a `Router` built in the test process instead. They cover
responses that a process on loopback cannot be brought to return reliably.
The admin port requires an API key only on a non-loopback address, which the
tests must not listen on, and `shutting_down` lasts only the moment between
SIGTERM and the listener's close.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from eventrouter.admin import AdminApp
from eventrouter.server import Router
from eventrouter.settings import Settings
from tests.conftest import (
    REPO,
    SESSION_KEY,
    RouterProcess,
    read_jsonl,
    route_doc,
    router_doc,
    sign_token,
    sink_doc,
    start_router,
    write_documents,
)

SPEC_PATH = REPO / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
SPEC_URI = "urn:eventrouter:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(SPEC))
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
API_KEY = "test-api-key-0123456789"
# Ports that the document's `servers` entries give the two listeners.
INGEST_PORT = 7350
ADMIN_PORT = 7351


# --- reading the document ------------------------------------------------------


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _node(pointer: str) -> Any:
    node: Any = SPEC
    for token in pointer.lstrip("/").split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


def _resolve(pointer: str) -> tuple[str, Any]:
    """Follow local `$ref`s from `pointer`; return the final pointer and node."""
    node = _node(pointer)
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"].removeprefix("#")
        node = _node(pointer)
    return pointer, node


def documented_responses() -> set[tuple[str, str, str]]:
    """Every (method, path, status) in the document; "*" stands for unlisted paths."""
    found = set()
    for path, item in SPEC["paths"].items():
        for method in HTTP_METHODS:
            for status in item.get(method, {}).get("responses", {}):
                found.add((method, path, status))
    for status in SPEC["x-unlisted-paths"]["responses"]:
        found.add(("*", "*", status))
    return found


def response_pointer(method: str, path: str, status: str) -> str:
    if path == "*":
        return _resolve(f"/x-unlisted-paths/responses/{status}")[0]
    return _resolve(f"/paths/{_escape(path)}/{method}/responses/{status}")[0]


def listener_port(path: str) -> int:
    """The port of the listener that the document puts `path` on."""
    servers = SPEC["paths"][path].get("servers", SPEC["servers"])
    port = urlsplit(servers[0]["url"]).port
    assert port is not None, f"server URL of {path} has no port"
    return port


def check_header(name: str, header: dict[str, Any], response: httpx.Response) -> None:
    value = response.headers.get(name)
    if value is None:
        assert not header.get("required"), f"required header {name} is missing"
        return
    schema = header["schema"]
    instance: Any = int(value) if schema.get("type") == "integer" else value
    jsonschema.validate(instance, schema)


def check_against_document(case: Case, response: httpx.Response) -> None:
    """Assert that `response` matches what the document lists for the case."""
    key = (case.method, case.path, case.status)
    assert key in documented_responses(), f"{key} is not in {SPEC_PATH.name}"
    pointer = response_pointer(case.method, case.path, case.status)
    documented = _node(pointer)
    for name in documented.get("headers", {}):
        _, header = _resolve(f"{pointer}/headers/{_escape(name)}")
        check_header(name, header, response)

    content = documented.get("content", {})
    if not content:
        assert response.content == b"", "the document gives this response no body"
        return
    media_type = response.headers["content-type"].split(";")[0].strip()
    assert media_type in content, (
        f"{media_type} is not documented; the document has {list(content)}"
    )
    body: Any = response.json() if media_type == "application/json" else response.text
    schema_ref = f"{SPEC_URI}#{pointer}/content/{_escape(media_type)}/schema"
    validator = jsonschema.Draft202012Validator(
        {"$ref": schema_ref},
        registry=REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(body)]
    assert errors == [], f"body {body!r} does not match {schema_ref}"


# --- routers -------------------------------------------------------------------


def _drain_fifo(path: Path, stop: threading.Event) -> None:
    # Opening the read end lets the sink's blocked open() of the write end return.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while not stop.is_set():
            try:
                if not os.read(fd, 65536):
                    time.sleep(0.02)
            except BlockingIOError:
                time.sleep(0.02)
    finally:
        os.close(fd)


class SharedRouters:
    """Routers that many cases use unchanged, started once per module on first use."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.events = tmp_path / "secured-events.jsonl"
        self.started: list[RouterProcess] = []

    def _start(self, files: list[Path] | None = None) -> RouterProcess:
        router = start_router(self.tmp_path, files)
        self.started.append(router)
        return router

    @functools.cached_property
    def open(self) -> RouterProcess:
        """The embedded default: no auth, every event to the log sink."""
        return self._start()

    @functools.cached_property
    def secured(self) -> RouterProcess:
        """A router that requires a session token or an API key; events go to `events`."""
        session_key = self.tmp_path / "session.key"
        session_key.write_text(SESSION_KEY + "\n")
        api_keys = self.tmp_path / "api.keys"
        api_keys.write_text(API_KEY + "\n")
        auth = {"sessionKey": {"file": str(session_key)}, "apiKeys": {"file": str(api_keys)}}
        config = write_documents(
            self.tmp_path / "secured.yaml",
            [
                router_doc("secured", auth=auth),
                sink_doc("events", file={"path": str(self.events)}),
                route_doc("all", ["events"], router="secured"),
            ],
        )
        return self._start([config])


class Routers:
    """The shared routers, and a held router of this test's own, started on first use."""

    def __init__(
        self, shared: SharedRouters, factory: Callable[..., RouterProcess], tmp_path: Path
    ) -> None:
        self._shared = shared
        self._factory = factory
        self.tmp_path = tmp_path
        self.fifo = tmp_path / "held.fifo"

    @property
    def open(self) -> RouterProcess:
        return self._shared.open

    @property
    def secured(self) -> RouterProcess:
        return self._shared.secured

    @property
    def events(self) -> Path:
        """The file that the secured router writes its events to."""
        return self._shared.events

    def start(self, files: list[Path]) -> RouterProcess:
        """Start a router of this test's own; it stops at the end of the test."""
        return self._factory(files)

    @functools.cached_property
    def held(self) -> RouterProcess:
        """A `reject` router whose only sink blocks on a FIFO without a reader.

        The buffer has two slots and the sink queue one, so a few events fill
        them and the next request gets 503.
        """
        os.mkfifo(self.fifo)
        config = write_documents(
            self.tmp_path / "held.yaml",
            [
                router_doc(
                    "held",
                    queue={"size": 2, "workers": 1, "overflow": "reject"},
                    # Under `reject` a batch must fit in the buffer.
                    limits={"maxBatchEvents": 2},
                ),
                sink_doc("fifo", file={"path": str(self.fifo)}, queueSize=1, batchSize=1),
                route_doc("all", ["fifo"], router="held"),
            ],
        )
        return self._factory([config], args=["--grace-period", "5"])

    def fill_held(self) -> httpx.Response:
        """Send events to the held router until it returns 503; return that response."""
        url = ingest_url(self.held, "/v2/event")
        for _ in range(50):
            response = httpx.post(url, json={"name": "filler"}, timeout=10)
            if response.status_code == 503:
                return response
            assert response.status_code == 200, response.text
            time.sleep(0.05)
        pytest.fail("the held router never returned 503")

    def release(self) -> None:
        """Stop the held router, reading its FIFO so that the blocked write can finish."""
        if "held" not in self.__dict__:
            return
        stop = threading.Event()
        reader = threading.Thread(target=_drain_fifo, args=(self.fifo, stop), daemon=True)
        reader.start()
        try:
            self.held.terminate(30)
        finally:
            stop.set()
            reader.join(5)


@pytest.fixture(scope="module")
def shared_routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRouters]:
    shared = SharedRouters(tmp_path_factory.mktemp("shared-routers"))
    yield shared
    for router in shared.started:
        router.terminate(10)


@pytest.fixture
def routers(
    shared_routers: SharedRouters, router_factory: Callable[..., RouterProcess], tmp_path: Path
) -> Iterator[Routers]:
    started = Routers(shared_routers, router_factory, tmp_path)
    yield started
    started.release()


def ingest_url(router: RouterProcess, path: str) -> str:
    assert listener_port(path) == INGEST_PORT, f"the document puts {path} on the admin port"
    return f"{router.url}{path}"


def admin_url(router: RouterProcess, path: str) -> str:
    assert listener_port(path) == ADMIN_PORT, f"the document puts {path} on the ingestion port"
    return f"{router.admin_url}{path}"


def in_process_router(tmp_path: Path) -> Router:
    """A router built in this process, with API keys; its servers never start."""
    api_keys = tmp_path / "in-process-api.keys"
    api_keys.write_text(API_KEY + "\n")
    return Router(Settings(api_keys_file=api_keys))


def asgi_request(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(fetch())


def admin_in_process(tmp_path: Path, path: str, headers: dict[str, str]) -> httpx.Response:
    """GET `path` from the admin app of a router that requires an API key for it."""
    app = AdminApp(in_process_router(tmp_path), require_key=True)
    return asgi_request(app, "GET", path, headers=headers)


def websocket_handshake_in_process(app: Any) -> httpx.Response:
    """Run the WebSocket handshake of `GET /ws` against an ASGI app; return its HTTP response."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "extensions": {"websocket.http.response": {}},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "websocket.http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"].endswith("response.body"))
    return httpx.Response(start["status"], headers=start["headers"], content=body)


def websocket_handshake(router: RouterProcess, target: str) -> httpx.Response:
    """Send a WebSocket handshake for `target` over TCP; return the HTTP response to it."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{router.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as connection:
        connection.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(4096)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
        while len(body) < length:
            chunk = connection.recv(4096)
            assert chunk, "connection closed before the whole body arrived"
            body += chunk
    return httpx.Response(status, headers=headers, content=body)


# --- cases ---------------------------------------------------------------------


Producer = Callable[[Routers], httpx.Response]


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    status: str
    produce: Producer
    error: str | None = None
    """The `error` code the body must have, for error responses."""


CASES: dict[str, Case] = {}


def case(
    method: str, path: str, status: int, variant: str = "", *, error: str | None = None
) -> Callable[[Producer], Producer]:
    """Register a function that makes a router return the given response."""

    def register(produce: Producer) -> Producer:
        name = f"{method.upper()} {path} {status}" + (f" {variant}" if variant else "")
        assert name not in CASES, f"duplicate case {name}"
        CASES[name] = Case(method, path, str(status), produce, error)
        return produce

    return register


@case("post", "/v2/event", 200, "open router")
def _event_accepted(routers: Routers) -> httpx.Response:
    event = {"name": "level_up", "properties": {"level": "5"}, "timestamp": "2025-01-31T18:04:05Z"}
    return httpx.post(ingest_url(routers.open, "/v2/event"), json=event)


@case("post", "/v2/event", 200, "session token")
def _event_with_token(routers: Routers) -> httpx.Response:
    headers = {"Authorization": f"Bearer {sign_token()}"}
    return httpx.post(
        ingest_url(routers.secured, "/v2/event"), json={"name": "login"}, headers=headers
    )


@case("post", "/v2/event", 400, error="invalid_event")
def _event_invalid(routers: Routers) -> httpx.Response:
    return httpx.post(
        ingest_url(routers.open, "/v2/event"), json={"name": "a", "properties": {"n": 5}}
    )


@case("post", "/v2/event", 401, error="unauthenticated")
def _event_without_credentials(routers: Routers) -> httpx.Response:
    return httpx.post(ingest_url(routers.secured, "/v2/event"), json={"name": "a"})


@case("post", "/v2/event", 413, error="too_large")
def _event_too_large(routers: Routers) -> httpx.Response:
    event = {"name": "a", "properties": {"blob": "x" * 300_000}}
    return httpx.post(ingest_url(routers.open, "/v2/event"), json=event)


@case("post", "/v2/event", 503, error="overloaded")
def _event_overloaded(routers: Routers) -> httpx.Response:
    return routers.fill_held()


@case("get", "/v2/event", 405, error="method_not_allowed")
def _event_wrong_method(routers: Routers) -> httpx.Response:
    return httpx.get(ingest_url(routers.open, "/v2/event"))


@case("post", "/v2/events", 200, "with errors")
def _batch_partly_valid(routers: Routers) -> httpx.Response:
    batch = {"events": [{"name": "a"}, {"nam": "b"}, {"name": "c", "properties": {"k": "v"}}]}
    return httpx.post(ingest_url(routers.open, "/v2/events"), json=batch)


@case("post", "/v2/events", 200, "api key")
def _batch_with_api_key(routers: Routers) -> httpx.Response:
    batch = {"events": [{"name": "server_tick", "external": False}]}
    return httpx.post(
        ingest_url(routers.secured, "/v2/events"), json=batch, headers={"X-Api-Key": API_KEY}
    )


@case("post", "/v2/events", 400, "invalid batch", error="invalid_batch")
def _batch_invalid(routers: Routers) -> httpx.Response:
    return httpx.post(ingest_url(routers.open, "/v2/events"), json={"events": []})


@case("post", "/v2/events", 400, "every event invalid")
def _batch_all_invalid(routers: Routers) -> httpx.Response:
    batch = {"events": [{"nam": "a"}, {"name": ""}]}
    return httpx.post(ingest_url(routers.open, "/v2/events"), json=batch)


@case("post", "/v2/events", 401, error="unauthenticated")
def _batch_expired_token(routers: Routers) -> httpx.Response:
    headers = {"Authorization": f"Bearer {sign_token(expires_in=-60)}"}
    return httpx.post(
        ingest_url(routers.secured, "/v2/events"), json={"events": [{"name": "a"}]}, headers=headers
    )


@case("post", "/v2/events", 413, "body", error="too_large")
def _batch_too_large(routers: Routers) -> httpx.Response:
    batch = {"events": [{"name": "a", "properties": {"blob": "x" * 4000}}] * 80}
    return httpx.post(ingest_url(routers.open, "/v2/events"), json=batch)


@case("post", "/v2/events", 413, "events", error="too_many_events")
def _batch_too_many(routers: Routers) -> httpx.Response:
    batch = {"events": [{"name": "a"}] * 501}
    return httpx.post(ingest_url(routers.open, "/v2/events"), json=batch)


@case("post", "/v2/events", 503, error="overloaded")
def _batch_overloaded(routers: Routers) -> httpx.Response:
    routers.fill_held()
    return httpx.post(
        ingest_url(routers.held, "/v2/events"), json={"events": [{"name": "a"}, {"name": "b"}]}
    )


@case("get", "/v2/events", 405, error="method_not_allowed")
def _batch_wrong_method(routers: Routers) -> httpx.Response:
    return httpx.get(ingest_url(routers.open, "/v2/events"))


@case("post", "/v2/event", 503, "shutting down in process", error="shutting_down")
def _event_shutting_down(routers: Routers) -> httpx.Response:
    router = in_process_router(routers.tmp_path)
    router.app.accepting = False
    return asgi_request(router.app, "POST", "/v2/event", json={"name": "a"})


@case("get", "/ws", 101)
def _session_opened(routers: Routers) -> httpx.Response:
    ingest_url(routers.open, "/ws")
    return websocket_handshake(routers.open, "/ws")


@case("get", "/ws", 401, error="unauthenticated")
def _session_without_token(routers: Routers) -> httpx.Response:
    ingest_url(routers.secured, "/ws")
    return websocket_handshake(routers.secured, f"/ws?token={sign_token(expires_in=-60)}")


@case("get", "/ws", 404, "sessions off", error="not_found")
def _sessions_turned_off(routers: Routers) -> httpx.Response:
    config = write_documents(
        routers.tmp_path / "no-sessions.yaml", [router_doc("quiet", sessions={"enabled": False})]
    )
    return websocket_handshake(routers.start([config]), "/ws")


@case("get", "/ws", 426, error="upgrade_required")
def _session_without_upgrade(routers: Routers) -> httpx.Response:
    return httpx.get(ingest_url(routers.open, "/ws"))


@case("get", "/ws", 503, "in process", error="shutting_down")
def _session_shutting_down(routers: Routers) -> httpx.Response:
    router = in_process_router(routers.tmp_path)
    router.app.accepting = False
    return websocket_handshake_in_process(router.app)


@case("get", "/healthz", 200)
def _health(routers: Routers) -> httpx.Response:
    return httpx.get(admin_url(routers.open, "/healthz"))


@case("post", "/healthz", 405, error="method_not_allowed")
def _health_wrong_method(routers: Routers) -> httpx.Response:
    return httpx.post(admin_url(routers.open, "/healthz"))


@case("get", "/readyz", 200)
def _ready(routers: Routers) -> httpx.Response:
    return httpx.get(admin_url(routers.open, "/readyz"))


@case("get", "/readyz", 503, "draining")
def _draining(routers: Routers) -> httpx.Response:
    url = admin_url(routers.held, "/readyz")
    routers.fill_held()
    routers.held.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = httpx.get(url)
        if response.status_code == 503:
            return response
        time.sleep(0.05)
    pytest.fail("/readyz did not return 503 while the router drained")


@case("post", "/readyz", 405, error="method_not_allowed")
def _ready_wrong_method(routers: Routers) -> httpx.Response:
    return httpx.post(admin_url(routers.open, "/readyz"))


@case("get", "/metrics", 200)
def _metrics(routers: Routers) -> httpx.Response:
    return httpx.get(admin_url(routers.open, "/metrics"))


@case("get", "/metrics", 401, "in process", error="unauthenticated")
def _metrics_without_key(routers: Routers) -> httpx.Response:
    return admin_in_process(routers.tmp_path, "/metrics", {})


@case("post", "/metrics", 405, error="method_not_allowed")
def _metrics_wrong_method(routers: Routers) -> httpx.Response:
    return httpx.post(admin_url(routers.open, "/metrics"))


@case("get", "/v1/routes", 200)
def _routes(routers: Routers) -> httpx.Response:
    return httpx.get(admin_url(routers.secured, "/v1/routes"))


@case("get", "/v1/routes", 401, "in process", error="unauthenticated")
def _routes_wrong_key(routers: Routers) -> httpx.Response:
    return admin_in_process(routers.tmp_path, "/v1/routes", {"X-Api-Key": "wrong"})


@case("post", "/v1/routes", 405, error="method_not_allowed")
def _routes_wrong_method(routers: Routers) -> httpx.Response:
    return httpx.post(admin_url(routers.open, "/v1/routes"))


@case("*", "*", 404, "ingestion port", error="not_found")
def _ingest_not_found(routers: Routers) -> httpx.Response:
    return httpx.post(f"{routers.open.url}/v2/rpc/healthcheck", json={})


@case("*", "*", 404, "admin port", error="not_found")
def _admin_not_found(routers: Routers) -> httpx.Response:
    return httpx.get(f"{routers.open.admin_url}/debug/vars")


# --- tests ---------------------------------------------------------------------


def test_openapi_document_is_valid() -> None:
    validate_openapi(SPEC)


def test_every_documented_response_has_case() -> None:
    documented = documented_responses()
    exercised = {(c.method, c.path, c.status) for c in CASES.values()}
    untested = sorted(documented - exercised)
    undocumented = sorted(exercised - documented)
    assert untested == [], "documented responses without a case"
    assert undocumented == [], "cases for responses the document does not list"


@pytest.mark.parametrize("name", sorted(CASES))
def test_response_matches_document(name: str, routers: Routers) -> None:
    case = CASES[name]
    response = case.produce(routers)
    assert response.status_code == int(case.status), response.text
    check_against_document(case, response)
    if case.error is not None:
        assert response.json()["error"] == case.error


def test_batch_errors_name_invalid_indexes(routers: Routers) -> None:
    response = _batch_partly_valid(routers)
    body = response.json()
    assert body["accepted"] == 2
    assert body["rejected"] == 1
    assert [e["index"] for e in body["errors"]] == [1]
    assert "dropped" not in body


def test_overloaded_response_has_retry_after(routers: Routers) -> None:
    response = _event_overloaded(routers)
    assert response.headers["retry-after"] == "1"
    assert "buffer is full" in response.json()["message"]


def test_envelope_records_caller(routers: Routers) -> None:
    token_headers = {"Authorization": f"Bearer {sign_token(uid='u-7', usn='ana', tid='t-3')}"}
    url = ingest_url(routers.secured, "/v2/event")
    by_token = httpx.post(url, json={"name": "by_token", "external": False}, headers=token_headers)
    assert by_token.status_code == 200
    by_key = httpx.post(
        url, json={"name": "by_key", "external": False}, headers={"X-Api-Key": API_KEY}
    )
    assert by_key.status_code == 200

    def names() -> set[str]:
        return {e["name"] for e in read_jsonl(routers.events)}

    routers.secured.wait_for(lambda: {"by_token", "by_key"} <= names(), what="both events")
    events = {e["name"]: e for e in read_jsonl(routers.events)}
    assert events["by_token"]["external"] is True
    assert events["by_token"]["user_id"] == "u-7"
    assert events["by_token"]["username"] == "ana"
    assert events["by_token"]["session_id"] == "t-3"
    assert events["by_key"]["external"] is False
    assert "user_id" not in events["by_key"]


def test_routes_contain_no_secret_values(routers: Routers) -> None:
    text = httpx.get(admin_url(routers.secured, "/v1/routes")).text
    assert SESSION_KEY not in text
    assert API_KEY not in text
