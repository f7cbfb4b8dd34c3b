"""Pydantic models of the eventrouter.io/v1alpha1 resources.

EventRouter, EventRoute and EventSink are Kubernetes-style documents with
`apiVersion`, `kind`, `metadata` and `spec`. Field names are camelCase in YAML
and snake_case in Python. The router reads these models from files, and the
operator imports the same module, so the schema has one home.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AliasGenerator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "AuthSpec",
    "BackoffPolicy",
    "BlackholeSinkSpec",
    "Duration",
    "EventRoute",
    "EventRouteSpec",
    "EventRouter",
    "EventRouterSpec",
    "EventSink",
    "EventSinkSpec",
    "FileSinkSpec",
    "HmacSignature",
    "HttpSinkSpec",
    "KafkaSasl",
    "KafkaSinkSpec",
    "KafkaTls",
    "LimitsSpec",
    "LogSinkSpec",
    "MatchSpec",
    "ObjectMeta",
    "PropertyCondition",
    "QueueSpec",
    "Resource",
    "RetryPolicy",
    "SecretHeader",
    "SecretKeyRef",
    "SecretSource",
    "SessionsSpec",
    "parse_duration",
]

API_VERSION = "eventrouter.io/v1alpha1"

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# A DNS-1123 subdomain, as Kubernetes requires for object names.
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def parse_duration(value: Any) -> float:
    """Parse "250ms", "5s", "1m", "1h" or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s or 1m, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m or h, e.g. 500ms")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$", "maxLength": 32},
            ],
            "x-duration": True,
        }
    ),
]
"""A duration in seconds, written in YAML as 500ms, 5s, 1m, 1h or a number."""

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=_NAME_PATTERN)]


_BASE_CONFIG = ConfigDict(
    alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
    populate_by_name=True,
    extra="forbid",
    frozen=True,
)


def _rules(*rules: tuple[str, str]) -> ConfigDict:
    """Model settings with CEL rules that the CRDs carry beside the pydantic validators.

    Each rule restates a `model_validator` of the same model for the API server,
    so `kubectl apply` rejects what `eventrouter validate` rejects.
    """
    return ConfigDict(
        **_BASE_CONFIG,
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": rule, "message": message} for rule, message in rules
            ]
        },
    )


