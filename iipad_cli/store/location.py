"""Where the feature store lives: `--cache DIR`, else $IIPAD_CACHE, else $XDG_CACHE_HOME/iipad, else ~/.cache/iipad."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "IIPAD_CACHE"


def resolve_cache_dir(option: Path | None = None) -> Path:
    """The store directory for a command's `--cache` value (None when the option was not given)."""
    if option is not None:
        return Path(option).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    if os.environ.get("XDG_CACHE_HOME"):
        return (Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "iipad").resolve()
    return (Path.home() / ".cache" / "iipad").resolve()
