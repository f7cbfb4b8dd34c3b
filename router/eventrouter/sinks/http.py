"""A sink that sends events to an HTTP endpoint with aiohttp.

Status codes decide the outcome: `successStatus` (default 2xx) is delivered,
`retryableStatus` (default 408, 429, 5xx) and connection errors are retried,
and anything else is a permanent error that goes to the dead-letter sink at
once. Secret header values and the signing key are read from their files at
each attempt, so a rotated or newly created Secret applies without a reload.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from eventrouter.envelope import Envelope, encode_envelope
from eventrouter.errors import (
    ConfigError,
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
)
from eventrouter.resources import HttpSinkSpec, SecretSource
from eventrouter.secretfiles import read_secret

__all__ = ["HttpSink", "sanitize_body", "status_matches"]

logger = logging.getLogger(__name__)

_BODY_SNIPPET = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_CONTENT_TYPES = {
    "json": "application/json",
    "array": "application/json",
    "ndjson": "application/x-ndjson",
}


def status_matches(status: int, patterns: Sequence[int | str]) -> bool:
    """True when `status` equals a listed code or falls in a listed class like 5xx."""
    for pattern in patterns:
        if isinstance(pattern, int):
            if status == pattern:
                return True
        elif status // 100 == int(pattern[0]):
            return True
    return False


def sanitize_body(raw: bytes) -> str:
    """Turn a response body into text fit for logs and dead letters: one line, truncated."""
    text = _CONTROL.sub(" ", raw[: _BODY_SNIPPET * 4].decode("utf-8", "replace")).strip()
    return text[:_BODY_SNIPPET] + ("…" if len(text) > _BODY_SNIPPET else "")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpSink:
    """Sends batches to one URL over a pooled aiohttp session."""

    cancellable = True

    def __init__(self, name: str, spec: HttpSinkSpec, secrets_dir: Path) -> None:
        self.name = name
        self._spec = spec
        self._secrets_dir = secrets_dir
        self._session: aiohttp.ClientSession | None = None
        self._content_type = _CONTENT_TYPES[spec.format]
        self._url = yarl.URL(spec.url)
        # With one event per request, each event is its own batch, so that a
        # retry or a dead letter concerns exactly the event that failed.
        self.max_batch: int | None = 1 if spec.format == "json" else None

    def abort(self) -> None:
        # `send` is cancellable, so the runner cancels it instead.
        return None

    def describe(self, batch: Sequence[Envelope]) -> tuple[str, SpanKind, dict[str, Any]]:
        url = self._url
        attributes: dict[str, Any] = {
            "eventrouter.sink.type": "http",
            "http.request.method": self._spec.method,
            "url.full": self._spec.url,
            "server.address": url.host or "",
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        return self._spec.method, SpanKind.CLIENT, attributes

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._spec.max_connections,
            ssl=not self._spec.tls_insecure_skip_verify,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _secret(self, source: SecretSource, field: str) -> str:
        try:
            return read_secret(source, self._secrets_dir, field)
        except ConfigError as exc:
            # The Secret may appear later; until then the sink is not ready
            # and its events wait for retries or go to the dead-letter sink.
            raise RetryableDeliveryError(
                f"secret for {field} is missing: {exc.issues[0].message}"
            ) from None

    def _headers(self, body: bytes, traceparent: str | None) -> dict[str, str]:
        headers = {"Content-Type": self._content_type, **self._spec.headers}
        # The attempt's span continues the trace when there is one; otherwise the
        # event's own trace context goes on, so receivers can still join it.
        propagate.inject(headers)
        if traceparent and "traceparent" not in headers:
            headers["traceparent"] = traceparent
        for index, header in enumerate(self._spec.secret_headers):
            value = self._secret(header.value_from, f"secretHeaders[{index}]")
            headers[header.name] = header.prefix + value
        signature = self._spec.signature
        if signature is not None:
            key = self._secret(signature.secret, "signature.secret").encode()
            stamp = str(int(time.time()))
            digest = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers[signature.timestamp_header] = stamp
            headers[signature.header] = f"sha256={digest}"
        return headers

    async def _post(self, body: bytes, traceparent: str | None = None) -> None:
        assert self._session is not None, "HttpSink.start() was not called"
        spec = self._spec
        try:
            # Redirects are not followed, because aiohttp (3.14) repeats a POST
            # that got a 302 or 303 as a GET without the body, and sends custom
            # secret headers such as X-Api-Key on to another host. A 3xx status
            # is handled like any other status that is not a success.
            async with self._session.request(
                spec.method,
                spec.url,
                data=body,
                headers=self._headers(body, traceparent),
                allow_redirects=False,
            ) as response:
                status = response.status
                # The runner sets the status on the attempt's span only for failures.
                trace.get_current_span().set_attribute("http.response.status_code", status)
                if status_matches(status, spec.success_status):
                    await response.read()
                    return
                snippet = sanitize_body(await response.content.read(_BODY_SNIPPET * 4))
                message = f"{spec.method} {spec.url} returned {status}: {snippet}"
                if status_matches(status, spec.retryable_status):
                    raise RetryableDeliveryError(
                        message,
                        status=status,
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                raise PermanentDeliveryError(message, status=status)
        except DeliveryError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableDeliveryError(
                f"{spec.method} {spec.url} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def send(self, batch: Sequence[Envelope]) -> None:
        fmt = self._spec.format
        if fmt == "array":
            await self._post(b"[" + b",".join(encode_envelope(e) for e in batch) + b"]")
            return
        if fmt == "ndjson":
            await self._post(b"".join(encode_envelope(e) + b"\n" for e in batch))
            return
        for event in batch:
            await self._post(encode_envelope(event), event.traceparent)