class _Model(BaseModel):
    model_config = ConfigDict(**_BASE_CONFIG)


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata that the router reads."""

    # Other metadata (uid, resourceVersion, managedFields) is dropped: nothing
    # reads it, and a dump of the model never carries it along.
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Name
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class SecretKeyRef(_Model):
    """One key of a Kubernetes Secret, mounted as a file by the operator."""

    name: Name
    key: Annotated[str, Field(min_length=1, max_length=253)]


class SecretSource(_Model):
    """The source of a secret value: a Secret key, a file, or an environment variable."""

    model_config = _rules(
        (
            "[has(self.secretKeyRef), has(self.file), has(self.env)].filter(x, x).size() == 1",
            "set exactly one of secretKeyRef, file or env",
        ),
    )

    secret_key_ref: SecretKeyRef | None = None
    file: str | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretSource:
        given = [f for f in ("secret_key_ref", "file", "env") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of secretKeyRef, file or env "
                f"(got {', '.join(to_camel(g) for g in given) or 'none'})"
            )
        return self


# --- EventRouter -------------------------------------------------------------


class QueueSpec(_Model):
    """The ring buffer between ingestion and the workers."""

    size: Annotated[int, Field(ge=1, le=4_194_304)] = 65536
    workers: Annotated[int, Field(ge=1, le=256)] = 8
    overflow: Literal["dropNewest", "dropOldest", "reject", "block"] = "dropNewest"
    block_timeout: Duration = 5.0
    """Under `block`, how long an HTTP request may wait for room before it gets 503."""


class AuthSpec(_Model):
    """Credentials that callers must present; with neither set, the router is open."""

    session_key: SecretSource | None = None
    api_keys: SecretSource | None = None


class LimitsSpec(_Model):
    """Bounds on what one request and one event may contain."""

    max_request_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    max_batch_events: Annotated[int, Field(ge=1, le=10_000)] = 500
    max_name_length: Annotated[int, Field(ge=1, le=1024)] = 128
    max_properties: Annotated[int, Field(ge=0, le=1024)] = 64
    max_property_key_length: Annotated[int, Field(ge=1, le=1024)] = 128
    max_property_value_length: Annotated[int, Field(ge=1, le=65536)] = 4096


class TracingSpec(_Model):
    """OpenTelemetry tracing settings; the standard OTEL_* variables also apply."""

    exporter: Literal["none", "otlp", "console"] = "none"
    endpoint: str | None = None
    sampling_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01


class AutoscalingSpec(_Model):
    """A HorizontalPodAutoscaler for the router's Deployment."""

    model_config = _rules(
        (
            "(has(self.minReplicas) ? self.minReplicas : 1)"
            " <= (has(self.maxReplicas) ? self.maxReplicas : 4)",
            "minReplicas must not exceed maxReplicas",
        ),
    )

    enabled: bool = False
    min_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 4
    # Spelled as in the HorizontalPodAutoscaler API, not by the camelCase rule.
    target_cpu_utilization_percentage: Annotated[
        int,
        Field(
            ge=1,
            le=100,
            validation_alias="targetCPUUtilizationPercentage",
            serialization_alias="targetCPUUtilizationPercentage",
        ),
    ] = 70

    @model_validator(mode="after")
    def _min_within_max(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must not exceed "
                f"maxReplicas ({self.max_replicas})"
            )
        return self


class SessionsSpec(_Model):
    """Client WebSocket sessions on `GET /ws`, which emit session_start and session_end."""

    enabled: bool = True
    max_sessions: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    max_sessions_per_user: Annotated[int, Field(ge=1, le=10_000)] = 16
    max_message_bytes: Annotated[int, Field(ge=256, le=16 * 1024 * 1024)] = 64 * 1024
    max_events_per_second: Annotated[float, Field(gt=0, le=100_000)] = 50.0
    """Sustained rate per session; bursts of twice this many are allowed."""
    idle_timeout: Duration = 60.0
    """Close a session that sends nothing, not even a ping, for this long."""


class EventRouterSpec(_Model):
    """The desired state of one router."""

    model_config = _rules(
        (
            "!has(self.queue) || !has(self.queue.overflow)"
            " || (self.queue.overflow != 'reject' && self.queue.overflow != 'block')"
            " || (has(self.queue.size) ? self.queue.size : 65536)"
            " >= (has(self.limits) && has(self.limits.maxBatchEvents)"
            " ? self.limits.maxBatchEvents : 500)",
            "with overflow reject or block, queue.size must be at least limits.maxBatchEvents",
        ),
    )

    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    image: str | None = None
    queue: QueueSpec = QueueSpec()
    auth: AuthSpec = AuthSpec()
    limits: LimitsSpec = LimitsSpec()
    sessions: SessionsSpec = SessionsSpec()
    tracing: TracingSpec = TracingSpec()
    resources: dict[str, dict[str, str]] | None = None
    autoscaling: AutoscalingSpec = AutoscalingSpec()

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> EventRouterSpec:
        # Under `reject` and `block` a batch is taken whole or not at all, so a
        # batch larger than the buffer could never be accepted.
        if self.queue.overflow in ("reject", "block") and (
            self.queue.size < self.limits.max_batch_events
        ):
            raise ValueError(
                f"with overflow reject or block, queue.size ({self.queue.size}) must be at least "
                f"limits.maxBatchEvents ({self.limits.max_batch_events}); raise queue.size "
                "or lower maxBatchEvents"
            )
        return self


# --- EventRoute --------------------------------------------------------------


