"""Load resource files and resolve them into the configuration of one router.

`load_config` reads YAML files and folders, validates every document against the
models in `eventrouter.resources`, checks references between documents, and
returns a `RouterConfig`, or raises `ConfigError` listing every problem found.
It does no I/O beyond reading the files, so `eventrouter validate`, the server
and the operator share it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from eventrouter.errors import ConfigError, ConfigIssue
from eventrouter.resources import (
    API_VERSION,
    KINDS,
    EventRoute,
    EventRouter,
    EventSink,
    Resource,
)

__all__ = ["DEFAULT_CONFIG_NAME", "RouterConfig", "load_config", "load_documents"]

DEFAULT_CONFIG_NAME = "<embedded default>"
_YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class LoadedDocument:
    """One validated document and where it came from."""

    file: str
    index: int
    resource: Resource


@dataclass(frozen=True)
class RouterConfig:
    """Everything one router runs on: its settings, its routes and the sinks they name."""

    router: EventRouter
    routes: tuple[EventRoute, ...]
    sinks: dict[str, EventSink]
    sources: tuple[str, ...]
    digest: str = field(default="")

    @property
    def name(self) -> str:
        return self.router.metadata.name


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _YAML_SUFFIXES)
            )
        else:
            files.append(path)
    return files


def _field_path(loc: Iterable[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _explain(error: Any) -> str:
    """Turn one pydantic error into a message that names the fix."""
    kind = error["type"]
    message: str = error["msg"]
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "extra_forbidden":
        return "unknown field; check its spelling and indentation against docs/resources.md"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "literal_error":
        return f"{message} (got {error['input']!r})"
    if kind == "string_pattern_mismatch":
        return (
            f"invalid name {error['input']!r}: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return f"{message} (got {error['input']!r})" if "input" in error else message


def _validate_document(
    file: str, index: int, body: Any
) -> tuple[Resource | None, list[ConfigIssue]]:
    if not isinstance(body, dict):
        found = type(body).__name__
        return None, [
            ConfigIssue(
                file, index, None, "", f"expected a mapping with apiVersion and kind, got {found}"
            )
        ]
    metadata = body.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    name = name if isinstance(name, str) else None
    api_version = body.get("apiVersion")
    if api_version != API_VERSION:
        return None, [
            ConfigIssue(
                file,
                index,
                name,
                "apiVersion",
                f"unsupported apiVersion {api_version!r}; use {API_VERSION}",
            )
        ]
    kind = body.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None, [
            ConfigIssue(
                file, index, name, "kind", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}"
            )
        ]
    try:
        return model.model_validate(body), []
    except ValidationError as exc:
        issues = [
            ConfigIssue(file, index, name, _field_path(err["loc"]), _explain(err), kind)
            for err in exc.errors()
        ]
        return None, issues


def _parse_text(file: str, text: str) -> tuple[list[tuple[int, Any]], list[ConfigIssue]]:
    # Documents before a syntax error are kept, so that references to them do
    # not show up as "not found", and the error names the document that failed.
    bodies: list[Any] = []
    issues: list[ConfigIssue] = []
    if len(text) > _MAX_FILE_CHARS:
        message = f"file is larger than {_MAX_FILE_CHARS} characters; split it into several files"
        return [], [ConfigIssue(file, None, None, "", message)]
    aliases = _count_aliases(text)
    if aliases > _MAX_ALIASES:
        # Aliases of aliases expand exponentially (a "billion laughs" file).
        message = f"file uses {aliases} YAML aliases, more than {_MAX_ALIASES}; write values out"
        return [], [ConfigIssue(file, None, None, "", message)]
    try:
        for body in yaml.safe_load_all(text):
            bodies.append(body)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        issues.append(ConfigIssue(file, len(bodies), None, "", f"invalid YAML{where}: {problem}"))
    except (ValueError, TypeError, RecursionError) as exc:
        # PyYAML raises these for values it parses but cannot build, such as
        # the date 2025-02-30, `!!int "0x"` or very deep nesting.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        issues.append(ConfigIssue(file, len(bodies), None, "", f"invalid YAML value: {reason}"))
    if not bodies and not issues:
        issues.append(ConfigIssue(file, None, None, "", "file holds no YAML documents"))
    return [(i, body) for i, body in enumerate(bodies) if body is not None], issues


_MAX_FILE_CHARS = 4 * 1024 * 1024
_MAX_ALIASES = 100


def _count_aliases(text: str) -> int:
    if "*" not in text:
        return 0
    try:
        return sum(1 for event in yaml.parse(text) if isinstance(event, yaml.AliasEvent))
    except yaml.YAMLError:
        # safe_load_all reports the syntax error with its position.
        return 0


def load_documents(
    paths: Sequence[str | Path],
) -> tuple[list[LoadedDocument], list[ConfigIssue]]:
    """Read and validate every document in the given files and folders."""
    documents: list[LoadedDocument] = []
    issues: list[ConfigIssue] = []
    files = _expand(paths)
    if not files:
        names = ", ".join(str(p) for p in paths)
        issues.append(ConfigIssue(names, None, None, "", "no .yaml, .yml or .json files found"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(ConfigIssue(str(path), None, None, "", f"cannot read file: {exc}"))
            continue
        found, problems = _parse_text(str(path), text)
        issues.extend(problems)
        for index, body in found:
            resource, problems = _validate_document(str(path), index, body)
            issues.extend(problems)
            if resource is not None:
                documents.append(LoadedDocument(str(path), index, resource))
    return documents, issues


def _locate(document: LoadedDocument, path: str, message: str) -> ConfigIssue:
    resource = document.resource
    return ConfigIssue(
        document.file, document.index, resource.metadata.name, path, message, resource.kind
    )


def _check_duplicates(documents: list[LoadedDocument]) -> list[ConfigIssue]:
    seen: dict[tuple[str, str], LoadedDocument] = {}
    issues = []
    for doc in documents:
        key = (doc.resource.kind, doc.resource.metadata.name)
        if key in seen:
            first = seen[key]
            issues.append(
                _locate(
                    doc,
                    "metadata.name",
                    f"duplicate {doc.resource.kind} {doc.resource.metadata.name!r}, first "
                    f"defined in {first.file} document {first.index}; rename one of them",
                )
            )
        else:
            seen[key] = doc
    return issues


def _select_router(
    documents: list[LoadedDocument], router_name: str | None
) -> tuple[EventRouter | None, list[ConfigIssue]]:
    routers = [d.resource for d in documents if isinstance(d.resource, EventRouter)]
    if router_name is not None:
        chosen = [r for r in routers if r.metadata.name == router_name]
        if chosen:
            return chosen[0], []
        if not routers:
            return _default_router(router_name), []
        names = ", ".join(r.metadata.name for r in routers)
        return None, [
            ConfigIssue(
                "<arguments>",
                None,
                None,
                "router",
                f"EventRouter {router_name!r} not found; the files define: {names}",
            )
        ]
    if len(routers) > 1:
        names = ", ".join(r.metadata.name for r in routers)
        return None, [
            ConfigIssue(
                "<arguments>",
                None,
                None,
                "router",
                f"the files define several EventRouters ({names}); choose one with --router",
            )
        ]
    if routers:
        return routers[0], []
    return _default_router("default"), []


def _default_router(name: str) -> EventRouter:
    return EventRouter.model_validate(
        {"apiVersion": API_VERSION, "kind": "EventRouter", "metadata": {"name": name}}
    )


def _check_references(
    documents: list[LoadedDocument], router: str, broken: set[str]
) -> tuple[list[EventRoute], dict[str, EventSink], list[ConfigIssue]]:
    """Return the router's routes and the sinks they need, with every dangling reference."""
    sinks = {d.resource.metadata.name: d for d in documents if isinstance(d.resource, EventSink)}
    routes: list[EventRoute] = []
    needed: dict[str, EventSink] = {}
    issues: list[ConfigIssue] = []

    def need(name: str, doc: LoadedDocument, path: str, role: str) -> None:
        target = sinks.get(name)
        if target is None and name in broken:
            return
        if target is None:
            issues.append(
                _locate(
                    doc,
                    path,
                    f"{role} {name!r} not found; define an EventSink named {name!r} "
                    "or remove the reference",
                )
            )
            return
        assert isinstance(target.resource, EventSink)
        needed[name] = target.resource

    for doc in documents:
        resource = doc.resource
        if isinstance(resource, EventRoute):
            # Every route is checked, also those of other routers, so that
            # `validate` reports a dangling reference wherever it is.
            for i, sink in enumerate(resource.spec.sinks):
                need(sink, doc, f"spec.sinks[{i}]", "sink")
            if resource.spec.router == router:
                routes.append(resource)
        elif isinstance(resource, EventSink) and resource.spec.dead_letter_sink:
            target = resource.spec.dead_letter_sink
            if target == resource.metadata.name:
                issues.append(
                    _locate(doc, "spec.deadLetterSink", "a sink cannot be its own dead-letter sink")
                )
            elif target not in sinks:
                need(target, doc, "spec.deadLetterSink", "dead-letter sink")

    # A route's sinks are only those it names, but dead-letter targets of those
    # sinks must run too, followed transitively.
    used = {name for route in routes for name in route.spec.sinks if name in sinks}
    pending = list(used)
    while pending:
        name = pending.pop()
        source = sinks[name].resource
        assert isinstance(source, EventSink)
        letter = source.spec.dead_letter_sink
        if letter and letter in sinks and letter not in used:
            used.add(letter)
            pending.append(letter)
    issues.extend(_check_dead_letter_cycles(sinks))
    selected = {}
    for name in sorted(used):
        resource = sinks[name].resource
        assert isinstance(resource, EventSink)
        selected[name] = resource
    return routes, selected, issues


