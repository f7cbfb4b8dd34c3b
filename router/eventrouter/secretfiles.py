"""Read secret values from Secret mounts, files or environment variables.

Resources only ever name a secret (a Secret key, a file path or a variable
name), so configuration dumps never contain a secret value.
"""

from __future__ import annotations

import os
from pathlib import Path

from eventrouter.errors import ConfigError, ConfigIssue
from eventrouter.resources import SecretSource

__all__ = ["read_secret"]


def read_secret(source: SecretSource, secrets_dir: Path, field: str) -> str:
    """Read a secret value from its file, Secret mount or variable; raise `ConfigError`."""
    if source.env is not None:
        value = os.environ.get(source.env)
        if value is None:
            raise ConfigError(
                [
                    ConfigIssue(
                        "<environment>", None, None, field, f"variable {source.env} is not set"
                    )
                ]
            )
        return value.strip()
    if source.secret_key_ref is not None:
        ref = source.secret_key_ref
        path = secrets_dir / ref.name / ref.key
    else:
        assert source.file is not None
        path = Path(source.file)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    str(path),
                    None,
                    None,
                    field,
                    f"cannot read secret file: {exc.strerror}; mount the Secret or fix the path",
                )
            ]
        ) from exc
