"""`helm install` into a real kube-apiserver, then the operator run as the chart's ServiceAccount.

The tests of this module run in order against one release. The operator runs
as a subprocess with the arguments and environment of the installed
Deployment, authenticated with a token of the chart's ServiceAccount, so that
any rule missing from the chart's Role shows up as a 403 in its log. There
are no nodes, so no pod ever runs: the operator creates each router's objects
and reports the router as not ready, and the test checks the reason it gives.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.chart.conftest import CHART, Helm
from tests.conftest import free_port
from tests.k8s.apiserver import KubeApiServer

NAMESPACE = "games"
RELEASE = "eventrouter"
OPERATOR = "eventrouter-operator"
ROUTER = "default"
CRDS = [
    "eventrouters.eventrouter.io",
    "eventroutes.eventrouter.io",
    "eventsinks.eventrouter.io",
    "kopfpeerings.kopf.dev",
    "clusterkopfpeerings.kopf.dev",
]
# Parts of operator log lines that show a request the chart's RBAC rules deny:
# the API server's Status message ("... is forbidden: User ..."), the reason
# that the kubernetes client and the reconciler log, and kopf's warning.
PERMISSION_ERRORS = ("forbidden", "Forbidden", "Not enough permissions")


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    *,
    timeout: float = 60.0,
    details: Callable[[], str] | None = None,
) -> Any:
    """Poll `predicate` until it returns a true value, and return that value.

    Fails after `timeout` seconds with `what` and the text of `details()`,
    such as an operator's log, read at that moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(0.2)


@dataclass
class Release:
    """The installed chart, and how to run helm and the Kubernetes client against it."""

    server: KubeApiServer
    api: client.ApiClient
    helm: Helm

    def helm_args(self, *args: str) -> list[str]:
        return [*args, "--namespace", NAMESPACE, "--kubeconfig", str(self.server.kubeconfig)]

    def router(self) -> dict[str, Any]:
        body: Any = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            "eventrouter.io", "v1alpha1", NAMESPACE, "eventrouters", ROUTER
        )
        return dict(body)

    def operator_deployment(self) -> client.V1Deployment:
        return client.AppsV1Api(self.api).read_namespaced_deployment(OPERATOR, NAMESPACE)

    def api_key(self) -> str:
        secret = client.CoreV1Api(self.api).read_namespaced_secret(f"{RELEASE}-api-keys", NAMESPACE)
        return base64.b64decode(secret.data["api-keys"]).decode()