class PropertyCondition(_Model):
    """One test on a property; exactly one operator is set."""

    model_config = _rules(
        (
            "[has(self.equals), has(self.__in__), has(self.exists), has(self.prefix),"
            " has(self.atLeast)].filter(x, x).size() == 1",
            "set exactly one of equals, in, exists, prefix or atLeast",
        ),
    )

    key: Annotated[str, Field(min_length=1, max_length=1024)]
    equals: str | None = None
    in_: Annotated[list[str] | None, Field(alias="in", max_length=1000)] = None
    exists: bool | None = None
    prefix: str | None = None
    at_least: float | None = None

    @model_validator(mode="after")
    def _exactly_one_operator(self) -> PropertyCondition:
        operators = ("equals", "in_", "exists", "prefix", "at_least")
        given = [op for op in operators if getattr(self, op) is not None]
        if len(given) != 1:
            names = ", ".join(to_camel(op.rstrip("_")) for op in given) or "none"
            raise ValueError(
                f"set exactly one of equals, in, exists, prefix or atLeast (got {names})"
            )
        return self


class MatchSpec(_Model):
    """The conditions an event must meet to take a route; every listed one must hold."""

    names: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1024)]],
        Field(min_length=1, max_length=256),
    ] = ["*"]
    external: bool | None = None
    properties: Annotated[list[PropertyCondition], Field(max_length=64)] = []


class EventRouteSpec(_Model):
    """Events of one router that match go to the listed sinks."""

    router: Name
    match: MatchSpec = MatchSpec()
    sinks: Annotated[list[Name], Field(min_length=1, max_length=64)]


# --- EventSink ---------------------------------------------------------------


def _cel_duration(field: str, default_seconds: float) -> str:
    """Build the CEL expression that reads a Duration field in seconds or as a string."""
    # NOTE: CEL durations end near 292 years (Go's time.Duration), so the API
    # server rejects a rule over a larger integer with a conversion error,
    # where the pydantic model accepts it.
    as_duration = (
        f"(type(self.{field}) == int ? duration(string(self.{field}) + 's')"
        f" : duration(self.{field}))"
    )
    return f"(has(self.{field}) ? {as_duration} : duration('{default_seconds}s'))"


_BACKOFF_INITIAL = 0.1
_BACKOFF_MAX = 30.0


class BackoffPolicy(_Model):
    """Delay between delivery attempts."""

    model_config = _rules(
        (
            f"{_cel_duration('initial', _BACKOFF_INITIAL)} <= {_cel_duration('max', _BACKOFF_MAX)}",
            "initial must not exceed max",
        ),
    )

    type: Literal["linear", "exponential"] = "exponential"
    initial: Duration = _BACKOFF_INITIAL
    max: Duration = _BACKOFF_MAX
    jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2

    @model_validator(mode="after")
    def _initial_within_max(self) -> BackoffPolicy:
        if self.initial > self.max:
            raise ValueError(f"initial ({self.initial}s) must not exceed max ({self.max}s)")
        return self


class RetryPolicy(_Model):
    """How often and how fast a failed delivery is attempted again."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    backoff: BackoffPolicy = BackoffPolicy()
    max_retry_after: Duration = 60.0
    """Maximum delay taken from a Retry-After header sent by the remote."""


class LogSinkSpec(_Model):
    """One JSON line per event on the router's stdout or stderr."""

    stream: Literal["stdout", "stderr"] = "stdout"