def _check_dead_letter_cycles(sinks: dict[str, LoadedDocument]) -> list[ConfigIssue]:
    issues = []
    for name, doc in sinks.items():
        seen = [name]
        current = doc.resource
        while isinstance(current, EventSink) and current.spec.dead_letter_sink:
            nxt = current.spec.dead_letter_sink
            if nxt == name and len(seen) > 1:
                chain = " -> ".join([*seen, nxt])
                issues.append(
                    _locate(
                        doc,
                        "spec.deadLetterSink",
                        f"dead-letter sinks form a cycle ({chain}); end the chain at a "
                        "sink without deadLetterSink",
                    )
                )
                break
            if nxt in seen or nxt not in sinks:
                break
            seen.append(nxt)
            current = sinks[nxt].resource
    return issues


def _digest(routes: Sequence[EventRoute], sinks: dict[str, EventSink], router: EventRouter) -> str:
    payload = "\n".join(
        [router.model_dump_json()]
        + [r.model_dump_json() for r in routes]
        + [s.model_dump_json() for s in sinks.values()]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve(
    documents: list[LoadedDocument],
    router_name: str | None,
    sources: Sequence[str],
    earlier: Sequence[ConfigIssue] = (),
) -> RouterConfig:
    """Check references between documents and build the configuration of one router.

    `earlier` holds the issues of documents that failed validation: they are
    reported together with the reference errors, and a reference to a document
    that failed is not reported a second time as not found.
    """
    issues = list(earlier)
    issues.extend(_check_duplicates(documents))
    router, problems = _select_router(documents, router_name)
    issues.extend(problems)
    if router is None:
        raise ConfigError(issues)
    broken = {issue.name for issue in earlier if issue.name}
    routes, sinks, problems = _check_references(documents, router.metadata.name, broken)
    issues.extend(problems)
    if issues:
        raise ConfigError(issues)
    return RouterConfig(
        router=router,
        routes=tuple(routes),
        sinks=sinks,
        sources=tuple(sources),
        digest=_digest(routes, sinks, router),
    )


def load_config(paths: Sequence[str | Path] | None, router_name: str | None = None) -> RouterConfig:
    """Load the given files and folders, or the embedded default when `paths` is empty."""
    if not paths:
        text = (
            importlib_resources.files("eventrouter")
            .joinpath("defaults/default.yaml")
            .read_text(encoding="utf-8")
        )
        found, issues = _parse_text(DEFAULT_CONFIG_NAME, text)
        documents = []
        for index, body in found:
            resource, problems = _validate_document(DEFAULT_CONFIG_NAME, index, body)
            issues.extend(problems)
            if resource is not None:
                documents.append(LoadedDocument(DEFAULT_CONFIG_NAME, index, resource))
        if issues:
            raise ConfigError(issues)
        return resolve(documents, router_name, [DEFAULT_CONFIG_NAME])
    documents, issues = load_documents(paths)
    return resolve(documents, router_name, [str(p) for p in paths], issues)
