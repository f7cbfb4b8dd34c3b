"""Unit tests of request decoding, decode error messages and ULID generation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from eventrouter.envelope import EventDecoder, IdGenerator, describe_decode_error
from eventrouter.resources import LimitsSpec

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TYPE_HINT = "property values must be strings"

LIMITS = LimitsSpec(
    max_batch_events=3,
    max_name_length=8,
    max_properties=2,
    max_property_key_length=4,
    max_property_value_length=5,
)


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(LIMITS)


def decode_error(decoder: EventDecoder, body: bytes) -> str:
    """Decode a body that must fail and return the rewritten error message."""
    with pytest.raises(msgspec.DecodeError) as info:
        decoder.decode_one(body)
    return describe_decode_error(info.value)


# --- single events -------------------------------------------------------------


def test_decode_valid_event(decoder: EventDecoder) -> None:
    event = decoder.decode_one(
        b'{"name":"login","properties":{"k":"v"},'
        b'"timestamp":"2024-05-01T12:00:00Z","external":false}'
    )
    assert event.name == "login"
    assert event.properties == {"k": "v"}
    assert event.timestamp == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert event.external is False


def test_decode_defaults(decoder: EventDecoder) -> None:
    event = decoder.decode_one(b'{"name":"login"}')
    assert event.properties == {}
    assert event.timestamp is None
    assert event.external is True


def test_decode_ignores_unknown_fields(decoder: EventDecoder) -> None:
    event = decoder.decode_one(b'{"name":"login","extra":{"nested":[1,2]},"value":3}')
    assert event.name == "login"


def test_decode_accepts_limits_exactly(decoder: EventDecoder) -> None:
    event = decoder.decode_one(b'{"name":"12345678","properties":{"abcd":"12345","b":""}}')
    assert event.name == "12345678"
    assert event.properties == {"abcd": "12345", "b": ""}


def test_decode_timestamp_with_offset(decoder: EventDecoder) -> None:
    event = decoder.decode_one(b'{"name":"a","timestamp":"2024-05-01T14:00:00.123+02:00"}')
    expected = datetime(2024, 5, 1, 14, 0, 0, 123000, tzinfo=timezone(timedelta(hours=2)))
    assert event.timestamp == expected
    assert event.timestamp.utcoffset() == timedelta(hours=2)
    assert event.timestamp.astimezone(UTC) == datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", "name: required field is missing"),
        (b'{"name":""}', "name: Expected `str` of length >= 1"),
        (b'{"name":"123456789"}', "name: Expected `str` of length <= 8"),
        (b'{"name":5}', "name: Expected `str`, got `int`"),
        (b'{"name":null}', "name: Expected `str`, got `null`"),
        (
            b'{"name":"a","properties":{"a":"1","b":"2","c":"3"}}',
            "properties: Expected `object` of length <= 2",
        ),
        (b'{"name":"a","properties":{"":"1"}}', "properties: key expected `str` of length >= 1"),
        (
            b'{"name":"a","properties":{"abcde":"1"}}',
            "properties: key expected `str` of length <= 4",
        ),
        (
            b'{"name":"a","properties":{"k":"123456"}}',
            "properties.k: Expected `str` of length <= 5",
        ),
        (
            b'{"name":"a","timestamp":"2024-05-01T12:00:00"}',
            "timestamp: Expected `datetime` with a timezone component",
        ),
        (b'{"name":"a","timestamp":"yesterday"}', "timestamp: Invalid RFC3339 encoded datetime"),
        (b'{"name":"a","external":"yes"}', "external: Expected `bool`, got `str`"),
        (b"[]", "Expected `object`, got `array`"),
        (b'{"name":', "Input data was truncated"),
        (b"@", "JSON is malformed: invalid character (byte 0)"),
    ],
)
def test_decode_error_message(decoder: EventDecoder, body: bytes, expected: str) -> None:
    assert decode_error(decoder, body) == expected


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(b"1", "int"), (b"1.5", "float"), (b"true", "bool"), (b"null", "null"), (b"[]", "array")],
)
def test_non_string_property_hint(decoder: EventDecoder, value: bytes, type_name: str) -> None:
    message = decode_error(decoder, b'{"name":"a","properties":{"k":' + value + b"}}")
    assert message.startswith(f"properties.k: Expected `str`, got `{type_name}`")
    assert TYPE_HINT in message


def test_long_value_no_type_hint(decoder: EventDecoder) -> None:
    # The value is a string, so the advice to send numbers as text would mislead.
    message = decode_error(decoder, b'{"name":"a","properties":{"k":"123456"}}')
    assert TYPE_HINT not in message


def test_malformed_json_is_decode_error(decoder: EventDecoder) -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        decoder.decode_one(b'{"name": "a",}')
    assert not isinstance(info.value, msgspec.ValidationError)


# --- batches -------------------------------------------------------------------


def test_batch_valid(decoder: EventDecoder) -> None:
    events, errors = decoder.decode_batch(
        b'{"events":[{"name":"a"},{"name":"b","external":false}]}'
    )
    assert [e.name for e in events] == ["a", "b"]
    assert [e.external for e in events] == [True, False]
    assert errors == []


def test_batch_ignores_unknown_fields(decoder: EventDecoder) -> None:
    events, errors = decoder.decode_batch(b'{"events":[{"name":"a","x":1}],"other":true}')
    assert [e.name for e in events] == ["a"]
    assert errors == []


def test_batch_reports_invalid_events_by_index(decoder: EventDecoder) -> None:
    body = b'{"events":[{"name":"a"},{},{"name":"b","properties":{"k":1}}]}'
    events, errors = decoder.decode_batch(body)
    assert [e.name for e in events] == ["a"]
    assert [e.index for e in errors] == [1, 2]
    assert errors[0].message == "events[1].name: required field is missing"
    assert errors[1].message.startswith("events[2].properties.k: Expected `str`, got `int`")
    assert TYPE_HINT in errors[1].message


def test_batch_all_invalid(decoder: EventDecoder) -> None:
    body = b'{"events":[{"name":""},{"name":"a","timestamp":"2024-05-01T12:00:00"}]}'
    events, errors = decoder.decode_batch(body)
    assert events == []
    assert [e.index for e in errors] == [0, 1]
    assert errors[0].message == "events[0].name: Expected `str` of length >= 1"
    assert errors[1].message == (
        "events[1].timestamp: Expected `datetime` with a timezone component"
    )


def test_batch_at_max_events(decoder: EventDecoder) -> None:
    events, errors = decoder.decode_batch(b'{"events":[{"name":"a"},{"name":"b"},{"name":"c"}]}')
    assert len(events) == 3
    assert errors == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"events":[{"name":"a"},{"name":"b"},{"name":"c"},{"name":"d"}]}',
            "events: Expected `array` of length <= 3",
        ),
        (b'{"events":[]}', "events: Expected `array` of length >= 1"),
        (b"{}", "events: required field is missing"),
        (b'{"events":5}', "events: Expected `array`, got `int`"),
        (b'{"events":[{"name":"a"}', "Input data was truncated"),
    ],
)
def test_batch_rejected_whole(decoder: EventDecoder, body: bytes, expected: str) -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        decoder.decode_batch(body)
    assert describe_decode_error(info.value) == expected


def test_batch_syntax_error_rejects_all(decoder: EventDecoder) -> None:
    # A syntax error inside one event fails the whole body, because the batch cannot be split.
    with pytest.raises(msgspec.DecodeError):
        decoder.decode_batch(b'{"events":[{"name":"a"},{"name":}]}')


# --- describe_decode_error -----------------------------------------------------


def test_describe_prefix_without_path() -> None:
    error = msgspec.ValidationError("Expected `object`, got `int`")
    assert describe_decode_error(error, "events[0]") == "events[0]: Expected `object`, got `int`"


def test_describe_prefix_with_missing_field() -> None:
    error = msgspec.ValidationError("Object missing required field `name`")
    assert describe_decode_error(error, "events[4]") == "events[4].name: required field is missing"


def test_describe_nested_missing_field() -> None:
    error = msgspec.ValidationError("Object missing required field `x` - at `$.a.b`")
    assert describe_decode_error(error) == "a.b.x: required field is missing"


def test_describe_list_index_path() -> None:
    error = msgspec.ValidationError("Expected `str`, got `int` - at `$.a[2]`")
    assert describe_decode_error(error) == "a[2]: Expected `str`, got `int`"


def test_describe_key_error_with_prefix() -> None:
    error = msgspec.ValidationError("Expected `str` of length >= 1 - at `key` in `$.properties`")
    assert describe_decode_error(error, "events[0]") == (
        "events[0].properties: key expected `str` of length >= 1"
    )


def test_describe_plain_decode_error() -> None:
    error = msgspec.DecodeError("Input data was truncated")
    assert describe_decode_error(error) == "Input data was truncated"


# --- IdGenerator ---------------------------------------------------------------


def decode_crockford(digits: str) -> int:
    value = 0
    for char in digits:
        value = value * 32 + CROCKFORD.index(char)
    return value


def decode_time_prefix(ulid: str) -> int:
    """Milliseconds since the epoch from the first 10 Crockford digits of a ULID."""
    return decode_crockford(ulid[:10])


def test_ulid_format() -> None:
    ulid = IdGenerator().next_ids(1)[0]
    assert len(ulid) == 26
    assert set(ulid) <= set(CROCKFORD)
    # 26 digits carry 130 bits and a ULID has 128, so the first digit is at most 7.
    assert ulid[0] in "01234567"


def test_ulid_count() -> None:
    generator = IdGenerator()
    assert len(generator.next_ids(5)) == 5
    assert generator.next_ids(0) == []


def test_ulids_unique() -> None:
    generator = IdGenerator()
    ids = [ulid for _ in range(1000) for ulid in generator.next_ids(100)]
    assert len(ids) == 100_000
    assert len(set(ids)) == 100_000


def test_ulids_sorted_in_generation_order() -> None:
    generator = IdGenerator()
    ids = [ulid for _ in range(1000) for ulid in generator.next_ids(100)]
    assert ids == sorted(ids)


def test_ulids_of_one_call_are_consecutive() -> None:
    ids = IdGenerator().next_ids(3)
    values = [decode_crockford(ulid) for ulid in ids]
    assert values[1] == values[0] + 1
    assert values[2] == values[0] + 2


def test_ulid_time_prefix_is_now() -> None:
    before = time.time_ns() // 1_000_000
    ulid = IdGenerator().next_ids(1)[0]
    after = time.time_ns() // 1_000_000
    assert before <= decode_time_prefix(ulid) <= after


def test_ulid_time_prefix_follows_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = IdGenerator()
    clock = [1_700_000_000_000 * 1_000_000]
    monkeypatch.setattr("eventrouter.envelope.time.time_ns", lambda: clock[0])
    first = generator.next_ids(1)[0]
    clock[0] += 5_000_000
    second = generator.next_ids(1)[0]
    assert decode_time_prefix(first) == 1_700_000_000_000
    assert decode_time_prefix(second) == 1_700_000_000_005
    assert first < second


def test_ulids_consecutive_across_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    # The random part starts 3 below a carry out of its low 40 bits, so the
    # 2,000 ids cross both the 10-bit and the 40-bit boundaries.
    start = (1 << 40) - 3
    monkeypatch.setattr("eventrouter.envelope.os.urandom", lambda n: (start << 1).to_bytes(n))
    ids = IdGenerator().next_ids(2000)
    values = [decode_crockford(ulid) for ulid in ids]
    assert values[0] & ((1 << 80) - 1) == start
    assert values == list(range(values[0], values[0] + 2000))
    assert all(len(ulid) == 26 for ulid in ids)


# --- checks outside the one-pass decoder ----------------------------------------

CONTROL_NAME = "name: must not contain control characters (U+0000 to U+001F or U+007F)"


@pytest.mark.parametrize("name", [b"a\\n", b"a\\u0000b", b"\\u007f", b"a\\tb"])
def test_name_control_characters_rejected(decoder: EventDecoder, name: bytes) -> None:
    assert decode_error(decoder, b'{"name":"' + name + b'"}') == CONTROL_NAME


def test_batch_control_name_by_index(decoder: EventDecoder) -> None:
    events, errors = decoder.decode_batch(b'{"events":[{"name":"a"},{"name":"b\\n"}]}')
    assert [e.name for e in events] == ["a"]
    assert [e.index for e in errors] == [1]
    assert errors[0].message == f"events[1].{CONTROL_NAME}"


def test_batch_key_lengths_by_index(decoder: EventDecoder) -> None:
    body = (
        b'{"events":[{"name":"a","properties":{"k":"1"}},'
        b'{"name":"b","properties":{"abcde":"1"}},'
        b'{"name":"c","properties":{"":"1"}}]}'
    )
    events, errors = decoder.decode_batch(body)
    assert [e.name for e in events] == ["a"]
    assert [e.index for e in errors] == [1, 2]
    assert errors[0].message == "events[1].properties: key expected `str` of length <= 4"
    assert errors[1].message == "events[2].properties: key expected `str` of length >= 1"


def test_key_valid_once_stays_checked(decoder: EventDecoder) -> None:
    # The checked keys are cached; a later invalid key must still be rejected.
    decoder.decode_one(b'{"name":"a","properties":{"abcd":"1"}}')
    assert decode_error(decoder, b'{"name":"a","properties":{"abcde":"1"}}') == (
        "properties: key expected `str` of length <= 4"
    )


def test_decoded_names_share_one_string(decoder: EventDecoder) -> None:
    first, _ = decoder.decode_batch(b'{"events":[{"name":"level_up"},{"name":"level_up"}]}')
    second = decoder.decode_one(b'{"name":"level_up"}')
    assert first[0].name == "level_up"
    assert first[0].name is first[1].name
    assert second.name is first[0].name


def test_next_id_continues_next_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("eventrouter.envelope.time.time_ns", lambda: 1_700_000_000_000_000_000)
    generator = IdGenerator()
    ids = [generator.next_id(), *generator.next_ids(3), generator.next_id()]
    values = [decode_crockford(ulid) for ulid in ids]
    assert values == list(range(values[0], values[0] + 5))