class FileSinkSpec(_Model):
    """JSON lines appended to a file, rotated by size."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    max_bytes: Annotated[int, Field(ge=0)] = 100 * 1024 * 1024
    max_files: Annotated[int, Field(ge=0, le=1000)] = 5
    fsync: Literal["never", "batch"] = "batch"


class BlackholeSinkSpec(_Model):
    """Counts events and discards them; for benchmarks and dry runs."""


StatusPattern = Annotated[
    int | str,
    Field(description="a status code such as 429, or a class such as 5xx"),
]


def _check_status_patterns(patterns: list[int | str], field: str) -> None:
    for pattern in patterns:
        if isinstance(pattern, int):
            if not 100 <= pattern <= 599:
                raise ValueError(f"{field}: {pattern} is not an HTTP status code (100 to 599)")
        elif not re.fullmatch(r"[1-5]xx", pattern):
            raise ValueError(f"{field}: {pattern!r} is neither a status code nor a class like 5xx")


class SecretHeader(_Model):
    """A request header whose value comes from a secret, e.g. an API token."""

    name: Annotated[
        str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    ]
    value_from: SecretSource
    prefix: Annotated[str, Field(max_length=64)] = ""
    """Text put before the secret, such as "Bearer "."""


class HmacSignature(_Model):
    """An HMAC-SHA256 signature of each request, so the receiver can verify the sender.

    The signed text is the Unix timestamp, a dot, and the body; the timestamp is
    sent in `timestampHeader` so that receivers can refuse replays.
    """

    secret: SecretSource
    header: Annotated[str, Field(min_length=1, max_length=256)] = "X-Eventrouter-Signature"
    timestamp_header: Annotated[str, Field(min_length=1, max_length=256)] = (
        "X-Eventrouter-Timestamp"
    )


class HttpSinkSpec(_Model):
    """Events sent to an HTTP endpoint: one per request, a JSON array, or NDJSON."""

    url: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^https?://")]
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: Annotated[dict[str, str], Field(max_length=64)] = {}
    secret_headers: Annotated[list[SecretHeader], Field(max_length=16)] = []
    format: Literal["json", "array", "ndjson"] = "json"
    """json: one event per request; array: a JSON array per batch; ndjson: one line per event."""
    success_status: Annotated[list[StatusPattern], Field(min_length=1, max_length=64)] = ["2xx"]
    retryable_status: Annotated[list[StatusPattern], Field(max_length=64)] = [408, 429, "5xx"]
    signature: HmacSignature | None = None
    max_connections: Annotated[int, Field(ge=1, le=1024)] = 16
    tls_insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _check_statuses(self) -> HttpSinkSpec:
        _check_status_patterns(self.success_status, "successStatus")
        _check_status_patterns(self.retryable_status, "retryableStatus")
        for header in self.headers:
            if header.lower() in {h.name.lower() for h in self.secret_headers}:
                raise ValueError(f"header {header!r} is set in both headers and secretHeaders")
        return self


class KafkaTls(_Model):
    """TLS to the brokers; each file is PEM, from a Secret mount or a path."""

    model_config = _rules(
        (
            "has(self.cert) == has(self.key)",
            "set both cert and key for client authentication, or neither",
        ),
    )

    ca: SecretSource | None = None
    """CA bundle to verify the brokers; the system's CAs when unset."""
    cert: SecretSource | None = None
    key: SecretSource | None = None
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _cert_with_key(self) -> KafkaTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("set both cert and key for client authentication, or neither")
        return self


