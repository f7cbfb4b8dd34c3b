"""Exception tree of the router.

    EventRouterError
    ├── ConfigError            resource files that do not validate or resolve
    ├── AuthError              missing, expired or badly signed credentials
    ├── IngestError            an event or request that the API rejects
    └── DeliveryError          a sink attempt that failed
        ├── RetryableDeliveryError
        └── PermanentDeliveryError

Whether a delivery failure is worth another attempt is a property of its type
(`DeliveryError.retryable`), never parsed from a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AuthError",
    "ConfigError",
    "ConfigIssue",
    "DeliveryError",
    "EventRouterError",
    "IngestError",
    "PermanentDeliveryError",
    "RetryableDeliveryError",
]


class EventRouterError(Exception):
    """Root of every error that the router raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a resource file, located by file, document and field path.

    `document` counts the YAML documents of the file from 0.
    """

    file: str
    document: int | None
    name: str | None
    path: str
    message: str
    kind: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f": document {self.document}"
            label = " ".join(part for part in (self.kind, self.name) if part)
            if label:
                where += f" ({label})"
        field = f": {self.path}" if self.path else ""
        return f"{where}{field}: {self.message}"


class ConfigError(EventRouterError):
    """Resource files that failed validation; `issues` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{len(issues)} configuration error(s):\n{lines}")


class AuthError(EventRouterError):
    """Credentials that are missing, expired, malformed or signed with another key."""


class IngestError(EventRouterError):
    """A request or event that the ingestion API rejects with a 4xx status."""

    def __init__(self, status: int, error: str, message: str) -> None:
        self.status = status
        self.error = error
        self.message = message
        super().__init__(message)


class DeliveryError(EventRouterError):
    """A failed delivery attempt; `retryable` tells whether another attempt may succeed.

    `status` is the remote status code, if there was one. `retry_after` is the
    delay in seconds that the remote asked for. `failed` lists the positions in
    the batch of the events that failed; None means the whole batch, and the
    others count as delivered.
    """

    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        failed: Sequence[int] | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.failed = failed
        super().__init__(message)


class RetryableDeliveryError(DeliveryError):
    """A failure that may pass on a later attempt: a timeout, a full disk, a 503."""

    retryable = True


class PermanentDeliveryError(DeliveryError):
    """A failure that no retry can fix: a rejected payload, a 400, a missing permission."""

    retryable = False
