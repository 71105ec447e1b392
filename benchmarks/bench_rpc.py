"""An RPC cluster of 2 workers on this machine: start-to-ready and tokens/s.

* readiness: ``RpcCluster.start()`` until it returns vs the same processes started by hand with the
  same argv (both workers spawned, each port polled every 1 ms, then llama-server spawned and
  ``/health`` polled every 1 ms): the raw limit. Target: ratio <= 1.05 (median of 10 runs).
* tokens/s of the cluster vs one local llama-server on the same model (reported as measured: every
  token's computation crosses the workers' TCP connections, so a cluster is slower on one machine);
  as root, also with the two workers on test hosts (network namespaces joined by veth links).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import free_port, record, report, setup, wait_health

from llama_proc import LlamaServer, LlamaServerArgs
from llama_proc.rpc import RpcCluster, RpcWorker
from llama_proc.versions import flag_dialect

PROMPT = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 64, "temperature": 0}


def _wait_port(port: int, host: str = "127.0.0.1") -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.001)


def raw_cluster(rpc_exe: str, exe: str, args: LlamaServerArgs) -> float:
    """Seconds from spawning both workers to a healthy llama-server, by hand."""
    ports = [free_port(), free_port()]
    started = time.perf_counter()
    workers = [
        subprocess.Popen([rpc_exe, "--host", "127.0.0.1", "--port", str(p)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in ports
    ]  # fmt: skip
    server = None
    try:
        for port in ports:
            _wait_port(port)
        port = free_port()
        argv = args.evolve(port=port, rpc=tuple(f"127.0.0.1:{p}" for p in ports), n_gpu_layers=-1).to_args(
            flag_dialect(exe)
        )
        server = subprocess.Popen(
            [exe, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_health(port)
        return time.perf_counter() - started
    finally:
        for proc in [server, *workers]:  # the server first: it aborts when its workers go first
            if proc is not None:
                proc.terminate()
                proc.wait()


def tokens_per_second(server: LlamaServer | RpcCluster, rounds: int = 5) -> float:
    server.chat_completions(PROMPT)  # warm up
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        tokens = server.chat_completions(PROMPT)["usage"]["completion_tokens"]
        rates.append(tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> int:
    executable, args = setup()
    rpc_exe = executable.parent / "rpc-server"
    ours, raw = [], []
    for _ in range(12):
        cluster = RpcCluster(args, [RpcWorker(rpc_exe), RpcWorker(rpc_exe)], executable=executable)
        t = time.perf_counter()
        cluster.start()
        ours.append(time.perf_counter() - t)
        cluster.stop()
        raw.append(raw_cluster(str(rpc_exe), str(executable), args))
    ours_ms, raw_ms = statistics.median(ours[2:]) * 1000, statistics.median(raw[2:]) * 1000
    record("2-worker cluster start() until ready", ours_ms, raw_ms, "ms", "ratio <= 1.05", ours_ms / raw_ms <= 1.05)

    with RpcCluster(args, [RpcWorker(rpc_exe), RpcWorker(rpc_exe)], executable=executable) as cluster:
        cluster_rate = tokens_per_second(cluster)
    with LlamaServer(executable, args) as local:
        local_rate = tokens_per_second(local)
    record("tokens/s: cluster vs one local server", cluster_rate, local_rate, "tok/s", "reported", True)
    if os.geteuid() == 0:
        veth_rate = over_veth(str(rpc_exe), executable, args)
        record("tokens/s: workers on 2 veth hosts vs local", veth_rate, local_rate, "tok/s", "reported", True)
    return report("RPC cluster (2 workers)")


def over_veth(rpc_exe: str, executable: Path, args: LlamaServerArgs) -> float:
    """tokens/s of a cluster whose workers run in two network namespaces (test hosts)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.netns import make_hosts

    with make_hosts(2) as hosts, contextlib.ExitStack() as stack:
        for host in hosts:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, rpc_exe, "--host", host.address, "--port", "50052"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            stack.callback(proc.wait)
            stack.callback(proc.terminate)
        addresses = [f"{h.address}:50052" for h in hosts]
        for host in hosts:
            _wait_port(50052, host.address)
        with RpcCluster(args, addresses, executable=executable) as cluster:
            return tokens_per_second(cluster)


if __name__ == "__main__":
    sys.exit(main())