class KafkaSasl(_Model):
    """SASL authentication to the brokers."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: Annotated[str, Field(min_length=1, max_length=256)]
    password: SecretSource


class KafkaSinkSpec(_Model):
    """Events produced to Kafka with aiokafka, one record per event.

    `topic` and `key` are templates: `{name}`, `{user_id}`, `{username}`,
    `{session_id}`, `{router}`, `{id}` and `{properties.KEY}` are replaced with
    the event's values. Characters not allowed in topic names become `_`.
    """

    model_config = _rules(
        (
            "(has(self.idempotence) && !self.idempotence) || !has(self.acks) || self.acks == 'all'",
            "idempotence requires acks: all; set idempotence: false to use acks 0 or 1",
        ),
    )

    bootstrap_servers: Annotated[
        list[Annotated[str, Field(min_length=3, max_length=512, pattern=r"^[^\s:]+:\d+$")]],
        Field(min_length=1, max_length=32),
    ]
    topic: Annotated[str, Field(min_length=1, max_length=512)]
    key: Annotated[str | None, Field(max_length=512)] = None
    acks: Literal[0, 1, "all"] = "all"
    idempotence: bool = True
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    linger: Duration = 0.005
    batch_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 256 * 1024
    request_timeout: Duration = 10.0
    headers: Annotated[dict[str, str], Field(max_length=32)] = {}
    """Static headers added to every record, beside eventrouter-id and eventrouter-name."""
    tls: KafkaTls | None = None
    sasl: KafkaSasl | None = None

    @model_validator(mode="after")
    def _idempotence_needs_all(self) -> KafkaSinkSpec:
        if self.idempotence and self.acks != "all":
            raise ValueError(
                "idempotence requires acks: all; set idempotence: false to use acks 0 or 1"
            )
        for template in (self.topic, self.key or ""):
            for field in re.findall(r"\{([^}]*)\}", template):
                if field not in _TEMPLATE_FIELDS and not field.startswith("properties."):
                    raise ValueError(
                        f"unknown template field {{{field}}}; use one of "
                        f"{', '.join('{' + f + '}' for f in sorted(_TEMPLATE_FIELDS))} "
                        "or {properties.KEY}"
                    )
        return self


_TEMPLATE_FIELDS = frozenset({"name", "user_id", "username", "session_id", "router", "id"})


_SINK_TYPES = ("log", "file", "blackhole", "http", "kafka")


class EventSinkSpec(_Model):
    """One destination; exactly one sink type is set."""

    model_config = _rules(
        (
            "[has(self.log), has(self.file), has(self.blackhole), has(self.http),"
            " has(self.kafka)].filter(x, x).size() == 1",
            "set exactly one sink type of log, file, blackhole, http, kafka",
        ),
    )

    log: LogSinkSpec | None = None
    file: FileSinkSpec | None = None
    blackhole: BlackholeSinkSpec | None = None
    http: HttpSinkSpec | None = None
    kafka: KafkaSinkSpec | None = None
    queue_size: Annotated[int, Field(ge=1, le=4_194_304)] = 16384
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1024
    batch_wait: Duration = 0.0
    timeout: Annotated[Duration, Field(gt=0)] = 10.0
    retry: RetryPolicy = RetryPolicy()
    dead_letter_sink: Name | None = None

    @model_validator(mode="after")
    def _exactly_one_type(self) -> EventSinkSpec:
        given = [t for t in _SINK_TYPES if getattr(self, t) is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one sink type of {', '.join(_SINK_TYPES)} "
                f"(got {', '.join(given) or 'none'})"
            )
        return self

    @property
    def type(self) -> str:
        """The name of the one sink type that is set."""
        return next(t for t in _SINK_TYPES if getattr(self, t) is not None)


# --- Documents ---------------------------------------------------------------


class _Resource(_Model):
    api_version: Literal["eventrouter.io/v1alpha1"]
    metadata: ObjectMeta
    # Written by the operator and not read by the router, so kept out of dumps and digests.
    status: dict[str, Any] | None = Field(default=None, exclude=True)


class EventRouter(_Resource):
    """A router: queue, workers, auth and limits."""

    kind: Literal["EventRouter"]
    spec: EventRouterSpec = EventRouterSpec()


class EventRoute(_Resource):
    """A route from matching events of one router to sinks."""

    kind: Literal["EventRoute"]
    spec: EventRouteSpec


class EventSink(_Resource):
    """A destination for events."""

    kind: Literal["EventSink"]
    spec: EventSinkSpec


Resource = EventRouter | EventRoute | EventSink

KINDS: dict[str, type[EventRouter] | type[EventRoute] | type[EventSink]] = {
    "EventRouter": EventRouter,
    "EventRoute": EventRoute,
    "EventSink": EventSink,
}
