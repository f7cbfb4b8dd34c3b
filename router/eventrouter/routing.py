"""Route matching: which sinks an event goes to.

A `RouteTable` is built once per configuration and is immutable, so workers can
use it while a reload builds the next one. Exact names are looked up in a dict;
glob patterns are compiled to one regular expression per route.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eventrouter.envelope import Envelope
from eventrouter.resources import EventRoute, PropertyCondition

__all__ = ["CompiledRoute", "RouteTable"]

Predicate = Callable[[dict[str, str]], bool]


def _condition(cond: PropertyCondition) -> Predicate:
    key = cond.key
    if cond.equals is not None:
        expected = cond.equals
        return lambda props: props.get(key) == expected
    if cond.in_ is not None:
        allowed = frozenset(cond.in_)
        return lambda props: props.get(key) in allowed
    if cond.exists is not None:
        wanted = cond.exists
        return lambda props: (key in props) == wanted
    if cond.prefix is not None:
        prefix = cond.prefix
        return lambda props: props.get(key, None) is not None and props[key].startswith(prefix)
    assert cond.at_least is not None
    minimum = cond.at_least

    def at_least(props: dict[str, str]) -> bool:
        # A missing, non-numeric or infinite value does not match.
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            return False
        return math.isfinite(value) and value >= minimum

    return at_least


@dataclass(frozen=True)
class CompiledRoute:
    """One route, ready to test events against."""

    name: str
    sinks: tuple[str, ...]
    exact_names: frozenset[str]
    pattern: re.Pattern[str] | None
    match_all_names: bool
    external: bool | None
    conditions: tuple[Predicate, ...]

    @classmethod
    def compile(cls, route: EventRoute) -> CompiledRoute:
        match = route.spec.match
        exact = frozenset(n for n in match.names if not _is_glob(n))
        globs = [n for n in match.names if _is_glob(n)]
        match_all = "*" in globs
        pattern = (
            re.compile("|".join(fnmatch.translate(g) for g in globs))
            if globs and not match_all
            else None
        )
        return cls(
            name=route.metadata.name,
            sinks=tuple(dict.fromkeys(route.spec.sinks)),
            exact_names=exact,
            pattern=pattern,
            match_all_names=match_all,
            external=match.external,
            conditions=tuple(_condition(c) for c in match.properties),
        )

    def matches(self, event: Envelope) -> bool:
        if not (
            self.match_all_names
            or event.name in self.exact_names
            or (self.pattern is not None and self.pattern.match(event.name))
        ):
            return False
        if self.external is not None and event.external != self.external:
            return False
        props = event.properties
        return all(test(props) for test in self.conditions)


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


_CACHE_SIZE = 4096


class RouteTable:
    """The routes of one configuration, in the order they were defined.

    When no route tests properties, the result depends only on the event's name
    and `external`, so it is cached per pair (up to 4,096 pairs; when full, the
    cache is cleared and fills again).
    """

    def __init__(self, routes: Sequence[EventRoute]) -> None:
        self.routes = tuple(CompiledRoute.compile(r) for r in routes)
        self._cacheable = all(not r.conditions for r in self.routes)
        self._cache: dict[tuple[str, bool], tuple[list[str], list[str]]] = {}
        self.constant: tuple[list[str], list[str]] | None = None
        """The targets of every event, when no route tests names, `external` or properties."""
        if all(r.match_all_names and r.external is None and not r.conditions for r in self.routes):
            self.constant = (
                [r.name for r in self.routes],
                list(dict.fromkeys(s for r in self.routes for s in r.sinks)),
            )

    def targets(self, event: Envelope) -> tuple[list[str], list[str]]:
        """Return the matching route names and the sinks they name, each sink once.

        The lists may be shared between calls: callers must not change them.
        """
        if not self._cacheable:
            return self._match(event)
        key = (event.name, event.external)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            found = self._cache[key] = self._match(event)
        return found

    def _match(self, event: Envelope) -> tuple[list[str], list[str]]:
        matched: list[str] = []
        sinks: list[str] = []
        for route in self.routes:
            if route.matches(event):
                matched.append(route.name)
                for sink in route.sinks:
                    if sink not in sinks:
                        sinks.append(sink)
        return matched, sinks
