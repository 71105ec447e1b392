"""Place ``llama-server`` into the package's ``bin/`` while a wheel is built (see ``setup.py``).

For each variant the first of these that gives a binary is used, and a wheel that carries one is
tagged for this platform:

1. a binary already under ``llama_proc/bin/{target}/{variant}/`` in the source tree, kept as it is;
2. ``LLAMA_SERVER_PATH``: that executable, copied with the ``rpc-server`` and shared libraries beside it;
3. the user cache's build of the same variant and release (``llama-proc build`` or ``llama-proc install``
   put it there; see :func:`cached_build`), copied: nothing is downloaded or compiled;
4. the prebuilt release, downloaded;
5. a build of the pinned llama.cpp source, as ``llama-proc build`` does it (into the user cache, then
   copied): it needs cmake and a C++ compiler and takes minutes.

Never fails the build: llama_proc works without a bundled binary (at run time it finds one, or
``llama-proc install``/``build`` provides one), so when nothing can be placed the hook prints one
warning per variant, with the reason of each way tried, and the wheel stays pure Python. Environment:

* ``LLAMA_PROC_SKIP_DOWNLOAD=1``: place nothing at all, before any of the steps (a pure-Python wheel);
* ``LLAMA_PROC_BUILD=never``: no build from source (steps 1 to 4 only);
* ``LLAMA_PROC_VARIANTS=cpu,cuda``: the variants to place (default: the platform's default);
* ``LLAMA_PROC_CACHE_DIR``: the user cache searched in step 3 and built into in step 5;
* ``LLAMA_PROC_LLAMA_CPP_TAG``: another release; a cached or built binary must then be of that
  release too, and a build needs ``LLAMA_PROC_SOURCE`` (the pinned source is :data:`~.releases.PINNED_TAG`);
* ``LLAMA_PROC_SOURCE``: the llama.cpp source tree or archive to build instead of the pinned one;
* ``LLAMA_PROC_RELEASES_URL``, ``GH_TOKEN``: as at run time.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ._paths import cache_dir
from .binaries import (
    _BUILD_INFO,
    PINNED_SOURCE,
    PINNED_SOURCE_SHA256,
    _acquire_install_lock,
    _is_executable,
    _read_info,
    _staged_install,
    _tool_env,
    build_from_source,
    fetch_source,
    install_prebuilt,
    source_digest,
)
from .errors import BuildError, ConfigError, LlamaProcError
from .platforms import current_target, default_variant, executable_name, resolve_variant
from .releases import PINNED_TAG, asset_names, release_tag

_LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("never", "0", "false", "no", "off")


def _warn(message: str) -> None:
    sys.stderr.write(f"llama-proc: warning: {message}\n")


def _note(message: str) -> None:
    sys.stderr.write(f"llama-proc: {message}\n")
    sys.stderr.flush()


def _copy_executable(source: Path, dest: Path, target: str) -> None:
    """Copy ``source`` as ``dest/llama-server`` with the ``rpc-server``, shared libraries and
    ``BUILD_INFO.json`` beside it; ``dest`` is replaced as a whole, or left as it was on failure."""
    if not source.is_file():
        raise ConfigError([f"LLAMA_SERVER_PATH: {source} is not a file"])
    with _staged_install(dest) as staging:
        for item in source.parent.iterdir():
            keep = item == source or item.name in (executable_name("rpc-server", target), _BUILD_INFO)
            keep = keep or any(item.name.endswith(s) or f"{s}." in item.name for s in _LIBRARY_SUFFIXES)
            if keep and item.is_file():
                shutil.copy2(item, staging / (executable_name("llama-server", target) if item == source else item.name))


def _wanted_source_digest(tag: str) -> str | None:
    """The ``source_digest`` a build from source must have to count as a build of ``tag``: that of
    ``LLAMA_PROC_SOURCE`` when set, else the pinned source distribution's for the pinned tag."""
    override = os.environ.get("LLAMA_PROC_SOURCE")
    if override:
        path = Path(override).expanduser()
        return source_digest(path) if path.exists() else None
    return PINNED_SOURCE_SHA256 if tag == PINNED_TAG else None


def cached_build(variant: str, tag: str | None = None) -> Path | None:
    """The user cache's ``bin/{target}/{variant}/`` when it holds a build of release ``tag`` (default:
    ``LLAMA_PROC_LLAMA_CPP_TAG``, else the pinned tag) for ``variant``; None otherwise.

    Its ``BUILD_INFO.json`` decides: a prebuilt install must name that tag (and the assets this
    target and variant take from it); a build from source must record the digest of the source that
    step 5 of this module would build (the pinned source distribution, whose published SHA-256 is
    :data:`~.binaries.PINNED_SOURCE_SHA256`, or ``LLAMA_PROC_SOURCE``). A folder without that file,
    or with the info of another release or source, is not used.
    """
    target = current_target()
    variant = resolve_variant(variant)
    tag = release_tag(tag)
    folder = cache_dir() / "bin" / target / variant
    info = _read_info(folder)
    if info is None or info.get("variant") != variant or info.get("target", target) != target:
        return None
    if not _is_executable(folder / executable_name("llama-server", target)):
        return None
    if info.get("source") == "release":
        matches = info.get("tag") == tag and info.get("assets") == asset_names(target, variant, tag)
    else:
        wanted = _wanted_source_digest(tag)
        matches = wanted is not None and info.get("source_digest") == wanted
    return folder if matches else None


