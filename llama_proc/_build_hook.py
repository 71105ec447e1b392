"""Place ``llama-server`` into the package's ``bin/`` while a wheel is built (see ``setup.py``).

Never fails the build: when nothing can be placed it prints one warning and the package falls back
to finding, downloading or building the binary at run time. Environment:

* ``LLAMA_PROC_SKIP_DOWNLOAD=1``: place nothing;
* ``LLAMA_PROC_VARIANTS=cpu,cuda``: the variants to place (default: the platform's default);
* ``LLAMA_SERVER_PATH``: copy that executable (and the libraries beside it) instead of downloading;
* a binary already under ``llama_proc/bin/{target}/{variant}/`` in the source tree is kept as it is;
* ``LLAMA_PROC_RELEASES_URL``, ``LLAMA_PROC_LLAMA_CPP_TAG``, ``GH_TOKEN``: as at run time.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .binaries import install_prebuilt
from .errors import LlamaProcError
from .platforms import current_target, default_variant, executable_name, resolve_variant

_LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")


def _warn(message: str) -> None:
    sys.stderr.write(f"llama-proc: warning: {message}\n")


def _copy_executable(source: Path, dest: Path, target: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.parent.iterdir():
        keep = item == source or item.name == executable_name("rpc-server", target)
        keep = keep or any(item.name.endswith(s) or f"{s}." in item.name for s in _LIBRARY_SUFFIXES)
        if keep and item.is_file():
            shutil.copy2(item, dest / (executable_name("llama-server", target) if item == source else item.name))


def install_into(bin_root: Path) -> list[Path]:
    """Place the configured variants under ``bin_root/{target}/{variant}/``; returns what was placed."""
    if os.environ.get("LLAMA_PROC_SKIP_DOWNLOAD", "").strip().lower() in ("1", "true", "yes", "on"):
        _warn("LLAMA_PROC_SKIP_DOWNLOAD is set: the package carries no llama-server; "
              "it will be found or installed at run time (llama-proc install)")  # fmt: skip
        return []
    target = current_target()
    exe = executable_name("llama-server", target)
    wanted = os.environ.get("LLAMA_PROC_VARIANTS") or default_variant(target)
    placed: list[Path] = []
    for name in (v.strip() for v in wanted.split(",") if v.strip()):
        try:
            variant = resolve_variant(name)
            dest = bin_root / target / variant
            if (dest / exe).is_file():  # pre-seeded in the source tree
                placed.append(dest / exe)
                continue
            env_path = os.environ.get("LLAMA_SERVER_PATH")
            if env_path:
                _copy_executable(Path(env_path), dest, target)
                placed.append(dest / exe)
                continue
            result = install_prebuilt(variant, dest_root=bin_root, retry_delays=())
            placed.append(result.llama_server)
        except (LlamaProcError, OSError) as exc:
            _warn(
                f"could not place llama-server ({name}) in the package: {exc} The install goes on; "
                "at run time llama-proc finds one on PATH or LLAMA_SERVER_PATH, or run `llama-proc install`."
            )
    return placed
