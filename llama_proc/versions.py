"""What a ``llama-server`` build is (``--version``) and which flag spellings it accepts (``--help``)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import attrs

from .config import FlagDialect
from .errors import StartupError

__all__ = [
    "FLAG_CHANGES",
    "FlagChange",
    "ServerVersion",
    "dialect_from_help",
    "flag_dialect",
    "parse_version",
    "server_version",
]


class FlagChange(NamedTuple):
    """One flag whose spelling changed between builds, and how ``--help`` tells them apart."""

    setting: str  #: the FlagDialect field it decides
    newer: str  #: what newer builds accept
    older: str  #: what older builds accept
    newer_if: Callable[[frozenset[str], str], bool]  #: (flags in --help, help text) -> newer?


def _flash_attn_takes_value(flags: frozenset[str], text: str) -> bool:
    line = next((line for line in text.splitlines() if "--flash-attn" in line), "")
    return "on|off" in line


#: The known flag changes. Each is decided from the build's own ``--help``, which is exact for
#: custom and source builds (whose build number is often 0) as well as for releases.
FLAG_CHANGES: tuple[FlagChange, ...] = (
    FlagChange("load_mode", "--load-mode mmap|none|mlock|mmap+mlock", "--mlock / --no-mmap",
               lambda flags, text: "--load-mode" in flags),
    FlagChange("flash_attn_value", "--flash-attn on|off|auto", "--flash-attn (a switch)", _flash_attn_takes_value),
    FlagChange("no_webui", "--no-webui", "--no-ui", lambda flags, text: "--no-webui" in flags),
    FlagChange("webui", "--webui", "--ui (or none)", lambda flags, text: "--webui" in flags),
    FlagChange("api_key_file", "--api-key-file FNAME", "--api-key KEY only",
               lambda flags, text: "--api-key-file" in flags),
)  # fmt: skip

_FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def dialect_from_help(text: str) -> FlagDialect:
    """The :class:`FlagDialect` of a build, from the text of its ``--help``; the newest if unreadable."""
    flags = frozenset(_FLAG_RE.findall(text))
    if "--model" not in flags:
        return FlagDialect()
    values: dict[str, object] = {}
    for change in FLAG_CHANGES:
        newer = change.newer_if(flags, text)
        if change.setting in ("load_mode", "flash_attn_value", "api_key_file"):
            values[change.setting] = newer
        elif change.setting == "no_webui":
            values[change.setting] = "--no-webui" if newer else "--no-ui"
        elif change.setting == "webui":
            values[change.setting] = "--webui" if newer else ("--ui" if "--ui" in flags else None)
    return FlagDialect(**values)  # type: ignore[arg-type]


@attrs.frozen
class ServerVersion:
    """What ``llama-server --version`` says."""

    #: The build number (the ``N`` of release tag ``bN``); None when the build does not know it.
    build: int | None
    #: The commit hash, when known.
    commit: str | None
    #: The version string (``0.6.0-dev`` in recent trees, the build number in older ones).
    version: str | None
    #: ``built with ...``: the compiler.
    compiler: str | None
    #: ``... for ...``: the platform it was built for.
    platform: str | None
    #: The whole output.
    raw: str

    @property
    def tag(self) -> str | None:
        """The release tag this build corresponds to (``b11434``), when the build number is known."""
        return f"b{self.build}" if self.build else None


_VERSION_RE = re.compile(r"version:\s*(\S+)\s*\((?:build\s+(\d+),\s*commit\s+([\w.-]+)|([\w.-]+))\)")
_BUILT_RE = re.compile(r"built with (.+?) for (\S.*)$", re.MULTILINE)


def parse_version(text: str) -> ServerVersion:
    """Parse the output of ``llama-server --version`` (both the older ``version: N (commit)`` and the
    newer ``version: X.Y.Z (build N, commit C)`` forms)."""
    build: int | None = None
    commit: str | None = None
    version: str | None = None
    match = _VERSION_RE.search(text)
    if match:
        version = match.group(1)
        if match.group(2) is not None:
            build = int(match.group(2))
            commit = match.group(3)
        else:
            commit = match.group(4)
            if version.isdigit():
                build = int(version)
    if commit in ("unknown", ""):
        commit = None
    if build == 0:
        build = None
    built = _BUILT_RE.search(text)
    return ServerVersion(
        build=build,
        commit=commit,
        version=version,
        compiler=built.group(1).strip() if built else None,
        platform=built.group(2).strip() if built else None,
        raw=text.strip(),
    )


_T = TypeVar("_T")
_cache: dict[tuple[str, Callable[[str], object], str, int, int], object] = {}
_cache_lock = threading.Lock()


def _run_cached(executable: str | os.PathLike[str], flag: str, parse: Callable[[str], _T], strict: bool) -> _T:
    path = Path(executable)
    try:
        st = path.stat()
    except OSError as exc:
        if strict:
            raise StartupError(f"cannot read {path}: {exc.strerror}") from None
        return parse("")
    key = (flag, parse, str(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]  # type: ignore[return-value]
    try:
        proc = subprocess.run([str(path), flag], stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False)
        text = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError) as exc:
        if strict:
            raise StartupError(f"cannot run {path} {flag}: {exc}") from None
        text = ""
    result = parse(text)
    with _cache_lock:
        _cache[key] = result
    return result


def server_version(executable: str | os.PathLike[str]) -> ServerVersion:
    """Run ``executable --version`` (once per file version) and parse it.

    :raises StartupError: when the executable cannot be run.
    """
    return _run_cached(executable, "--version", parse_version, strict=True)


def looks_like_llama_server(executable: str | os.PathLike[str]) -> bool:
    """Whether ``executable --help`` lists ``--model``, as every llama-server's does."""
    return _run_cached(executable, "--help", _lists_model_flag, strict=False)


def _lists_model_flag(text: str) -> bool:
    return "--model" in frozenset(_FLAG_RE.findall(text))


def flag_dialect(executable: str | os.PathLike[str]) -> FlagDialect:
    """The flag spellings ``executable`` accepts, from its ``--help`` (once per file version).

    An executable whose ``--help`` cannot be read gets the newest spelling.
    """
    return _run_cached(executable, "--help", dialect_from_help, strict=False)
