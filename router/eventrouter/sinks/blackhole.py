"""A sink that discards every event; for benchmarks and dry runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import SpanKind

from eventrouter.envelope import Envelope


class BlackholeSink:
    """Accepts every batch and keeps nothing."""

    cancellable = True
    max_batch: int | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    def abort(self) -> None:
        # `send` is cancellable, so the runner cancels it instead.
        return None

    def describe(self, batch: Sequence[Envelope]) -> tuple[str, SpanKind, dict[str, Any]]:
        return f"deliver {self.name}", SpanKind.INTERNAL, {"eventrouter.sink.type": "blackhole"}

    async def start(self) -> None:
        return None

    async def send(self, batch: Sequence[Envelope]) -> None:
        return None

    async def close(self) -> None:
        return None
