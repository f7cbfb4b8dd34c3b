"""Fixtures for the chart tests: the real helm, and a kube-apiserver of their own.

The chart installs cluster-scoped objects (CRDs, ClusterRoles), and Helm
creates a CRD only when it does not exist yet. So each test module here that
needs an API server gets a KubeApiServer of its own, which starts in about
6 s, rather than the session's shared `kube_apiserver`. Then `helm install`
really creates the CRDs, and nothing here changes what other test folders see.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from tests.conftest import REPO
from tests.k8s.apiserver import KubeApiServer, ensure_binaries

CHART = REPO / "charts" / "eventrouter"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


class Helm:
    """The helm binary that scripts/install-k8s.sh builds, with its own cache and config folders."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))
        }
        for kind in ("CACHE", "CONFIG", "DATA"):
            self.environment[f"HELM_{kind}_HOME"] = str(home / f"helm-{kind.lower()}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run helm with `args`; with `check`, fail the test on a non-zero exit code."""
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.environment,
            timeout=120,
            check=False,
        )
        if check:
            assert result.returncode == 0, (
                f"helm {' '.join(args)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def template(self, namespace: str, *args: str) -> list[dict[str, Any]]:
        """Render the chart as release `eventrouter` and return its documents."""
        result = self.run("template", "eventrouter", str(CHART), "--namespace", namespace, *args)
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="package")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(ensure_binaries() / "helm", tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def chart_apiserver() -> Iterator[KubeApiServer]:
    """A kube-apiserver and etcd for one test module."""
    with KubeApiServer() as server:
        yield server


@pytest.fixture(scope="module")
def chart_api(chart_apiserver: KubeApiServer) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(chart_apiserver.kubeconfig))
    yield api
    api.close()


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """Return the one document of `kind` (and `name`); fail when there is none or several."""
    found = [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(documents: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in documents)
