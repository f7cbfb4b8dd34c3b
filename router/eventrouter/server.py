"""`eventrouter serve`: one process with the ingestion and admin servers and the engine.

Signals: SIGTERM and SIGINT stop accepting, drain within the grace period and
exit; SIGHUP reloads the resource files. The files are also polled for
changes every `reload_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from eventrouter.admin import AdminApp
from eventrouter.app import IngestApp
from eventrouter.auth import Authenticator
from eventrouter.config import RouterConfig, load_config
from eventrouter.engine import Engine
from eventrouter.errors import ConfigError, ConfigIssue, DeliveryError
from eventrouter.logs import configure_logging
from eventrouter.metrics import Metrics
from eventrouter.secretfiles import read_secret
from eventrouter.settings import Settings
from eventrouter.tracing import Tracing

__all__ = ["Router", "is_loopback", "run"]

logger = logging.getLogger(__name__)

_YAML_SUFFIXES = (".yaml", ".yml", ".json")


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_authenticator(config: RouterConfig, settings: Settings) -> Authenticator:
    """Read the session key and API keys from settings or the EventRouter's auth block."""
    auth = config.router.spec.auth
    session_key: str | None = None
    if settings.session_key is not None:
        session_key = settings.session_key.get_secret_value()
    elif settings.session_key_file is not None:
        session_key = _read_file(settings.session_key_file, "EVENTROUTER_SESSION_KEY_FILE")
    elif auth.session_key is not None:
        session_key = read_secret(auth.session_key, settings.secrets_dir, "spec.auth.sessionKey")
    api_text: str | None = None
    if settings.api_keys_file is not None:
        api_text = _read_file(settings.api_keys_file, "EVENTROUTER_API_KEYS_FILE")
    elif auth.api_keys is not None:
        api_text = read_secret(auth.api_keys, settings.secrets_dir, "spec.auth.apiKeys")
    api_keys = [line.strip() for line in (api_text or "").splitlines() if line.strip()]
    if session_key is not None and len(session_key) < 16:
        raise ConfigError(
            [
                ConfigIssue(
                    "<auth>",
                    None,
                    None,
                    "sessionKey",
                    "session key is shorter than 16 characters; use the same long random key "
                    "as the game server's session.encryption_key",
                )
            ]
        )
    return Authenticator(session_key, api_keys)


def _read_file(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(str(path), None, None, setting, f"cannot read file: {exc.strerror}")]
        ) from exc


def check_bind(settings: Settings, authenticator: Authenticator) -> None:
    """Refuse to listen beyond loopback without authentication."""
    if not is_loopback(settings.host) and not authenticator.enabled:
        raise ConfigError(
            [
                ConfigIssue(
                    "<settings>",
                    None,
                    None,
                    "host",
                    f"refusing to listen on {settings.host} without authentication: set "
                    "spec.auth.sessionKey or spec.auth.apiKeys in the EventRouter, or "
                    "EVENTROUTER_SESSION_KEY_FILE / EVENTROUTER_API_KEYS_FILE, or listen on "
                    "127.0.0.1",
                )
            ]
        )
    if not is_loopback(settings.admin_host) and not authenticator.has_api_keys:
        raise ConfigError(
            [
                ConfigIssue(
                    "<settings>",
                    None,
                    None,
                    "adminHost",
                    f"refusing to serve the admin API on {settings.admin_host} without API keys: "
                    "configure spec.auth.apiKeys (metrics and routes then require X-Api-Key) "
                    "or listen on 127.0.0.1",
                )
            ]
        )


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the router."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn_config(
    app: object,
    host: str,
    port: int,
    ws_max_bytes: int | None = None,
    limit_concurrency: int | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        http="httptools",
        # websockets-sansio can refuse a handshake with an HTTP status and body.
        ws="websockets-sansio" if ws_max_bytes else "none",
        ws_max_size=ws_max_bytes or 16 * 1024 * 1024,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=5,
        # Beyond this many open connections and sessions, new requests get 503.
        # NOTE: uvicorn (0.55) with httptools bounds neither header size nor the
        # time to send headers; docs/api.md tells users to put a proxy in front.
        limit_concurrency=limit_concurrency,
    )