@pytest.fixture(scope="module")
def crds_before_install(chart_apiserver: KubeApiServer) -> list[str]:
    listing = chart_apiserver.request(
        "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    )
    return [item["metadata"]["name"] for item in listing["items"]]


@pytest.fixture(scope="module")
def release(
    chart_apiserver: KubeApiServer,
    chart_api: client.ApiClient,
    helm: Helm,
    crds_before_install: list[str],
) -> Release:
    chart_apiserver.create_namespace(NAMESPACE)
    installed = Release(chart_apiserver, chart_api, helm)
    # No --wait: with no nodes the operator's pod never becomes ready.
    helm.run(*installed.helm_args("install", RELEASE, str(CHART)))
    return installed


def service_account_kubeconfig(release: Release, path: Path) -> Path:
    """Write a kubeconfig that authenticates with a token of the operator's ServiceAccount."""
    token_request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600},
    }
    response = release.server.request(
        "POST",
        f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{OPERATOR}/token",
        token_request,
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": release.server.url,
                    "certificate-authority": str(release.server.ca_file),
                },
            }
        ],
        "users": [{"name": OPERATOR, "user": {"token": response["status"]["token"]}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": OPERATOR}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    health_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_operator(
    release: Release, folder: Path, name: str, *extra_args: str, peering: bool = False
) -> OperatorProcess:
    """Run `eventrouter operator` as the installed Deployment would, as its ServiceAccount.

    The arguments come from the Deployment and the environment from its
    ConfigMap, with the liveness endpoint moved to a free loopback port.
    Without `peering` the environment also turns peering off, as
    EVENTROUTER_STANDALONE does in the chart.
    """
    deployment = release.operator_deployment()
    (container,) = deployment.spec.template.spec.containers
    config_map = client.CoreV1Api(release.api).read_namespaced_config_map(OPERATOR, NAMESPACE)
    port = free_port()
    args = list(container.args)
    args[args.index("--liveness") + 1] = f"http://127.0.0.1:{port}/healthz"
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("EVENTROUTER_", "KUBE"))
    }
    environment.update(config_map.data)
    if not peering:
        environment.pop("EVENTROUTER_PEERING_MANDATORY", None)
        environment["EVENTROUTER_STANDALONE"] = "true"
    environment.update(
        {
            "KUBECONFIG": str(service_account_kubeconfig(release, folder / f"{name}.kubeconfig")),
            "POD_ID": name,
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "eventrouter", *args, *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=folder,
        )
    return OperatorProcess(process, log_path, f"http://127.0.0.1:{port}/healthz")


@pytest.fixture(scope="module")
def operator(
    release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator in standalone mode (`--standalone`), for the tests that follow install."""
    started = start_operator(
        release, tmp_path_factory.mktemp("operator"), "operator", "--standalone"
    )
    yield started
    started.stop()


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


def test_install_creates_crds(release: Release, crds_before_install: list[str]) -> None:
    extensions = client.ApiextensionsV1Api(release.api)

    assert crds_before_install == []
    for name in CRDS:
        crd = extensions.read_custom_resource_definition(name)
        established = [c for c in crd.status.conditions if c.type == "Established"]
        assert [c.status for c in established] == ["True"], name
    router_crd = extensions.read_custom_resource_definition("eventrouters.eventrouter.io")
    assert [(v.name, v.storage) for v in router_crd.spec.versions] == [("v1alpha1", True)]


def test_install_creates_operator_objects(release: Release) -> None:
    core = client.CoreV1Api(release.api)
    rbac = client.RbacAuthorizationV1Api(release.api)
    custom = client.CustomObjectsApi(release.api)

    assert core.read_namespaced_service_account(OPERATOR, NAMESPACE)
    assert core.read_namespaced_config_map(OPERATOR, NAMESPACE).data["EVENTROUTER_PEERING"] == (
        RELEASE
    )
    role = rbac.read_namespaced_role(OPERATOR, NAMESPACE)
    assert {"eventrouters/status", "eventroutes/status", "eventsinks/status"} in [
        set(rule.resources) for rule in role.rules
    ]
    binding = rbac.read_namespaced_role_binding(OPERATOR, NAMESPACE)
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", OPERATOR)]
    deployment = release.operator_deployment()
    assert deployment.spec.template.spec.service_account_name == OPERATOR
    assert deployment.status.ready_replicas is None
    peering = custom.get_namespaced_custom_object(
        "kopf.dev", "v1", NAMESPACE, "kopfpeerings", RELEASE
    )
    assert peering["metadata"]["name"] == RELEASE
    assert len(release.api_key()) == 40
    router = release.router()
    assert router["spec"]["auth"]["apiKeys"]["secretKeyRef"]["name"] == f"{RELEASE}-api-keys"
    for plural, name in (("eventroutes", "default-all-events"), ("eventsinks", "default-log")):
        body = custom.get_namespaced_custom_object(
            "eventrouter.io", "v1alpha1", NAMESPACE, plural, name
        )
        assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_operator_reconciles_default_router(release: Release, operator: OperatorProcess) -> None:
    core = client.CoreV1Api(release.api)
    apps = client.AppsV1Api(release.api)

    router = wait_until(
        lambda: (r := release.router()) and condition(r, "Progressing") and r,
        f"the operator to report the status of EventRouter {ROUTER}",
        details=operator.log,
    )

    deployment = apps.read_namespaced_deployment(ROUTER, NAMESPACE)
    (owner,) = deployment.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("EventRouter", ROUTER, router["metadata"]["uid"])
    (container,) = deployment.spec.template.spec.containers
    assert container.image == "ghcr.io/eventrouter/eventrouter:0.1.0"
    assert container.args[0] == "serve"
    assert container.readiness_probe.http_get.path == "/readyz"
    assert container.liveness_probe.http_get.path == "/healthz"
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.allow_privilege_escalation is False
    secrets = [v.secret.secret_name for v in deployment.spec.template.spec.volumes if v.secret]
    assert secrets == [f"{RELEASE}-api-keys"]
    config = core.read_namespaced_config_map(f"{ROUTER}-config", NAMESPACE)
    assert "default-all-events" in config.data["config.yaml"]
    service = core.read_namespaced_service(ROUTER, NAMESPACE)
    assert [p.port for p in service.spec.ports] == [7350, 7351]

    ready = condition(router, "Ready")
    progressing = condition(router, "Progressing")
    assert ready["status"] == "False"
    assert ready["reason"] == "ReplicasNotReady"
    assert "0 of 1 replicas ready" in ready["message"]
    assert "a cluster without nodes runs none" in ready["message"]
    assert progressing["status"] == "True"
    assert condition(router, "Degraded")["status"] == "False"
    assert router["status"]["routeCount"] == 1


def test_operator_liveness_endpoint_answers(operator: OperatorProcess) -> None:
    response = httpx.get(operator.health_url, timeout=10)

    assert response.status_code == 200


def test_upgrade_keeps_api_key(release: Release, operator: OperatorProcess) -> None:
    api_key = release.api_key()
    before = release.operator_deployment().spec.template.metadata.annotations
    autoscaling = ["--set", "defaultRouter.autoscaling.enabled=true"]

    release.helm.run(*release.helm_args("upgrade", RELEASE, str(CHART), *autoscaling))
    unchanged = release.operator_deployment().spec.template.metadata.annotations
    release.helm.run(
        *release.helm_args(
            "upgrade", RELEASE, str(CHART), *autoscaling, "--set", "routerImage=example/router:2"
        )
    )
    changed = release.operator_deployment().spec.template.metadata.annotations

    assert release.api_key() == api_key
    assert unchanged["checksum/config"] == before["checksum/config"]
    assert changed["checksum/config"] != before["checksum/config"]
    history = release.helm.run(*release.helm_args("history", RELEASE, "--output", "yaml"))
    assert [entry["revision"] for entry in yaml.safe_load(history.stdout)] == [1, 2, 3]


def test_operator_applies_autoscaling_from_upgrade(
    release: Release, operator: OperatorProcess
) -> None:
    autoscaling = client.AutoscalingV2Api(release.api)
    policy = client.PolicyV1Api(release.api)

    scaler = wait_until(
        lambda: _read_or_none(autoscaling.read_namespaced_horizontal_pod_autoscaler),
        "the operator to create the HorizontalPodAutoscaler",
        details=operator.log,
    )
    budget = wait_until(
        lambda: _read_or_none(policy.read_namespaced_pod_disruption_budget),
        "the operator to create the PodDisruptionBudget",
        details=operator.log,
    )

    assert (scaler.spec.min_replicas, scaler.spec.max_replicas) == (1, 4)
    assert budget.spec.max_unavailable == 1

    # Turning autoscaling off again must not need a permission that the chart lacks.
    # Without any values, helm upgrade would reuse the last release's values.
    off = ["--set", "defaultRouter.autoscaling.enabled=false"]
    release.helm.run(*release.helm_args("upgrade", RELEASE, str(CHART), *off))
    router = release.router()
    assert router["spec"]["autoscaling"]["enabled"] is False
    generation = router["metadata"]["generation"]
    wait_until(
        lambda: (release.router().get("status") or {}).get("observedGeneration") == generation,
        f"the operator to reconcile generation {generation}",
        details=operator.log,
    )


def _read_or_none(read: Callable[[str, str], Any]) -> Any:
    try:
        return read(ROUTER, NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_operator_log_has_no_permission_errors(operator: OperatorProcess) -> None:
    assert operator.stop() == 0
    log = operator.log()

    assert "creating games/default Deployment" in log
    denied = [line for line in log.splitlines() if any(e in line for e in PERMISSION_ERRORS)]
    assert denied == []


def pause_state(process: OperatorProcess) -> str:
    """Return "active" or "paused" from the last pause or resume line in the log.

    With mandatory peering kopf starts paused and logs only changes, so a
    process that never logged one is still paused.
    """
    state = "paused"
    for line in process.log().splitlines():
        if "Pausing operations" in line or "Pausing all operators" in line:
            state = "paused"
        elif "Resuming operations after the pause" in line:
            state = "active"
    return state


def test_peered_operators_keep_one_active(release: Release, tmp_path: Path) -> None:
    custom = client.CustomObjectsApi(release.api)
    first = start_operator(release, tmp_path, "operator-a", peering=True)
    second = start_operator(release, tmp_path, "operator-b", peering=True)
    try:
        peers = wait_until(
            lambda: len(_peers(custom)) == 2 and _peers(custom),
            f"both operators in KopfPeering {RELEASE}",
            details=lambda: first.log() + second.log(),
        )
        higher, lower = sorted(
            (first, second), key=lambda p: peers[p.log_path.stem]["priority"], reverse=True
        )
        wait_until(
            lambda: pause_state(higher) == "active" and pause_state(lower) == "paused",
            "the operator with the higher priority to run and the other to pause",
            details=lambda: first.log() + second.log(),
        )
    finally:
        first.stop()
        second.stop()

    assert sorted(peers) == ["operator-a", "operator-b"]
    assert peers["operator-a"]["priority"] != peers["operator-b"]["priority"]
    for process in (first, second):
        denied = [
            line for line in process.log().splitlines() if any(e in line for e in PERMISSION_ERRORS)
        ]
        assert denied == []


def _peers(custom: client.CustomObjectsApi) -> dict[str, Any]:
    peering: Any = custom.get_namespaced_custom_object(
        "kopf.dev", "v1", NAMESPACE, "kopfpeerings", RELEASE
    )
    return dict(peering.get("status") or {})


def test_crd_upgrade_needs_force_conflicts(release: Release) -> None:
    # What `kubectl apply --server-side [--force-conflicts] -f crds/` sends for
    # a CRD that a newer chart changed. Helm v4 created the CRDs with
    # server-side apply as field manager "helm", which owns their fields.
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/eventrouters.eventrouter.io"
    crd = yaml.safe_load((CHART / "crds" / "eventrouters.yaml").read_text())
    crd["spec"]["names"]["shortNames"] = ["erouter", "er"]
    context = release.server._client_ssl_context()

    def apply(force: bool) -> int:
        request = urllib.request.Request(
            f"{release.server.url}{path}?fieldManager=kubectl&force={str(force).lower()}",
            data=json.dumps(crd).encode(),
            method="PATCH",
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            message = json.loads(exc.read())["message"]
            assert 'with "helm"' in message
            assert ".spec.names.shortNames" in message
            return exc.code

    assert apply(force=False) == 409
    assert apply(force=True) == 200
    stored = release.server.request("GET", path)
    assert stored["spec"]["names"]["shortNames"] == ["erouter", "er"]


def test_router_deleted_before_uninstall(release: Release, tmp_path: Path) -> None:
    extensions = client.ApiextensionsV1Api(release.api)
    custom = client.CustomObjectsApi(release.api)
    # kopf puts a finalizer on each EventRouter, so a router is deleted only
    # while an operator runs. helm uninstall deletes the operator's
    # ServiceAccount too, so routers go first, as docs/install.md describes.
    assert "kopf.zalando.org/KopfFinalizerMarker" in release.router()["metadata"]["finalizers"]
    running = start_operator(release, tmp_path, "operator", "--standalone")
    try:
        custom.delete_namespaced_custom_object(
            "eventrouter.io", "v1alpha1", NAMESPACE, "eventrouters", ROUTER
        )
        wait_until(
            lambda: _read_or_none(_read_router(release)) is None,
            f"the operator to remove its finalizer from EventRouter {ROUTER}",
            details=running.log,
        )
    finally:
        running.stop()

    release.helm.run(*release.helm_args("uninstall", RELEASE))

    for name in CRDS:
        assert extensions.read_custom_resource_definition(name).metadata.name == name
    with pytest.raises(ApiException) as missing:
        release.operator_deployment()
    assert missing.value.status == 404


def _read_router(release: Release) -> Callable[[str, str], Any]:
    custom = client.CustomObjectsApi(release.api)

    def read(name: str, namespace: str) -> Any:
        return custom.get_namespaced_custom_object(
            "eventrouter.io", "v1alpha1", namespace, "eventrouters", name
        )

    return read
