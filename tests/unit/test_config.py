"""Unit tests of loading resource files into one router's configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from eventrouter.config import DEFAULT_CONFIG_NAME, RouterConfig, load_config
from eventrouter.errors import ConfigError
from eventrouter.resources import parse_duration

API_VERSION = "eventrouter.io/v1alpha1"


def router_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "EventRouter",
        "metadata": {"name": name},
        "spec": spec,
    }


def sink_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "EventSink",
        "metadata": {"name": name},
        "spec": {"log": {}, **spec},
    }


def route_doc(name: str, router: str, sinks: list[str], **match: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"router": router, "sinks": sinks}
    if match:
        spec["match"] = match
    return {
        "apiVersion": API_VERSION,
        "kind": "EventRoute",
        "metadata": {"name": name},
        "spec": spec,
    }


def write(path: Path, documents: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def load(
    tmp_path: Path, documents: list[dict[str, Any]], router: str | None = None
) -> RouterConfig:
    return load_config([write(tmp_path / "resources.yaml", documents)], router)


def load_error(
    tmp_path: Path, documents: list[dict[str, Any]], router: str | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, documents, router)
    return info.value


TWO_ROUTERS = [
    router_doc("game", queue={"size": 1024}),
    router_doc("analytics"),
    sink_doc("game-log"),
    sink_doc("analytics-log"),
    route_doc("game-all", "game", ["game-log"]),
    route_doc("analytics-purchases", "analytics", ["analytics-log"], names=["purchase_*"]),
    route_doc("analytics-logins", "analytics", ["analytics-log"], names=["login"]),
]


# --- embedded default ----------------------------------------------------------


@pytest.mark.parametrize("paths", [None, []])
def test_default_config(paths: list[str] | None) -> None:
    config = load_config(paths)
    assert config.name == "default"
    assert [r.metadata.name for r in config.routes] == ["all-events"]
    assert config.routes[0].spec.sinks == ["log"]
    assert config.routes[0].spec.match.names == ["*"]
    assert list(config.sinks) == ["log"]
    assert config.sinks["log"].spec.type == "log"
    assert config.sources == (DEFAULT_CONFIG_NAME,)
    assert len(config.digest) == 16


def test_default_config_digest_stable() -> None:
    assert load_config(None).digest == load_config(None).digest


# --- router selection ----------------------------------------------------------


def test_several_routers_need_router_flag(tmp_path: Path) -> None:
    error = load_error(tmp_path, TWO_ROUTERS)
    assert len(error.issues) == 1
    assert error.issues[0].path == "router"
    assert "several EventRouters (game, analytics)" in error.issues[0].message
    assert "--router" in error.issues[0].message


def test_router_not_found(tmp_path: Path) -> None:
    error = load_error(tmp_path, TWO_ROUTERS, router="lobby")
    assert len(error.issues) == 1
    assert error.issues[0].message == (
        "EventRouter 'lobby' not found; the files define: game, analytics"
    )


@pytest.mark.parametrize(
    ("router", "routes", "sinks"),
    [
        ("game", ["game-all"], ["game-log"]),
        ("analytics", ["analytics-purchases", "analytics-logins"], ["analytics-log"]),
    ],
)
def test_router_selected(tmp_path: Path, router: str, routes: list[str], sinks: list[str]) -> None:
    config = load(tmp_path, TWO_ROUTERS, router=router)
    assert config.name == router
    assert [r.metadata.name for r in config.routes] == routes
    assert list(config.sinks) == sinks


def test_selected_router_spec(tmp_path: Path) -> None:
    config = load(tmp_path, TWO_ROUTERS, router="game")
    assert config.router.spec.queue.size == 1024


def test_single_router_needs_no_flag(tmp_path: Path) -> None:
    config = load(tmp_path, [router_doc("game"), sink_doc("s"), route_doc("r", "game", ["s"])])
    assert config.name == "game"


def test_no_router_document_uses_default(tmp_path: Path) -> None:
    config = load(tmp_path, [sink_doc("s"), route_doc("r", "default", ["s"])])
    assert config.name == "default"
    assert [r.metadata.name for r in config.routes] == ["r"]


def test_router_flag_without_router_document(tmp_path: Path) -> None:
    config = load(tmp_path, [sink_doc("s"), route_doc("r", "lobby", ["s"])], router="lobby")
    assert config.name == "lobby"
    assert [r.metadata.name for r in config.routes] == ["r"]


def test_routes_of_other_routers_excluded(tmp_path: Path) -> None:
    documents = [
        router_doc("game"),
        sink_doc("common"),
        sink_doc("other-only"),
        route_doc("mine", "game", ["common"]),
        route_doc("theirs", "lobby", ["common", "other-only"]),
    ]
    config = load(tmp_path, documents)
    assert [r.metadata.name for r in config.routes] == ["mine"]
    assert list(config.sinks) == ["common"]


def test_routes_keep_file_order(tmp_path: Path) -> None:
    documents = [sink_doc("s")] + [route_doc(f"r{i}", "default", ["s"]) for i in (3, 1, 2)]
    config = load(tmp_path, documents)
    assert [r.metadata.name for r in config.routes] == ["r3", "r1", "r2"]


def test_other_router_dangling_sink_reported(tmp_path: Path) -> None:
    documents = [router_doc("game"), sink_doc("s"), route_doc("theirs", "lobby", ["missing"])]
    error = load_error(tmp_path, documents)
    assert [issue.path for issue in error.issues] == ["spec.sinks[0]"]
    assert "sink 'missing' not found" in error.issues[0].message


# --- dead-letter sinks ---------------------------------------------------------


def test_dead_letter_targets_transitive(tmp_path: Path) -> None:
    documents = [
        sink_doc("primary", deadLetterSink="retry-queue"),
        sink_doc("retry-queue", deadLetterSink="last-resort"),
        sink_doc("last-resort"),
        sink_doc("unused", deadLetterSink="unused-dlq"),
        sink_doc("unused-dlq"),
        route_doc("r", "default", ["primary"]),
    ]
    config = load(tmp_path, documents)
    assert sorted(config.sinks) == ["last-resort", "primary", "retry-queue"]


def test_dead_letter_shared_by_routes(tmp_path: Path) -> None:
    documents = [
        sink_doc("a", deadLetterSink="dlq"),
        sink_doc("b", deadLetterSink="dlq"),
        sink_doc("dlq"),
        route_doc("ra", "default", ["a"]),
        route_doc("rb", "default", ["b"]),
    ]
    config = load(tmp_path, documents)
    assert sorted(config.sinks) == ["a", "b", "dlq"]


def test_dead_letter_target_also_routed(tmp_path: Path) -> None:
    documents = [
        sink_doc("a", deadLetterSink="b"),
        sink_doc("b"),
        route_doc("r", "default", ["a", "b"]),
    ]
    config = load(tmp_path, documents)
    assert sorted(config.sinks) == ["a", "b"]


def test_dead_letter_missing_reported(tmp_path: Path) -> None:
    documents = [sink_doc("a", deadLetterSink="nowhere"), route_doc("r", "default", ["a"])]
    error = load_error(tmp_path, documents)
    assert [issue.path for issue in error.issues] == ["spec.deadLetterSink"]
    assert "dead-letter sink 'nowhere' not found" in error.issues[0].message


def test_dead_letter_self_reported(tmp_path: Path) -> None:
    documents = [sink_doc("a", deadLetterSink="a"), route_doc("r", "default", ["a"])]
    error = load_error(tmp_path, documents)
    assert [issue.message for issue in error.issues] == [
        "a sink cannot be its own dead-letter sink"
    ]


def test_dead_letter_cycle_reported(tmp_path: Path) -> None:
    documents = [
        sink_doc("a", deadLetterSink="b"),
        sink_doc("b", deadLetterSink="a"),
        route_doc("r", "default", ["a"]),
    ]
    error = load_error(tmp_path, documents)
    assert error.issues
    assert all("form a cycle" in issue.message for issue in error.issues)


# --- digest --------------------------------------------------------------------


BASE = [
    router_doc("game"),
    sink_doc("s", timeout="5s"),
    route_doc("r", "game", ["s"], names=["purchase_*"]),
]


def test_digest_stable(tmp_path: Path) -> None:
    first = load(tmp_path, BASE).digest
    second = load(tmp_path, BASE).digest
    assert first == second
    assert len(first) == 16


def test_digest_ignores_file_layout(tmp_path: Path) -> None:
    # The same resources with other formatting and in two files.
    single_file = load(tmp_path, BASE).digest
    folder = tmp_path / "split"
    folder.mkdir()
    write(folder / "a.yaml", BASE[:1])
    (folder / "b.yaml").write_text(yaml.safe_dump_all(BASE[1:], default_flow_style=True))
    assert load_config([folder]).digest == single_file


def test_digest_same_for_equal_durations(tmp_path: Path) -> None:
    # "5s" and 5 parse to the same number of seconds.
    changed = [BASE[0], sink_doc("s", timeout=5), BASE[2]]
    assert load(tmp_path, changed).digest == load(tmp_path, BASE).digest


@pytest.mark.parametrize(
    "changed",
    [
        [router_doc("game", queue={"size": 1024}), BASE[1], BASE[2]],
        [BASE[0], sink_doc("s", timeout="6s"), BASE[2]],
        [BASE[0], BASE[1], route_doc("r", "game", ["s"], names=["purchase_done"])],
        [BASE[0], BASE[1], route_doc("r", "game", ["s"], names=["purchase_*"], external=False)],
        [*BASE, route_doc("r2", "game", ["s"])],
    ],
    ids=["router-queue", "sink-timeout", "route-names", "route-external", "extra-route"],
)
def test_digest_changes(tmp_path: Path, changed: list[dict[str, Any]]) -> None:
    assert load(tmp_path, changed).digest != load(tmp_path, BASE).digest


def test_digest_ignores_unused_sink(tmp_path: Path) -> None:
    assert load(tmp_path, [*BASE, sink_doc("unused")]).digest == load(tmp_path, BASE).digest


# --- durations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0", 0.0),
        ("2", 2.0),
        (" 5s ", 5.0),
        ("10 ms", 0.01),
        (2, 2.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1s", "invalid duration '-1s'"),
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        ("5x", "invalid duration '5x'"),
        ("5 seconds", "invalid duration '5 seconds'"),
        ("", "invalid duration ''"),
        ("ms", "invalid duration 'ms'"),
        ("1.2.3s", "invalid duration '1.2.3s'"),
        (None, "invalid duration None"),
        (True, "got a boolean"),
    ],
)
def test_parse_duration_rejected(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


@pytest.mark.parametrize(
    ("timeout", "seconds"), [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), (2, 2.0)]
)
def test_duration_in_resource(tmp_path: Path, timeout: Any, seconds: float) -> None:
    config = load(tmp_path, [sink_doc("s", timeout=timeout), route_doc("r", "default", ["s"])])
    assert config.sinks["s"].spec.timeout == pytest.approx(seconds)


def test_negative_duration_in_resource(tmp_path: Path) -> None:
    documents = [sink_doc("s", timeout="-1s"), route_doc("r", "default", ["s"])]
    error = load_error(tmp_path, documents)
    assert [issue.path for issue in error.issues] == ["spec.timeout"]
    assert "invalid duration '-1s'" in error.issues[0].message