class Router:
    """The running router: engine, apps and servers, with reload and drain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        config = load_config(settings.config, settings.router)
        self.authenticator = build_authenticator(config, settings)
        check_bind(settings, self.authenticator)
        # NOTE: tracing is set up once; a reload that changes spec.tracing
        # applies after a restart.
        self.tracing = Tracing(config.router.spec.tracing, config.name)
        self.engine = Engine(
            config, self.metrics, settings.grace_period, settings.secrets_dir, self.tracing
        )
        self.app = IngestApp(self.engine, self.authenticator, self.metrics)
        self.admin = AdminApp(self, require_key=not is_loopback(settings.admin_host))
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._signal_tasks: set[asyncio.Future[bool]] = set()
        self._fingerprint = self._files_fingerprint()

    # --- reload ------------------------------------------------------------------

    def _files_fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        entries: list[tuple[str, int, int]] = []
        for raw in self.settings.config:
            path = Path(raw)
            files = (
                [p for p in path.rglob("*") if p.suffix in _YAML_SUFFIXES]
                if path.is_dir()
                else [path]
            )
            for file in files:
                try:
                    stat = file.stat()
                except OSError:
                    continue
                entries.append((str(file), stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(entries))

    async def reload(self, reason: str) -> bool:
        """Load the files again and apply them; keep the running configuration on error."""
        async with self._reload_lock:
            self._fingerprint = self._files_fingerprint()
            try:
                # Parsing runs on a thread, so large files do not hold up requests.
                config = await asyncio.to_thread(
                    load_config, self.settings.config, self.settings.router
                )
                authenticator = build_authenticator(config, self.settings)
                check_bind(self.settings, authenticator)
                if config.digest == self.engine.config.digest:
                    # The digest covers the resources but not the secret values,
                    # so keys rotated in their files still take effect here.
                    self.authenticator = authenticator
                    self.app.configure(authenticator)
                    self.metrics.reloads.labels("unchanged").inc()
                    logger.info(
                        "configuration unchanged (%s)", reason, extra={"digest": config.digest}
                    )
                    return True
                await self.engine.reload(config)
            except ConfigError as exc:
                self.metrics.reloads.labels("rejected").inc()
                logger.error(
                    "configuration rejected (%s); the previous one keeps running:\n%s",
                    reason,
                    "\n".join(f"  {issue}" for issue in exc.issues),
                    extra={"errors": [str(i) for i in exc.issues]},
                )
                return False
            except DeliveryError as exc:
                self.metrics.reloads.labels("rejected").inc()
                logger.error(
                    "configuration rejected (%s): a sink failed to start: %s; "
                    "the previous configuration keeps running",
                    reason,
                    exc,
                )
                return False
            self.authenticator = authenticator
            self.app.configure(authenticator)
            self.metrics.reloads.labels("applied").inc()
            logger.info(
                "configuration reloaded (%s): %d routes, %d sinks",
                reason,
                len(config.routes),
                len(config.sinks),
                extra={"digest": config.digest},
            )
            return True

    async def _watch_files(self) -> None:
        interval = self.settings.reload_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if self._files_fingerprint() != self._fingerprint:
                    await self.reload("files changed")
            except Exception:
                # The watcher must outlive any one bad reload.
                logger.exception("checking the configuration files for changes failed")

    def _reload_on_signal(self) -> None:
        if self._stop.is_set():
            logger.info("ignoring SIGHUP: the router is stopping")
            return
        task = asyncio.ensure_future(self.reload("SIGHUP"))
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    # --- run ---------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit status."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            await self.engine.start()
        except DeliveryError as exc:
            logger.error("a sink failed to start: %s", exc)
            return 1
        # NOTE: the WebSocket message limit is read once here; a reload that
        # changes spec.sessions.maxMessageBytes applies after a restart.
        sessions = self.engine.config.router.spec.sessions
        # The listening sockets are bound here, so that a port in use is a
        # clear error instead of uvicorn's exit from inside a task.
        try:
            ingest_socket = _bind(settings.host, settings.port, reuse_port=settings.reuse_port)
            admin_socket = _bind(settings.admin_host, settings.admin_port)
        except OSError as exc:
            logger.error("%s", exc)
            await self.engine.drain(0)
            return 1
        ingest = _Server(
            _uvicorn_config(
                self.app,
                settings.host,
                settings.port,
                sessions.max_message_bytes,
                limit_concurrency=settings.max_connections,
            )
        )
        admin = _Server(_uvicorn_config(self.admin, settings.admin_host, settings.admin_port))
        admin_task = asyncio.create_task(admin.serve([admin_socket]), name="admin-server")
        ingest_task = asyncio.create_task(ingest.serve([ingest_socket]), name="ingest-server")
        while not (ingest.started and admin.started):
            if ingest_task.done() or admin_task.done():
                logger.error("the HTTP servers failed to start")
                ingest.should_exit = admin.should_exit = True
                await asyncio.gather(ingest_task, admin_task, return_exceptions=True)
                await self.engine.drain(0)
                return 1
            await asyncio.sleep(0.01)

        # The modules, config and servers live as long as the process. Freezing
        # them keeps the garbage collector's full collections, which pause
        # the event loop, from walking them again and again.
        gc.freeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        watcher = (
            asyncio.create_task(self._watch_files(), name="config-watcher")
            if settings.config and settings.reload_interval > 0
            else None
        )
        logger.info(
            "router %s listening on %s:%d, admin on %s:%d, auth %s",
            self.engine.config.name,
            settings.host,
            _bound_port(ingest, settings.port),
            settings.admin_host,
            _bound_port(admin, settings.admin_port),
            "on" if self.authenticator.enabled else "off (loopback only)",
            extra={
                "router": self.engine.config.name,
                "port": _bound_port(ingest, settings.port),
                "admin_port": _bound_port(admin, settings.admin_port),
                "config": list(self.engine.config.sources),
            },
        )

        await self._stop.wait()

        # Stop taking events first, then close the listener and wait for the
        # requests in progress, then drain what was accepted.
        logger.info("stopping: draining for up to %.0fs", settings.grace_period)
        if watcher is not None:
            watcher.cancel()
        self.app.accepting = False
        # Requests waiting for room under `block` get 503 shutting_down now,
        # not when the server's graceful shutdown gives up on them.
        self.engine.buffer.stop_waiting()
        # Sessions close first, so that their session_end events are in the
        # buffer before the drain starts.
        await self.app.sessions.close_all(timeout=min(5.0, settings.grace_period))
        ingest.should_exit = True
        await ingest_task
        await self.engine.drain()
        # Counted from the metrics, so that events cut off anywhere (ring buffer,
        # a worker waiting for room, a sink) are all included.
        buffer_lost, sinks_lost = _shutdown_drops(self.metrics)
        lost = round(buffer_lost + sinks_lost)
        admin.should_exit = True
        await admin_task
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        self.tracing.shutdown()
        totals = _outcome_totals(self.metrics)
        summary = (
            f"over the run, counted once per sink: delivered {totals['delivered']:.0f}, "
            f"dead-lettered {totals['dead_lettered']:.0f}, dropped {totals['dropped']:.0f}; "
            f"dropped by the ring buffer {totals['buffer_dropped']:.0f}"
        )
        if lost:
            logger.error(
                "router stopped; %d deliveries were not made at shutdown "
                "(%d events left in the ring buffer, %d left for sinks); %s",
                lost,
                buffer_lost,
                sinks_lost,
                summary,
                extra=totals,
            )
        elif totals["dropped"] or totals["buffer_dropped"] or totals["dead_lettered"]:
            logger.warning(
                "router stopped; nothing was left at shutdown, but some events were "
                "dead-lettered or dropped: %s",
                summary,
                extra=totals,
            )
        else:
            logger.info(
                "router stopped; every accepted event was delivered: %s", summary, extra=totals
            )
        return 0


def _outcome_totals(metrics: Metrics) -> dict[str, float]:
    """Events per outcome over all sinks, and the ring buffer's drops, from the metrics."""
    totals = {"delivered": 0.0, "dead_lettered": 0.0, "dropped": 0.0, "buffer_dropped": 0.0}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "eventrouter_sink_events_total":
                outcome = sample.labels.get("outcome", "")
                if outcome in totals:
                    totals[outcome] += sample.value
            elif sample.name == "eventrouter_buffer_dropped_total":
                totals["buffer_dropped"] += sample.value
    return totals


