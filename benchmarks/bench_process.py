"""Process costs: import time, resident memory, and log pumps under a verbose server.

Targets: ``import llama_proc`` vs ``import requests`` ratio <= 1.3; a verbose server's throughput
with llama_proc's log pumps vs with its output sent to /dev/null ratio >= 0.95; memory is reported.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time

from _common import free_port, record, report, setup

from llama_proc import LlamaServer
from llama_proc.versions import flag_dialect

MEMORY_SCRIPT = """
import sys, time
{setup}
with open("/proc/self/status") as fh:
    rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
print(rss / 1024)
"""


def import_time(module: str) -> float:
    samples = []
    for _ in range(15):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples[3:])


def rss_mib(setup_code: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT.format(setup=setup_code)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def throughput(port: int, n: int = 150) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 16, "seed": 1}).encode()
    t = time.perf_counter()
    for _ in range(n):
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise OSError(f"status {response.status}")  # still loading: not a measurement
    conn.close()
    return n / (time.perf_counter() - t)


def main() -> int:
    executable, args = setup()
    ours_ms, requests_ms = import_time("llama_proc") * 1000, import_time("requests") * 1000
    record("import time", ours_ms, requests_ms, "ms", "ratio <= 1.3", ours_ms / requests_ms <= 1.3)

    held = (
        "from llama_proc import LlamaServer, LlamaServerArgs\n"
        f"s = LlamaServer({str(executable)!r}, LlamaServerArgs(model={str(args.model)!r}, n_ctx=256)); s.start()"
    )
    ours_rss, base_rss = rss_mib(held), rss_mib("import requests")
    record("RSS, idle process holding a server", ours_rss, base_rss, "MiB", "reported", True)

    # Both servers run at once and are measured in alternating rounds, so that drift in the
    # machine's speed hits both alike (an idle llama-server takes no CPU).
    verbose = args.evolve(verbose=True)
    port = free_port()
    argv = [str(executable), *verbose.evolve(port=port).to_args(flag_dialect(executable))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with LlamaServer(executable, verbose) as server:
            assert server.port is not None
            deadline = time.monotonic() + 60
            while True:
                try:
                    throughput(port, 1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            for target in (server.port, port):
                throughput(target, 20)
            pumped_runs: list[float] = []
            devnull_runs: list[float] = []
            for _ in range(7):
                for target, runs in ((server.port, pumped_runs), (port, devnull_runs)):
                    runs.append(throughput(target))
            pumped, devnull = statistics.median(pumped_runs), statistics.median(devnull_runs)
            lines = len(server.log_tail(10_000))
    finally:
        proc.terminate()
        proc.wait()
    record(
        f"verbose server, requests/s ({lines} log lines kept)",
        pumped,
        devnull,
        "/s",
        "ratio >= 0.95",
        pumped / devnull >= 0.95,
    )
    return report("Process costs")


if __name__ == "__main__":
    sys.exit(main())
