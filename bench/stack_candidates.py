"""Candidate servers for bench/run_stacks.py and the commands that start them.

Every candidate serves ``POST /v2/event`` and ``POST /v2/events`` from the modules in
bench/stacks/ as a single process with a single event loop on 127.0.0.1.
"""

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

STACKS_DIR = Path(__file__).resolve().parent / "stacks"
BIN_DIR = Path(sys.executable).parent
HOST = "127.0.0.1"
FLOOR = "floor"


def uvicorn_command(target: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            str(BIN_DIR / "uvicorn"),
            target,
            "--app-dir", str(STACKS_DIR),
            "--host", HOST,
            "--port", str(port),
            "--http", "httptools",
            "--loop", "uvloop",
            "--no-access-log",
            "--log-level", "warning",
        ]  # fmt: skip

    return command


def granian_command(target: str, interface: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            str(BIN_DIR / "granian"),
            target,
            "--working-dir", str(STACKS_DIR),
            "--interface", interface,
            "--host", HOST,
            "--port", str(port),
            "--workers", "1",
            "--runtime-threads", "1",
            "--loop", "uvloop",
            "--no-ws",
            "--log-level", "warning",
        ]  # fmt: skip

    return command


def aiohttp_command(port: int) -> list[str]:
    script = STACKS_DIR / "aiohttp_msgspec.py"
    return [sys.executable, str(script), "--host", HOST, "--port", str(port)]


@dataclasses.dataclass(frozen=True)
class Candidate:
    key: str
    server: str
    decoding: str
    command: Callable[[int], list[str]]
    validates: bool = True


CANDIDATES = [
    Candidate(
        FLOOR,
        "uvicorn, raw ASGI",
        "orjson.loads, no validation",
        uvicorn_command("floor_asgi:app"),
        validates=False,
    ),
    Candidate(
        "asgi-msgspec",
        "uvicorn, raw ASGI",
        "msgspec typed Struct",
        uvicorn_command("asgi_msgspec:app"),
    ),
    Candidate(
        "asgi-json-pydantic",
        "uvicorn, raw ASGI",
        "json.loads + pydantic model_validate",
        uvicorn_command("asgi_json_pydantic:app"),
    ),
    Candidate(
        "asgi-pydantic-json",
        "uvicorn, raw ASGI",
        "pydantic model_validate_json",
        uvicorn_command("asgi_pydantic_json:app"),
    ),
    Candidate(
        "starlette-msgspec",
        "uvicorn, Starlette",
        "msgspec typed Struct",
        uvicorn_command("starlette_msgspec:app"),
    ),
    Candidate(
        "aiohttp-msgspec",
        "aiohttp web, uvloop",
        "msgspec typed Struct",
        aiohttp_command,
    ),
    Candidate(
        "granian-asgi-msgspec",
        "granian, raw ASGI",
        "msgspec typed Struct",
        granian_command("asgi_msgspec:app", "asgi"),
    ),
    Candidate(
        "granian-rsgi-msgspec",
        "granian, RSGI",
        "msgspec typed Struct",
        granian_command("rsgi_msgspec:app", "rsgi"),
    ),
]
