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


class IdGenerator:
    """Monotonic ULIDs: 48 bits of milliseconds, then 80 bits that start random.

    Within one millisecond the random part is incremented, so ids of one
    process sort in the order they were made.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._random = 0
        # The first 24 digits of the last id made, and the bits above its low 10.
        self._block = -1
        self._prefix = ""

    def next_ids(self, count: int) -> list[str]:
        if count == 1:
            return [self.next_id()]
        with self._lock:
            value = self._advance(count)
            pairs = _PAIRS
            ids: list[str] = []
            end = value + count
            while value < end:
                block = value >> 10
                prefix = self._prefix_of(block)
                block_end = min(end, (block + 1) << 10)
                ids += [prefix + pairs[v & 0x3FF] for v in range(value, block_end)]
                value = block_end
        return ids

    def next_id(self) -> str:
        """Return one new id, as `next_ids(1)` does, at less cost."""
        with self._lock:
            value = self._advance(1)
            return self._prefix_of(value >> 10) + _PAIRS[value & 0x3FF]

    def _advance(self, count: int) -> int:
        """Take `count` consecutive values and return the first; call with the lock held."""
        now_ms = time.time_ns() // 1_000_000
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            # One bit of headroom so that increments never carry into the time.
            self._random = int.from_bytes(os.urandom(10), "big") >> 1
        value = (self._last_ms << 80) | self._random
        self._random += count
        return value

    def _prefix_of(self, block: int) -> str:
        # Consecutive ids differ only in their last two digits (the low 10 bits)
        # until those carry over, so the 24 digits before them are encoded once
        # per block of 1,024 values and reused across calls.
        if block != self._block:
            self._block = block
            self._prefix = _encode_prefix(block)
        return self._prefix


def _encode_prefix(block: int) -> str:
    """Encode the first 24 digits of a ULID: its top 120 bits, of which the top 2 are zero."""
    pairs = _PAIRS
    return (
        _CROCKFORD[block >> 115]
        + pairs[(block >> 105) & 0x3FF]
        + pairs[(block >> 95) & 0x3FF]
        + pairs[(block >> 85) & 0x3FF]
        + pairs[(block >> 75) & 0x3FF]
        + pairs[(block >> 65) & 0x3FF]
        + pairs[(block >> 55) & 0x3FF]
        + pairs[(block >> 45) & 0x3FF]
        + pairs[(block >> 35) & 0x3FF]
        + _CROCKFORD[(block >> 30) & 0x1F]
        + pairs[(block >> 20) & 0x3FF]
        + pairs[(block >> 10) & 0x3FF]
        + pairs[block & 0x3FF]
    )


@dataclass(frozen=True)
class EventError:
    """The error of one rejected event of a request."""

    index: int | None
    message: str


class EventDecoder:
    """Decode `POST /v2/event` and `POST /v2/events` bodies under the router's limits.

    Unknown fields are ignored, as Nakama's API does. A valid body is decoded in
    one pass. A body with an invalid event is decoded again event by event, so
    each invalid event is reported by index and never hides the others.
    """

    def __init__(self, limits: LimitsSpec) -> None:
        self.limits = limits
        value = Annotated[str, msgspec.Meta(max_length=limits.max_property_value_length)]
        name = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_name_length)]
        strict_key = Annotated[
            str, msgspec.Meta(min_length=1, max_length=limits.max_property_key_length)
        ]
        # The strict type checks everything and words the errors. The fast type
        # leaves out the name's character check and the key lengths, which cost
        # about half of the decoding. `_passes_checks` applies them instead, once
        # per distinct name and key. Plain `str` keys also let msgspec reuse one
        # string object for each repeated property key.
        strict_event = _event_type(
            Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_name_length,
                                        pattern=_NAME_PATTERN)],
            strict_key,
            value,
            limits.max_properties,
        )  # fmt: skip
        fast_event = _event_type(name, str, value, limits.max_properties)
        raw_batch = _batch_type(msgspec.Raw, limits.max_batch_events)
        fast_batch = _batch_type(fast_event, limits.max_batch_events)
        self.event_type: Any = strict_event
        self._event = msgspec.json.Decoder(strict_event)
        self._fast_event = msgspec.json.Decoder(fast_event)
        self._batch: msgspec.json.Decoder[Any] = msgspec.json.Decoder(raw_batch)
        self._fast_batch: msgspec.json.Decoder[Any] = msgspec.json.Decoder(fast_batch)
        self._max_key = limits.max_property_key_length
        # Names that passed the character check, each mapped to one shared
        # string object, so queued events of one name share their name.
        self._names: dict[str, str] = {}
        # Property keys whose length is valid.
        self._keys: set[str] = set()

    def _passes_checks(self, events: list[Any]) -> bool:
        """Apply the checks that the fast type leaves out, and share the names' strings."""
        names = self._names
        keys = self._keys
        for event in events:
            name = event.name
            known = names.get(name)
            if known is None:
                if _CONTROL_CHARACTER.search(name):
                    return False
                if len(names) >= _NAME_CACHE_SIZE:
                    names.clear()
                names[name] = name
            elif known is not name:
                event.name = known
            properties = event.properties
            if properties and not keys.issuperset(properties):
                for key in properties:
                    if key not in keys:
                        if not 0 < len(key) <= self._max_key:
                            return False
                        if len(keys) >= _KEY_CACHE_SIZE:
                            keys.clear()
                        keys.add(key)
        return True

    def decode_one(self, body: bytes) -> Any:
        """Decode a single event; raise `msgspec.ValidationError` or `DecodeError`."""
        try:
            event = self._fast_event.decode(body)
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            if self._passes_checks([event]):
                return event
        return self._decode_strict(body)

    def _decode_strict(self, body: bytes) -> Any:
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

    def count_events(self, body: bytes) -> int | None:
        """Count the events of a batch without decoding them, or return None if it is invalid."""
        try:
            return len(self._batch.decode(body).events)
        except (msgspec.DecodeError, RecursionError):
            return None

    def decode_batch(self, body: bytes) -> tuple[list[Any], list[EventError]]:
        """Decode a batch into its valid events and one error per invalid event."""
        try:
            events: list[Any] = self._fast_batch.decode(body).events
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            if self._passes_checks(events):
                return events, []
        try:
            raws: list[msgspec.Raw] = self._batch.decode(body).events
        except RecursionError:
            raise msgspec.DecodeError(_TOO_DEEP) from None
        events = []
        errors: list[EventError] = []
        for index, raw in enumerate(raws):
            try:
                events.append(self.decode_one(raw))
            except msgspec.DecodeError as exc:
                errors.append(EventError(index, describe_decode_error(exc, f"events[{index}]")))
        return events, errors


