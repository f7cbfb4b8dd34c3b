"""A sink that produces events to Kafka with aiokafka.

The producer is created lazily inside a delivery attempt, so a broker that is
down at start-up makes the sink not ready instead of stopping the router. After
a failed attempt, the next attempt starts a new producer. A fresh client re-reads
the cluster metadata from the bootstrap servers, which recovers from a broker
restart on a new address or a client stuck on stale metadata, and it starts new
idempotence sequence numbers.

Delivery is at least once: when an attempt times out, records that aiokafka
had already sent may be sent again by the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from opentelemetry.trace import SpanKind

from eventrouter.envelope import Envelope, encode_envelope
from eventrouter.errors import (
    ConfigError,
    PermanentDeliveryError,
    RetryableDeliveryError,
)
from eventrouter.resources import KafkaSinkSpec, SecretSource
from eventrouter.secretfiles import read_secret

__all__ = ["KafkaSink", "compile_template"]

logger = logging.getLogger(__name__)

_FIELD = re.compile(r"\{([^}]*)\}")
_TOPIC_INVALID = re.compile(r"[^a-zA-Z0-9._-]")
_MAX_TOPIC = 249
# aiokafka's default max_request_size; the producer is created with it, and a
# larger record fails on its own without being sent.
_MAX_REQUEST_BYTES = 1_048_576
_PARTITION_CACHE_SIZE = 65_536
_TOPIC_CACHE_SIZE = 4096
# Seconds to wait for each step of abandoning a producer.
_ABANDON_TIMEOUT = 5.0

Template = Callable[[Envelope], str]
# Index in the batch, key, value and headers of one record.
_Record = tuple[int, bytes | None, bytes, list[tuple[str, bytes]]]


def compile_template(template: str) -> Template:
    """Turn "game.{name}" or "{properties.platform}" into a function of an envelope."""
    parts: list[str | Callable[[Envelope], str]] = []
    position = 0
    for match in _FIELD.finditer(template):
        parts.append(template[position : match.start()])
        field = match.group(1)
        if field.startswith("properties."):
            parts.append(_property_getter(field.removeprefix("properties.")))
        else:
            parts.append(_field_getter(field))
        position = match.end()
    parts.append(template[position:])
    constant = [p for p in parts if p]
    if all(isinstance(p, str) for p in constant):
        text = "".join(p for p in constant if isinstance(p, str))
        return lambda e: text
    return lambda e: "".join(p if isinstance(p, str) else p(e) for p in constant)


def _property_getter(key: str) -> Template:
    return lambda event: event.properties.get(key, "")


def _field_getter(field: str) -> Template:
    return lambda event: str(getattr(event, field) or "")


def _secret_path(source: SecretSource, secrets_dir: Path, field: str) -> str:
    """Return a path for a PEM secret; a value from a variable goes to a private temp file."""
    if source.file is not None:
        return source.file
    if source.secret_key_ref is not None:
        return str(secrets_dir / source.secret_key_ref.name / source.secret_key_ref.key)
    value = read_secret(source, secrets_dir, field)
    handle, path = tempfile.mkstemp(prefix="eventrouter-", suffix=".pem")
    with os.fdopen(handle, "w") as file:
        file.write(value)
    return path


class KafkaSink:
    """Produces one record per event; topic and key come from templates."""

    cancellable = True
    max_batch: int | None = None

    def __init__(self, name: str, spec: KafkaSinkSpec, secrets_dir: Path) -> None:
        self.name = name
        self._spec = spec
        self._secrets_dir = secrets_dir
        self._topic = compile_template(spec.topic)
        self._key = compile_template(spec.key) if spec.key else None
        self._static_headers = [(k, v.encode()) for k, v in spec.headers.items()]
        self._producer: AIOKafkaProducer | None = None
        self._stale = False
        self._abandoning: set[asyncio.Task[None]] = set()
        self._next_sticky = -1
        self._partition_cache: dict[tuple[bytes, int], int] = {}
        # Template results mapped to valid topic names.
        self._topics: dict[str, str] = {}

    def abort(self) -> None:
        # `send` is cancellable, so the runner cancels it instead.
        return None

    def describe(self, batch: Sequence[Envelope]) -> tuple[str, SpanKind, dict[str, Any]]:
        topic = self._topic_for(batch[0]) if batch else self._spec.topic
        return (
            f"publish {topic}",
            SpanKind.PRODUCER,
            {
                "eventrouter.sink.type": "kafka",
                "messaging.system": "kafka",
                "messaging.operation.type": "publish",
                "messaging.operation.name": "send",
                "messaging.destination.name": topic,
                "server.address": self._spec.bootstrap_servers[0].rsplit(":", 1)[0],
            },
        )

    async def start(self) -> None:
        # Connecting waits for the first attempt, so that a broker that is down
        # does not keep the router from starting.
        return None

    def _producer_options(self) -> dict[str, Any]:
        spec = self._spec
        options: dict[str, Any] = {
            "bootstrap_servers": spec.bootstrap_servers,
            "client_id": f"eventrouter-{self.name}",
            "acks": spec.acks,
            "enable_idempotence": spec.idempotence,
            "compression_type": None if spec.compression == "none" else spec.compression,
            "linger_ms": int(spec.linger * 1000),
            "max_batch_size": spec.batch_bytes,
            "max_request_size": _MAX_REQUEST_BYTES,
            # NOTE: with idempotence (the default), aiokafka 0.14 keeps retrying
            # a batch past this timeout while the partition's leader is known,
            # so the runner's per-attempt `timeout` is what bounds a send.
            "request_timeout_ms": max(1, int(spec.request_timeout * 1000)),
            "retry_backoff_ms": 100,
            # Re-read metadata often enough that partition leaders that moved
            # during a broker restart are found without waiting five minutes.
            "metadata_max_age_ms": 30_000,
        }
        context: ssl.SSLContext | None = None
        if spec.tls is not None:
            tls = spec.tls
            context = create_ssl_context(
                cafile=_secret_path(tls.ca, self._secrets_dir, "tls.ca") if tls.ca else None,
                certfile=(
                    _secret_path(tls.cert, self._secrets_dir, "tls.cert") if tls.cert else None
                ),
                keyfile=_secret_path(tls.key, self._secrets_dir, "tls.key") if tls.key else None,
            )
            if tls.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            options["ssl_context"] = context
            options["security_protocol"] = "SSL"
        if spec.sasl is not None:
            options["security_protocol"] = "SASL_SSL" if context else "SASL_PLAINTEXT"
            options["sasl_mechanism"] = spec.sasl.mechanism
            options["sasl_plain_username"] = spec.sasl.username
            options["sasl_plain_password"] = read_secret(
                spec.sasl.password, self._secrets_dir, "sasl.password"
            )
        return options

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None and not self._stale:
            return self._producer
        if self._producer is not None:
            old, self._producer = self._producer, None
            logger.info("sink %s: replacing the Kafka producer after a failed attempt", self.name)
            # The runner retries or dead-letters every record of the failed
            # attempt, so the old producer must not deliver them too. It is
            # abandoned without a flush, in the background so that this
            # attempt's timeout is not spent on it.
            task = asyncio.create_task(_abandon(old))
            self._abandoning.add(task)
            task.add_done_callback(self._abandoning.discard)
        try:
            options = self._producer_options()
        except ConfigError as exc:
            raise RetryableDeliveryError(f"secret is missing: {exc.issues[0].message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise PermanentDeliveryError(f"invalid TLS files: {exc}") from exc
        producer = AIOKafkaProducer(**options)
        try:
            await producer.start()
        except BaseException as exc:
            await _stop_quietly(producer, 1.0)
            if isinstance(exc, KafkaError):
                raise RetryableDeliveryError(
                    f"cannot connect to {','.join(self._spec.bootstrap_servers)}: {exc}"
                ) from exc
            raise
        self._producer = producer
        self._stale = False
        return producer

    def _topic_for(self, event: Envelope) -> str:
        text = self._topic(event)
        topic = self._topics.get(text)
        if topic is None:
            if len(self._topics) >= _TOPIC_CACHE_SIZE:
                self._topics.clear()
            topic = _TOPIC_INVALID.sub("_", text)[:_MAX_TOPIC] or "_"
            self._topics[text] = topic
        return topic

    def _headers_for(self, event: Envelope) -> list[tuple[str, bytes]]:
        headers = [
            ("eventrouter-id", event.id.encode()),
            ("eventrouter-name", event.name.encode()),
            *self._static_headers,
        ]
        if event.traceparent:
            headers.append(("traceparent", event.traceparent.encode()))
        return headers

    async def send(self, batch: Sequence[Envelope]) -> None:
        try:
            producer = await self._ensure_producer()
            results: list[object] = [None] * len(batch)
            pending: list[tuple[asyncio.Future[Any], list[int]]] = []
            for (topic, partition), records in (await self._group(producer, batch)).items():
                builder = producer.create_batch()
                members: list[int] = []
                for index, key, value, headers in records:
                    if _record_size(key, value, headers) > _MAX_REQUEST_BYTES:
                        results[index] = MessageSizeTooLargeError(
                            f"the record is larger than the producer's max request size "
                            f"of {_MAX_REQUEST_BYTES} bytes; lower spec.limits of the "
                            "EventRouter so that events stay smaller"
                        )
                        continue
                    # `append` returns None when the builder is full. An empty
                    # builder takes any record.
                    if builder.append(timestamp=None, key=key, value=value, headers=headers):
                        members.append(index)
                        continue
                    pending.append(await self._submit(producer, builder, topic, partition, members))
                    builder = producer.create_batch()
                    builder.append(timestamp=None, key=key, value=value, headers=headers)
                    members = [index]
                if members:
                    pending.append(await self._submit(producer, builder, topic, partition, members))
            outcomes = await asyncio.gather(*(f for f, _ in pending), return_exceptions=True)
            for (_, members), outcome in zip(pending, outcomes, strict=True):
                for index in members:
                    results[index] = outcome
            too_large = [
                index
                for _, members in pending
                for index in members
                if isinstance(results[index], MessageSizeTooLargeError)
            ]
            if len(too_large) > 1:
                # The broker rejects a whole record batch that exceeds the
                # topic's max.message.bytes, with the records that fit in it.
                # Sending each again on its own finds the ones that do not fit.
                # NOTE: each of these sends waits out `linger` first, so with a
                # long linger they can use up the attempt's timeout.
                self._stale = True
                for index in too_large:
                    results[index] = await self._send_alone(batch[index])
        except asyncio.CancelledError:
            # The runner's per-attempt timeout: the connection may be dead.
            self._stale = True
            raise
        except KafkaError as exc:
            self._stale = True
            raise _delivery_error(exc, None) from exc
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            # A new producer also starts new sequence numbers. An idempotent
            # producer has used some on any batch that the broker rejected, so
            # the broker would reject its next records for that partition as
            # out of order (OutOfOrderSequenceNumber).
            self._stale = True
            failed = [i for i, result in enumerate(results) if isinstance(result, BaseException)]
            # One error decides for all failed events. A retryable one wins, so
            # that no event that may still succeed is dead-lettered early.
            retryable = [e for e in errors if not _is_permanent(e)]
            error = retryable[0] if retryable else errors[0]
            raise _delivery_error(error, None if len(failed) == len(batch) else failed)

    @staticmethod
    async def _submit(
        producer: AIOKafkaProducer, builder: Any, topic: str, partition: int, members: list[int]
    ) -> tuple[asyncio.Future[Any], list[int]]:
        """Queue a record batch; return its delivery future and the batch indices it carries."""
        # A closed builder is ready to send at once: the batch is complete, so
        # waiting out the producer's linger would only add latency.
        builder.close()
        future: asyncio.Future[Any] = await producer.send_batch(builder, topic, partition=partition)
        return future, members

    async def _group(
        self, producer: AIOKafkaProducer, batch: Sequence[Envelope]
    ) -> dict[tuple[str, int], list[_Record]]:
        """Encode each event as a record and group the records by topic and partition.

        A keyed record goes to the partition that Kafka's default partitioner
        picks (murmur2 of the key), so every producer agrees on it. Records
        without a key go to one partition per topic and call, the next one each
        call, as the Java client's sticky partitioner does.
        """
        groups: dict[tuple[str, int], list[_Record]] = {}
        partitions: dict[str, list[int]] = {}
        sticky: dict[str, int] = {}
        for index, event in enumerate(batch):
            topic = self._topic_for(event)
            known = partitions.get(topic)
            if known is None:
                known = partitions[topic] = sorted(await producer.partitions_for(topic))
            key = self._key(event).encode() if self._key else None
            if key:
                partition = self._partition_for(key, known)
            else:
                key = None
                partition = sticky.get(topic, -1)
                if partition < 0:
                    self._next_sticky += 1
                    partition = sticky[topic] = known[self._next_sticky % len(known)]
            record = (index, key, encode_envelope(event), self._headers_for(event))
            group = groups.get((topic, partition))
            if group is None:
                groups[(topic, partition)] = [record]
            else:
                group.append(record)
        return groups

    def _partition_for(self, key: bytes, partitions: list[int]) -> int:
        cache_key = (key, len(partitions))
        position = self._partition_cache.get(cache_key)
        if position is None:
            # aiokafka's murmur2 is pure Python and costs a few microseconds a
            # key, so positions are cached. The bound keeps the cache small
            # when there are many distinct keys.
            if len(self._partition_cache) >= _PARTITION_CACHE_SIZE:
                self._partition_cache.clear()
            position = (murmur2(key) & 0x7FFFFFFF) % len(partitions)
            self._partition_cache[cache_key] = position
        return partitions[position]

    async def _send_alone(self, event: Envelope) -> object:
        """Produce one record in a record batch of its own; return its metadata or its error.

        After a failure the next call uses a new producer, for the reason given in `send`.
        """
        producer = await self._ensure_producer()
        key = self._key(event).encode() if self._key else None
        try:
            return await producer.send_and_wait(
                self._topic_for(event),
                encode_envelope(event),
                key=key or None,
                headers=self._headers_for(event),
            )
        except KafkaError as exc:
            self._stale = True
            return exc

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _stop_quietly(producer, self._spec.request_timeout)
        if self._abandoning:
            await asyncio.gather(*self._abandoning, return_exceptions=True)


def _record_size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """Upper bound of a record's size in a record batch, as aiokafka's `send` checks it."""
    if len(value) < _MAX_REQUEST_BYTES // 2:
        # Headers are bounded far below this margin, so the estimate is skipped.
        return len(value)
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


def _is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError) and not exc.retriable


def _delivery_error(
    exc: BaseException, failed: list[int] | None
) -> RetryableDeliveryError | PermanentDeliveryError:
    text = str(exc)
    # aiokafka's errors already start with their class name, as in
    # "[Error 10] MessageSizeTooLargeError: ...".
    message = text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
    if _is_permanent(exc):
        return PermanentDeliveryError(message, failed=failed)
    return RetryableDeliveryError(message, failed=failed)


async def _stop_quietly(producer: AIOKafkaProducer, timeout: float) -> None:
    """Stop a producer, letting it deliver what it holds for up to `timeout` seconds."""
    stopped = False
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(producer.stop(), timeout)
        stopped = True
    if not stopped:
        await _abandon(producer)


async def _abandon(producer: AIOKafkaProducer) -> None:
    """Stop a producer's background sender and close its connections, delivering nothing more.

    aiokafka 0.14 has no public call for this. `stop()` waits until every
    record is delivered, and when it is cancelled it leaves the sender task
    running, which would deliver records later that the runner has already
    retried or dead-lettered. So this cancels the sender through private
    attributes.
    """
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        # The sender waits for its in-flight requests, each bounded by
        # request_timeout_ms, before it ends.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, _ABANDON_TIMEOUT)
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        accumulator.fail_all(KafkaError("the producer was closed before it delivered the record"))
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(producer.client.close(), _ABANDON_TIMEOUT)
