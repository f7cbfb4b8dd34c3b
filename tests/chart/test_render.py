"""The chart rendered by the real helm for each values file in charts/eventrouter/ci.

Every rendered object is created with a server-side dry run
(`?dryRun=All&fieldValidation=Strict`) against a real kube-apiserver. That is
stronger than checking the manifests against the OpenAPI v3 documents of
/openapi/v3. The dry run decodes with strict field validation, so an unknown
or duplicate field fails. It then applies defaults and runs the API server's
own validation and admission. Those check what the published schemas do not
express: a selector that must match the pod labels, DNS-1123 names, port
ranges, required fields, and the CRDs' structural schemas and CEL rules.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, CI_VALUES, Helm, find, kinds
from tests.k8s.apiserver import KubeApiServer

NAMESPACE = "games"
OPERATOR = "eventrouter-operator"

# The rules that the operator needs in every namespace that it watches.
NAMESPACED_RULES = [
    {"apiGroups": ["eventrouter.io"], "resources": ["eventrouters"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["eventrouter.io"], "resources": ["eventroutes", "eventsinks"],
     "verbs": ["list", "watch"]},
    {"apiGroups": ["eventrouter.io"],
     "resources": ["eventrouters/status", "eventroutes/status", "eventsinks/status"],
     "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]  # fmt: skip
PEERING_RULE = {
    "apiGroups": ["kopf.dev"],
    "resources": ["kopfpeerings"],
    "verbs": ["get", "list", "watch", "patch"],
}
CLUSTER_RULES = [
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["list", "watch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
     "verbs": ["get", "list", "watch", "patch"]},
]  # fmt: skip


def values_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


@pytest.fixture(scope="module")
def api_paths(chart_apiserver: KubeApiServer) -> dict[tuple[str, str], tuple[str, bool]]:
    """(apiVersion, kind) to (collection path, namespaced) for the kinds the chart renders."""
    chart_apiserver.create_namespace(NAMESPACE)
    crds = [
        document
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
    ]
    for crd in crds:
        chart_apiserver.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
        )
    for crd in crds:
        spec = crd["spec"]
        prefix = f"/apis/{spec['group']}/{spec['versions'][0]['name']}"
        _discover(chart_apiserver, prefix, spec["names"]["plural"])
    groups = ["/api/v1"] + [
        f"/apis/{version['groupVersion']}"
        for group in chart_apiserver.request("GET", "/apis")["groups"]
        for version in group["versions"]
    ]
    paths = {}
    for prefix in groups:
        listing = _discover(chart_apiserver, prefix)
        for resource in listing["resources"]:
            if "/" in resource["name"]:
                continue
            namespaced = bool(resource["namespaced"])
            paths[(listing["groupVersion"], resource["kind"])] = (
                f"{prefix}/namespaces/{{namespace}}/{resource['name']}"
                if namespaced
                else f"{prefix}/{resource['name']}",
                namespaced,
            )
    return paths


def _discover(server: KubeApiServer, prefix: str, plural: str | None = None) -> dict[str, Any]:
    """Return the resource list of one group version, waiting up to 30 s for `plural` in it.

    A new CRD's group version and resource are served a moment after the CRD
    is created, and until then the API server answers 404.
    """
    deadline = time.monotonic() + 30
    while True:
        try:
            listing: dict[str, Any] = server.request("GET", prefix)
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise
        else:
            names = [resource["name"] for resource in listing["resources"]]
            if plural is None or plural in names:
                return listing
            if time.monotonic() > deadline:
                pytest.fail(f"{prefix} does not serve {plural} after 30 s")
        time.sleep(0.2)


def dry_run_create(
    server: KubeApiServer,
    paths: dict[tuple[str, str], tuple[str, bool]],
    document: dict[str, Any],
) -> dict[str, Any]:
    """Create `document` with a server-side dry run and strict field validation."""
    key = (document["apiVersion"], document["kind"])
    assert key in paths, f"the API server does not serve {key}"
    path, namespaced = paths[key]
    if namespaced:
        path = path.format(namespace=document["metadata"].get("namespace", NAMESPACE))
    try:
        created: dict[str, Any] = server.request(
            "POST", f"{path}?dryRun=All&fieldValidation=Strict", document
        )
    except urllib.error.HTTPError as exc:
        status = json.loads(exc.read())
        pytest.fail(
            f"{document['kind']} {document['metadata']['name']} is invalid: {status['message']}"
        )
    return created


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_helm_lint_passes(helm: Helm, values: Path) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(values))

    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_rendered_objects_pass_dry_run(
    helm: Helm,
    chart_apiserver: KubeApiServer,
    api_paths: dict[tuple[str, str], tuple[str, bool]],
    values: Path,
) -> None:
    documents = helm.template(NAMESPACE, "-f", str(values))

    assert documents
    for document in documents:
        created = dry_run_create(chart_apiserver, api_paths, document)
        assert created["metadata"]["name"] == document["metadata"]["name"]


def test_dry_run_rejects_invalid_objects(
    helm: Helm,
    chart_apiserver: KubeApiServer,
    api_paths: dict[tuple[str, str], tuple[str, bool]],
) -> None:
    documents = helm.template(NAMESPACE)
    unknown_field = find(documents, "Deployment")
    unknown_field["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    bad_selector = find(helm.template(NAMESPACE), "Deployment")
    bad_selector["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "router"
    bad_router = find(helm.template(NAMESPACE), "EventRouter")
    bad_router["spec"]["queue"]["overflow"] = "drop"

    for document, message in (
        (unknown_field, 'unknown field "spec.template.spec.containers[0].livenesProbe"'),
        (bad_selector, "`selector` does not match template `labels`"),
        (bad_router, "spec.queue.overflow: Unsupported value"),
    ):
        with pytest.raises(pytest.fail.Exception, match=re.escape(message)):
            dry_run_create(chart_apiserver, api_paths, document)


def render(helm: Helm, name: str) -> list[dict[str, Any]]:
    return helm.template(NAMESPACE, "-f", str(CHART / "ci" / f"{name}-values.yaml"))


def operator_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(documents, "Deployment", OPERATOR)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def test_default_values_render_namespaced_operator(helm: Helm) -> None:
    documents = render(helm, "default")

    assert kinds(documents) == [
        "ConfigMap", "Deployment", "EventRoute", "EventRouter", "EventSink", "KopfPeering",
        "Role", "RoleBinding", "Secret", "ServiceAccount",
    ]  # fmt: skip
    role = find(documents, "Role", OPERATOR)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [*NAMESPACED_RULES, PEERING_RULE]
    binding = find(documents, "RoleBinding", OPERATOR)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": OPERATOR,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}
    ]
    container = operator_container(documents)
    assert container["args"] == [
        "operator", "--namespace", NAMESPACE, "--no-scanning",
        "--priority", "random", "--liveness", "http://0.0.0.0:8080/healthz",
    ]  # fmt: skip
    peering = find(documents, "KopfPeering")
    assert peering["metadata"] == {
        "name": "eventrouter",
        "namespace": NAMESPACE,
        "labels": peering["metadata"]["labels"],
    }
    config = find(documents, "ConfigMap", OPERATOR)["data"]
    assert config == {
        "EVENTROUTER_IMAGE": "ghcr.io/eventrouter/eventrouter:0.1.0",
        "EVENTROUTER_PEERING": "eventrouter",
        "EVENTROUTER_PEERING_MANDATORY": "true",
    }


def test_operator_pod_is_hardened(helm: Helm) -> None:
    documents = render(helm, "default")
    deployment = find(documents, "Deployment", OPERATOR)
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(documents)

    assert pod["serviceAccountName"] == OPERATOR
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert container["image"] == "ghcr.io/eventrouter/eventrouter:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["env"] == [
        {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    assert container["envFrom"] == [{"configMapRef": {"name": OPERATOR}}]


def test_default_router_renders_catch_all(helm: Helm) -> None:
    documents = render(helm, "default")

    router = find(documents, "EventRouter", "default")
    assert router["spec"]["auth"] == {
        "apiKeys": {"secretKeyRef": {"name": "eventrouter-api-keys", "key": "api-keys"}}
    }
    assert router["spec"]["autoscaling"]["enabled"] is False
    assert router["spec"]["replicas"] == 1
    route = find(documents, "EventRoute", "default-all-events")
    assert route["spec"] == {
        "router": "default",
        "match": {"names": ["*"]},
        "sinks": ["default-log"],
    }
    sink = find(documents, "EventSink", "default-log")
    assert sink["spec"] == {"log": {"stream": "stdout"}}
    secret = find(documents, "Secret", "eventrouter-api-keys")
    assert len(secret["data"]["api-keys"]) > 40


def test_cluster_wide_values_render_cluster_role(helm: Helm) -> None:
    documents = render(helm, "cluster-wide")

    assert "Role" not in kinds(documents)
    assert "RoleBinding" not in kinds(documents)
    role = find(documents, "ClusterRole", f"{OPERATOR}-{NAMESPACE}")
    assert role["rules"] == [*NAMESPACED_RULES, *CLUSTER_RULES]
    binding = find(documents, "ClusterRoleBinding", f"{OPERATOR}-{NAMESPACE}")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert binding["roleRef"]["name"] == f"{OPERATOR}-{NAMESPACE}"
    assert find(documents, "ClusterKopfPeering")["metadata"]["name"] == "eventrouter"
    assert "KopfPeering" not in kinds(documents)
    deployment = find(documents, "Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 2
    assert operator_container(documents)["args"][:2] == ["operator", "--all-namespaces"]
    assert "--no-scanning" not in operator_container(documents)["args"]


def test_listed_namespaces_bind_cluster_role_per_namespace(helm: Helm) -> None:
    documents = helm.template(
        NAMESPACE,
        "--set", "operator.clusterWide=true",
        "--set", f"operator.watchNamespaces={{{NAMESPACE},teams}}",
    )  # fmt: skip

    role = find(documents, "ClusterRole")
    assert role["rules"] == [*NAMESPACED_RULES, PEERING_RULE]
    bindings = [d for d in documents if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == [NAMESPACE, "teams"]
    assert all(b["roleRef"]["kind"] == "ClusterRole" for b in bindings)
    assert "ClusterRoleBinding" not in kinds(documents)
    peerings = [d for d in documents if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == [NAMESPACE, "teams"]
    args = operator_container(documents)["args"]
    assert args[:6] == [
        "operator",
        "--namespace",
        NAMESPACE,
        "--namespace",
        "teams",
        "--no-scanning",
    ]


def test_autoscaling_values_render_router_autoscaler(helm: Helm) -> None:
    documents = render(helm, "autoscaling")

    spec = find(documents, "EventRouter", "default")["spec"]
    assert spec["autoscaling"] == {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 6,
        "targetCPUUtilizationPercentage": 60,
    }
    assert spec["queue"]["overflow"] == "reject"


def test_no_default_router_values_render_operator_only(helm: Helm) -> None:
    documents = render(helm, "no-default-router")

    assert kinds(documents) == ["ConfigMap", "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    assert find(documents, "Role")["rules"] == NAMESPACED_RULES
    assert find(documents, "ConfigMap")["data"] == {
        "EVENTROUTER_IMAGE": "ghcr.io/eventrouter/eventrouter:0.1.0",
        "EVENTROUTER_STANDALONE": "true",
    }
    deployment = find(documents, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--priority" not in operator_container(documents)["args"]


def test_config_checksum_follows_configmap(helm: Helm) -> None:
    def checksum(*args: str) -> str:
        documents = helm.template(NAMESPACE, *args)
        annotations = find(documents, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    default = checksum()

    assert checksum() == default
    assert checksum("--set", "operator.replicas=2") == default
    assert checksum("--set", "routerImage=registry.example/router:1.2.3") != default
    assert checksum("--set", "peering.enabled=false") != default


def test_image_digest_pins_operator_and_routers(helm: Helm) -> None:
    digest = "sha256:" + "ab" * 32

    documents = helm.template(NAMESPACE, "--set", f"image.digest={digest}")

    image = f"ghcr.io/eventrouter/eventrouter@{digest}"
    assert operator_container(documents)["image"] == image
    assert find(documents, "ConfigMap")["data"]["EVENTROUTER_IMAGE"] == image


# Each case: id, values, and a part of helm's error message. Schema errors
# come first, then the `fail` rules of templates/validate.yaml.
SCHEMA_ERRORS = [
    (
        "unknown-overflow",
        {"defaultRouter": {"queue": {"overflow": "drop"}}},
        "at '/defaultRouter/queue/overflow': value must be one of 'dropNewest', 'dropOldest', "
        "'reject'",
    ),
    (
        "misspelled-key",
        {"operator": {"replica": 2}},
        "additional properties 'replica' not allowed",
    ),
    (
        "replicas-as-string",
        {"operator": {"replicas": "2"}},
        "at '/operator/replicas': got string, want integer",
    ),
]
# `helm lint` renders in lint mode, where `fail` only logs a line (Helm
# v4.3.2), so these cases go through `helm template`, which fails like install.
FAIL_RULES = [
    (
        "replicas-without-peering",
        {"operator": {"replicas": 2}, "peering": {"enabled": False}},
        "[ERROR] operator.replicas is 2 but peering.enabled is false",
    ),
    (
        "other-namespace-without-cluster-wide",
        {"operator": {"watchNamespaces": ["teams"]}},
        '[ERROR] operator.watchNamespaces names "teams", but with operator.clusterWide=false',
    ),
    (
        "default-router-not-watched",
        {"operator": {"clusterWide": True, "watchNamespaces": ["teams"]}},
        "[ERROR] defaultRouter.enabled creates an EventRouter in the release namespace "
        f'"{NAMESPACE}"',
    ),
    (
        "autoscaling-min-above-max",
        {"defaultRouter": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "[ERROR] defaultRouter.autoscaling.minReplicas (5) must not exceed maxReplicas (2)",
    ),
    (
        "reject-with-small-queue",
        {"defaultRouter": {"queue": {"overflow": "reject", "size": 100}}},
        "[ERROR] defaultRouter.queue.size is 100, but with overflow reject it must be at least 500",
    ),
    (
        "block-with-small-queue",
        {"defaultRouter": {"queue": {"overflow": "block", "size": 100}}},
        "[ERROR] defaultRouter.queue.size is 100, but with overflow block it must be at least 500",
    ),
    (
        "service-account-without-name",
        {"serviceAccount": {"create": False}},
        "[ERROR] serviceAccount.create is false, so serviceAccount.name must name",
    ),
]


def write_values(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    ("values", "message"), [c[1:] for c in SCHEMA_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS]
)
def test_schema_rejects_values(
    helm: Helm, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    path = write_values(tmp_path, values)

    rendered = helm.run(
        "template", "eventrouter", str(CHART), "--namespace", NAMESPACE, "-f", str(path),
        check=False,
    )  # fmt: skip
    linted = helm.run("lint", str(CHART), "--namespace", NAMESPACE, "-f", str(path), check=False)

    assert rendered.returncode == 1
    assert message in rendered.stderr
    assert linted.returncode == 1
    assert message in linted.stdout


@pytest.mark.parametrize(
    ("values", "message"), [c[1:] for c in FAIL_RULES], ids=[c[0] for c in FAIL_RULES]
)
def test_fail_rule_rejects_values(
    helm: Helm, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    path = write_values(tmp_path, values)

    rendered = helm.run(
        "template", "eventrouter", str(CHART), "--namespace", NAMESPACE, "-f", str(path),
        check=False,
    )  # fmt: skip

    assert rendered.returncode == 1
    assert "execution error at (eventrouter/templates/validate.yaml" in rendered.stderr
    assert message in rendered.stderr
