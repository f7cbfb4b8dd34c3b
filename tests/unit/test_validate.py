"""`eventrouter validate`: the example folders pass, and broken documents are located.

Every error line has the form `error: FILE: document INDEX (NAME): FIELD PATH:
MESSAGE`, where INDEX counts the YAML documents of the file from 0 and NAME is
there when the document has one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, route_doc, router_doc, sink_doc, write_documents

EXAMPLE_FOLDERS = ["kubernetes", "quickstart"]

# Every broken case adds to or changes this valid router, sink and route, so
# an error also has to name the right document among valid ones.
VALID = [router_doc(), sink_doc("console", log={}), route_doc("all-events", ["console"])]


def validate(*paths: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "eventrouter", "validate"]
    for path in paths:
        command += ["-f", str(path)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTROUTER_")}
    return subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=60, check=False
    )


def assert_error_line(
    stderr: str, file: Path, document: int, path: str | None, fragment: str
) -> None:
    """Assert that one error line names the file, document index, field path and message."""
    field = f"{re.escape(path)}: " if path else ""
    pattern = (
        rf"(?m)^error: {re.escape(str(file))}: document {document}( \([^)]*\))?: "
        rf"{field}.*{re.escape(fragment)}"
    )
    assert re.search(pattern, stderr), f"no line matches {pattern!r} in:\n{stderr}"


# --- examples ---------------------------------------------------------------------


def test_example_folders_listed() -> None:
    found = sorted(p.name for p in (REPO / "examples").iterdir() if p.is_dir())
    assert found == EXAMPLE_FOLDERS


@pytest.mark.parametrize("folder", EXAMPLE_FOLDERS)
def test_example_folder_valid(folder: str) -> None:
    result = validate(f"examples/{folder}/")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("ok: "), lines[0]
    assert "router game-events has" in lines[0]


# --- broken documents ---------------------------------------------------------------


@dataclass(frozen=True)
class BrokenCase:
    """A file that must fail validation, and where the error must point."""

    id: str
    documents: list[dict[str, Any]] | str
    """Documents to write as YAML, or the raw text of the file."""
    document: int
    path: str | None
    """Field path in the error line, or None for an error without one (invalid YAML)."""
    fragment: str
    """Text that the error message must contain."""


def with_field(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a deep copy of `document` with the dotted `path` set to `value`."""
    copy: dict[str, Any] = yaml.safe_load(yaml.safe_dump(document))
    *parents, last = path.split(".")
    target = copy
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value
    return copy


BROKEN_YAML_DOCUMENT = """\
---
apiVersion: eventrouter.io/v1alpha1
kind: EventSink
metadata:
  name: purchases
spec:
  file: {path: [purchases.jsonl}
"""
BROKEN_YAML_PREFIX = yaml.safe_dump_all(VALID, sort_keys=False)
# The flow sequence that is never closed is on the last line of the document.
BROKEN_YAML_LINE = BROKEN_YAML_PREFIX.count("\n") + BROKEN_YAML_DOCUMENT.count("\n")

