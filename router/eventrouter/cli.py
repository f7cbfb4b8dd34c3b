"""The `eventrouter` command: serve, validate and send."""

from __future__ import annotations

import argparse
import json
import random
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from eventrouter import __version__
from eventrouter.config import load_documents, resolve
from eventrouter.errors import ConfigError

__all__ = ["main"]


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a router",
        description=(
            "Run a router. Without -f it runs the embedded default: ingestion on "
            "127.0.0.1:7350, admin on 127.0.0.1:7351, no auth, every event to stdout as JSON. "
            "Each option can also be set with the EVENTROUTER_* variable named in its help."
        ),
    )
    serve.add_argument(
        "-f",
        "--file",
        dest="config",
        action="append",
        metavar="PATH",
        help="resource file or folder; repeat for more (EVENTROUTER_CONFIG, a JSON list)",
    )
    serve.add_argument(
        "--router", help="EventRouter to run when the files define several (EVENTROUTER_ROUTER)"
    )
    serve.add_argument("--host", help="ingestion address (EVENTROUTER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="ingestion port (EVENTROUTER_PORT, default 7350)")
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        default=None,
        help="let several routers listen on the same ingestion port, so the kernel spreads "
        "connections over them; give each its own --admin-port (EVENTROUTER_REUSE_PORT)",
    )
    serve.add_argument(
        "--admin-host", help="admin address (EVENTROUTER_ADMIN_HOST, default 127.0.0.1)"
    )
    serve.add_argument(
        "--admin-port", type=int, help="admin port (EVENTROUTER_ADMIN_PORT, default 7351)"
    )
    serve.add_argument(
        "--session-key-file", help="file with the session token key (EVENTROUTER_SESSION_KEY_FILE)"
    )
    serve.add_argument(
        "--api-keys-file", help="file with one API key per line (EVENTROUTER_API_KEYS_FILE)"
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        help="seconds to drain after SIGTERM (EVENTROUTER_GRACE_PERIOD, default 30)",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        help="seconds between checks of the -f files; 0 turns it off "
        "(EVENTROUTER_RELOAD_INTERVAL, default 1)",
    )
    serve.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="EVENTROUTER_LOG_LEVEL, default INFO",
    )
    serve.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        help="auto is JSON unless stderr is a terminal (EVENTROUTER_LOG_FORMAT)",
    )


def _add_validate(commands: Any) -> None:
    validate = commands.add_parser(
        "validate",
        help="check resource files",
        description="Check resource files and print every error with its file, document and field.",
    )
    validate.add_argument(
        "-f",
        "--file",
        dest="config",
        action="append",
        metavar="PATH",
        required=True,
        help="resource file or folder; repeat for more",
    )
    validate.add_argument("--router", help="EventRouter to check the routes of")


def _add_send(commands: Any) -> None:
    send = commands.add_parser(
        "send",
        help="send test events to a router",
        description="Send test events to a running router with POST /v2/events.",
    )
    send.add_argument("name", help="event name")
    send.add_argument(
        "-p",
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="event property; repeat for more",
    )
    send.add_argument("-n", "--count", type=int, default=1, help="number of events (default 1)")
    send.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="events per request, at most the router's limits.maxBatchEvents (default 100)",
    )
    send.add_argument(
        "--internal",
        action="store_true",
        help="send external: false; the router keeps it only for API-key callers",
    )
    send.add_argument("--url", default="http://127.0.0.1:7350", help="router address")
    send.add_argument("--token", help="session token, sent as Authorization: Bearer")
    send.add_argument("--api-key", help="API key, sent as X-Api-Key")


def _add_operator(commands: Any) -> None:
    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator",
        description=(
            "Run the kopf operator that turns EventRouter resources into a ConfigMap, a "
            "Deployment and a Service. It uses the in-cluster service account, or KUBECONFIG."
        ),
    )
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        metavar="NAMESPACE",
        help="watch this namespace; repeat for more (default: the whole cluster)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    operator.add_argument(
        "--standalone",
        action="store_true",
        help="run without peering, when only one operator replica runs",
    )
    operator.add_argument(
        "--priority",
        type=_peering_priority,
        default=0,
        metavar="N|random",
        help="peering priority: among live peers only the highest runs, and peers with equal "
        "priorities all pause; 'random' picks one of 1 to 2**31-1 (default 0)",
    )
    operator.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz",
    )
    operator.add_argument(
        "--no-scanning",
        action="store_true",
        help="do not list or watch Namespaces and CRDs, which needs no cluster-wide access; "
        "then CRD changes take effect at the next restart",
    )


def _peering_priority(value: str) -> int:
    if value == "random":
        # Distinct replicas of one Deployment collide with odds of 1 in 2**31.
        return random.randint(1, 2**31 - 1)
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid priority {value!r}: use an integer or 'random'"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventrouter",
        description="Take in game events once and route them to every sink that needs them.",
    )
    parser.add_argument("--version", action="version", version=f"eventrouter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_validate(commands)
    _add_send(commands)
    _add_operator(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from eventrouter.server import run
    from eventrouter.settings import Settings

    flags = {
        key: value for key, value in vars(args).items() if key != "command" and value is not None
    }
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"eventrouter: invalid setting {field}: {error['msg']}", file=sys.stderr)
        return 2
    return run(settings)


def _validate(args: argparse.Namespace) -> int:
    documents, issues = load_documents(args.config)
    try:
        config = resolve(documents, args.router, args.config, issues)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        print(f"{len(exc.issues)} error(s) in {len(args.config)} path(s)", file=sys.stderr)
        return 1
    kinds = [d.resource.kind for d in documents]
    print(
        f"ok: {_plural(len(documents), 'document')} "
        f"({kinds.count('EventRouter')} EventRouter, {kinds.count('EventRoute')} EventRoute, "
        f"{kinds.count('EventSink')} EventSink); router {config.name} has "
        f"{_plural(len(config.routes), 'route')} to {_plural(len(config.sinks), 'sink')}"
    )
    return 0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _send(args: argparse.Namespace) -> int:
    properties: dict[str, str] = {}
    for item in args.property:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"eventrouter: invalid property {item!r}: use KEY=VALUE", file=sys.stderr)
            return 2
        properties[key] = value
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    if args.api_key:
        headers["X-Api-Key"] = args.api_key
    accepted = 0
    remaining = args.count
    while remaining > 0:
        size = min(remaining, max(1, args.batch_size))
        event = {"name": args.name, "properties": properties, "external": not args.internal}
        body = json.dumps({"events": [event] * size}).encode()
        request = urllib.request.Request(
            args.url.rstrip("/") + "/v2/events", data=body, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                accepted += json.loads(response.read())["accepted"]
        except urllib.error.HTTPError as exc:
            print(
                f"eventrouter: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr
            )
            return 1
        except urllib.error.URLError as exc:
            print(f"eventrouter: cannot reach {args.url}: {exc.reason}", file=sys.stderr)
            return 1
        remaining -= size
    print(f"sent {_plural(args.count, 'event')}, {accepted} accepted")
    return 0


def _operator(args: argparse.Namespace) -> int:
    import kopf

    import eventrouter_operator.handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=False)
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = args.no_scanning
    kopf.run(
        standalone=args.standalone,
        namespaces=args.namespace or [],
        clusterwide=not args.namespace,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        settings=settings,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "operator":
        return _operator(args)
    if args.command == "validate":
        return _validate(args)
    return _send(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
