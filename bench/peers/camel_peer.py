"""Build and launch the Apache Camel peer of bench/kafka_e2e.py.

The peer in bench/peers/camel is a Camel Main application with one route:
`POST /v2/events` on a Vert.x HTTP server, split into one Kafka record per
event, 200 once Kafka has acknowledged every record of the request. By default
the splitter sends a request's events one after the other, and with
`parallel=True` (`--parallel`) it sends them concurrently.
scripts/build-camel-peer.sh builds it into a jar folder under
~/.cache/eventrouter/camel-peer/, keyed by the hash of its sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-camel-peer.sh"
MAIN_CLASS = "eventrouter.bench.camel.CamelPeer"


def build() -> Path:
    """Run scripts/build-camel-peer.sh and return the folder with the peer's jars.

    Raises RuntimeError with the script's output, which includes Maven's
    output when the build failed.
    """
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-libs-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{BUILD_SCRIPT} failed with exit code {result.returncode}, "
            f"so the Camel peer is missing.\n{result.stdout}{result.stderr}"
        )
    libs_dir = Path(result.stdout.strip().splitlines()[-1])
    if not libs_dir.is_dir():
        raise RuntimeError(f"{BUILD_SCRIPT} printed {libs_dir}, which is not a folder.")
    return libs_dir


def find_java() -> str:
    """Return the java executable from JAVA_HOME, else from PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java not found in JAVA_HOME or on PATH. Install Java 17 or newer.")
    return java


def start(
    libs_dir: Path, port: int, bootstrap: str, topic: str, parallel: bool = False
) -> subprocess.Popen[bytes]:
    """Start the peer on 127.0.0.1:`port`, pinned to CPU 0 like the other servers.

    `parallel` selects the splitter's parallel processing.

    Under `taskset -c 0` the JVM counts 1 available processor, so its
    ergonomics pick the serial garbage collector and 2 JIT compiler threads
    (OpenJDK 17). Every other JVM setting is the default. Log messages below
    WARN are off, and the JVM's stderr is the caller's.
    """
    command = [
        "taskset", "-c", "0", find_java(),
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        "-cp", f"{libs_dir}/*", MAIN_CLASS,
        "--port", str(port), "--bootstrap", bootstrap, "--topic", topic,
    ]  # fmt: skip
    if parallel:
        command.append("--parallel")
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
