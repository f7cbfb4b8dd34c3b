"""Sinks: where events leave the router.

A sink implements the `Sink` protocol and knows only how to write one batch.
`SinkRunner` wraps it with what every sink needs: a bounded queue, batching,
a per-attempt timeout, retries with backoff, a dead-letter sink, and exact
accounting of every event it was given.
"""

from __future__ import annotations

from pathlib import Path

from eventrouter.errors import ConfigError, ConfigIssue
from eventrouter.resources import EventSink
from eventrouter.sinks.base import Sink, SinkRunner
from eventrouter.sinks.blackhole import BlackholeSink
from eventrouter.sinks.file import FileSink
from eventrouter.sinks.http import HttpSink
from eventrouter.sinks.kafka import KafkaSink
from eventrouter.sinks.log import LogSink

__all__ = ["DEFAULT_SECRETS_DIR", "Sink", "SinkRunner", "build_sink"]

DEFAULT_SECRETS_DIR = Path("/var/run/secrets/eventrouter")


def build_sink(resource: EventSink, secrets_dir: Path = DEFAULT_SECRETS_DIR) -> Sink:
    """Create the sink that an EventSink resource describes; raise `ConfigError`."""
    spec = resource.spec
    name = resource.metadata.name
    if spec.http is not None:
        return HttpSink(name, spec.http, secrets_dir)
    if spec.kafka is not None:
        return KafkaSink(name, spec.kafka, secrets_dir)
    if spec.log is not None:
        return LogSink(name, spec.log)
    if spec.file is not None:
        return FileSink(name, spec.file)
    if spec.blackhole is not None:
        return BlackholeSink(name)
    raise ConfigError(
        [
            ConfigIssue(
                "<sinks>",
                None,
                name,
                f"spec.{spec.type}",
                f"sink type {spec.type!r} is not supported by this version of the router; "
                "use log, file, http or blackhole",
            )
        ]
    )