BROKEN_CASES = [
    BrokenCase(
        "bad-api-version",
        [*VALID, with_field(sink_doc("archive", log={}), "apiVersion", "eventrouter.io/v1")],
        3,
        "apiVersion",
        "unsupported apiVersion 'eventrouter.io/v1'; use eventrouter.io/v1alpha1",
    ),
    BrokenCase(
        "unknown-kind",
        [*VALID, with_field(sink_doc("archive", log={}), "kind", "EventRoutes")],
        3,
        "kind",
        "unknown kind 'EventRoutes'; use one of EventRouter, EventRoute, EventSink",
    ),
    BrokenCase(
        "missing-name",
        [*VALID, with_field(sink_doc("archive", log={}), "metadata", {"labels": {"team": "data"}})],
        3,
        "metadata.name",
        "required field is missing",
    ),
    BrokenCase(
        "invalid-name",
        [*VALID, sink_doc("Purchases_Archive", log={})],
        3,
        "metadata.name",
        "invalid name 'Purchases_Archive'",
    ),
    BrokenCase(
        "unknown-field",
        [*VALID, {**route_doc("purchases", []), "spec": {"router": "test", "sinkz": ["console"]}}],
        3,
        "spec.sinkz",
        "unknown field; check its spelling",
    ),
    BrokenCase(
        "two-sink-types",
        [*VALID, sink_doc("archive", log={}, file={"path": "archive.jsonl"})],
        3,
        "spec",
        "set exactly one sink type of log, file, blackhole, http, kafka (got log, file)",
    ),
    BrokenCase(
        "no-sink-type",
        [*VALID, sink_doc("archive", retry={"maxAttempts": 3})],
        3,
        "spec",
        "set exactly one sink type of log, file, blackhole, http, kafka (got none)",
    ),
    BrokenCase(
        "bad-overflow",
        [router_doc(queue={"overflow": "dropAll"}), *VALID[1:]],
        0,
        "spec.queue.overflow",
        "'dropNewest', 'dropOldest', 'reject' or 'block' (got 'dropAll')",
    ),
    BrokenCase(
        "zero-queue-size",
        [router_doc(queue={"size": 0}), *VALID[1:]],
        0,
        "spec.queue.size",
        "greater than or equal to 1 (got 0)",
    ),
    BrokenCase(
        "negative-sink-queue-size",
        [*VALID, sink_doc("archive", log={}, queueSize=-5)],
        3,
        "spec.queueSize",
        "greater than or equal to 1 (got -5)",
    ),
    BrokenCase(
        "bad-duration",
        [*VALID, sink_doc("archive", log={}, timeout="5 parsecs")],
        3,
        "spec.timeout",
        "invalid duration '5 parsecs': use a number with ms, s, m or h",
    ),
    BrokenCase(
        "two-operators",
        [
            *VALID,
            route_doc(
                "purchases",
                ["console"],
                properties=[{"key": "price", "prefix": "1", "atLeast": 1}],
            ),
        ],
        3,
        "spec.match.properties[0]",
        "set exactly one of equals, in, exists, prefix or atLeast (got prefix, atLeast)",
    ),
    BrokenCase(
        "missing-sink",
        [*VALID, route_doc("billing", ["billing-webhook"], names=["purchase"])],
        3,
        "spec.sinks[0]",
        "sink 'billing-webhook' not found; define an EventSink named 'billing-webhook'",
    ),
    BrokenCase(
        "missing-dead-letter-sink",
        [*VALID, sink_doc("archive", log={}, deadLetterSink="archive-dead-letter")],
        3,
        "spec.deadLetterSink",
        "dead-letter sink 'archive-dead-letter' not found",
    ),
    BrokenCase(
        "dead-letter-cycle",
        [
            *VALID,
            sink_doc("primary", log={}, deadLetterSink="fallback"),
            sink_doc("fallback", log={}, deadLetterSink="primary"),
        ],
        3,
        "spec.deadLetterSink",
        "dead-letter sinks form a cycle (primary -> fallback -> primary)",
    ),
    BrokenCase(
        "dead-letter-self",
        [*VALID, sink_doc("archive", log={}, deadLetterSink="archive")],
        3,
        "spec.deadLetterSink",
        "a sink cannot be its own dead-letter sink",
    ),
    BrokenCase(
        "invalid-yaml",
        BROKEN_YAML_PREFIX + BROKEN_YAML_DOCUMENT,
        3,
        None,
        f"invalid YAML at line {BROKEN_YAML_LINE}, column",
    ),
    BrokenCase(
        "duplicate-name",
        [*VALID, sink_doc("console", blackhole={})],
        3,
        "metadata.name",
        "duplicate EventSink 'console', first defined in",
    ),
]


