"""Desired Kubernetes objects for one EventRouter, built without any API calls.

`resolve_router` decides which routes and sinks a router runs and what status
each gets; `build_objects` turns that into a ConfigMap, a Deployment, a
Service, and optionally a HorizontalPodAutoscaler and a PodDisruptionBudget.
Everything here is a pure function of the resources and the Secrets that
exist, so the handlers stay thin and the tests can check the output directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from eventrouter.config import LoadedDocument, resolve
from eventrouter.errors import ConfigError
from eventrouter.resources import (
    API_VERSION,
    EventRoute,
    EventRouter,
    EventSink,
    SecretSource,
)

__all__ = [
    "CONFIG_FILE",
    "MANAGED_BY",
    "SECRETS_DIR",
    "Resolution",
    "ResourceStatus",
    "build_objects",
    "file_sink_folders",
    "resolve_router",
    "secret_names",
]

CONFIG_DIR = "/etc/eventrouter"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
SECRETS_DIR = "/var/run/secrets/eventrouter"
MANAGED_BY = "eventrouter-operator"
INGEST_PORT = 7350
ADMIN_PORT = 7351
DEFAULT_IMAGE = "ghcr.io/eventrouter/eventrouter:0.1.0"


@dataclass(frozen=True)
class ResourceStatus:
    """One condition to report on a route or sink."""

    type: str
    status: bool
    reason: str
    message: str


@dataclass
class Resolution:
    """The routes and sinks of one router, and the conditions of every resource that names it."""

    router: EventRouter | None
    router_error: str | None
    routes: list[EventRoute] = field(default_factory=list)
    sinks: dict[str, EventSink] = field(default_factory=dict)
    route_status: dict[str, list[ResourceStatus]] = field(default_factory=dict)
    sink_status: dict[str, list[ResourceStatus]] = field(default_factory=dict)
    config_text: str = ""
    digest: str = ""
    secrets: list[str] = field(default_factory=list)
    router_missing_secrets: list[str] = field(default_factory=list)
    """Secrets that the router's own spec (auth) names and the namespace lacks."""


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def _validate(model: type[BaseModel], body: Mapping[str, Any]) -> tuple[Any, str | None]:
    clean = {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind"),
        "metadata": {"name": body.get("metadata", {}).get("name")},
        "spec": body.get("spec", {}),
    }
    try:
        return model.model_validate(clean), None
    except ValidationError as exc:
        return None, _first_error(exc)


