"""``kill_group``: the one place that stops a process group, with escalation from SIGTERM to SIGKILL.

Standard library only and free of the rest of llama_proc, so that every module that stops processes
can import it: ``process`` (servers), ``_registry`` (stale servers, which ``process`` itself imports)
and ``binaries`` (interrupted builds).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any, Callable

__all__ = ["kill_group"]

_log = logging.getLogger("llama_proc.process")

_POSIX = os.name == "posix"
#: How often a group that is not our child is checked while we wait for it to end.
_POLL_INTERVAL = 0.02


def kill_group(
    process: subprocess.Popen[Any] | int,
    timeout: float,
    *,
    second_term_after: float | None = None,
    kill_wait: float | None = None,
    ended: Callable[[], bool] | None = None,
) -> int | None:
    """Stop the process group led by ``process``; return its exit code when it is known.

    SIGTERM (and SIGKILL) go to the whole group, so the processes it started get them too; for a
    :class:`~subprocess.Popen`, the wait ends when the leader is reaped, and a group member that
    outlives it is not waited for. When
    ``second_term_after`` is given and the group still runs that long after it (at most half of
    ``timeout``), a second SIGTERM follows: llama-server exits at once on a second one. When the
    group still runs ``timeout`` seconds after the first SIGTERM, SIGKILL; then it is waited for up
    to ``kill_wait`` seconds more (None: until it ends).

    :param process: a child of ours (a :class:`subprocess.Popen`: waited for, and so reaped; where
        there are no process groups, Windows, :meth:`~subprocess.Popen.kill` stands for both
        signals), or the pid of a group leader we did not start.
    :param ended: for a pid, tells whether the group has ended (polled while waiting); by default,
        when no process is left in the group.
    :returns: the exit code of a :class:`~subprocess.Popen` (None if it still ran after
        ``kill_wait``); None for a pid.

    A child already reaped is never signalled: its pid may belong to another process by now (one
    that exited but was not reaped still holds its pid and group, so signalling it is safe and
    reaches what it left running). When the group is gone, or not ours to signal, the escalation
    ends: a child is still waited for, a pid is left alone.
    """
    popen: subprocess.Popen[Any] | None
    if isinstance(process, subprocess.Popen):
        popen, pid = process, process.pid
    else:
        popen, pid = None, process
    if popen is not None and popen.returncode is not None:
        return popen.returncode
    if popen is None and not _POSIX:  # pragma: no cover - Windows: no process groups to signal
        return None
    gone = ended if ended is not None else (lambda: _group_gone(pid))

    def wait(seconds: float | None) -> bool:
        if popen is not None:
            try:
                popen.wait(seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = None if seconds is None else time.monotonic() + seconds
        while not gone():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def send(kill: bool) -> bool:
        try:
            if _POSIX:
                os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
            else:  # pragma: no cover - Windows
                assert popen is not None
                popen.kill()
        except (ProcessLookupError, PermissionError):
            return False
        return True

    grace = timeout if second_term_after is None else min(second_term_after, timeout / 2)
    steps: list[tuple[bool, float | None]] = [(False, grace)]  # (SIGKILL?, seconds to wait after it)
    if second_term_after is not None:
        steps.append((False, timeout - grace))
    steps.append((True, kill_wait))
    for index, (kill, seconds) in enumerate(steps):
        if kill:
            _log.warning("pid %d did not stop within %.3g s of SIGTERM; killing it", pid, timeout)
        elif index:
            _log.info("pid %d still runs %.3g s after SIGTERM; sending a second one", pid, grace)
        if not send(kill):
            if popen is not None:
                wait(kill_wait)  # gone or not ours to signal: a child of ours is still reaped
            break
        if wait(seconds):
            break
    return popen.returncode if popen is not None else None


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
