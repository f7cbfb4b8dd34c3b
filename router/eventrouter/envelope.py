"""The event envelope that sinks receive, and the decoder that builds it from request bodies.

Decoding uses msgspec typed structs, so type and size checks run in C; see
docs/benchmarks.md for the comparison that chose it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec

from eventrouter.resources import LimitsSpec

__all__ = [
    "DeadLetter",
    "Envelope",
    "EventDecoder",
    "IdGenerator",
    "encode_envelope",
]


class DeadLetter(msgspec.Struct, frozen=True, omit_defaults=True):
    """The reason an event reached a dead-letter sink."""

    sink: str
    error: str
    attempts: int
    status: int | None = None


class Envelope(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One accepted event as every sink receives it.

    `timestamp` is the client's time when the event carried one, else the
    receive time. `id` is a ULID: unique and sortable by receive time.
    """

    id: str
    name: str
    properties: dict[str, str]
    timestamp: datetime
    received_at: datetime
    external: bool
    router: str
    user_id: str | None = None
    username: str | None = None
    session_id: str | None = None
    traceparent: str | None = None
    dead_letter: DeadLetter | None = None


_encoder = msgspec.json.Encoder()


def encode_envelope(envelope: Envelope) -> bytes:
    """Serialize an envelope as one compact JSON object."""
    return _encoder.encode(envelope)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two Crockford digits for each 10-bit value.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_LOW_MASK = (1 << 40) - 1