@pytest.mark.parametrize("case", BROKEN_CASES, ids=[case.id for case in BROKEN_CASES])
def test_broken_document_rejected(case: BrokenCase, tmp_path: Path) -> None:
    file = tmp_path / f"{case.id}.yaml"
    if isinstance(case.documents, str):
        file.write_text(case.documents)
    else:
        write_documents(file, case.documents)

    result = validate(file)

    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    assert f"error: {file}: " in result.stderr
    assert f"error: {file}: document {case.document}" in result.stderr
    assert_error_line(result.stderr, file, case.document, case.path, case.fragment)


def test_duplicate_name_points_to_first(tmp_path: Path) -> None:
    file = write_documents(tmp_path / "sinks.yaml", [*VALID, sink_doc("console", blackhole={})])
    result = validate(file)
    assert result.returncode == 1
    assert f"first defined in {file} document 1; rename one of them" in result.stderr


# --- several errors -----------------------------------------------------------------


def test_multi_error_file_reports_all(tmp_path: Path) -> None:
    file = write_documents(
        tmp_path / "game-events.yaml",
        [
            router_doc(queue={"size": 0, "overflow": "dropAll"}),
            sink_doc("console", log={}),
            sink_doc("purchases", file={"path": "purchases.jsonl"}, timeout="5 parsecs"),
            route_doc("all-events", ["console"]),
            {**route_doc("sessions", []), "spec": {"router": "test", "sinkz": ["console"]}},
            route_doc("billing", ["billing-webhook"]),
            sink_doc("console", blackhole={}),
        ],
    )
    expected = [
        (0, "spec.queue.size", "greater than or equal to 1 (got 0)"),
        (0, "spec.queue.overflow", "(got 'dropAll')"),
        (2, "spec.timeout", "invalid duration '5 parsecs'"),
        (4, "spec.sinkz", "unknown field"),
        (4, "spec.sinks", "required field is missing"),
        (5, "spec.sinks[0]", "sink 'billing-webhook' not found"),
        (6, "metadata.name", "duplicate EventSink 'console'"),
    ]

    result = validate(file)

    assert result.returncode == 1
    for document, path, fragment in expected:
        assert_error_line(result.stderr, file, document, path, fragment)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(expected), result.stderr
    assert result.stderr.splitlines()[-1] == f"{len(expected)} error(s) in 1 path(s)"


def test_errors_across_files_reported(tmp_path: Path) -> None:
    routes = write_documents(
        tmp_path / "routes.yaml",
        [
            router_doc(),
            route_doc("all-events", ["console"]),
            route_doc("billing", ["billing-webhook"]),
        ],
    )
    sinks = write_documents(
        tmp_path / "sinks.yaml", [sink_doc("console", log={}, batchWait="soon")]
    )

    result = validate(routes, sinks)

    assert result.returncode == 1
    assert_error_line(result.stderr, routes, 2, "spec.sinks[0]", "'billing-webhook' not found")
    assert_error_line(result.stderr, sinks, 0, "spec.batchWait", "invalid duration 'soon'")
    # The console sink failed validation, so the route that names it gets no
    # second error saying that it is not found.
    assert "sink 'console' not found" not in result.stderr
    assert result.stderr.splitlines()[-1] == "2 error(s) in 2 path(s)"


def test_yaml_error_keeps_earlier_documents(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    write_documents(folder / "routes.yaml", [router_doc(), route_doc("all-events", ["console"])])
    sinks = folder / "sinks.yaml"
    console = yaml.safe_dump(sink_doc("console", log={}), sort_keys=False)
    sinks.write_text(console + BROKEN_YAML_DOCUMENT)

    result = validate(folder)

    assert result.returncode == 1
    assert_error_line(result.stderr, sinks, 1, None, "invalid YAML at line")
    # The console sink comes before the syntax error, so the route still finds it.
    assert "sink 'console' not found" not in result.stderr
    assert result.stderr.splitlines()[-1] == "1 error(s) in 1 path(s)"