def _build_disabled() -> bool:
    return os.environ.get("LLAMA_PROC_BUILD", "").strip().lower() in _FALSE


def _has_cmake() -> bool:
    return shutil.which("cmake", path=_tool_env()["PATH"]) is not None


def _build(variant: str, tag: str) -> Path:
    """Build ``variant`` from the pinned source (or ``LLAMA_PROC_SOURCE``) into the user cache."""
    override = os.environ.get("LLAMA_PROC_SOURCE")
    if not override and tag != PINNED_TAG:
        raise BuildError(
            f"the pinned source is llama.cpp {PINNED_TAG}, not {tag}; set LLAMA_PROC_SOURCE to a source of {tag}"
        )
    if not _has_cmake():  # checked before the source is fetched
        raise BuildError("cmake is not installed (`pip install cmake ninja` provides it; a C++ compiler is needed too)")
    source = fetch_source()
    name = "==".join(PINNED_SOURCE) if not override else str(source)
    _note(f"building llama-server ({variant}) from {name} into the user cache (minutes, unless already built)")
    last = [-1]

    def progress(fraction: float | None, line: str) -> None:
        if fraction is not None and int(fraction * 10) > last[0]:
            last[0] = int(fraction * 10)
            _note(f"  build {fraction:.0%}")

    result = build_from_source(source, variant, progress=progress)
    _note(f"llama-server ({variant}) {'built' if result.built else 'was already built'}: {result.directory}")
    return result.directory


def _copy_cached(folder: Path, dest: Path, target: str, variant: str) -> None:
    lock = _acquire_install_lock(target, variant, 3600.0)  # an install or build of it may be under way
    try:
        _copy_executable(folder / executable_name("llama-server", target), dest, target)
    finally:
        lock.release()


def _place(variant: str, bin_root: Path, target: str, reasons: list[str]) -> Path | None:
    """Steps 1 to 5 for one variant; returns the placed llama-server, or None with ``reasons`` filled."""
    dest = bin_root / target / variant
    exe = executable_name("llama-server", target)
    if (dest / exe).is_file():  # pre-seeded in the source tree
        return dest / exe
    env_path = os.environ.get("LLAMA_SERVER_PATH")
    if env_path:
        _copy_executable(Path(env_path), dest, target)
        return dest / exe
    tag = release_tag()
    cached = cached_build(variant, tag)
    if cached is not None:
        _copy_cached(cached, dest, target, variant)
        _note(f"llama-server ({variant}) copied from the user cache: {cached}")
        return dest / exe
    try:
        return install_prebuilt(variant, dest_root=bin_root, retry_delays=()).llama_server
    except (LlamaProcError, OSError) as exc:
        reasons.append(f"no prebuilt: {exc}")
    if _build_disabled():
        reasons.append("no build from source: LLAMA_PROC_BUILD=never")
        return None
    try:
        built = _build(variant, tag)
        _copy_cached(built, dest, target, variant)
        return dest / exe
    except (LlamaProcError, OSError) as exc:
        reasons.append(f"no build from source: {exc}")
    return None


def install_into(bin_root: Path) -> list[Path]:
    """Place the configured variants under ``bin_root/{target}/{variant}/``; returns what was placed."""
    if os.environ.get("LLAMA_PROC_SKIP_DOWNLOAD", "").strip().lower() in _TRUE:
        _warn("LLAMA_PROC_SKIP_DOWNLOAD is set: the package carries no llama-server; "
              "it will be found or installed at run time (llama-proc install)")  # fmt: skip
        return []
    target = current_target()
    wanted = os.environ.get("LLAMA_PROC_VARIANTS") or default_variant(target)
    placed: list[Path] = []
    for name in (v.strip() for v in wanted.split(",") if v.strip()):
        reasons: list[str] = []
        try:
            found = _place(resolve_variant(name), bin_root, target, reasons)
        except (LlamaProcError, OSError) as exc:
            reasons.append(str(exc))
            found = None
        if found is not None:
            placed.append(found)
            continue
        why = " / ".join(reason.rstrip(".") for reason in reasons)
        _warn(
            f"could not place llama-server ({name}) in the package: {why}. The install goes on; at run time "
            "llama-proc finds one on PATH or LLAMA_SERVER_PATH, or run `llama-proc install`."
        )
    return placed
