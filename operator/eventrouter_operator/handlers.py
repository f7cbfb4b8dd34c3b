"""kopf handlers: every event of a watched object reconciles the routers it affects.

The handlers are event handlers, not change handlers, so kopf stores no
progress annotations on the resources and a reconcile that finds nothing to
change writes nothing. Reconciles of one namespace run one at a time.

Run with `eventrouter operator` or `kopf run -m eventrouter_operator.handlers`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf
from kubernetes import client, config

from eventrouter_operator.builders import DEFAULT_IMAGE, MANAGED_BY
from eventrouter_operator.crds import GROUP
from eventrouter_operator.reconcile import Reconciler

logger = logging.getLogger(__name__)

_reconciler: Reconciler | None = None
_locks: dict[str, asyncio.Lock] = {}


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG")
            )
        image = os.environ.get("EVENTROUTER_IMAGE", DEFAULT_IMAGE)
        _reconciler = Reconciler(client.ApiClient(), image)
    return _reconciler


async def _reconcile_namespace(namespace: str | None) -> None:
    if not namespace:
        return
    lock = _locks.setdefault(namespace, asyncio.Lock())
    async with lock:
        await asyncio.to_thread(reconciler().reconcile_namespace, namespace)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Settings that keep watches alive and the operator's own writes few."""
    # A watch that the server or a proxy silently stalls is dropped and
    # restarted by the client after these timeouts.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    # Two replicas of the operator never handle the same objects at once.
    settings.peering.name = os.environ.get("EVENTROUTER_PEERING", "eventrouter-operator")
    settings.peering.mandatory = os.environ.get("EVENTROUTER_PEERING_MANDATORY", "") == "true"
    # `eventrouter operator --standalone` passes standalone=True to kopf.run,
    # which sets this before the startup handlers run, so only turn it on here.
    if os.environ.get("EVENTROUTER_STANDALONE", "") == "true":
        settings.peering.standalone = True
    # Only warnings and errors become Kubernetes Events.
    settings.posting.level = logging.WARNING


@kopf.on.event(GROUP, "v1alpha1", "eventrouters")
async def router_event(namespace: str | None, **_: Any) -> None:
    await _reconcile_namespace(namespace)


@kopf.on.event(GROUP, "v1alpha1", "eventroutes")
async def route_event(namespace: str | None, **_: Any) -> None:
    await _reconcile_namespace(namespace)


@kopf.on.event(GROUP, "v1alpha1", "eventsinks")
async def sink_event(namespace: str | None, **_: Any) -> None:
    await _reconcile_namespace(namespace)


@kopf.on.event("", "v1", "secrets")
async def secret_event(namespace: str | None, **_: Any) -> None:
    # A Secret that a sink was waiting for may have appeared.
    await _reconcile_namespace(namespace)


_OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


@kopf.on.event("", "v1", "configmaps", labels=_OWNED)
@kopf.on.event("", "v1", "services", labels=_OWNED)
@kopf.on.event("apps", "v1", "deployments", labels=_OWNED)
async def owned_event(namespace: str | None, **_: Any) -> None:
    # Puts back manual edits and reads the Deployment's ready replicas.
    await _reconcile_namespace(namespace)


@kopf.timer(GROUP, "v1alpha1", "eventrouters", interval=60.0, idle=30.0)
async def resync(namespace: str | None, **_: Any) -> None:
    await _reconcile_namespace(namespace)