def _secret_sources(value: Any) -> Iterable[SecretSource]:
    """Yield every SecretSource inside a model, at any depth."""
    if isinstance(value, SecretSource):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_sources(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_sources(item)


def secret_names(value: Any) -> list[str]:
    """Names of the Secrets that a model refers to through secretKeyRef."""
    names = {s.secret_key_ref.name for s in _secret_sources(value) if s.secret_key_ref}
    return sorted(names)


def resolve_router(
    router_body: Mapping[str, Any],
    route_bodies: Iterable[Mapping[str, Any]],
    sink_bodies: Iterable[Mapping[str, Any]],
    existing_secrets: set[str],
) -> Resolution:
    """Choose the routes and sinks of one router and the status of each.

    A route that names a missing sink, or a sink that is invalid, leaves out
    that route only; every other route of the router keeps running.
    """
    router, error = _validate(EventRouter, router_body)
    name = router_body["metadata"]["name"]
    resolution = Resolution(router=router, router_error=error)
    if router is not None:
        resolution.router_missing_secrets = [
            s for s in secret_names(router.spec) if s not in existing_secrets
        ]

    sinks: dict[str, EventSink] = {}
    invalid_sinks: set[str] = set()
    for body in sink_bodies:
        sink_name = body["metadata"]["name"]
        sink, sink_error = _validate(EventSink, body)
        if sink is None:
            resolution.sink_status[sink_name] = [
                ResourceStatus("Ready", False, "InvalidSpec", sink_error or "invalid")
            ]
            invalid_sinks.add(sink_name)
            continue
        missing = [s for s in secret_names(sink.spec) if s not in existing_secrets]
        if missing:
            # The sink still runs: its Secret volume is optional, and the router
            # reads the files at each attempt, so it recovers once they appear.
            resolution.sink_status[sink_name] = [
                ResourceStatus(
                    "Ready",
                    False,
                    "SecretNotFound",
                    f"Secret {', '.join(missing)} not found in the namespace; "
                    "create it and the sink becomes ready without a restart",
                )
            ]
        else:
            resolution.sink_status[sink_name] = [
                ResourceStatus("Ready", True, "Valid", "the sink is valid and its Secrets exist")
            ]
        sinks[sink_name] = sink

    for body in route_bodies:
        if body.get("spec", {}).get("router") != name:
            continue
        route_name = body["metadata"]["name"]
        route, route_error = _validate(EventRoute, body)
        if route is None:
            resolution.route_status[route_name] = [
                ResourceStatus("Accepted", False, "InvalidSpec", route_error or "invalid"),
                ResourceStatus("ResolvedRefs", False, "InvalidSpec", "the route is not valid"),
            ]
            continue
        unusable = [s for s in route.spec.sinks if s not in sinks]
        letters = _missing_dead_letters(route.spec.sinks, sinks)
        accepted = ResourceStatus("Accepted", True, "Accepted", f"the route belongs to {name}")
        if unusable or letters:
            resolution.route_status[route_name] = [
                accepted,
                _unresolved(unusable, letters, invalid_sinks),
            ]
            continue
        resolution.route_status[route_name] = [
            accepted,
            ResourceStatus("ResolvedRefs", True, "ResolvedRefs", "every sink of the route exists"),
        ]
        resolution.routes.append(route)

    if router is None:
        return resolution
    _finish(resolution, router, sinks)
    return resolution


def _unresolved(sinks: list[str], letters: list[str], invalid: set[str]) -> ResourceStatus:
    """Build the ResolvedRefs=False condition of a route with missing or invalid sinks."""
    missing = [s for s in sinks if s not in invalid]
    missing_letters = [s for s in letters if s not in invalid]
    broken = [s for s in sinks + letters if s in invalid]
    parts = []
    if missing:
        parts.append(f"EventSink {', '.join(missing)} not found")
    if missing_letters:
        parts.append(f"dead-letter EventSink {', '.join(missing_letters)} not found")
    if parts:
        parts[-1] += "; create it or remove it from the route"
    if broken:
        parts.append(f"EventSink {', '.join(broken)} is not valid; its status says why")
    reason = "SinkNotFound" if missing or missing_letters else "InvalidSink"
    return ResourceStatus("ResolvedRefs", False, reason, "; ".join(parts))


def _missing_dead_letters(names: Iterable[str], sinks: Mapping[str, EventSink]) -> list[str]:
    missing = []
    pending = [n for n in names if n in sinks]
    seen = set(pending)
    while pending:
        letter = sinks[pending.pop()].spec.dead_letter_sink
        if letter is None or letter in seen:
            continue
        if letter not in sinks:
            missing.append(letter)
            continue
        seen.add(letter)
        pending.append(letter)
    return missing


def _finish(resolution: Resolution, router: EventRouter, sinks: Mapping[str, EventSink]) -> None:
    """Resolve the accepted routes like `eventrouter serve` would and render the file."""
    documents = [LoadedDocument("<operator>", 0, router)]
    documents += [LoadedDocument("<operator>", i + 1, r) for i, r in enumerate(resolution.routes)]
    documents += [
        LoadedDocument("<operator>", len(documents) + i, s) for i, s in enumerate(sinks.values())
    ]
    try:
        config = resolve(documents, router.metadata.name, ["<operator>"])
    except ConfigError as exc:
        resolution.router_error = "; ".join(str(i) for i in exc.issues)
        return
    resolution.sinks = dict(config.sinks)
    bodies = [
        _document(router),
        *(_document(r) for r in config.routes),
        *(_document(s) for s in config.sinks.values()),
    ]
    resolution.config_text = yaml.safe_dump_all(bodies, sort_keys=False)
    resolution.digest = hashlib.sha256(resolution.config_text.encode()).hexdigest()[:16]
    names = set(secret_names(router.spec))
    for sink in config.sinks.values():
        names.update(secret_names(sink.spec))
    resolution.secrets = sorted(names)


def _document(resource: EventRouter | EventRoute | EventSink) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": resource.kind,
        "metadata": {"name": resource.metadata.name},
        "spec": resource.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True),
    }


# --- objects -------------------------------------------------------------------

# The kernel's folders, which an emptyDir must never cover.
_SYSTEM_FOLDERS = (PurePosixPath("/dev"), PurePosixPath("/proc"), PurePosixPath("/sys"))


