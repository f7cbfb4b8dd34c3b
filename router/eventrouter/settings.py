"""Process settings: command-line flags, then EVENTROUTER_* variables, then defaults.

Everything about routing lives in the resource files; these settings set where
to listen, where to find files and secrets, and how to log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Settings of `eventrouter serve`."""

    model_config = SettingsConfigDict(env_prefix="EVENTROUTER_", extra="ignore")

    config: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Resource files or folders; empty runs the embedded default.

    EVENTROUTER_CONFIG takes a comma-separated list of paths or a JSON list.
    """
    router: str | None = None
    """The EventRouter of the files to run, when they define several."""
    host: str = "127.0.0.1"
    port: int = Field(default=7350, ge=0, le=65535)
    reuse_port: bool = False
    """Sets SO_REUSEPORT on the ingestion socket, so several routers can share its port."""
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=7351, ge=0, le=65535)
    session_key: SecretStr | None = None
    """Session token key; overrides spec.auth.sessionKey."""
    session_key_file: Path | None = None
    api_keys_file: Path | None = None
    """File with one API key per line; overrides spec.auth.apiKeys."""
    secrets_dir: Path = Path("/var/run/secrets/eventrouter")
    """The folder where Secrets named by secretKeyRef are mounted, one folder per Secret."""
    max_connections: int = Field(default=10_000, ge=1)
    """Open connections and sessions on the ingestion port; beyond, new requests get 503."""
    grace_period: float = Field(default=30.0, ge=0)
    """Seconds to drain the buffer and sink queues after SIGTERM."""
    reload_interval: float = Field(default=1.0, ge=0)
    """Seconds between checks of the -f files for changes; 0 turns watching off."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("config", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value
