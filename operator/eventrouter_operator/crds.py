"""Generate the CustomResourceDefinitions from the pydantic resource models.

The models in `eventrouter.resources` are the one source of truth: this module
turns their JSON schemas into structural OpenAPI v3 schemas (no `$ref`, a type on
every node, bounds on every string, list and map), adds the CEL rules that the
models declare, printer columns, short names and the `eventrouting` category.

    python -m eventrouter_operator.crds --write crds/

writes one file per kind; `--check` exits 1 when the files differ from the
models, so a test keeps them in step.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from eventrouter.resources import EventRoute, EventRouter, EventSink

__all__ = ["GROUP", "VERSION", "crd_documents", "main", "structural_schema"]

GROUP = "eventrouter.io"
VERSION = "v1alpha1"
CATEGORY = "eventrouting"

# Bounds for strings, lists and maps that the models leave open. The API server
# needs them to bound the cost of CEL rules, and they keep objects small.
_MAX_STRING = 4096
_MAX_ITEMS = 256
_MAX_PROPERTIES = 256

_KEPT_KEYWORDS = (
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "x-kubernetes-validations",
)


def _first_paragraph(text: str) -> str:
    return text.strip().split("\n\n")[0].replace("\n", " ")


def _resolve(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        merged = dict(defs[name])
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        return merged
    return dict(schema)


def _int_or_string(schema: Mapping[str, Any]) -> dict[str, Any]:
    # A structural schema may not give types inside anyOf, so an integer or a
    # string is x-kubernetes-int-or-string, with the checks of both at the top.
    # The API server applies pattern and maxLength to string values only, and
    # minimum and maximum to integer values only.
    node: dict[str, Any] = {"x-kubernetes-int-or-string": True}
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "string":
            node.update({k: v for k, v in branch.items() if k in ("pattern", "maxLength")})
            node.setdefault("maxLength", _MAX_STRING)
        elif branch.get("type") == "integer":
            node.update({k: v for k, v in branch.items() if k in ("minimum", "maximum")})
    if "enum" in schema:
        node["enum"] = schema["enum"]
    if "description" in schema:
        node["description"] = _first_paragraph(schema["description"])
    return node


def structural_schema(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON schema node into a structural CRD schema node."""
    schema = _resolve(schema, defs)
    if schema.get("x-duration"):
        return _int_or_string(schema)

    if "anyOf" in schema:
        options = [_resolve(o, defs) for o in schema["anyOf"]]
        real = [o for o in options if o.get("type") != "null"]
        nullable = len(real) < len(options)
        if len(real) == 1:
            inner = dict(real[0])
            for key in ("description", "x-kubernetes-validations"):
                if key in schema and key not in inner:
                    inner[key] = schema[key]
            node = structural_schema(inner, defs)
        elif {o.get("type") for o in real} <= {"integer", "string"}:
            node = _int_or_string(schema)
        else:
            raise ValueError(f"cannot express {schema!r} as a structural schema")
        if nullable:
            node["nullable"] = True
        return node

    if "enum" in schema and "type" not in schema:
        # A Literal of numbers and strings, such as acks: 0, 1 or all.
        return _int_or_string(schema)

    kind = schema.get("type")
    node = {"type": kind} if kind else {}
    for key in _KEPT_KEYWORDS:
        if key in schema:
            node[key] = schema[key]
    if "exclusiveMinimum" in schema:
        node["minimum"] = schema["exclusiveMinimum"]
        node["exclusiveMinimum"] = True
    if "description" in node:
        node["description"] = _first_paragraph(node["description"])

    if kind == "object":
        properties = schema.get("properties", {})
        if properties:
            node["properties"] = {
                name: structural_schema(sub, defs) for name, sub in properties.items()
            }
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            node["additionalProperties"] = structural_schema(extra, defs)
            node.setdefault("maxProperties", _MAX_PROPERTIES)
        if schema.get("required"):
            node["required"] = list(schema["required"])
    elif kind == "array":
        node["items"] = structural_schema(schema.get("items", {}), defs)
        node.setdefault("maxItems", _MAX_ITEMS)
    elif kind == "string":
        node.setdefault("maxLength", _MAX_STRING)
    return node


_CONDITION = '.status.conditions[?(@.type=="{}")].status'

