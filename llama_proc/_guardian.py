"""A watchdog that stops our servers when the Python process that started them dies.

Run as a script (``python -I -S _guardian.py``), it reads commands on stdin, one per line:
``+ PGID`` registers a process group, ``- PGID`` forgets it. The write end of that pipe belongs to
the Python process that owns the servers, so when that process ends for any reason, SIGKILL
included, the guardian reads end-of-file, sends SIGTERM to every registered group, waits briefly,
and sends SIGKILL to what is left. It is standard library only and imports nothing of llama_proc,
so it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
import time

GRACE_SECONDS = 5.0


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
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        parts = raw.split()
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        pgid = int(parts[1])
        if pgid <= 1:
            continue
        if parts[0] == b"+":
            groups.add(pgid)
        elif parts[0] == b"-":
            groups.discard(pgid)
    for pgid in groups:
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while groups and time.monotonic() < deadline:
        groups = {g for g in groups if _alive(g)}
        time.sleep(0.02)
    for pgid in groups:
        _signal(pgid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
