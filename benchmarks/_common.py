"""Shared helpers of the benchmarks: the binary and model, robust timing, and the result table."""

from __future__ import annotations

import gc
import http.client
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_proc import LlamaServerArgs, ensure_executable
from llama_proc.tiny_model import ensure_tiny_model

ROWS: list[tuple[str, str, str, str, str, bool]] = []


def setup() -> tuple[Path, LlamaServerArgs]:
    """The llama-server (built or downloaded once) and the tiny model's args."""
    return ensure_executable(), LlamaServerArgs(model=ensure_tiny_model(), n_ctx=1024, n_parallel=4)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_health(port: int) -> None:
    """Poll ``/health`` on 127.0.0.1:``port`` every 1 ms with the standard library until it answers 200
    (the raw baseline of a start: no pooling, no backoff)."""
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.001)


def compare(
    ours: Callable[[], object], baseline: Callable[[], object], n: int, rounds: int = 15
) -> tuple[float, float]:
    """Seconds per call of each, measured in alternating rounds so that drift in the machine's speed
    hits both alike; returns the median of each (the ratio of medians is what is reported)."""
    for fn in (ours, baseline):
        for _ in range(max(10, n // 10)):
            fn()
    a, b = [], []
    gc.disable()
    try:
        for _ in range(rounds):
            for fn, out in ((ours, a), (baseline, b)):
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                out.append((time.perf_counter() - t) / n)
    finally:
        gc.enable()
    return statistics.median(a), statistics.median(b)


def record(name: str, ours: float, baseline: float, unit: str, target: str, ok: bool) -> None:
    """Add one row; ``target`` says what passing means (ratio <= 1.05, ...)."""
    ratio = ours / baseline if baseline else float("inf")
    ROWS.append((name, f"{ours:.3f} {unit}", f"{baseline:.3f} {unit}", f"{ratio:.3f}", target, ok))


def report(title: str) -> int:
    """Print the table; exit status 1 when a row failed its target."""
    print(f"\n{title} ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')})")  # fmt: skip
    widths = [
        max(len(str(r[i])) for r in [("benchmark", "llama_proc", "baseline", "ratio", "target", ""), *ROWS])
        for i in range(5)
    ]
    header = ("benchmark", "llama_proc", "baseline", "ratio", "target")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  result")
    for row in ROWS:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:5], widths)) + ("  PASS" if row[5] else "  FAIL"))
    return 0 if all(r[5] for r in ROWS) else 1