_KINDS: dict[str, dict[str, Any]] = {
    "EventRouter": {
        "model": EventRouter,
        "plural": "eventrouters",
        "short": ["erouter"],
        "columns": [
            {"name": "Ready", "type": "string", "jsonPath": _CONDITION.format("Ready")},
            {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Available", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Routes", "type": "integer", "jsonPath": ".status.routeCount"},
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                "priority": 1,
            },
        ],
    },
    "EventRoute": {
        "model": EventRoute,
        "plural": "eventroutes",
        "short": ["eroute"],
        "columns": [
            {"name": "Router", "type": "string", "jsonPath": ".spec.router"},
            {"name": "Sinks", "type": "string", "jsonPath": ".spec.sinks"},
            {"name": "Accepted", "type": "string", "jsonPath": _CONDITION.format("Accepted")},
            {
                "name": "ResolvedRefs",
                "type": "string",
                "jsonPath": _CONDITION.format("ResolvedRefs"),
            },
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="ResolvedRefs")].reason',
            },
        ],
    },
    "EventSink": {
        "model": EventSink,
        "plural": "eventsinks",
        "short": ["esink"],
        "columns": [
            {"name": "Ready", "type": "string", "jsonPath": _CONDITION.format("Ready")},
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
            },
            {"name": "Dead-Letter", "type": "string", "jsonPath": ".spec.deadLetterSink"},
        ],
    },
}

_CONDITIONS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "maxItems": 16,
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "maxLength": 64},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "maxLength": 256},
            "message": {"type": "string", "maxLength": 32768},
            "observedGeneration": {"type": "integer", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    },
}


def _status_schema(kind: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "observedGeneration": {"type": "integer", "minimum": 0},
        "conditions": copy.deepcopy(_CONDITIONS_SCHEMA),
    }
    if kind == "EventRouter":
        properties["readyReplicas"] = {"type": "integer", "minimum": 0}
        properties["routeCount"] = {"type": "integer", "minimum": 0}
        properties["configDigest"] = {"type": "string", "maxLength": 64}
    return {
        "type": "object",
        "properties": properties,
        # kopf keeps its own progress records under status.kopf.
        "x-kubernetes-preserve-unknown-fields": True,
    }


def crd_documents() -> dict[str, dict[str, Any]]:
    """Return the CRD of each kind, keyed by the file name it is written to."""
    documents: dict[str, dict[str, Any]] = {}
    for kind, info in _KINDS.items():
        model = info["model"]
        full = model.model_json_schema(by_alias=True, mode="validation")
        defs = full.get("$defs", {})
        spec_schema = structural_schema(full["properties"]["spec"], defs)
        spec_schema.pop("nullable", None)
        root: dict[str, Any] = {
            "type": "object",
            "description": _first_paragraph(model.__doc__ or kind),
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec_schema,
                "status": _status_schema(kind),
            },
        }
        if "spec" in full.get("required", []):
            root["required"] = ["spec"]
        plural = info["plural"]
        documents[f"{plural}.yaml"] = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": f"{plural}.{GROUP}",
                "labels": {
                    "app.kubernetes.io/name": "eventrouter",
                    "app.kubernetes.io/part-of": "eventrouter",
                },
            },
            "spec": {
                "group": GROUP,
                "scope": "Namespaced",
                "names": {
                    "kind": kind,
                    "listKind": f"{kind}List",
                    "plural": plural,
                    "singular": kind.lower(),
                    "shortNames": info["short"],
                    "categories": [CATEGORY],
                },
                "versions": [
                    {
                        "name": VERSION,
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}},
                        "additionalPrinterColumns": [
                            *info["columns"],
                            {
                                "name": "Age",
                                "type": "date",
                                "jsonPath": ".metadata.creationTimestamp",
                            },
                        ],
                        "schema": {"openAPIV3Schema": root},
                    }
                ],
            },
        }
    return documents


_HEADER = (
    "# Generated from the pydantic models in router/eventrouter/resources.py by\n"
    "# `python -m eventrouter_operator.crds --write crds/`. Do not edit by hand.\n"
)


def render(document: dict[str, Any]) -> str:
    return _HEADER + yaml.safe_dump(document, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eventrouter_operator.crds",
        description="Write or check the CRDs generated from the resource models.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", help="write one file per kind into DIR")
    action.add_argument("--check", metavar="DIR", help="exit 1 if the files in DIR differ")
    args = parser.parse_args(argv)
    folder = Path(args.write or args.check)
    stale = []
    for name, document in crd_documents().items():
        path = folder / name
        text = render(document)
        if args.write:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(str(path))
    if stale:
        print(
            f"out of date: {', '.join(stale)}; "
            f"run python -m eventrouter_operator.crds --write {folder}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