class IdGenerator:
    """Monotonic ULIDs: 48 bits of milliseconds, then 80 bits that start random.

    Within one millisecond the random part is incremented, so ids of one
    process sort in the order they were made.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._random = 0

    def next_ids(self, count: int) -> list[str]:
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                # One bit of headroom so that increments never carry into the time.
                self._random = int.from_bytes(os.urandom(10), "big") >> 1
            first = (self._last_ms << 80) | self._random
            self._random += count
        # The ids of one call share all but their low 40 bits (8 digits) unless
        # the low bits carry over, so the 18 high digits are encoded once.
        pairs = _PAIRS
        ids = []
        high = -1
        prefix = ""
        for value in range(first, first + count):
            if value >> 40 != high:
                high = value >> 40
                prefix = _encode_high(high)
            low = value & _LOW_MASK
            ids.append(
                prefix
                + pairs[low >> 30]
                + pairs[(low >> 20) & 0x3FF]
                + pairs[(low >> 10) & 0x3FF]
                + pairs[low & 0x3FF]
            )
        return ids


def _encode_high(high: int) -> str:
    """Encode the first 18 digits of a ULID: its top 90 bits, of which the top 2 are zero."""
    pairs = _PAIRS
    return (
        _CROCKFORD[high >> 85]
        + pairs[(high >> 75) & 0x3FF]
        + pairs[(high >> 65) & 0x3FF]
        + pairs[(high >> 55) & 0x3FF]
        + pairs[(high >> 45) & 0x3FF]
        + pairs[(high >> 35) & 0x3FF]
        + pairs[(high >> 25) & 0x3FF]
        + pairs[(high >> 15) & 0x3FF]
        + pairs[(high >> 5) & 0x3FF]
        + _CROCKFORD[high & 0x1F]
    )


@dataclass(frozen=True)
class EventError:
    """The error of one rejected event of a request."""

    index: int | None
    message: str


class EventDecoder:
    """Decode `POST /v2/event` and `POST /v2/events` bodies under the router's limits.

    Unknown fields are ignored, as Nakama's API does. A batch is decoded event by
    event, so one invalid event is reported by index and never hides the others.
    """

    def __init__(self, limits: LimitsSpec) -> None:
        self.limits = limits
        key = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_property_key_length)]
        value = Annotated[str, msgspec.Meta(max_length=limits.max_property_value_length)]
        event_type = msgspec.defstruct(
            "Event",
            [
                (
                    "name",
                    Annotated[
                        str,
                        msgspec.Meta(
                            min_length=1,
                            max_length=limits.max_name_length,
                            # No control characters: names end up in log lines,
                            # topic names and HTTP headers.
                            pattern=r"^[^\x00-\x1f\x7f]+$",
                        ),
                    ],
                ),
                (
                    "properties",
                    Annotated[dict[key, value], msgspec.Meta(max_length=limits.max_properties)],
                    msgspec.field(default_factory=dict),
                ),
                ("timestamp", Annotated[datetime, msgspec.Meta(tz=True)] | None, None),
                ("external", bool, True),
            ],
            frozen=True,
            gc=False,
        )
        batch_type = msgspec.defstruct(
            "Batch",
            [
                (
                    "events",
                    Annotated[
                        list[msgspec.Raw],
                        msgspec.Meta(min_length=1, max_length=limits.max_batch_events),
                    ],
                )
            ],
        )
        self.event_type: Any = event_type
        self._event = msgspec.json.Decoder(event_type)
        self._batch: msgspec.json.Decoder[Any] = msgspec.json.Decoder(batch_type)

    def decode_one(self, body: bytes) -> Any:
        """Decode a single event; raise `msgspec.ValidationError` or `DecodeError`."""
        try:
            return self._event.decode(body)
        except RecursionError:
            raise msgspec.DecodeError(_TOO_DEEP) from None
        except msgspec.ValidationError as exc:
            # msgspec says `$.properties[...]` for a bad value; name the key.
            if "`$.properties[...]`" in str(exc):
                raise self._name_property(body, exc) from None
            raise

    def _name_property(self, body: bytes, exc: msgspec.ValidationError) -> msgspec.ValidationError:
        try:
            properties = msgspec.json.decode(body).get("properties")
        except (msgspec.DecodeError, RecursionError, AttributeError):
            return exc
        limit = self.limits.max_property_value_length
        for key, value in properties.items() if isinstance(properties, dict) else ():
            if not isinstance(value, str) or len(value) > limit:
                quoted = key if key.isidentifier() else repr(key)
                text = str(exc).replace("`$.properties[...]`", f"`$.properties.{quoted}`")
                return msgspec.ValidationError(text)
        return exc

    def decode_batch(self, body: bytes) -> tuple[list[Any], list[EventError]]:
        """Decode a batch into its valid events and one error per invalid event."""
        try:
            raws: list[msgspec.Raw] = self._batch.decode(body).events
        except RecursionError:
            raise msgspec.DecodeError(_TOO_DEEP) from None
        events: list[Any] = []
        errors: list[EventError] = []
        for index, raw in enumerate(raws):
            try:
                events.append(self.decode_one(raw))
            except msgspec.DecodeError as exc:
                errors.append(EventError(index, describe_decode_error(exc, f"events[{index}]")))
        return events, errors


_TOO_DEEP = "JSON is nested too deeply; events hold a name, string properties and a timestamp"


def describe_decode_error(exc: msgspec.DecodeError, prefix: str = "") -> str:
    """Rewrite msgspec's "... - at `$.x`" as "x: ..." with the JSON path first."""
    text = str(exc)
    path = ""
    if match := _AT_KEY.search(text):
        # "... - at `key` in `$.properties`": the message is about a map key.
        text = "key " + text[: match.start()].lower()
        path = match.group(1)
    elif match := _AT_PATH.search(text):
        text = text[: match.start()]
        path = match.group(1)
    if match := _MISSING.match(text):
        path = f"{path}.{match.group(1)}" if path else match.group(1)
        text = "required field is missing"
    path = path.removeprefix("$").lstrip(".").replace("[...]", "")
    if path.startswith("properties") and text.startswith("Expected `str`, got"):
        text += "; property values must be strings, so send numbers and booleans as text"
    location = ".".join(p for p in (prefix, path) if p).replace(".[", "[")
    return f"{location}: {text}" if location else text


_AT_KEY = re.compile(r" - at `key` in `([^`]*)`$")
_AT_PATH = re.compile(r" - at `([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")
