"""Readiness: ``start()`` until it returns vs spawning the same argv and polling /health every 1 ms.

Target: ratio <= 1.05 (median of >= 10 runs). Also ``stop()`` of an idle server: <= 20 ms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from _common import free_port, record, report, setup, wait_health

from llama_proc import LlamaServer
from llama_proc.versions import flag_dialect


def raw_start(executable: str, argv: list[str], port: int) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [executable, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_health(port)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    executable, args = setup()
    dialect = flag_dialect(executable)
    ours, raw, stops = [], [], []
    for _i in range(12):
        server = LlamaServer(executable, args)
        t = time.perf_counter()
        server.start()
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        code = server.stop()
        stops.append(time.perf_counter() - t)
        assert code == 0, f"stop() ended with {code}: not a graceful TERM"
        port = free_port()
        raw.append(raw_start(str(executable), args.evolve(port=port).to_args(dialect), port))
    ours_ms, raw_ms = statistics.median(ours[2:]) * 1000, statistics.median(raw[2:]) * 1000
    record("start() until ready", ours_ms, raw_ms, "ms", "ratio <= 1.05", ours_ms / raw_ms <= 1.05)
    stop_ms = statistics.median(stops) * 1000
    record("stop() of an idle server", stop_ms, 20.0, "ms", "<= 20 ms (baseline = limit)", stop_ms <= 20.0)
    return report("Readiness and stop")


if __name__ == "__main__":
    sys.exit(main())
