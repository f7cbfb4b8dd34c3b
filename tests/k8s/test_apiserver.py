"""Tests of the kube_apiserver fixture with the official Python client and the built helm.

They check that the control plane is real: objects are stored, a CRD's
structural schema and CEL rule (x-kubernetes-validations) reject invalid
objects with the API server's messages, and helm renders and installs a chart.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.k8s.apiserver import HOST, KubeApiServer

TOOLS_DIR = Path(__file__).resolve().parent / "tools"

CRD_GROUP = "cel.tests.eventrouter.io"
CRD_PLURAL = "widgets"
CEL_MESSAGE = "minReplicas must not be greater than maxReplicas"

TINY_CHART_FILES = {
    "Chart.yaml": "apiVersion: v2\nname: tiny\nversion: 0.1.0\n",
    "values.yaml": "greeting: hello\n",
    "templates/configmap.yaml": (
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: {{ .Release.Name }}-settings\n"
        "data:\n"
        "  greeting: {{ .Values.greeting | quote }}\n"
    ),
}


def required_version(module_dir: Path, module: str) -> str:
    """Return the version that go.mod in `module_dir` requires of `module`."""
    for line in (module_dir / "go.mod").read_text().splitlines():
        fields = line.split()
        if fields[:2] == ["require", module]:
            return fields[2]
        if fields[:1] == [module] and len(fields) > 1 and fields[1].startswith("v"):
            return fields[1]
    raise AssertionError(f"{module_dir / 'go.mod'} does not require {module}")


@pytest.fixture(scope="module")
def api_client(kube_apiserver: KubeApiServer) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kube_apiserver.kubeconfig))
    yield api
    api.close()


@pytest.fixture
def namespace(kube_apiserver: KubeApiServer) -> str:
    return kube_apiserver.create_namespace()


@pytest.fixture
def tiny_chart(tmp_path: Path) -> Path:
    chart = tmp_path / "tiny"
    for name, text in TINY_CHART_FILES.items():
        (chart / name).parent.mkdir(parents=True, exist_ok=True)
        (chart / name).write_text(text)
    return chart


def run_helm(
    kube_apiserver: KubeApiServer, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run the built helm with its cache, config and data folders in `tmp_path`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    for kind in ("CACHE", "CONFIG", "DATA"):
        environment[f"HELM_{kind}_HOME"] = str(tmp_path / f"helm-{kind.lower()}")
    result = subprocess.run(
        [str(kube_apiserver.helm), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"helm {' '.join(args)} failed with exit code {result.returncode}:\n"
        f"{result.stdout}{result.stderr}"
    )
    return result


def widget_crd() -> dict[str, Any]:
    spec_schema = {
        "type": "object",
        "required": ["minReplicas", "maxReplicas"],
        "properties": {
            "minReplicas": {"type": "integer", "minimum": 0},
            "maxReplicas": {"type": "integer", "minimum": 0},
        },
        "x-kubernetes-validations": [
            {"rule": "self.minReplicas <= self.maxReplicas", "message": CEL_MESSAGE}
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{CRD_PLURAL}.{CRD_GROUP}"},
        "spec": {
            "group": CRD_GROUP,
            "scope": "Namespaced",
            "names": {"plural": CRD_PLURAL, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": spec_schema},
                        }
                    },
                }
            ],
        },
    }


def widget(name: str, min_replicas: Any, max_replicas: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{CRD_GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
    }


def wait_until_established(extensions: client.ApiextensionsV1Api, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = extensions.read_custom_resource_definition(name)
        conditions = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.1)
    pytest.fail(f"CRD {name} was not Established within 30 s")


def create_widget(
    custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Create a Widget, retrying 404s for up to 10 s while the new CRD's handler starts."""
    deadline = time.monotonic() + 10
    while True:
        try:
            created: dict[str, Any] = custom.create_namespaced_custom_object(
                CRD_GROUP, "v1", namespace, CRD_PLURAL, body
            )
            return created
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_apiserver_listens_on_loopback(kube_apiserver: KubeApiServer) -> None:
    assert kube_apiserver.url == f"https://{HOST}:{kube_apiserver.port}"
    assert kube_apiserver.is_running

    for name, pid in kube_apiserver.pids.items():
        listening = [
            conn.laddr
            for conn in psutil.Process(pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        ]
        assert listening, f"{name} listens on no port"
        assert {address.ip for address in listening} == {HOST}, f"{name} listens on {listening}"


def test_apiserver_reports_built_version(
    kube_apiserver: KubeApiServer, api_client: client.ApiClient
) -> None:
    expected = required_version(TOOLS_DIR / "kube-apiserver", "k8s.io/kubernetes")

    info = client.VersionApi(api_client).get_code()

    assert info.git_version == expected
    assert kube_apiserver.bin_dir is not None
    assert kube_apiserver.bin_dir.parent.name == expected


def test_namespace_and_configmap_round_trip(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    body = {"metadata": {"name": "settings"}, "data": {"region": "eu", "shards": "3"}}

    core.create_namespaced_config_map(namespace, body)
    stored = core.read_namespaced_config_map("settings", namespace)

    assert core.read_namespace(namespace).status.phase == "Active"
    assert stored.data == {"region": "eu", "shards": "3"}
    assert [cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items] == [
        "settings"
    ]


def test_crd_cel_rule_rejects_invalid_object(
    api_client: client.ApiClient, namespace: str
) -> None:
    extensions = client.ApiextensionsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    crd_name = f"{CRD_PLURAL}.{CRD_GROUP}"
    extensions.create_custom_resource_definition(widget_crd())
    try:
        wait_until_established(extensions, crd_name)

        created = create_widget(custom, namespace, widget("valid", 1, 3))
        assert created["spec"] == {"minReplicas": 1, "maxReplicas": 3}

        with pytest.raises(ApiException) as cel_error:
            create_widget(custom, namespace, widget("inverted", 5, 2))
        assert cel_error.value.status == 422
        cel_status = json.loads(cel_error.value.body)
        assert cel_status["reason"] == "Invalid"
        assert CEL_MESSAGE in cel_status["message"]
        assert [cause["field"] for cause in cel_status["details"]["causes"]] == ["spec"]

        with pytest.raises(ApiException) as schema_error:
            create_widget(custom, namespace, widget("wrong-type", "one", 2))
        assert schema_error.value.status == 422
        schema_status = json.loads(schema_error.value.body)
        assert "spec.minReplicas" in schema_status["message"]
        assert "integer" in schema_status["message"]

        stored = custom.list_namespaced_custom_object(CRD_GROUP, "v1", namespace, CRD_PLURAL)
        assert [item["metadata"]["name"] for item in stored["items"]] == ["valid"]
    finally:
        extensions.delete_custom_resource_definition(crd_name)


def test_helm_version_matches_go_mod(kube_apiserver: KubeApiServer, tmp_path: Path) -> None:
    expected = required_version(TOOLS_DIR / "helm", "helm.sh/helm/v4")

    result = run_helm(kube_apiserver, tmp_path, "version", "--template", "{{ .Version }}")

    assert result.stdout.strip() == expected


def test_helm_template_renders_tiny_chart(
    kube_apiserver: KubeApiServer, tmp_path: Path, tiny_chart: Path
) -> None:
    result = run_helm(
        kube_apiserver, tmp_path, "template", "demo", str(tiny_chart), "--set", "greeting=hi"
    )

    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(documents) == 1
    assert documents[0]["kind"] == "ConfigMap"
    assert documents[0]["metadata"]["name"] == "demo-settings"
    assert documents[0]["data"] == {"greeting": "hi"}


def test_helm_install_creates_configmap(
    kube_apiserver: KubeApiServer,
    api_client: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    tiny_chart: Path,
) -> None:
    core = client.CoreV1Api(api_client)
    kube_args = ["--kubeconfig", str(kube_apiserver.kubeconfig), "--namespace", namespace]

    run_helm(kube_apiserver, tmp_path, "install", "demo", str(tiny_chart), *kube_args)

    configmap = core.read_namespaced_config_map("demo-settings", namespace)
    assert configmap.data == {"greeting": "hello"}
    release_secret = core.read_namespaced_secret("sh.helm.release.v1.demo.v1", namespace)
    assert release_secret.type == "helm.sh/release.v1"
    listed = run_helm(kube_apiserver, tmp_path, "list", "--output", "json", *kube_args)
    releases = json.loads(listed.stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]

    run_helm(kube_apiserver, tmp_path, "uninstall", "demo", *kube_args)

    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("demo-settings", namespace)
    assert missing.value.status == 404