def _shutdown_drops(metrics: Metrics) -> tuple[float, float]:
    """Events the ring buffer dropped at shutdown, and those the sinks dropped, once per sink."""
    buffer = sinks = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.labels.get("reason") != "shutdown":
                continue
            if sample.name == "eventrouter_buffer_dropped_total":
                buffer += sample.value
            elif sample.name == "eventrouter_sink_dropped_total":
                sinks += sample.value
    return buffer, sinks


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind a listening TCP socket, or raise OSError with a message that names the fix.

    With `reuse_port`, Linux lets other sockets of the same user that also set
    SO_REUSEPORT bind the same address, and spreads new connections over them.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        hint = (
            "every router on this port needs --reuse-port"
            if reuse_port
            else "choose others with --port and --admin-port, or start every router that "
            "shares the port with --reuse-port"
        )
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port}: {exc.strerror}; another process may be using "
            f"the port (Nakama uses 7350 and 7351): {hint}",
        ) from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _bound_port(server: uvicorn.Server, fallback: int) -> int:
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return fallback


def _open_standard_descriptors() -> None:
    """Point descriptors 0, 1 and 2 at /dev/null when the process started without them.

    Otherwise the first sockets would take those numbers, and the log sink
    would write events into a client connection.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def run(settings: Settings) -> int:
    """Run a router in this process until it is stopped; return the exit status."""
    _open_standard_descriptors()
    configure_logging(settings.log_level, settings.log_format)

    async def main() -> int:
        try:
            router = Router(settings)
        except ConfigError as exc:
            logger.error("cannot start: %s", exc, extra={"errors": [str(i) for i in exc.issues]})
            return 1
        return await router.run()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.run(main())
    return int(uvloop.run(main()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(Settings()))
