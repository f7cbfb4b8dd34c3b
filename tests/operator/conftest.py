"""Fixtures for the operator tests: the CRDs installed once, a client, and a namespace per test.

The API server is shared by the whole test session and CRDs are cluster-wide,
so `eventrouter_crds` creates them once and accepts CRDs that already exist.
Every test works in a namespace of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.conftest import REPO
from tests.k8s.apiserver import KubeApiServer

CRD_DIR = REPO / "crds"
EXAMPLES_DIR = REPO / "examples" / "kubernetes"
GROUP = "eventrouter.io"
VERSION = "v1alpha1"
PLURALS = {"EventRouter": "eventrouters", "EventRoute": "eventroutes", "EventSink": "eventsinks"}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def example_documents() -> list[dict[str, Any]]:
    """The documents of examples/kubernetes, in file order."""
    documents = []
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        documents += load_yaml(path)
    return documents


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    details: Callable[[], str] | None = None,
) -> Any:
    """Poll `predicate` until it returns a true value and return that value.

    Fails the test after `timeout` seconds with `what`, and with the text of
    `details()` (an operator log, say) when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def kube_api(kube_apiserver: KubeApiServer) -> Iterator[client.ApiClient]:
    """A client of the test API server as its admin user."""
    api = config.new_client_from_config(config_file=str(kube_apiserver.kubeconfig))
    yield api
    api.close()


def _crd_established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = extensions.read_custom_resource_definition(name)
    conditions = (crd.status and crd.status.conditions) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _served(custom: client.CustomObjectsApi, plural: str) -> bool:
    try:
        custom.list_namespaced_custom_object(GROUP, VERSION, "default", plural)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


@pytest.fixture(scope="session")
def eventrouter_crds(kube_api: client.ApiClient) -> list[dict[str, Any]]:
    """Create the CRDs of crds/ once per session and wait until they are served.

    A CRD that already exists, created by another test module, is kept as it is.
    """
    extensions = client.ApiextensionsV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    documents = [load_yaml(path)[0] for path in sorted(CRD_DIR.glob("*.yaml"))]
    for document in documents:
        try:
            extensions.create_custom_resource_definition(document)
        except ApiException as exc:
            if exc.status != 409:
                raise
    for document in documents:
        name = document["metadata"]["name"]
        plural = document["spec"]["names"]["plural"]
        wait_until(lambda n=name: _crd_established(extensions, n), f"CRD {name} to be Established")
        wait_until(lambda p=plural: _served(custom, p), f"{plural} to be served")
    return documents


@pytest.fixture
def namespace(kube_apiserver: KubeApiServer, eventrouter_crds: list[dict[str, Any]]) -> str:
    """A new namespace for one test, with the CRDs installed."""
    return kube_apiserver.create_namespace()


def create(api: client.ApiClient, namespace: str, document: dict[str, Any]) -> dict[str, Any]:
    """Create one EventRouter, EventRoute, EventSink or Secret in `namespace`."""
    if document["kind"] == "Secret":
        created = client.CoreV1Api(api).create_namespaced_secret(namespace, document)
        result: dict[str, Any] = api.sanitize_for_serialization(created)
        return result
    body: Any = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[document["kind"]], document
    )
    return dict(body)


def get(api: client.ApiClient, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """Read one custom resource; None when it does not exist."""
    try:
        body: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURALS[kind], name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(body)


def condition(body: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """The status condition of type `kind`, or {} when there is none."""
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


def table_rows(api: client.ApiClient, namespace: str, plural: str) -> dict[str, dict[str, Any]]:
    """The rows `kubectl get <plural>` prints, by object name, as column name to cell."""
    # kubectl requests this Table rendering of the printer columns from the API server.
    request = api.param_serialize(
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*request)
    response.read()
    table = json.loads(response.data)
    headers = [c["name"] for c in table["columnDefinitions"]]
    rows = [dict(zip(headers, r["cells"], strict=True)) for r in table["rows"]]
    return {row["Name"]: row for row in rows}