def file_sink_folders(resolution: Resolution) -> list[str]:
    """Return the absolute folders that file sinks write to, except system folders and mounts."""
    # The config and Secret mounts are read-only, so a file sink there fails anyway.
    reserved = (*_SYSTEM_FOLDERS, PurePosixPath(CONFIG_DIR), PurePosixPath(SECRETS_DIR))
    folders = set()
    for sink in resolution.sinks.values():
        if sink.spec.file is None:
            continue
        folder = PurePosixPath(sink.spec.file.path).parent
        if not folder.is_absolute() or folder == PurePosixPath("/"):
            continue
        if any(folder == r or r in folder.parents for r in reserved):
            continue
        folders.add(str(folder))
    return sorted(folders)


def labels(router: str) -> dict[str, str]:
    """Return the standard labels of every object made for one router."""
    return {
        "app.kubernetes.io/name": "eventrouter",
        "app.kubernetes.io/instance": router,
        "app.kubernetes.io/component": "router",
        "app.kubernetes.io/part-of": "eventrouter",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _selector(router: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "eventrouter", "app.kubernetes.io/instance": router}


def _owner(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "EventRouter",
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, namespace: str, router: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(router),
        "ownerReferences": [owner],
    }


def _container(router: EventRouter, image: str) -> dict[str, Any]:
    spec = router.spec
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "serve",
            "-f",
            CONFIG_FILE,
            "--host",
            "0.0.0.0",
            "--admin-host",
            "0.0.0.0",
        ],
        "env": [
            {"name": "EVENTROUTER_SECRETS_DIR", "value": SECRETS_DIR},
            {"name": "EVENTROUTER_LOG_FORMAT", "value": "json"},
            {"name": "EVENTROUTER_GRACE_PERIOD", "value": "25"},
        ],
        "ports": [
            {"name": "ingest", "containerPort": INGEST_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "admin"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "admin"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    if spec.resources:
        container["resources"] = {k: dict(v) for k, v in spec.resources.items()}
    return container


def build_objects(
    router_body: Mapping[str, Any],
    resolution: Resolution,
    *,
    image: str = DEFAULT_IMAGE,
) -> list[dict[str, Any]]:
    """Build the objects the router needs, each a full body for server-side apply."""
    router = resolution.router
    assert router is not None
    name = router.metadata.name
    namespace = router_body["metadata"]["namespace"]
    owner = _owner(router_body)
    config_name = f"{name}-config"

    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_name, namespace, name, owner),
        "data": {"config.yaml": resolution.config_text},
    }

    container = _container(router, image)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name}},
    ]
    for index, secret in enumerate(resolution.secrets):
        volume = f"secret-{index}"
        # optional: a missing Secret must not keep the pod from starting; the
        # sinks that need it report it and recover when it appears.
        volumes.append({"name": volume, "secret": {"secretName": secret, "optional": True}})
        container["volumeMounts"].append(
            {"name": volume, "mountPath": f"{SECRETS_DIR}/{secret}", "readOnly": True}
        )
    for index, folder in enumerate(file_sink_folders(resolution)):
        # The root filesystem is read-only, so each folder that a file sink
        # writes to gets a writable volume.
        # NOTE: an emptyDir lives as long as the pod, so the files go with it.
        volume = f"data-{index}"
        volumes.append({"name": volume, "emptyDir": {}})
        container["volumeMounts"].append({"name": volume, "mountPath": folder})
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, name, owner),
        "spec": {
            "selector": {"matchLabels": _selector(name)},
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {
                    "containers": [container],
                    "volumes": volumes,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }
    if not router.spec.autoscaling.enabled:
        deployment["spec"]["replicas"] = router.spec.replicas

    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, name, owner),
        "spec": {
            "selector": _selector(name),
            "ports": [
                {"name": "ingest", "port": INGEST_PORT, "targetPort": "ingest", "protocol": "TCP"},
                {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"},
            ],
        },
    }
    objects = [configmap, deployment, service]

    scaling = router.spec.autoscaling
    if scaling.enabled:
        objects.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": _meta(name, namespace, name, owner),
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": scaling.min_replicas,
                    "maxReplicas": scaling.max_replicas,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {
                                    "type": "Utilization",
                                    "averageUtilization": scaling.target_cpu_utilization_percentage,
                                },
                            },
                        }
                    ],
                },
            }
        )
    if scaling.enabled or router.spec.replicas > 1:
        objects.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": _meta(name, namespace, name, owner),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(name)}},
            }
        )
    return objects
