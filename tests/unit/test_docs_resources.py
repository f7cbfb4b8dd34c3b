"""docs/resources.md documents every field of the resource models, so the two cannot drift.

The models are walked from EventRouter, EventRoute and EventSink through every
nested model. Each field has a YAML path such as `spec.queue.size`, with `[]`
for list items (`spec.match.properties[].key`). A model that appears at several
paths, such as a secret source, is documented once, at any of them. The only
field without a row is the top-level `spec`.

The reference tables of the page have the header `| Field | Type | Default |`.
Each row's first cell is a field path in backticks and its default is a YAML
value in backticks, "required", "unset", or a dash for an object whose fields
have their own defaults.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from eventrouter.resources import EventRoute, EventRouter, EventSink, parse_duration
from tests.conftest import REPO

DOC_PATH = REPO / "docs" / "resources.md"
TABLE_HEADER = re.compile(r"^\|\s*Field\s*\|\s*Type\s*\|\s*Default\s*\|")
ROW = re.compile(r"^\|\s*`(?P<path>[^`]+)`\s*\|(?P<type>[^|]*)\|(?P<default>[^|]*)\|")


@dataclass(frozen=True)
class ModelField:
    """One field of one model, with every YAML path at which it occurs."""

    model: type[BaseModel]
    name: str
    info: FieldInfo
    paths: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.model.__name__}.{self.name} ({' or '.join(self.paths)})"


def _alias(name: str, info: FieldInfo) -> str:
    alias = info.serialization_alias or info.alias or name
    assert isinstance(alias, str)
    return alias


def _nested_models(annotation: Any, in_list: bool = False) -> list[tuple[type[BaseModel], bool]]:
    """Models inside a field's type, each with whether it is a list item."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, in_list)]
    origin = typing.get_origin(annotation)
    found = []
    for argument in typing.get_args(annotation):
        found += _nested_models(argument, in_list or origin is list)
    return found


def collect_fields() -> list[ModelField]:
    paths: dict[tuple[type[BaseModel], str], list[str]] = {}
    infos: dict[tuple[type[BaseModel], str], FieldInfo] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            path = prefix + _alias(name, info)
            # `spec` is required in two kinds and optional in the third, so the
            # page describes it in prose; its fields have rows.
            if path != "spec":
                key = (model, name)
                infos[key] = info
                if path not in paths.setdefault(key, []):
                    paths[key].append(path)
            for nested, in_list in _nested_models(info.annotation):
                walk(nested, path + ("[]." if in_list else "."))

    for kind in (EventRouter, EventRoute, EventSink):
        walk(kind, "")
    return [
        ModelField(model, name, infos[(model, name)], tuple(found))
        for (model, name), found in paths.items()
    ]


def documented_rows() -> dict[str, tuple[str, str, str]]:
    """Rows of the field tables: path -> (type cell, default cell, whole line)."""
    rows: dict[str, tuple[str, str, str]] = {}
    in_table = False
    for line in DOC_PATH.read_text().splitlines():
        if TABLE_HEADER.match(line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        match = ROW.match(line)
        if in_table and match:
            path = match["path"]
            assert path not in rows, f"{path} has two rows in {DOC_PATH.name}"
            rows[path] = (match["type"].strip(), match["default"].strip(), line)
    return rows


FIELDS = collect_fields()
ROWS = documented_rows()


def _row_of(field: ModelField) -> tuple[str, str, str] | None:
    for path in field.paths:
        if path in ROWS:
            return ROWS[path]
    return None


def _is_duration(info: FieldInfo) -> bool:
    return any(getattr(m, "func", None) is parse_duration for m in info.metadata)


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    values = []
    for argument in typing.get_args(annotation):
        values += _literal_values(argument)
    return values


def _bounds(info: FieldInfo) -> list[str]:
    """Numeric bounds of a field (ge, le, min_length, ...), written as in the page."""
    bounds = []
    for item in info.metadata:
        for attribute in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(item, attribute, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                bounds.append(str(int(value)) if float(value).is_integer() else str(value))
    return bounds


def test_every_field_has_row() -> None:
    missing = [f.label for f in FIELDS if _row_of(f) is None]
    assert missing == [], f"fields without a row in {DOC_PATH.name}"


def test_every_row_is_field() -> None:
    known = {path for f in FIELDS for path in f.paths}
    unknown = sorted(set(ROWS) - known)
    assert unknown == [], f"rows in {DOC_PATH.name} for fields the models do not have"


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.paths[0])
def test_row_default_matches_model(field: ModelField) -> None:
    row = _row_of(field)
    if row is None:
        pytest.skip("no row; test_every_field_has_row reports it")
    _, default_cell, line = row
    if field.info.is_required():
        assert default_cell == "required", line
        return
    default = field.info.get_default(call_default_factory=True)
    if default is None:
        assert default_cell == "unset", line
        return
    if isinstance(default, BaseModel):
        assert default_cell in ("—", "-"), line
        return
    match = re.fullmatch(r"`(.*)`", default_cell)
    assert match is not None, f"default {default!r} is not in backticks: {line}"
    documented = yaml.safe_load(match[1])
    if _is_duration(field.info):
        documented = parse_duration(documented)
    assert documented == default, line


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.paths[0])
def test_row_lists_options_and_bounds(field: ModelField) -> None:
    row = _row_of(field)
    if row is None:
        pytest.skip("no row; test_every_field_has_row reports it")
    type_cell, _, line = row
    for value in _literal_values(field.info.annotation):
        assert f"`{value}`" in type_cell, f"option {value!r} is missing: {line}"
    for bound in _bounds(field.info):
        assert re.search(rf"\b{re.escape(bound)}\b", type_cell), f"bound {bound} is missing: {line}"
