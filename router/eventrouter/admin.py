"""The admin API on port 7351: health, readiness, metrics and the active configuration.

It is not meant for game clients. `/healthz` and `/readyz` are always open, for
probes. On a non-loopback address, `/metrics` and `/v1/routes` require an API
key, because they describe the deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventrouter.app import Receive, Scope, Send, _lifespan, _respond
from eventrouter.errors import AuthError

if TYPE_CHECKING:
    from eventrouter.server import Router

__all__ = ["AdminApp", "redacted_config"]


def redacted_config(router: Router) -> dict[str, Any]:
    """The active configuration as JSON, with every secret value left out.

    Secrets are only ever referenced by name (Secret key, file path or variable
    name) in the resources, so dumping the resources reveals no secret value.
    """
    config = router.engine.config
    return {
        "router": config.router.model_dump(mode="json", by_alias=True, exclude_none=True),
        "routes": [
            r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in config.routes
        ],
        "sinks": [
            s.model_dump(mode="json", by_alias=True, exclude_none=True)
            for s in config.sinks.values()
        ],
        "sources": list(config.sources),
        "digest": config.digest,
    }


class AdminApp:
    """ASGI application for the admin port."""

    def __init__(self, router: Router, *, require_key: bool) -> None:
        self.router = router
        self.require_key = require_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(
                send,
                405,
                _json({"error": "method_not_allowed", "message": "use GET or HEAD"}),
                [(b"allow", b"GET, HEAD")],
            )
            return
        if path == "/healthz":
            await _respond(send, 200, _json({"status": "ok"}))
        elif path == "/readyz":
            status, body = self._readiness()
            await _respond(send, status, _json(body))
        elif path in ("/metrics", "/v1/routes"):
            if self.require_key and not self._key_ok(scope):
                await _respond(
                    send,
                    401,
                    _json(
                        {
                            "error": "unauthenticated",
                            "message": "send an API key in X-Api-Key or as Authorization: Bearer",
                        }
                    ),
                )
                return
            if path == "/metrics":
                data = generate_latest(self.router.metrics.registry)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": data})
            else:
                await _respond(send, 200, _json(redacted_config(self.router)))
        else:
            await _respond(
                send, 404, _json({"error": "not_found", "message": f"no endpoint at {path}"})
            )

    def _key_ok(self, scope: Scope) -> bool:
        """Accept an API key in X-Api-Key, or as a bearer token as Prometheus sends it."""
        key = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                key = value.decode("latin-1")
            elif name == b"authorization" and key is None:
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token:
                    key = token.strip()
        if key is None:
            return False
        try:
            self.router.authenticator.check_api_key(key)
        except AuthError:
            return False
        return True

    def _readiness(self) -> tuple[int, dict[str, Any]]:
        engine = self.router.engine
        sinks = {
            name: {
                "ready": runner.ready,
                "queued": runner.queue_depth,
                "inFlight": runner.in_flight(),
                **({"lastError": runner.last_error} if runner.last_error else {}),
            }
            for name, runner in engine.runners.items()
        }
        if not engine.started:
            return 503, {"status": "starting", "sinks": sinks}
        if not self.router.app.accepting:
            return 503, {"status": "draining", "sinks": sinks}
        # A sink that cannot deliver is reported but does not make the router
        # unready: the other sinks still deliver, and its own queue absorbs the
        # events under the overflow policy.
        degraded = [name for name, s in sinks.items() if not s["ready"]]
        body: dict[str, Any] = {"status": "degraded" if degraded else "ready", "sinks": sinks}
        return 200, body


def _json(value: Any) -> bytes:
    return orjson.dumps(value)
