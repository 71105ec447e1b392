"""Records of the servers this user's processes started, to find and stop stale ones.

Each started server is recorded in ``{cache}/run/{pid}.json`` with its start time and its owner's pid
and start time (from ``/proc``), and the record is removed when the server is stopped. A server whose
owner died without stopping it (and whose guardian could not either) is *stale*: :func:`reap_stale`
stops it, but only after checking that the pid still belongs to the same process (same start time,
same executable), so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ._kill import kill_group
from ._paths import private_cache_dir

_log = logging.getLogger("llama_proc.process")
_LINUX = sys.platform.startswith("linux")


def _run_dir() -> Path:
    path = private_cache_dir() / "run"
    path.mkdir(exist_ok=True)
    return path


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def _executable_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None


def record(pid: int, argv0: str, argv: Sequence[str] = ()) -> None:
    """Write the record of a server just started by this process (Linux only; errors are logged).
    ``argv``, the whole command line, tells :func:`running` its port, model and alias."""
    if not _LINUX:
        return
    data = {
        "pid": pid,
        "start": start_time(pid),
        "executable": argv0,
        "owner": os.getpid(),
        "owner_start": start_time(os.getpid()),
        "port": _flag(argv, "--port"),
        "model": _flag(argv, "--model"),
        "alias": _flag(argv, "--alias"),
        "started_at": time.time(),
    }
    try:
        target = _run_dir() / f"{pid}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        _log.debug("cannot record server %s: %s", pid, exc)


def _flag(argv: Sequence[str], name: str) -> str | None:
    args = list(argv)
    return args[args.index(name) + 1] if name in args[:-1] else None


def _records() -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """Each record file and what it holds (None when it cannot be read or lacks its pids)."""
    try:
        paths = sorted(_run_dir().glob("*.json"))
    except OSError:
        return
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            int(data["pid"]), int(data["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            yield path, None
            continue
        yield path, data


def _still_recorded_process(data: Mapping[str, Any]) -> bool:
    """True when the record's pid still runs the recorded executable since the recorded time (and
    has not been reused by another process)."""
    pid = int(data["pid"])
    return start_time(pid) == data.get("start") and _executable_of(pid) == data.get("executable")


def _owner_alive(data: Mapping[str, Any]) -> bool:
    now = start_time(int(data["owner"]))
    return now is not None and now == data.get("owner_start")


def running() -> list[dict[str, Any]]:
    """The servers that llama_proc processes of this user started and that still run (Linux): each
    record's ``pid``, ``port``, ``model``, ``alias``, ``owner`` (pid), ``owner_alive`` and
    ``started_at`` (seconds since the epoch). A record whose pid is gone or was reused is skipped."""
    if not _LINUX:
        return []
    found = []
    for _path, data in _records():
        if data is None or not _still_recorded_process(data):
            continue
        found.append(
            {
                "pid": int(data["pid"]),
                "port": int(data["port"]) if str(data.get("port") or "").isdigit() else None,
                "model": data.get("model"),
                "alias": data.get("alias"),
                "owner": int(data["owner"]),
                "owner_alive": _owner_alive(data),
                "started_at": data.get("started_at"),
            }
        )
    return found


def forget(pid: int) -> None:
    """Remove the record of a server that was stopped."""
    if _LINUX:
        with contextlib.suppress(OSError):
            (_run_dir() / f"{pid}.json").unlink()


def _ended(pid: int) -> bool:
    return start_time(pid) is None


def reap_stale(timeout: float = 5.0) -> list[int]:
    """Stop every recorded server whose owner is gone; returns their pids.

    A record is acted on only when its server pid still runs the same executable with the same start
    time; records of servers that are gone, or whose pid now belongs to another process, are dropped.
    """
    if not _LINUX:
        return []
    reaped: list[int] = []
    for path, data in _records():
        if data is None:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if _owner_alive(data):
            continue  # its owner still runs: not stale
        if not _still_recorded_process(data):
            with contextlib.suppress(OSError):
                path.unlink()  # gone, or the pid was reused by another process: never touch it
            continue
        pid, owner = int(data["pid"]), int(data["owner"])
        name = os.path.basename(str(data.get("executable") or "llama-server"))
        _log.warning("stopping stale %s pid %d (its owner %d is gone)", name, pid, owner)
        # not our child, so never reaped here: it has ended once it is gone or a zombie (start_time None)
        kill_group(pid, timeout, kill_wait=5.0, ended=functools.partial(_ended, pid))
        reaped.append(pid)
        with contextlib.suppress(OSError):
            path.unlink()
    return reaped
