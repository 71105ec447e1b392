"""Where llama_proc keeps its files."""

from __future__ import annotations

import os
from pathlib import Path

import appdirs


def cache_dir() -> Path:
    """The user cache directory of llama_proc (``LLAMA_PROC_CACHE_DIR`` overrides it)."""
    override = os.environ.get("LLAMA_PROC_CACHE_DIR")
    return Path(override) if override else Path(appdirs.user_cache_dir("llama_proc"))


def private_cache_dir() -> Path:
    """:func:`cache_dir`, created if needed with user-only permissions (0700), so that nothing written
    below it (binaries, sources, models, locks, server records) can be read or replaced by other users."""
    path = cache_dir()
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.name == "posix":
            path.chmod(0o700)
    return path
