"""A real Apache Kafka broker in KRaft mode for tests, run with the machine's Java.

`KafkaBroker` fetches the broker jars from Maven Central with
scripts/install-kafka.sh, formats a KRaft log directory in a temporary folder
and runs one JVM that is both broker and controller, listening only on
127.0.0.1. `stop()` and `start()` keep the ports and the log directory, so a
test can take the broker down and bring it back with its data.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code

from tests.processes import free_port, launcher

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install-kafka.sh"

NODE_ID = 1
HOST = "127.0.0.1"

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Console output goes to the JVM's stdout, which KafkaBroker appends to broker.log.
LOG4J2_PROPERTIES = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class KafkaBrokerError(RuntimeError):
    """Failure to fetch, format, start or reach the Kafka broker."""


def random_cluster_id() -> str:
    """Return a cluster id in Kafka's Uuid format: 16 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")


def ensure_jars() -> Path:
    """Run scripts/install-kafka.sh and return the folder with the broker jars.

    Raises KafkaBrokerError with the script's output, which includes Maven's
    output when the download failed.
    """
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--print-libs-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise KafkaBrokerError(
            f"{INSTALL_SCRIPT} failed with exit code {result.returncode}, "
            f"so the Kafka broker jars are missing.\n{result.stdout}{result.stderr}"
        )
    libs_dir = Path(result.stdout.strip().splitlines()[-1])
    if not libs_dir.is_dir():
        raise KafkaBrokerError(f"{INSTALL_SCRIPT} printed {libs_dir}, which is not a folder.")
    return libs_dir


