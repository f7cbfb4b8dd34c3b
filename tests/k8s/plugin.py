"""Pytest plugin with the `kube_apiserver` fixture: one real kube-apiserver and etcd per session.

The control plane starts at first use and stops at the end of the session,
also after failures, and at interpreter exit if teardown never runs. Tests
share it, so each test creates its own namespace with
`kube_apiserver.create_namespace()` and gives cluster-scoped objects (CRDs,
ClusterRoles) names of its own.

tests/conftest.py lists this plugin in `pytest_plugins`, so every test folder
can use the fixture.

NOTE: the fixture runs scripts/install-k8s.sh, and on a machine without the
cached binaries that build takes longer than the 300 s pytest timeout. Run
scripts/install-k8s.sh (scripts/test.sh does) before pytest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.k8s.apiserver import KubeApiServer


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[KubeApiServer]:
    """A running kube-apiserver. Clients use `kube_apiserver.kubeconfig` or `kube_apiserver.url`."""
    server = KubeApiServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
