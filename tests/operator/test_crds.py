"""The CRDs of crds/ against a real kube-apiserver: generated, accepted, and strict.

Each invalid document is created for real and must fail with 422 and a
message that names the field and carries the rule's message. The same
documents go through the pydantic models, so `kubectl apply` and
`eventrouter validate` reject the same things.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from eventrouter.resources import KINDS
from eventrouter_operator.crds import crd_documents
from tests.conftest import REPO
from tests.operator.conftest import (
    GROUP,
    PLURALS,
    VERSION,
    create,
    example_documents,
    load_yaml,
    table_rows,
)

API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "eventrouter-tests"

KAFKA = {"bootstrapServers": ["kafka-0.kafka:9092"], "topic": "events"}


def document(kind: str, spec: dict[str, Any], name: str = "subject") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def route_spec(**match: Any) -> dict[str, Any]:
    return {"router": "game-events", "sinks": ["console"], "match": match}


# Each case: id, kind, spec, the field path the API server names, and a part
# of its message. For CEL rules that part is the rule's whole message.
INVALID = [
    (
        "two-sink-types",
        "EventSink",
        {"log": {}, "blackhole": {}},
        "spec",
        "set exactly one sink type of log, file, blackhole, http, kafka",
    ),
    (
        "no-sink-type",
        "EventSink",
        {"timeout": "5s"},
        "spec",
        "set exactly one sink type of log, file, blackhole, http, kafka",
    ),
    (
        "property-two-operators",
        "EventRoute",
        route_spec(properties=[{"key": "sku", "equals": "gems", "prefix": "com."}]),
        "spec.match.properties[0]",
        "set exactly one of equals, in, exists, prefix or atLeast",
    ),
    (
        "secret-file-and-env",
        "EventRouter",
        {"auth": {"apiKeys": {"file": "/etc/keys", "env": "API_KEYS"}}},
        "spec.auth.apiKeys",
        "set exactly one of secretKeyRef, file or env",
    ),
    (
        "secret-header-no-source",
        "EventSink",
        {
            "http": {
                "url": "https://ads.example.com/v1/events",
                "secretHeaders": [{"name": "Authorization", "valueFrom": {}}],
            }
        },
        "spec.http.secretHeaders[0].valueFrom",
        "set exactly one of secretKeyRef, file or env",
    ),
    (
        "backoff-strings",
        "EventSink",
        {"log": {}, "retry": {"backoff": {"initial": "20s", "max": "10s"}}},
        "spec.retry.backoff",
        "initial must not exceed max",
    ),
    (
        "backoff-seconds-and-string",
        "EventSink",
        {"log": {}, "retry": {"backoff": {"initial": 20, "max": "10s"}}},
        "spec.retry.backoff",
        "initial must not exceed max",
    ),
    (
        "backoff-seconds",
        "EventSink",
        {"log": {}, "retry": {"backoff": {"initial": 20, "max": 10}}},
        "spec.retry.backoff",
        "initial must not exceed max",
    ),
    (
        "backoff-initial-over-default-max",
        "EventSink",
        {"log": {}, "retry": {"backoff": {"initial": "1m"}}},
        "spec.retry.backoff",
        "initial must not exceed max",
    ),
    (
        "reject-queue-below-batch",
        "EventRouter",
        {"queue": {"size": 100, "overflow": "reject"}, "limits": {"maxBatchEvents": 500}},
        "spec",
        "with overflow reject or block, queue.size must be at least limits.maxBatchEvents",
    ),
    (
        "block-queue-below-batch",
        "EventRouter",
        {"queue": {"size": 100, "overflow": "block"}, "limits": {"maxBatchEvents": 500}},
        "spec",
        "with overflow reject or block, queue.size must be at least limits.maxBatchEvents",
    ),
    (
        "reject-queue-below-default-batch",
        "EventRouter",
        {"queue": {"size": 499, "overflow": "reject"}},
        "spec",
        "with overflow reject or block, queue.size must be at least limits.maxBatchEvents",
    ),
    (
        "kafka-idempotence-acks-1",
        "EventSink",
        {"kafka": {**KAFKA, "acks": 1}},
        "spec.kafka",
        "idempotence requires acks: all; set idempotence: false to use acks 0 or 1",
    ),
    (
        "kafka-tls-cert-without-key",
        "EventSink",
        {"kafka": {**KAFKA, "tls": {"cert": {"file": "/etc/kafka/client.pem"}}}},
        "spec.kafka.tls",
        "set both cert and key for client authentication, or neither",
    ),
    (
        "autoscaling-min-over-max",
        "EventRouter",
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        "spec.autoscaling",
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "autoscaling-min-over-default-max",
        "EventRouter",
        {"autoscaling": {"minReplicas": 5}},
        "spec.autoscaling",
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "names-over-max-items",
        "EventRoute",
        route_spec(names=[f"level_{i}" for i in range(257)]),
        "spec.match.names",
        "must have at most 256 items",
    ),
    (
        "router-over-max-length",
        "EventRoute",
        {"router": "r" * 254, "sinks": ["console"]},
        "spec.router",
        "may not be more than 253 bytes",
    ),
    (
        "url-over-max-length",
        "EventSink",
        {"http": {"url": "https://example.com/" + "a" * 4096}},
        "spec.http.url",
        "may not be more than 4096 bytes",
    ),
    (
        "invalid-overflow-enum",
        "EventRouter",
        {"queue": {"overflow": "dropAll"}},
        "spec.queue.overflow",
        'Unsupported value: "dropAll"',
    ),
    (
        "invalid-acks-enum",
        "EventSink",
        {"kafka": {**KAFKA, "acks": "2"}},
        "spec.kafka.acks",
        'Unsupported value: "2"',
    ),
    (
        "negative-duration",
        "EventRouter",
        {"sessions": {"idleTimeout": -5}},
        "spec.sessions.idleTimeout",
        "should be greater than or equal to 0",
    ),
    (
        "duration-without-unit",
        "EventSink",
        {"log": {}, "timeout": "5 minutes"},
        "spec.timeout",
        "should match",
    ),
]

# Documents on the edge of a rule that both the API server and pydantic accept.
VALID_EDGES = [
    (
        "backoff-mixed-forms",
        "EventSink",
        {"log": {}, "retry": {"backoff": {"initial": "500ms", "max": 1}}},
    ),
    ("backoff-equal", "EventSink", {"log": {}, "retry": {"backoff": {"initial": "2s", "max": 2}}}),
    (
        "kafka-acks-1-no-idempotence",
        "EventSink",
        {"kafka": {**KAFKA, "acks": 1, "idempotence": False}},
    ),
    (
        "kafka-tls-cert-and-key",
        "EventSink",
        {"kafka": {**KAFKA, "tls": {"cert": {"file": "/c.pem"}, "key": {"file": "/k.pem"}}}},
    ),
    ("reject-queue-equal-batch", "EventRouter", {"queue": {"size": 500, "overflow": "reject"}}),
    (
        "autoscaling-min-equals-max",
        "EventRouter",
        {"autoscaling": {"minReplicas": 4, "maxReplicas": 4}},
    ),
    ("property-in-only", "EventRoute", route_spec(properties=[{"key": "currency", "in": ["USD"]}])),
    ("secret-env-only", "EventRouter", {"auth": {"apiKeys": {"env": "API_KEYS"}}}),
]

EXPECTED_NAMES = {
    "EventRouter": (["erouter"], ["Ready", "Replicas", "Available", "Routes", "Reason", "Age"]),
    "EventRoute": (["eroute"], ["Router", "Sinks", "Accepted", "ResolvedRefs", "Reason", "Age"]),
    "EventSink": (["esink"], ["Ready", "Reason", "Dead-Letter", "Age"]),
}


def rejection(exc: ApiException) -> str:
    return str(json.loads(exc.body)["message"])


def without_values(message: str) -> str:
    """A pydantic message without the bracketed values it adds, e.g. "(got file, env)"."""
    return re.sub(r" \([^)]*\)", "", message)


def test_crds_match_generator() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventrouter_operator.crds", "--check", str(REPO / "crds")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_crds_apply(kube_api: client.ApiClient, eventrouter_crds: list[dict[str, Any]]) -> None:
    """Server-side apply of each file passes the API server's checks, CEL compilation included."""
    extensions = client.ApiextensionsV1Api(kube_api)
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = load_yaml(path)[0]
        extensions.patch_custom_resource_definition(
            crd["metadata"]["name"],
            crd,
            field_manager=FIELD_MANAGER,
            force=True,
            dry_run="All",
            _content_type="application/apply-patch+yaml",
        )


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_crd_names_and_columns(
    kube_api: client.ApiClient, eventrouter_crds: list[dict[str, Any]], kind: str
) -> None:
    short_names, columns = EXPECTED_NAMES[kind]
    name = f"{PLURALS[kind]}.{GROUP}"
    crd = kube_api.sanitize_for_serialization(
        client.ApiextensionsV1Api(kube_api).read_custom_resource_definition(name)
    )
    names = crd["spec"]["names"]
    (version,) = crd["spec"]["versions"]
    established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]

    assert names["shortNames"] == short_names
    assert "eventrouting" in names["categories"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["name"] == VERSION
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == columns
    assert established[0]["status"] == "True"


def test_printer_columns_show_status(kube_api: client.ApiClient, namespace: str) -> None:
    """`kubectl get eventroutes` shows a route's ResolvedRefs and reason from its status."""
    custom = client.CustomObjectsApi(kube_api)
    create(kube_api, namespace, document("EventRoute", route_spec(), name="purchases"))
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "eventroutes",
        "purchases",
        {
            "status": {
                "conditions": [
                    {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok"},
                    {
                        "type": "ResolvedRefs",
                        "status": "False",
                        "reason": "SinkNotFound",
                        "message": "EventSink console not found",
                    },
                ]
            }
        },
    )

    row = table_rows(kube_api, namespace, "eventroutes")["purchases"]

    assert row["Name"] == "purchases"
    assert row["Router"] == "game-events"
    assert row["Accepted"] == "True"
    assert row["ResolvedRefs"] == "False"
    assert row["Reason"] == "SinkNotFound"


def cel_rules() -> set[tuple[str, str]]:
    """(kind, message) of every CEL rule in the generated CRDs."""
    kinds = {f"{plural}.yaml": kind for kind, plural in PLURALS.items()}
    rules = set()

    def walk(node: Any, kind: str) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                rules.add((kind, rule["message"]))
            for value in node.values():
                walk(value, kind)
        elif isinstance(node, list):
            for value in node:
                walk(value, kind)

    for file_name, crd in crd_documents().items():
        walk(crd, kinds[file_name])
    return rules


def test_every_rule_has_a_case() -> None:
    """A new CEL rule without a row in INVALID fails here."""
    covered = {(kind, message) for _, kind, _, _, message in INVALID}

    assert cel_rules() - covered == set()


@pytest.mark.parametrize(
    ("kind", "spec", "field", "message"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_document_rejected(
    kube_api: client.ApiClient,
    namespace: str,
    kind: str,
    spec: dict[str, Any],
    field: str,
    message: str,
) -> None:
    body = document(kind, spec)

    with pytest.raises(ApiException) as raised:
        create(kube_api, namespace, copy.deepcopy(body))
    text = rejection(raised.value)

    assert raised.value.status == 422, text
    assert f"{field}: " in text
    assert message in text


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [(c[1], c[2], c[4]) for c in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_document_rejected_offline(kind: str, spec: dict[str, Any], message: str) -> None:
    """The pydantic models reject every document that the API server rejects, with its message."""
    with pytest.raises(ValidationError) as raised:
        KINDS[kind].model_validate(document(kind, spec))
    errors = [without_values(str(e["msg"])) for e in raised.value.errors()]

    if (kind, message) in cel_rules():
        assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    ("kind", "spec"), [c[1:] for c in VALID_EDGES], ids=[c[0] for c in VALID_EDGES]
)
def test_edge_document_accepted(
    kube_api: client.ApiClient, namespace: str, kind: str, spec: dict[str, Any]
) -> None:
    body = document(kind, spec)

    created = create(kube_api, namespace, copy.deepcopy(body))
    KINDS[kind].model_validate(body)

    assert created["spec"] == spec


def test_examples_accepted(kube_api: client.ApiClient, namespace: str) -> None:
    """Every document of examples/kubernetes, at least one of each kind, is stored whole."""
    documents = example_documents()
    created = [create(kube_api, namespace, copy.deepcopy(d)) for d in documents]
    kinds = {c["kind"] for c in created}

    assert kinds == {"EventRouter", "EventRoute", "EventSink"}
    for sent, stored in zip(documents, created, strict=True):
        # A field the schema does not declare would be pruned without an error.
        assert stored["spec"] == sent["spec"], sent["metadata"]["name"]