def find_java() -> str:
    """Return the java executable from JAVA_HOME, else from PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaBrokerError("java not found in JAVA_HOME or on PATH. Install Java 17 or newer.")
    return java


def run_in_new_loop(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine in a fresh event loop on another thread and return its result.

    This works whether or not the caller's thread already runs an event loop.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class KafkaBroker:
    """One Kafka node (broker and controller) on 127.0.0.1 with its data in a temporary folder.

    The first `start()` fetches the jars, picks two free ports, writes
    server.properties and formats the log directory. Later starts reuse all of
    them, so `bootstrap` stays the same across `stop()` and `start()`.
    """

    def __init__(
        self,
        *,
        num_partitions: int = 1,
        heap: str = "512m",
        startup_timeout: float = 120.0,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
        self.num_partitions = num_partitions
        self.heap = heap
        self.startup_timeout = startup_timeout
        self.extra_properties = dict(extra_properties or {})
        self.cluster_id = random_cluster_id()

        self.work_dir: Path | None = None
        self.libs_dir: Path | None = None
        self.port: int | None = None
        self.controller_port: int | None = None
        self._java: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

    # Paths inside work_dir. They exist only after the first start().

    @property
    def log_file(self) -> Path:
        """The broker's console log: the JVM's stdout and stderr, appended across restarts."""
        return self._require_work_dir() / "broker.log"

    @property
    def config_file(self) -> Path:
        return self._require_work_dir() / "server.properties"

    @property
    def data_dir(self) -> Path:
        """The KRaft log directory (log.dirs), kept across restarts."""
        return self._require_work_dir() / "data"

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string for clients, "127.0.0.1:<port>"."""
        if self.port is None:
            raise KafkaBrokerError("The broker has no port yet. Call start() first.")
        return f"{HOST}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker and block until it lists itself in a metadata response.

        Does nothing if the broker is already running. Raises KafkaBrokerError
        with the tail of broker.log if the JVM exits, or if no metadata response
        lists the broker within `startup_timeout` seconds.
        """
        if self._closed:
            raise KafkaBrokerError("This KafkaBroker was closed. Create a new one.")
        if self.is_running:
            return
        if self.work_dir is None:
            self._prepare()

        self._launch()
        try:
            self._wait_until_ready()
        except BaseException:
            self._terminate(timeout=10.0)
            raise
        logger.info("Kafka broker %s is ready (pid %s)", self.bootstrap, self._pid())

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the JVM with SIGTERM, and SIGKILL it if it is still running after `timeout` seconds.

        Ports, data and log file stay, so `start()` brings the same broker back.
        """
        self._terminate(timeout)

    async def start_async(self) -> None:
        """Run `start()` in a worker thread, so the caller's event loop keeps running meanwhile."""
        await asyncio.to_thread(self.start)

    async def stop_async(self, timeout: float = 30.0) -> None:
        """Run `stop()` in a worker thread, so the caller's event loop keeps running meanwhile."""
        await asyncio.to_thread(self.stop, timeout)

    def close(self) -> None:
        """Stop the broker and delete its temporary folder. The object cannot start again."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._terminate(timeout=30.0)
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def create_topic(
        self,
        name: str,
        partitions: int | None = None,
        *,
        timeout_ms: int = 30_000,
    ) -> None:
        """Create a topic with replication factor 1 through aiokafka's admin client.

        `partitions` defaults to the broker's num_partitions. Raises the
        aiokafka error for the broker's error code, e.g. TopicAlreadyExistsError.
        """
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=timeout_ms)
        await admin.start()
        try:
            response = await admin.create_topics(
                [NewTopic(name, partitions or self.num_partitions, 1)], timeout_ms=timeout_ms
            )
        finally:
            await admin.close()

        # Each entry is (topic, error_code) in CreateTopics v0 and
        # (topic, error_code, error_message) in later versions.
        for entry in response.topic_errors:
            error_code = entry[1]
            if error_code != 0:
                message = entry[2] if len(entry) > 2 else None
                raise for_code(error_code)(f"create topic {entry[0]!r}: {message}")

    def log_tail(self, max_lines: int = 60) -> str:
        """Return the last `max_lines` lines of broker.log, or a note if there is none yet."""
        if self.work_dir is None or not self.log_file.exists():
            return "(no broker log yet)"
        with self.log_file.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 64 * 1024))
            text = file.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-max_lines:])

    def server_properties(self) -> dict[str, str]:
        """Return the broker settings: one node in KRaft combined mode on 127.0.0.1."""
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            # A static voter set, so `StorageTool format` needs no --standalone
            # flag. The voter address contains the controller port, which is
            # why restarts keep that port.
            "controller.quorum.voters": f"{NODE_ID}@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "true",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # The default, 50, makes the broker create and load 50 partitions of
            # __consumer_offsets when the first consumer group appears.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        properties.update(self.extra_properties)
        return properties

    def _prepare(self) -> None:
        self.libs_dir = ensure_jars()
        self._java = find_java()
        self.work_dir = Path(tempfile.mkdtemp(prefix="eventrouter-kafka-"))
        atexit.register(self.close)
        # NOTE: another process can take a port between free_port() and the
        # JVM's bind, or while the broker is stopped. start() then fails with
        # the bind error from broker.log.
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()

        lines = [f"{key}={value}" for key, value in self.server_properties().items()]
        self.config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self.work_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES, encoding="utf-8")
        self._format_storage()

    def _java_command(self, main_class: str, *args: str) -> list[str]:
        assert self._java is not None
        assert self.libs_dir is not None
        assert self.work_dir is not None
        command = [
            self._java,
            f"-Xmx{self.heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.work_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.libs_dir}/*",
            main_class,
            *args,
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # Kill the JVM if the test process dies without running teardown.
            command = [setpriv, "--pdeathsig", "KILL", *command]
        return command

    def _format_storage(self) -> None:
        command = self._java_command(
            "kafka.tools.StorageTool",
            "format",
            # One argument with "=", because a base64url id may start with "-".
            f"--cluster-id={self.cluster_id}",
            "--config",
            str(self.config_file),
        )
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired as exc:
            # TimeoutExpired carries bytes even when run() was given text=True.
            output = b"".join(part for part in (exc.stdout, exc.stderr) if isinstance(part, bytes))
            raise KafkaBrokerError(
                "kafka.tools.StorageTool format timed out after 120 s.\n"
                + output.decode("utf-8", errors="replace")
            ) from exc
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"kafka.tools.StorageTool format failed with exit code {result.returncode}:\n"
                f"{' '.join(command)}\n{result.stdout}{result.stderr}"
            )

    def _launch(self) -> None:
        command = self._java_command("kafka.Kafka", str(self.config_file))
        with self.log_file.open("ab") as log:
            log.write(f"\n==== starting: {' '.join(command)}\n".encode())
            log.flush()
            self._process = launcher.popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,
            )
        logger.info("Started Kafka broker JVM (pid %s) for %s", self._pid(), self.bootstrap)

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            return_code = self._process.poll()
            if return_code is not None:
                raise KafkaBrokerError(
                    f"Kafka broker JVM exited with code {return_code} during start-up. "
                    f"Last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise KafkaBrokerError(
                    f"Timed out after {self.startup_timeout:.0f} s waiting for the Kafka broker "
                    f"on {self.bootstrap} to list itself in a metadata response. "
                    f"Last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if self._port_accepts_connections() and self._broker_is_listed():
                return
            time.sleep(0.25)

    def _port_accepts_connections(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _broker_is_listed(self) -> bool:
        """Return True once a metadata response from the broker lists this node."""

        async def fetch_broker_ids() -> set[int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5_000)
            try:
                await admin.start()
                cluster = await admin.describe_cluster()
            finally:
                await admin.close()
            return {int(broker["node_id"]) for broker in cluster["brokers"]}

        try:
            return NODE_ID in run_in_new_loop(fetch_broker_ids)
        except (KafkaError, OSError) as exc:  # TimeoutError is a subclass of OSError.
            logger.debug("Kafka broker %s is not ready yet: %r", self.bootstrap, exc)
            return False

    def _terminate(self, timeout: float) -> None:
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "Kafka broker (pid %s) did not exit within %.0f s of SIGTERM, so sending SIGKILL",
                process.pid,
                timeout,
            )
            process.kill()
            process.wait()
        logger.info("Stopped Kafka broker (pid %s), exit code %s", process.pid, process.returncode)

    def _pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _require_work_dir(self) -> Path:
        if self.work_dir is None:
            raise KafkaBrokerError("The broker has no work folder yet. Call start() first.")
        return self.work_dir