# No control characters: names end up in log lines, topic names and HTTP
# headers. `\Z`, unlike `$`, does not match before a final newline.
_NAME_PATTERN = r"^[^\x00-\x1f\x7f]+\Z"
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
_NAME_CACHE_SIZE = 4096
_KEY_CACHE_SIZE = 4096


def _event_type(name: Any, key: Any, value: Any, max_properties: int) -> Any:
    return msgspec.defstruct(
        "Event",
        [
            ("name", name),
            (
                "properties",
                Annotated[dict[key, value], msgspec.Meta(max_length=max_properties)],
                msgspec.field(default_factory=dict),
            ),
            ("timestamp", Annotated[datetime, msgspec.Meta(tz=True)] | None, None),
            ("external", bool, True),
        ],
        gc=False,
    )


def _batch_type(event: Any, max_events: int) -> Any:
    return msgspec.defstruct(
        "Batch",
        [("events", Annotated[list[event], msgspec.Meta(min_length=1, max_length=max_events)])],
    )


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
    if text.startswith("Expected `str` matching regex") and path == "name":
        text = "must not contain control characters (U+0000 to U+001F or U+007F)"
    if path.startswith("properties") and text.startswith("Expected `str`, got"):
        text += "; property values must be strings, so send numbers and booleans as text"
    location = ".".join(p for p in (prefix, path) if p).replace(".[", "[")
    return f"{location}: {text}" if location else text


_AT_KEY = re.compile(r" - at `key` in `([^`]*)`$")
_AT_PATH = re.compile(r" - at `([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")
