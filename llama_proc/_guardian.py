"""A watchdog that stops our servers when the Python process that started them dies.

Run as a script (``python -I -S _guardian.py``), it reads commands on stdin, one per line:
``+ PGID START`` registers a process group (START: its leader's start time from ``/proc``, 0 when
unknown), ``- PGID`` forgets it. A group whose leader's start time changed belongs to another
process by now (its pid was reused) and is never signalled. The write end of that pipe belongs to
the Python process that owns the servers, so when that process ends for any reason, SIGKILL
included, the guardian reads end-of-file, sends SIGTERM to every registered group, waits briefly,
and sends SIGKILL to what is left. It is standard library only and imports nothing of llama_proc,
so it starts in milliseconds (``-I -S`` leaves neither the package nor site-packages importable).
That is also why it stops groups itself instead of with ``_kill.kill_group``: it signals every
group at once under one grace period, and checks again that a group is still ours before SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time

GRACE_SECONDS = 5.0


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _ours(pgid: int, start: int) -> bool:
    return start == 0 or not os.path.exists("/proc/self/stat") or _start_time(pgid) == start


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    # Interrupts aimed at the terminal's foreground group must not end the guardian early.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    starts: dict[int, int] = {}
    for raw in sys.stdin.buffer:
        parts = raw.split()
        if len(parts) < 2 or not all(p.isdigit() for p in parts[1:]):
            continue
        pgid = int(parts[1])
        if pgid <= 1:
            continue
        if parts[0] == b"+":
            starts[pgid] = int(parts[2]) if len(parts) > 2 else 0
        elif parts[0] == b"-":
            starts.pop(pgid, None)
    groups = {pgid for pgid, start in starts.items() if _ours(pgid, start)}
    for pgid in groups:
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while groups and time.monotonic() < deadline:
        groups = {g for g in groups if _alive(g)}
        time.sleep(0.02)
    for pgid in groups:
        if _ours(pgid, starts[pgid]):  # still the same process after the grace period
            _signal(pgid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
