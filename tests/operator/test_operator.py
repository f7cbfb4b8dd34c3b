"""The real operator against a real kube-apiserver.

Each test runs `eventrouter operator -n <namespace> --standalone` as a
subprocess in a namespace of its own and watches what it does to the API
server. There is no controller manager, scheduler or node, so no pod ever
runs, Deployments never become ready and owner references are never
garbage-collected. The tests check the objects and statuses instead.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from eventrouter_operator.builders import DEFAULT_IMAGE
from eventrouter_operator.reconcile import Reconciler
from tests.conftest import RouterProcess, read_jsonl, sign_token
from tests.k8s.apiserver import KubeApiServer
from tests.operator.conftest import (
    GROUP,
    PLURALS,
    VERSION,
    condition,
    create,
    example_documents,
    get,
    table_rows,
    wait_until,
)

API_VERSION = f"{GROUP}/{VERSION}"
SECRETS_DIR = "/var/run/secrets/eventrouter"
API_KEY = "server-key-0123456789"
SESSION_KEY = "example-session-key-0123456789abcdef"
ROUTER_LABELS = {
    "app.kubernetes.io/name": "eventrouter",
    "app.kubernetes.io/component": "router",
    "app.kubernetes.io/part-of": "eventrouter",
    "app.kubernetes.io/managed-by": "eventrouter-operator",
}
OWNED_KINDS = (
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
)


# --- the operator process ----------------------------------------------------------


@dataclass
class OperatorProcess:
    """A running `eventrouter operator` subprocess and its log file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"operator log ({self.log_path}), last {lines} lines:\n{text}"

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """Poll `predicate` like `wait_until`; fail early if the operator exits."""

        def check() -> Any:
            if self.process.poll() is not None:
                pytest.fail(f"operator exited with {self.process.returncode}\n{self.tail()}")
            return predicate()

        return wait_until(check, what, timeout=timeout, details=self.tail)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_operator(
    kube_apiserver: KubeApiServer, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Return a function that starts `eventrouter operator -n NAMESPACE [--standalone]`.

    Every operator that it starts stops at teardown.
    """
    started: list[OperatorProcess] = []

    def start(namespace: str, *, standalone: bool = True) -> OperatorProcess:
        command = [sys.executable, "-m", "eventrouter", "operator", "-n", namespace]
        if standalone:
            command.append("--standalone")
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # The operator stops with the test process, even when it is killed.
            # NOTE: without setpriv, an operator outlives a killed test process.
            command = [setpriv, "--pdeathsig", "TERM", *command]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTROUTER_")}
        environment.update({"KUBECONFIG": str(kube_apiserver.kubeconfig), "PYTHONUNBUFFERED": "1"})
        log_path = tmp_path / f"operator-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path
            )
        operator = OperatorProcess(process, log_path)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()


@pytest.fixture
def operator(start_operator: Callable[..., OperatorProcess], namespace: str) -> OperatorProcess:
    return start_operator(namespace)


# --- documents and reads -----------------------------------------------------------


def router_doc(name: str = "game-events", **spec: Any) -> dict[str, Any]:
    """An EventRouter that takes API keys from the Secret `router-auth`."""
    auth = {"apiKeys": {"secretKeyRef": {"name": "router-auth", "key": "api-keys"}}}
    return {
        "apiVersion": API_VERSION,
        "kind": "EventRouter",
        "metadata": {"name": name},
        "spec": {"auth": auth, **spec},
    }


def route_doc(
    name: str, sinks: list[str], router: str = "game-events", **match: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {"router": router, "sinks": sinks}
    if match:
        spec["match"] = match
    return {
        "apiVersion": API_VERSION,
        "kind": "EventRoute",
        "metadata": {"name": name},
        "spec": spec,
    }


def sink_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "EventSink",
        "metadata": {"name": name},
        "spec": spec,
    }


def secret_doc(name: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {k.replace("_", "-"): v for k, v in data.items()},
    }


def example_secret() -> dict[str, Any]:
    """The Secret game-events-auth, which examples/kubernetes/router.yaml requires."""
    return secret_doc("game-events-auth", session_key=SESSION_KEY, api_keys=f"{API_KEY}\n")


def read(api: client.ApiClient, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One built-in object as a plain dict, as kubectl shows it; None when it does not exist."""
    readers = {
        "ConfigMap": client.CoreV1Api(api).read_namespaced_config_map,
        "Service": client.CoreV1Api(api).read_namespaced_service,
        "Secret": client.CoreV1Api(api).read_namespaced_secret,
        "Deployment": client.AppsV1Api(api).read_namespaced_deployment,
        "HorizontalPodAutoscaler": (
            client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler
        ),
        "PodDisruptionBudget": client.PolicyV1Api(api).read_namespaced_pod_disruption_budget,
    }
    try:
        found = readers[kind](name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    result: dict[str, Any] = api.sanitize_for_serialization(found)
    return result


def config_documents(api: client.ApiClient, namespace: str, router: str) -> list[dict[str, Any]]:
    """Return the documents of the router's ConfigMap, or [] while it is missing or not YAML."""
    configmap = read(api, "ConfigMap", namespace, f"{router}-config")
    if configmap is None:
        return []
    try:
        documents = list(yaml.safe_load_all((configmap.get("data") or {}).get("config.yaml", "")))
    except yaml.YAMLError:
        return []
    return [d for d in documents if isinstance(d, dict)]


def config_names(api: client.ApiClient, namespace: str, router: str, kind: str) -> set[str]:
    """Names of the `kind` documents in the router's ConfigMap."""
    documents = config_documents(api, namespace, router)
    return {d["metadata"]["name"] for d in documents if d.get("kind") == kind}


def status_of(
    api: client.ApiClient, namespace: str, kind: str, name: str, condition_type: str
) -> dict[str, Any]:
    return condition(get(api, namespace, kind, name), condition_type)


def resource_versions(api: client.ApiClient, namespace: str) -> dict[str, str]:
    """resourceVersion of every EventRouter, EventRoute, EventSink and owned object."""
    versions = {}
    custom = client.CustomObjectsApi(api)
    for kind, plural in PLURALS.items():
        listed: Any = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        for item in listed["items"]:
            versions[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    for router in [k.split("/", 1)[1] for k in versions if k.startswith("EventRouter/")]:
        for kind in OWNED_KINDS:
            name = owned_name(kind, router)
            body = read(api, kind, namespace, name)
            if body is not None:
                versions[f"{kind}/{name}"] = body["metadata"]["resourceVersion"]
    return versions


def wait_condition(
    operator: OperatorProcess,
    api: client.ApiClient,
    namespace: str,
    kind: str,
    name: str,
    condition_type: str,
    status: str,
    reason: str | None = None,
) -> dict[str, Any]:
    """Wait until the condition `condition_type` has `status` (and `reason`) and return it."""

    def reached() -> dict[str, Any] | None:
        found = status_of(api, namespace, kind, name, condition_type)
        if found.get("status") != status or reason not in (None, found.get("reason")):
            return None
        return found

    expected = f"{condition_type}={status}" + (f" with reason {reason}" if reason else "")
    result: dict[str, Any] = operator.wait(reached, f"{kind} {name} to report {expected}")
    return result


def owned_name(kind: str, router: str) -> str:
    """The name of the router's object of `kind`."""
    return f"{router}-config" if kind == "ConfigMap" else router


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def wait_for_examples(api: client.ApiClient, namespace: str, operator: OperatorProcess) -> None:
    """Wait until the operator has reconciled examples/kubernetes and reported on everything."""

    def done() -> bool:
        router = get(api, namespace, "EventRouter", "game-events")
        routes_done = all(
            status_of(api, namespace, "EventRoute", d["metadata"]["name"], "ResolvedRefs")
            for d in example_documents()
            if d["kind"] == "EventRoute"
        )
        status = (router or {}).get("status") or {}
        return status.get("routeCount") == 5 and routes_done

    operator.wait(done, "the examples to be reconciled")


def create_examples(api: client.ApiClient, namespace: str) -> None:
    create(api, namespace, example_secret())
    for document in example_documents():
        create(api, namespace, document)


# --- the examples ------------------------------------------------------------------


def test_examples_objects(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """examples/kubernetes becomes a ConfigMap, Deployment, Service, HPA and PDB."""
    create_examples(kube_api, namespace)
    wait_for_examples(kube_api, namespace, operator)
    router = get(kube_api, namespace, "EventRouter", "game-events")
    assert router is not None
    uid = router["metadata"]["uid"]
    objects = {
        kind: read(kube_api, kind, namespace, owned_name(kind, "game-events"))
        for kind in OWNED_KINDS
    }

    for kind, body in objects.items():
        assert body is not None, kind
        labels = body["metadata"]["labels"]
        (owner,) = body["metadata"]["ownerReferences"]
        assert labels == {**ROUTER_LABELS, "app.kubernetes.io/instance": "game-events"}, kind
        assert owner["apiVersion"] == API_VERSION, kind
        assert owner["kind"] == "EventRouter", kind
        assert owner["name"] == "game-events", kind
        assert owner["uid"] == uid, kind
        assert owner["controller"] is True, kind
        assert owner["blockOwnerDeletion"] is True, kind

    config = config_documents(kube_api, namespace, "game-events")
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in config)
    example_kinds = sorted((d["kind"], d["metadata"]["name"]) for d in example_documents())
    assert kinds == example_kinds
    # The ConfigMap names Secrets and never contains their values.
    assert API_KEY not in objects["ConfigMap"]["data"]["config.yaml"]
    assert SESSION_KEY not in objects["ConfigMap"]["data"]["config.yaml"]

    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    router_container = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in router_container["ports"]}
    mounts = {m["name"]: m for m in router_container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    security = router_container["securityContext"]
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "eventrouter",
        "app.kubernetes.io/instance": "game-events",
    }
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == (
        "game-events"
    )
    assert router_container["args"][:3] == ["serve", "-f", "/etc/eventrouter/config.yaml"]
    assert ports == {"ingest": 7350, "admin": 7351}
    assert router_container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert router_container["readinessProbe"]["httpGet"]["port"] == "admin"
    assert router_container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert router_container["livenessProbe"]["httpGet"]["port"] == "admin"
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert router_container["resources"]["requests"] == {"cpu": "500m", "memory": "256Mi"}
    assert {"name": "EVENTROUTER_SECRETS_DIR", "value": SECRETS_DIR} in router_container["env"]
    assert volumes["config"]["configMap"]["name"] == "game-events-config"
    assert mounts["config"]["mountPath"] == "/etc/eventrouter"

    secret_volumes = {v["secret"]["secretName"]: v for v in volumes.values() if v.get("secret")}
    assert sorted(secret_volumes) == ["game-events-auth"]
    volume = secret_volumes["game-events-auth"]
    assert volume["secret"]["optional"] is True
    assert mounts[volume["name"]]["mountPath"] == f"{SECRETS_DIR}/game-events-auth"
    assert mounts[volume["name"]]["readOnly"] is True

    # The file sinks write below /var/lib/eventrouter on a read-only root filesystem.
    data_mounts = {
        m["mountPath"] for m in mounts.values() if volumes[m["name"]].get("emptyDir") is not None
    }
    assert data_mounts == {"/var/lib/eventrouter"}

    service = objects["Service"]
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert service_ports == {"ingest": (7350, "ingest"), "admin": (7351, "admin")}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    status = router["status"]
    ready = condition(router, "Ready")
    progressing = condition(router, "Progressing")
    degraded = condition(router, "Degraded")
    assert ready["status"] == "False"
    assert ready["reason"] == "ReplicasNotReady"
    assert "0 of 2 replicas ready" in ready["message"]
    assert progressing["status"] == "True"
    assert "0 of 2 replicas ready" in progressing["message"]
    assert degraded["status"] == "False", degraded["message"]
    assert status["routeCount"] == 5
    assert status["readyReplicas"] == 0
    assert status["observedGeneration"] == router["metadata"]["generation"]
    for document in example_documents():
        if document["kind"] == "EventSink":
            sink_ready = status_of(
                kube_api, namespace, "EventSink", document["metadata"]["name"], "Ready"
            )
            assert sink_ready["status"] == "True", sink_ready


def _mirror_pod(
    api: client.ApiClient, namespace: str, deployment: dict[str, Any], root: Path
) -> dict[str, str]:
    """Recreate the pod's writable and Secret volumes under `root`, as the kubelet would.

    Returns EVENTROUTER_* variables of the container whose values are paths,
    rewritten into `root`.
    """
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container(deployment)["volumeMounts"]:
        volume = volumes[mount["name"]]
        folder = root / PurePosixPath(mount["mountPath"]).relative_to("/")
        if volume.get("emptyDir") is not None:
            folder.mkdir(parents=True, exist_ok=True)
        elif volume.get("secret") is not None:
            secret = read(api, "Secret", namespace, volume["secret"]["secretName"])
            folder.mkdir(parents=True, exist_ok=True)
            for key, value in ((secret or {}).get("data") or {}).items():
                (folder / key).write_bytes(base64.b64decode(value))
    return {
        e["name"]: str(root / PurePosixPath(e["value"]).relative_to("/"))
        for e in container(deployment)["env"]
        if e.get("value", "").startswith("/")
    }


def test_example_config_serves(
    kube_api: client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    router_factory: Callable[..., RouterProcess],
    tmp_path: Path,
) -> None:
    """The ConfigMap's config.yaml runs in `eventrouter serve` and routes as the examples define.

    Only what a laptop lacks is changed: paths move below a temporary root
    that has the pod's Secret and emptyDir volumes, as the kubelet mounts them.
    """
    create_examples(kube_api, namespace)
    wait_for_examples(kube_api, namespace, operator)
    deployment = read(kube_api, "Deployment", namespace, "game-events")
    assert deployment is not None
    root = tmp_path / "pod"
    env = _mirror_pod(kube_api, namespace, deployment, root)

    documents = config_documents(kube_api, namespace, "game-events")
    for document in documents:
        file_spec = document["spec"].get("file") if document["kind"] == "EventSink" else None
        if file_spec:
            file_spec["path"] = str(root / PurePosixPath(file_spec["path"]).relative_to("/"))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    stdout_path = tmp_path / "router-stdout.jsonl"
    with stdout_path.open("wb") as stdout:
        router = router_factory([config_path], env=env, stdout=stdout)

    data = root / "var/lib/eventrouter"
    paid = {"sku": "com.example.mygame.gems_100", "currency": "USD", "price": "4.99"}
    free = {"sku": "com.example.mygame.daily_reward", "currency": "USD", "price": "0"}
    events = [
        {"name": "purchase", "properties": paid, "external": True},
        {"name": "purchase", "properties": free, "external": True},
        {"name": "purchase_verified", "properties": {"receipt_status": "valid"}, "external": False},
    ]
    response = httpx.post(
        f"{router.url}/v2/events",
        json={"events": events},
        headers={"X-Api-Key": API_KEY},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    # A game client's session token, signed with the session key from the Secret.
    token = sign_token(key=SESSION_KEY)
    response = httpx.post(
        f"{router.url}/v2/event",
        json={"name": "tutorial_step_2", "properties": {}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text

    def delivered(sink: str) -> float:
        return router.metric("eventrouter_sink_events_total", sink=sink, outcome="delivered")

    router.wait_for(lambda: delivered("console") == 4, what="4 events in the log sink")
    router.wait_for(lambda: delivered("purchases") == 1, what="the paid purchase")
    router.wait_for(lambda: delivered("verified-purchases") == 1, what="the verified purchase")
    router.wait_for(lambda: delivered("ad-attribution") == 1, what="the tutorial step")
    purchases = read_jsonl(data / "purchases.jsonl")
    verified = read_jsonl(data / "verified-purchases.jsonl")

    assert [(e["name"], e["properties"]["sku"]) for e in purchases] == [("purchase", paid["sku"])]
    assert [e["name"] for e in verified] == ["purchase_verified"]
    assert router.metric("eventrouter_route_matches_total", route="purchases") == 1
    assert delivered("sessions") == 0
    assert read_jsonl(data / "sessions.jsonl") == []
    assert sorted(e["name"] for e in read_jsonl(stdout_path)) == [
        "purchase",
        "purchase",
        "purchase_verified",
        "tutorial_step_2",
    ]


# --- changes -----------------------------------------------------------------------


def test_route_edit_updates_configmap(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create_examples(kube_api, namespace)
    wait_for_examples(kube_api, namespace, operator)
    names = ["purchase", "purchase_refunded", "purchase_restored"]

    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "eventroutes", "purchases", {"spec": {"match": {"names": names}}}
    )

    def served_names() -> list[str] | None:
        for document in config_documents(kube_api, namespace, "game-events"):
            if document["kind"] == "EventRoute" and document["metadata"]["name"] == "purchases":
                served: list[str] = document["spec"]["match"]["names"]
                return served if served == names else None
        return None

    operator.wait(served_names, "the edited match names in the ConfigMap", timeout=10)
    operator.wait(
        lambda: (
            status_of(kube_api, namespace, "EventRoute", "purchases", "Accepted").get(
                "observedGeneration"
            )
            == 2
        ),
        "the route's status to observe generation 2",
        timeout=10,
    )


def _project_configmap(configmap: dict[str, Any], folder: Path, version: int) -> None:
    """Write a ConfigMap volume the way the kubelet does: new files, then one symlink swap.

    Each key is a symlink through `..data`, which points at a folder of the
    current version, and `..data` is replaced by a rename.
    """
    version_dir = folder / f"..v{version}"
    version_dir.mkdir(parents=True)
    for key, value in configmap["data"].items():
        (version_dir / key).write_text(value)
        link = folder / key
        if not link.is_symlink():
            link.symlink_to(Path("..data") / key)
    (folder / "..data_tmp").symlink_to(version_dir.name)
    (folder / "..data_tmp").replace(folder / "..data")


def test_configmap_change_reloads_router(
    kube_api: client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    router_factory: Callable[..., RouterProcess],
    tmp_path: Path,
) -> None:
    """A route edit reaches a router that reads the mounted ConfigMap, without a restart."""
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    create(kube_api, namespace, router_doc())
    create(kube_api, namespace, sink_doc("console", log={}))
    create(kube_api, namespace, route_doc("gameplay", ["console"], names=["level_up"]))
    operator.wait(
        lambda: config_names(kube_api, namespace, "game-events", "EventRoute") == {"gameplay"},
        "the ConfigMap",
    )
    deployment = operator.wait(
        lambda: read(kube_api, "Deployment", namespace, "game-events"), "the Deployment"
    )
    root = tmp_path / "pod"
    env = _mirror_pod(kube_api, namespace, deployment, root)
    config_dir = root / "etc/eventrouter"
    configmap = read(kube_api, "ConfigMap", namespace, "game-events-config")
    assert configmap is not None
    _project_configmap(configmap, config_dir, 1)
    router = router_factory([config_dir / "config.yaml"], env=env)
    pid = router.process.pid

    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "eventroutes",
        "gameplay",
        {"spec": {"match": {"names": ["level_up", "level_down"]}}},
    )

    def edited_configmap() -> dict[str, Any] | None:
        found = read(kube_api, "ConfigMap", namespace, "game-events-config")
        if found is not None and "level_down" in found["data"]["config.yaml"]:
            return found
        return None

    edited = operator.wait(edited_configmap, "the edited route in the ConfigMap")
    _project_configmap(edited, config_dir, 2)

    def active_names() -> list[str]:
        routes = httpx.get(f"{router.admin_url}/v1/routes", timeout=5).json()["routes"]
        names: list[str] = routes[0]["spec"]["match"]["names"]
        return names

    router.wait_for(lambda: active_names() == ["level_up", "level_down"], what="the reload")
    response = httpx.post(
        f"{router.url}/v2/event",
        json={"name": "level_down", "properties": {}},
        headers={"X-Api-Key": API_KEY},
        timeout=10,
    )

    assert response.status_code == 200, response.text
    router.wait_for(
        lambda: router.metric("eventrouter_route_matches_total", route="gameplay") == 1,
        what="level_down to match the edited route",
    )
    assert router.process.pid == pid
    assert router.process.poll() is None


def test_router_delete_keeps_owner_references(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """Deleting an EventRouter leaves owned objects that carry its uid as controller owner.

    The garbage collector of kube-controller-manager deletes those objects in
    a real cluster. This API server runs without one, so they stay, and the
    test checks the owner references that the collector would follow.
    """
    create_examples(kube_api, namespace)
    wait_for_examples(kube_api, namespace, operator)
    router = get(kube_api, namespace, "EventRouter", "game-events")
    assert router is not None
    uid = router["metadata"]["uid"]

    client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "eventrouters", "game-events"
    )
    # kopf put a finalizer on the router for its timer, and must take it off.
    operator.wait(
        lambda: get(kube_api, namespace, "EventRouter", "game-events") is None,
        "the EventRouter to be deleted",
    )

    for kind in OWNED_KINDS:
        body = read(kube_api, kind, namespace, owned_name(kind, "game-events"))
        assert body is not None, kind
        owners = body["metadata"]["ownerReferences"]
        assert [(o["uid"], o["controller"]) for o in owners] == [(uid, True)], kind
    operator.wait(
        lambda: (
            status_of(kube_api, namespace, "EventRoute", "purchases", "Accepted").get("reason")
            == "RouterNotFound"
        ),
        "the route to report RouterNotFound",
    )


# --- the reported cases --------------------------------------------------------------


def test_dangling_sink_reference(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """A route that names a missing EventSink reports it, and the other route is served."""
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    create(kube_api, namespace, router_doc())
    create(kube_api, namespace, sink_doc("console", log={}))
    create(kube_api, namespace, route_doc("gameplay", ["console"], names=["level_*"]))
    create(kube_api, namespace, route_doc("billing", ["billing-webhook"], names=["purchase"]))

    resolved = wait_condition(
        operator, kube_api, namespace, "EventRoute", "billing", "ResolvedRefs", "False"
    )
    operator.wait(
        lambda: config_names(kube_api, namespace, "game-events", "EventRoute") == {"gameplay"},
        "the ConfigMap to serve the gameplay route",
    )
    degraded = wait_condition(
        operator, kube_api, namespace, "EventRouter", "game-events", "Degraded", "True"
    )
    row = table_rows(kube_api, namespace, "eventroutes")["billing"]

    assert resolved["reason"] == "SinkNotFound"
    assert "billing-webhook" in resolved["message"]
    assert status_of(kube_api, namespace, "EventRoute", "gameplay", "ResolvedRefs")["status"] == (
        "True"
    )
    assert "billing" in degraded["message"]
    assert row["ResolvedRefs"] == "False"
    assert row["Reason"] == "SinkNotFound"

    create(
        kube_api,
        namespace,
        sink_doc("billing-webhook", http={"url": "https://billing.example.com/events"}),
    )

    wait_condition(operator, kube_api, namespace, "EventRoute", "billing", "ResolvedRefs", "True")
    operator.wait(
        lambda: (
            config_names(kube_api, namespace, "game-events", "EventRoute")
            == {"gameplay", "billing"}
        ),
        "the billing route in the ConfigMap",
    )
    wait_condition(operator, kube_api, namespace, "EventRouter", "game-events", "Degraded", "False")


def test_missing_secret(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """A sink whose Secret is missing says so and recovers when the Secret appears."""
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    create(kube_api, namespace, router_doc())
    create(kube_api, namespace, sink_doc("console", log={}))
    header = {
        "name": "Authorization",
        "prefix": "Bearer ",
        "valueFrom": {"secretKeyRef": {"name": "ads-token", "key": "token"}},
    }
    create(
        kube_api,
        namespace,
        sink_doc(
            "ad-network",
            http={"url": "https://ads.example.com/v1/events", "secretHeaders": [header]},
        ),
    )
    create(kube_api, namespace, route_doc("everything", ["console"]))
    create(kube_api, namespace, route_doc("installs", ["ad-network"], names=["install"]))
    pid = operator.process.pid

    ready = wait_condition(
        operator, kube_api, namespace, "EventSink", "ad-network", "Ready", "False"
    )
    degraded = wait_condition(
        operator, kube_api, namespace, "EventRouter", "game-events", "Degraded", "True"
    )
    served = config_names(kube_api, namespace, "game-events", "EventRoute")
    deployment = read(kube_api, "Deployment", namespace, "game-events")
    assert deployment is not None
    volumes = {
        v["secret"]["secretName"]: v
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if v.get("secret")
    }
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}

    assert ready["reason"] == "SecretNotFound"
    assert "ads-token" in ready["message"]
    assert status_of(kube_api, namespace, "EventSink", "console", "Ready")["status"] == "True"
    assert status_of(kube_api, namespace, "EventRoute", "everything", "ResolvedRefs")["status"] == (
        "True"
    )
    # The sink still runs: it reads the token at each attempt, once the Secret is mounted.
    assert served == {"everything", "installs"}
    assert volumes["ads-token"]["secret"]["optional"] is True
    assert mounts[volumes["ads-token"]["name"]] == f"{SECRETS_DIR}/ads-token"
    assert "ad-network" in degraded["message"]

    create(kube_api, namespace, secret_doc("ads-token", token="ads-0123456789"))

    wait_condition(operator, kube_api, namespace, "EventSink", "ad-network", "Ready", "True")
    wait_condition(operator, kube_api, namespace, "EventRouter", "game-events", "Degraded", "False")
    assert operator.process.poll() is None
    assert operator.process.pid == pid


def test_router_auth_problems(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """Degraded names a missing auth Secret, and apiKeys left unset, which stop the pod."""
    create(kube_api, namespace, router_doc("keyed"))
    open_router = router_doc("open")
    del open_router["spec"]["auth"]
    create(kube_api, namespace, open_router)

    keyed = wait_condition(
        operator, kube_api, namespace, "EventRouter", "keyed", "Degraded", "True"
    )
    unkeyed = wait_condition(
        operator, kube_api, namespace, "EventRouter", "open", "Degraded", "True"
    )

    assert keyed["reason"] == "ResourcesNotReady"
    assert "Secret router-auth of spec.auth not found" in keyed["message"]
    assert unkeyed["reason"] == "ResourcesNotReady"
    assert "spec.auth.apiKeys is not set" in unkeyed["message"]

    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))

    wait_condition(operator, kube_api, namespace, "EventRouter", "keyed", "Degraded", "False")


def test_manual_edits_reverted(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    create(kube_api, namespace, router_doc(replicas=1))
    create(kube_api, namespace, sink_doc("console", log={}))
    create(kube_api, namespace, route_doc("everything", ["console"]))
    operator.wait(
        lambda: config_names(kube_api, namespace, "game-events", "EventRoute") == {"everything"},
        "the ConfigMap",
    )
    operator.wait(lambda: read(kube_api, "Deployment", namespace, "game-events"), "the Deployment")
    original = read(kube_api, "ConfigMap", namespace, "game-events-config")
    assert original is not None
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)

    apps.patch_namespaced_deployment(
        "game-events",
        namespace,
        {
            "metadata": {"labels": {"app.kubernetes.io/component": "edited"}},
            "spec": {"replicas": 3},
        },
    )
    core.patch_namespaced_config_map(
        "game-events-config", namespace, {"data": {"config.yaml": "edited: by hand\n"}}
    )

    def deployment_restored() -> bool:
        deployment = read(kube_api, "Deployment", namespace, "game-events") or {}
        labels = deployment["metadata"]["labels"]
        return bool(
            deployment["spec"]["replicas"] == 1
            and labels["app.kubernetes.io/component"] == "router"
        )

    def configmap_restored() -> bool:
        configmap = read(kube_api, "ConfigMap", namespace, "game-events-config") or {}
        return bool(configmap["data"] == original["data"])

    operator.wait(deployment_restored, "replicas 1 and the component label back", timeout=15)
    operator.wait(configmap_restored, "the ConfigMap's data back", timeout=15)


def test_unchanged_router_no_writes(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """A reconcile that an unrelated Secret triggers changes no resourceVersion."""
    create_examples(kube_api, namespace)
    wait_for_examples(kube_api, namespace, operator)
    # Let the events of the operator's own writes run out: a quiet second
    # with no handler call.
    handled = "Handler '"

    def quiet() -> bool:
        before = operator.log().count(handled)
        time.sleep(1.0)
        return operator.log().count(handled) == before

    operator.wait(quiet, "the operator to go quiet")
    before = resource_versions(kube_api, namespace)
    log_before = operator.log()
    secret_calls = log_before.count("Handler 'secret_event' succeeded")

    create(kube_api, namespace, secret_doc("unrelated", note="not used by any router"))
    operator.wait(
        lambda: operator.log().count("Handler 'secret_event' succeeded") > secret_calls,
        "the reconcile that the new Secret triggers",
    )
    new_lines = operator.log()[len(log_before) :]

    assert resource_versions(kube_api, namespace) == before
    assert "updating" not in new_lines
    assert "creating" not in new_lines


def test_reconcile_twice_no_writes(kube_api: client.ApiClient, namespace: str) -> None:
    """Reconciler.reconcile_namespace, called directly: the second call writes nothing."""
    create_examples(kube_api, namespace)
    reconciler = Reconciler(kube_api, DEFAULT_IMAGE)

    reconciler.reconcile_namespace(namespace)
    first_writes = reconciler.writes
    before = resource_versions(kube_api, namespace)
    reconciler.writes = 0
    reconciler.reconcile_namespace(namespace)

    assert first_writes > 0
    assert reconciler.writes == 0
    assert resource_versions(kube_api, namespace) == before


def test_broken_sink_isolated(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """A sink that the CRD accepts and the models reject stops only the route that uses it."""
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    create(kube_api, namespace, router_doc())
    create(kube_api, namespace, router_doc("other"))
    create(kube_api, namespace, sink_doc("console", log={}))
    # The schema has no rule for template fields, so the API server stores this.
    kafka = {"bootstrapServers": ["kafka-0.kafka:9092"], "topic": "events.{nope}"}
    create(kube_api, namespace, sink_doc("broken-kafka", kafka=kafka))
    create(kube_api, namespace, route_doc("gameplay", ["console"]))
    create(kube_api, namespace, route_doc("to-kafka", ["broken-kafka"]))
    create(kube_api, namespace, route_doc("other-gameplay", ["console"], router="other"))
    create(kube_api, namespace, route_doc("orphan", ["console"], router="missing-router"))

    sink_ready = wait_condition(
        operator, kube_api, namespace, "EventSink", "broken-kafka", "Ready", "False"
    )
    operator.wait(
        lambda: config_names(kube_api, namespace, "game-events", "EventRoute") == {"gameplay"},
        "the gameplay route in game-events' ConfigMap",
    )
    operator.wait(
        lambda: config_names(kube_api, namespace, "other", "EventRoute") == {"other-gameplay"},
        "the route of the other router in its ConfigMap",
    )
    # Until the operator has seen the sink, the route may report SinkNotFound.
    resolved = wait_condition(
        operator, kube_api, namespace, "EventRoute", "to-kafka", "ResolvedRefs", "False",
        reason="InvalidSink",
    )  # fmt: skip
    orphan = wait_condition(
        operator, kube_api, namespace, "EventRoute", "orphan", "Accepted", "False"
    )
    degraded = wait_condition(
        operator, kube_api, namespace, "EventRouter", "game-events", "Degraded", "True"
    )

    assert sink_ready["reason"] == "InvalidSpec"
    assert "{nope}" in sink_ready["message"]
    assert "broken-kafka" in resolved["message"]
    assert "not valid" in resolved["message"]
    assert orphan["reason"] == "RouterNotFound"
    assert "to-kafka" in degraded["message"]
    assert "broken-kafka" not in config_names(kube_api, namespace, "game-events", "EventSink")


def test_autoscaling_objects(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """autoscaling.enabled makes an HPA and a PDB, replicas > 1 a PDB, and off removes them."""
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    scaling = {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 5,
        "targetCPUUtilizationPercentage": 60,
    }
    create(kube_api, namespace, router_doc("scaled", autoscaling=scaling))
    create(kube_api, namespace, router_doc("fixed", replicas=3))
    create(kube_api, namespace, router_doc("single", replicas=1))
    create(kube_api, namespace, sink_doc("console", log={}))
    for router in ("scaled", "fixed", "single"):
        create(kube_api, namespace, route_doc(f"{router}-all", ["console"], router=router))

    hpa = operator.wait(
        lambda: read(kube_api, "HorizontalPodAutoscaler", namespace, "scaled"), "the HPA"
    )
    scaled_pdb = operator.wait(
        lambda: read(kube_api, "PodDisruptionBudget", namespace, "scaled"), "the PDB of scaled"
    )
    fixed_pdb = operator.wait(
        lambda: read(kube_api, "PodDisruptionBudget", namespace, "fixed"), "the PDB of fixed"
    )
    operator.wait(
        lambda: read(kube_api, "Deployment", namespace, "single"), "the Deployment of single"
    )
    scaled_ready = wait_condition(
        operator, kube_api, namespace, "EventRouter", "scaled", "Ready", "False"
    )
    deployment = read(kube_api, "Deployment", namespace, "scaled")
    assert deployment is not None
    operator_fields = [
        m["fieldsV1"]
        for m in deployment["metadata"]["managedFields"]
        if m["manager"] == "eventrouter-operator"
    ]
    metric = hpa["spec"]["metrics"][0]["resource"]

    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "scaled",
    }
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["maxReplicas"] == 5
    assert metric["name"] == "cpu"
    assert metric["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert scaled_pdb["spec"]["maxUnavailable"] == 1
    assert fixed_pdb["spec"]["maxUnavailable"] == 1
    assert fixed_pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "fixed"
    assert read(kube_api, "HorizontalPodAutoscaler", namespace, "fixed") is None
    assert read(kube_api, "HorizontalPodAutoscaler", namespace, "single") is None
    assert read(kube_api, "PodDisruptionBudget", namespace, "single") is None
    # The HPA owns the replica count, so the operator leaves it out.
    assert all("f:replicas" not in fields.get("f:spec", {}) for fields in operator_fields)
    assert "0 of 2 replicas ready" in scaled_ready["message"]

    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "eventrouters",
        "scaled",
        {"spec": {"autoscaling": {"enabled": False}, "replicas": 1}},
    )

    operator.wait(
        lambda: read(kube_api, "HorizontalPodAutoscaler", namespace, "scaled") is None,
        "the HPA to be deleted once autoscaling is off",
    )
    operator.wait(
        lambda: read(kube_api, "PodDisruptionBudget", namespace, "scaled") is None,
        "the PDB to be deleted at one replica",
    )
    operator.wait(
        lambda: (read(kube_api, "Deployment", namespace, "scaled") or {})["spec"]["replicas"] == 1,
        "the Deployment to have spec.replicas 1",
    )


# --- peering -------------------------------------------------------------------------

PEERING_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "kopfpeerings.kopf.dev"},
    "spec": {
        "group": "kopf.dev",
        "scope": "Namespaced",
        "names": {"kind": "KopfPeering", "plural": "kopfpeerings", "singular": "kopfpeering"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def _peering_crd(api: client.ApiClient) -> None:
    """kopf's namespaced KopfPeering CRD, created once per API server."""
    extensions = client.ApiextensionsV1Api(api)
    try:
        extensions.create_custom_resource_definition(copy.deepcopy(PEERING_CRD))
    except ApiException as exc:
        if exc.status != 409:
            raise

    def served() -> bool:
        try:
            client.CustomObjectsApi(api).list_namespaced_custom_object(
                "kopf.dev", "v1", "default", "kopfpeerings"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_until(served, "KopfPeering to be served")


@pytest.mark.parametrize("standalone", [True, False], ids=["standalone", "peering"])
def test_standalone_flag(
    kube_api: client.ApiClient,
    namespace: str,
    start_operator: Callable[..., OperatorProcess],
    standalone: bool,
) -> None:
    """--standalone keeps the operator out of a KopfPeering object; without it, it joins."""
    _peering_crd(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfPeering",
        "metadata": {"name": "eventrouter-operator"},
    }
    custom.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", peering)
    create(kube_api, namespace, secret_doc("router-auth", api_keys=API_KEY))
    create(kube_api, namespace, router_doc())
    create(kube_api, namespace, sink_doc("console", log={}))
    create(kube_api, namespace, route_doc("everything", ["console"]))

    operator = start_operator(namespace, standalone=standalone)
    operator.wait(
        lambda: config_names(kube_api, namespace, "game-events", "EventRoute") == {"everything"},
        "the router to be reconciled",
    )

    def peers() -> dict[str, Any]:
        body: Any = custom.get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", "eventrouter-operator"
        )
        return dict(body.get("status") or {})

    if standalone:
        assert peers() == {}
    else:
        operator.wait(peers, "the operator to add itself to the KopfPeering status")
