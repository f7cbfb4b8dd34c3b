"""Unit tests of route matching: names, globs, `external` and property conditions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from eventrouter.envelope import Envelope
from eventrouter.resources import EventRoute
from eventrouter.routing import RouteTable

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_event(
    name: str, properties: dict[str, str] | None = None, *, external: bool = True
) -> Envelope:
    return Envelope(
        id="01HXAMPLE0000000000000000",
        name=name,
        properties=properties or {},
        timestamp=NOW,
        received_at=NOW,
        external=external,
        router="test",
    )


def make_route(name: str, sinks: list[str], **match: Any) -> EventRoute:
    spec: dict[str, Any] = {"router": "test", "sinks": sinks}
    if match:
        spec["match"] = match
    return EventRoute.model_validate(
        {
            "apiVersion": "eventrouter.io/v1alpha1",
            "kind": "EventRoute",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def matches(event: Envelope, **match: Any) -> bool:
    """Return whether a table with one route of this match block takes the event."""
    routes, _ = RouteTable([make_route("r", ["s"], **match)]).targets(event)
    return routes == ["r"]


@pytest.mark.parametrize(
    ("names", "event_name", "expected"),
    [
        (["purchase"], "purchase", True),
        (["purchase"], "purchase_done", False),
        (["purchase"], "Purchase", False),
        (["login", "purchase"], "login", True),
        (["purchase_*"], "purchase_done", True),
        (["purchase_*"], "purchase_", True),
        (["purchase_*"], "purchase", False),
        (["purchase_*"], "x_purchase_done", False),
        (["level_?"], "level_1", True),
        (["level_?"], "level_10", False),
        (["level_?"], "level_", False),
        (["[ab]*"], "alpha", True),
        (["[ab]*"], "beta", True),
        (["[ab]*"], "gamma", False),
        (["*"], "anything", True),
        (["*"], "x", True),
        (["login", "purchase_*"], "purchase_done", True),
        (["login", "purchase_*"], "logout", False),
        (["*", "login"], "logout", True),
    ],
)
def test_name_match(names: list[str], event_name: str, expected: bool) -> None:
    assert matches(make_event(event_name), names=names) is expected


def test_names_default_to_catch_all() -> None:
    assert matches(make_event("whatever")) is True


def test_glob_is_anchored_at_end() -> None:
    # fnmatch patterns must match the whole name, not a prefix of it.
    assert matches(make_event("level_12"), names=["level_?"]) is False


@pytest.mark.parametrize(
    ("external", "event_external", "expected"),
    [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (None, True, True),
        (None, False, True),
    ],
)
def test_external_match(external: bool | None, event_external: bool, expected: bool) -> None:
    match: dict[str, Any] = {"names": ["*"]}
    if external is not None:
        match["external"] = external
    event = make_event("e", external=event_external)
    assert matches(event, **match) is expected


@pytest.mark.parametrize(
    ("condition", "properties", "expected"),
    [
        ({"key": "k", "equals": "v"}, {"k": "v"}, True),
        ({"key": "k", "equals": "v"}, {"k": "w"}, False),
        ({"key": "k", "equals": "v"}, {"k": "V"}, False),
        ({"key": "k", "equals": "v"}, {}, False),
        ({"key": "k", "equals": ""}, {"k": ""}, True),
        ({"key": "k", "equals": ""}, {}, False),
        ({"key": "k", "in": ["a", "b"]}, {"k": "a"}, True),
        ({"key": "k", "in": ["a", "b"]}, {"k": "b"}, True),
        ({"key": "k", "in": ["a", "b"]}, {"k": "c"}, False),
        ({"key": "k", "in": ["a", "b"]}, {}, False),
        ({"key": "k", "in": []}, {"k": "a"}, False),
        ({"key": "k", "exists": True}, {"k": ""}, True),
        ({"key": "k", "exists": True}, {"other": "x"}, False),
        ({"key": "k", "exists": False}, {"other": "x"}, True),
        ({"key": "k", "exists": False}, {"k": "x"}, False),
        ({"key": "k", "prefix": "eu-"}, {"k": "eu-west"}, True),
        ({"key": "k", "prefix": "eu-"}, {"k": "eu-"}, True),
        ({"key": "k", "prefix": "eu-"}, {"k": "us-east"}, False),
        ({"key": "k", "prefix": "eu-"}, {"k": "xeu-west"}, False),
        ({"key": "k", "prefix": "eu-"}, {}, False),
        ({"key": "k", "prefix": ""}, {"k": "any"}, True),
        ({"key": "k", "prefix": ""}, {}, False),
        ({"key": "k", "atLeast": 10}, {"k": "10"}, True),
        ({"key": "k", "atLeast": 10}, {"k": "10.5"}, True),
        ({"key": "k", "atLeast": 10}, {"k": "9.99"}, False),
        ({"key": "k", "atLeast": 10}, {"k": "1e3"}, True),
        ({"key": "k", "atLeast": 10}, {"k": " 11 "}, True),
        ({"key": "k", "atLeast": -5}, {"k": "-4"}, True),
        ({"key": "k", "atLeast": -5}, {"k": "-6"}, False),
        ({"key": "k", "atLeast": 0.5}, {"k": "0.5"}, True),
        ({"key": "k", "atLeast": 10}, {"k": "ten"}, False),
        ({"key": "k", "atLeast": 10}, {"k": ""}, False),
        ({"key": "k", "atLeast": 10}, {"k": "nan"}, False),
        ({"key": "k", "atLeast": 10}, {}, False),
    ],
)
def test_property_condition(
    condition: dict[str, Any], properties: dict[str, str], expected: bool
) -> None:
    event = make_event("e", properties)
    assert matches(event, names=["*"], properties=[condition]) is expected


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"store": "apple", "amount": "5", "region": "eu-west"}, True),
        ({"store": "google", "amount": "5", "region": "eu-west"}, False),
        ({"store": "apple", "amount": "0.5", "region": "eu-west"}, False),
        ({"store": "apple", "amount": "5", "region": "us-east"}, False),
        ({"store": "apple", "amount": "5"}, False),
        ({}, False),
    ],
)
def test_all_conditions_must_hold(properties: dict[str, str], expected: bool) -> None:
    conditions = [
        {"key": "store", "equals": "apple"},
        {"key": "amount", "atLeast": 1},
        {"key": "region", "prefix": "eu-"},
    ]
    event = make_event("purchase", properties)
    assert matches(event, names=["purchase"], properties=conditions) is expected


def test_match_fields_combine() -> None:
    match = {"names": ["purchase"], "external": False, "properties": [{"key": "k", "exists": True}]}
    assert matches(make_event("purchase", {"k": "1"}, external=False), **match) is True
    assert matches(make_event("purchase", {"k": "1"}, external=True), **match) is False
    assert matches(make_event("login", {"k": "1"}, external=False), **match) is False
    assert matches(make_event("purchase", {}, external=False), **match) is False


def test_several_routes_list_each_sink_once() -> None:
    table = RouteTable(
        [
            make_route("purchases", ["analytics", "billing"], names=["purchase_*"]),
            make_route("everything", ["archive", "analytics"]),
            make_route("logins", ["security"], names=["login"]),
            make_route("billing-again", ["billing", "audit"], names=["purchase_done"]),
        ]
    )
    routes, sinks = table.targets(make_event("purchase_done"))
    assert routes == ["purchases", "everything", "billing-again"]
    assert sinks == ["analytics", "billing", "archive", "audit"]


def test_route_order_decides_sink_order() -> None:
    table = RouteTable(
        [
            make_route("second", ["b", "a"]),
            make_route("first", ["a", "c"]),
        ]
    )
    routes, sinks = table.targets(make_event("e"))
    assert routes == ["second", "first"]
    assert sinks == ["b", "a", "c"]


def test_route_lists_repeated_sink_once() -> None:
    table = RouteTable([make_route("r", ["a", "b", "a"])])
    _, sinks = table.targets(make_event("e"))
    assert sinks == ["a", "b"]


def test_unmatched_event_has_no_targets() -> None:
    table = RouteTable(
        [
            make_route("purchases", ["billing"], names=["purchase_*"]),
            make_route("server-only", ["audit"], external=False),
        ]
    )
    routes, sinks = table.targets(make_event("login", external=True))
    assert routes == []
    assert sinks == []


def test_empty_table_matches_nothing() -> None:
    routes, sinks = RouteTable([]).targets(make_event("e"))
    assert routes == []
    assert sinks == []


# --- targets shared by every event -----------------------------------------------


def test_constant_targets_catch_all() -> None:
    table = RouteTable([make_route("all", ["a", "b"]), make_route("copy", ["b", "c"], names=["*"])])
    assert table.constant == (["all", "copy"], ["a", "b", "c"])
    assert table.targets(make_event("anything")) == table.constant


def test_constant_targets_no_routes() -> None:
    assert RouteTable([]).constant == ([], [])


@pytest.mark.parametrize(
    "match",
    [
        {"names": ["purchase"]},
        {"names": ["purchase_*"]},
        {"external": True},
        {"properties": [{"key": "platform", "exists": True}]},
    ],
)
def test_constant_targets_unset_when_routes_filter(match: dict[str, Any]) -> None:
    table = RouteTable([make_route("all", ["a"]), make_route("some", ["b"], **match)])
    assert table.constant is None
