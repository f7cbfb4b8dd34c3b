"""Reconcile one EventRouter: read its resources, apply its objects, write statuses.

Writes happen only where the live state differs from the desired state: an
object is applied when one of the fields the operator sets differs (fields the
API server defaults are ignored), and a status is patched when one of its
conditions changed. So reconciling an unchanged router twice writes nothing,
and a manual edit of an owned object is put back at the next reconcile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from eventrouter_operator.builders import (
    MANAGED_BY,
    Resolution,
    ResourceStatus,
    build_objects,
    resolve_router,
)
from eventrouter_operator.crds import GROUP, VERSION

__all__ = ["Reconciler", "subset_matches"]

logger = logging.getLogger(__name__)

FIELD_MANAGER = MANAGED_BY
_PLURALS = {"EventRouter": "eventrouters", "EventRoute": "eventroutes", "EventSink": "eventsinks"}
# Kinds that build_objects makes only for some specs. The reconcile deletes
# them when the spec no longer requires them.
_OPTIONAL_KINDS = frozenset({"HorizontalPodAutoscaler", "PodDisruptionBudget"})


def subset_matches(desired: Any, live: Any) -> bool:
    """True when every field of `desired` has the same value in `live`.

    Fields that only `live` has (defaults the API server filled in, status,
    metadata it manages) do not count. Lists must have the same length.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(k in live and subset_matches(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(subset_matches(d, v) for d, v in zip(desired, live, strict=True))
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return desired == live
    return bool(desired == live)


def _conditions(
    wanted: list[ResourceStatus], current: list[dict[str, Any]], generation: int | None
) -> list[dict[str, Any]]:
    """Conditions as Kubernetes wants them; lastTransitionTime moves only on a change."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_type = {c.get("type"): c for c in current}
    result = []
    for status in wanted:
        value = "True" if status.status else "False"
        previous = by_type.get(status.type, {})
        changed = previous.get("status") != value
        condition = {
            "type": status.type,
            "status": value,
            "reason": status.reason,
            "message": status.message[:4096],
            "lastTransitionTime": now if changed else previous.get("lastTransitionTime", now),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        result.append(condition)
    return result


def _same_conditions(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> bool:
    keys = ("type", "status", "reason", "message", "observedGeneration")
    strip = [{k: c.get(k) for k in keys} for c in new]
    return strip == [{k: c.get(k) for k in keys} for c in old]


class Reconciler:
    """Reconciles routers with the Kubernetes API through the official client."""

    def __init__(self, api: client.ApiClient, image: str) -> None:
        self.api = api
        self.image = image
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.autoscaling = client.AutoscalingV2Api(api)
        self.policy = client.PolicyV1Api(api)
        self.writes = 0
        """Count of write requests sent; tests use it to check idempotence."""

    # --- reading -------------------------------------------------------------------

    def _list(self, namespace: str, kind: str) -> list[dict[str, Any]]:
        found: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, _PLURALS[kind]
        )
        return list(found.get("items", []))

    def _get_router(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body: Any = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "eventrouters", name
            )
            return dict(body)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _secret_names(self, namespace: str) -> set[str]:
        secrets = self.core.list_namespaced_secret(namespace)
        return {s.metadata.name for s in secrets.items if s.metadata and s.metadata.name}

    # --- the reconcile -------------------------------------------------------------

    def reconcile_namespace(self, namespace: str) -> None:
        """Reconcile every router of a namespace, and routes that name no router."""
        routers = self._list(namespace, "EventRouter")
        routes = self._list(namespace, "EventRoute")
        sinks = self._list(namespace, "EventSink")
        secrets = self._secret_names(namespace)
        names = {r["metadata"]["name"] for r in routers}
        for router in routers:
            try:
                self._reconcile(router, routes, sinks, secrets)
            except ApiException as exc:
                # One router's failure must not stop the others.
                logger.error(
                    "reconciling EventRouter %s/%s failed: %s %s",
                    namespace,
                    router["metadata"]["name"],
                    exc.status,
                    exc.reason,
                )
            except Exception:
                # An unexpected error in one router must not stop the others either.
                logger.exception(
                    "reconciling EventRouter %s/%s failed", namespace, router["metadata"]["name"]
                )
        for route in routes:
            target = route.get("spec", {}).get("router")
            if target not in names:
                self._patch_status(
                    route,
                    [
                        ResourceStatus(
                            "Accepted",
                            False,
                            "RouterNotFound",
                            f"EventRouter {target!r} not found in namespace {namespace}",
                        ),
                        ResourceStatus(
                            "ResolvedRefs", False, "RouterNotFound", "the route has no router"
                        ),
                    ],
                )

    def reconcile_router(self, namespace: str, name: str) -> None:
        router = self._get_router(namespace, name)
        if router is None:
            return
        routes = self._list(namespace, "EventRoute")
        sinks = self._list(namespace, "EventSink")
        self._reconcile(router, routes, sinks, self._secret_names(namespace))

    def _reconcile(
        self,
        router: dict[str, Any],
        routes: list[dict[str, Any]],
        sinks: list[dict[str, Any]],
        secrets: set[str],
    ) -> None:
        resolution = resolve_router(router, routes, sinks, secrets)
        by_name = {r["metadata"]["name"]: r for r in routes}
        for name, statuses in resolution.route_status.items():
            self._patch_status(by_name[name], statuses)
        sink_by_name = {s["metadata"]["name"]: s for s in sinks}
        for name, statuses in resolution.sink_status.items():
            self._patch_status(sink_by_name[name], statuses)

        if resolution.router is None or not resolution.config_text:
            message = resolution.router_error or "the router is not valid"
            self._patch_status(
                router,
                [
                    ResourceStatus("Ready", False, "InvalidSpec", message),
                    ResourceStatus("Progressing", False, "InvalidSpec", message),
                    ResourceStatus("Degraded", True, "InvalidSpec", message),
                ],
            )
            return

        ready_replicas = 0
        objects = build_objects(router, resolution, image=self.image)
        for desired in objects:
            live = self._apply(desired)
            if desired["kind"] == "Deployment" and live is not None:
                ready_replicas = int((live.get("status") or {}).get("readyReplicas") or 0)
        for kind in _OPTIONAL_KINDS.difference(o["kind"] for o in objects):
            self._delete_owned(kind, router)
        self._patch_status(
            router,
            self._router_conditions(router, resolution, ready_replicas),
            extra={
                "readyReplicas": ready_replicas,
                "routeCount": len(resolution.routes),
                "configDigest": resolution.digest,
            },
        )

    def _router_conditions(
        self, router: dict[str, Any], resolution: Resolution, ready: int
    ) -> list[ResourceStatus]:
        spec = resolution.router.spec if resolution.router else None
        if spec is None:
            wanted = 1
        elif spec.autoscaling.enabled:
            wanted = spec.autoscaling.min_replicas
        else:
            wanted = spec.replicas
        broken_routes = sorted(
            n for n, s in resolution.route_status.items() if not all(c.status for c in s)
        )
        broken_sinks = sorted(
            n
            for n, s in resolution.sink_status.items()
            if n in resolution.sinks and not all(c.status for c in s)
        )
        problems = []
        if broken_routes:
            problems.append(f"routes not served: {', '.join(broken_routes)}")
        if broken_sinks:
            problems.append(f"sinks not ready: {', '.join(broken_sinks)}")
        if resolution.router_missing_secrets:
            problems.append(
                f"Secret {', '.join(resolution.router_missing_secrets)} of spec.auth not found "
                "in the namespace, so the router cannot start until it is created"
            )
        auth = spec.auth if spec else None
        if auth is not None and auth.api_keys is None:
            problems.append(
                "spec.auth.apiKeys is not set: on Kubernetes the router listens on the pod's "
                "address and serves its admin port only with API keys, so it will not start"
            )
        degraded = ResourceStatus(
            "Degraded",
            bool(problems),
            "ResourcesNotReady" if problems else "AsExpected",
            "; ".join(problems) or "every route and sink of the router is served",
        )
        if ready >= max(wanted, 1) or (wanted == 0 and ready == 0):
            return [
                ResourceStatus(
                    "Ready", True, "ReplicasReady", f"{ready} of {wanted} replicas ready"
                ),
                ResourceStatus("Progressing", False, "Complete", "the Deployment is up to date"),
                degraded,
            ]
        message = (
            f"{ready} of {wanted} replicas ready; waiting for pods to become ready "
            "(a cluster without nodes runs none)"
        )
        return [
            ResourceStatus("Ready", False, "ReplicasNotReady", message),
            ResourceStatus("Progressing", True, "ReplicasNotReady", message),
            degraded,
        ]

    # --- writing -------------------------------------------------------------------

    def _read(self, desired: dict[str, Any]) -> dict[str, Any] | None:
        kind = desired["kind"]
        meta = desired["metadata"]
        readers = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "Deployment": self.apps.read_namespaced_deployment,
            "HorizontalPodAutoscaler": self.autoscaling.read_namespaced_horizontal_pod_autoscaler,
            "PodDisruptionBudget": self.policy.read_namespaced_pod_disruption_budget,
        }
        try:
            live = readers[kind](meta["name"], meta["namespace"])
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: dict[str, Any] = self.api.sanitize_for_serialization(live)  # type: ignore[no-untyped-call]
        return result

    def _apply(self, desired: dict[str, Any]) -> dict[str, Any] | None:
        """Server-side apply `desired` unless the live object already matches it."""
        live = self._read(desired)
        if live is not None and subset_matches(
            {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}, live
        ):
            return live
        kind = desired["kind"]
        meta = desired["metadata"]
        patchers = {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "Deployment": self.apps.patch_namespaced_deployment,
            "HorizontalPodAutoscaler": self.autoscaling.patch_namespaced_horizontal_pod_autoscaler,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
        }
        self.writes += 1
        logger.info(
            "%s %s/%s %s",
            "updating" if live is not None else "creating",
            meta["namespace"],
            meta["name"],
            kind,
        )
        result = patchers[kind](
            meta["name"],
            meta["namespace"],
            desired,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        applied: dict[str, Any] = self.api.sanitize_for_serialization(result)  # type: ignore[no-untyped-call]
        return applied

    def _delete_owned(self, kind: str, router: dict[str, Any]) -> None:
        """Delete the router's `kind` object if this router owns it.

        An HPA left behind after autoscaling is turned off would keep scaling
        the Deployment against spec.replicas. An object of the same name that
        the router does not own is left alone.
        """
        meta = router["metadata"]
        probe = {"kind": kind, "metadata": {"name": meta["name"], "namespace": meta["namespace"]}}
        live = self._read(probe)
        if live is None:
            return
        owners = (live.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == meta["uid"] for o in owners):
            return
        deleters = {
            "HorizontalPodAutoscaler": self.autoscaling.delete_namespaced_horizontal_pod_autoscaler,
            "PodDisruptionBudget": self.policy.delete_namespaced_pod_disruption_budget,
        }
        self.writes += 1
        logger.info("deleting %s/%s %s", meta["namespace"], meta["name"], kind)
        try:
            deleters[kind](meta["name"], meta["namespace"])
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _patch_status(
        self,
        body: dict[str, Any],
        statuses: list[ResourceStatus],
        extra: dict[str, Any] | None = None,
    ) -> None:
        status = body.get("status") or {}
        generation = body["metadata"].get("generation")
        current = status.get("conditions") or []
        conditions = _conditions(statuses, current, generation)
        unchanged = (
            _same_conditions(conditions, current) and status.get("observedGeneration") == generation
        )
        if extra:
            unchanged = unchanged and all(status.get(k) == v for k, v in extra.items())
        if unchanged:
            return
        patch = {
            "status": {"conditions": conditions, "observedGeneration": generation, **(extra or {})}
        }
        meta = body["metadata"]
        self.writes += 1
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], _PLURALS[body["kind"]], meta["name"], patch
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
