"""RPC workers and clusters: real rpc-server and llama-server processes, with workers on this
machine's loopback and on test hosts (network namespaces) reached over veth links."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from llama_proc import (
    APITimeoutError,
    ConfigError,
    LlamaServerArgs,
    RestartPolicy,
    RpcWorkerError,
    RpcWorkerUnreachable,
    ServerNotRunning,
    StartupAborted,
    StartupError,
)
from llama_proc.rpc import RpcCluster, RpcWorker, rpc_flags

from .conftest import children_of, pid_alive, process_name, wait_until
from .netns import Host, make_hosts, pids_in

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def rpc_exe(llama_exe: Path) -> Path:
    return llama_exe.parent / "rpc-server"


def _rpc_children() -> list[int]:
    return [p for p in children_of(os.getpid()) if process_name(p) == "rpc-server"]


# -- one worker ---------------------------------------------------------------------------------------


def test_worker_settings_are_checked_and_flags_follow_the_build(rpc_exe: Path) -> None:
    with pytest.raises(ConfigError, match="port: must be between 1 and 65535, got 0; threads: must be at least 1"):
        RpcWorker(rpc_exe, port=0, threads=0)
    assert {"--host", "--port", "--threads", "--device", "--cache"} <= rpc_flags(rpc_exe)
    worker = RpcWorker(rpc_exe, port=50100, threads=2, cache=True)
    assert worker.to_args() == ["--host", "127.0.0.1", "--port", "50100", "--threads", "2", "--cache"]
    if "--mem" not in rpc_flags(rpc_exe):
        with pytest.raises(ConfigError, match="mem: this rpc-server .* has no --mem flag"):
            RpcWorker(rpc_exe, mem=1024).to_args()
    with pytest.raises(ConfigError, match="expected host:port"):
        RpcWorker.attach("10.0.0.5")
    with pytest.raises(ConfigError, match="host: rpc-server listens on IPv4 addresses only"):
        RpcWorker(rpc_exe, host="localhost")
    assert RpcWorker.attach("worker-a.internal:50052").address == "worker-a.internal:50052"  # resolved by llama-server


def test_worker_starts_listens_and_stops(rpc_exe: Path) -> None:
    with RpcWorker(rpc_exe) as worker:
        assert worker.pid in _rpc_children() and worker.is_running()
        # ready means its own log says it accepted a connection, not just that the port is open
        assert any("Accepted client connection" in line for line in worker.log_tail(50))
        # SIGPIPE ignored: a client that vanishes mid-answer must not kill the worker
        with open(f"/proc/{worker.pid}/status") as fh:
            ignored = int(next(line for line in fh if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGPIPE - 1))
        worker.check(1.0)
        assert RpcWorker.attach(worker.address).is_running()
        pid = worker.pid
    assert not pid_alive(pid or 0) and not worker.is_running()
    with pytest.raises(RpcWorkerUnreachable, match=re.escape(f"RPC worker {worker.address}: ")):
        RpcWorker.attach(worker.address).start()


def test_a_worker_off_loopback_warns(rpc_exe: Path, caplog: pytest.LogCaptureFixture, hosts: list[Host]) -> None:
    address = hosts[0].local  # this machine's end of a test link: not loopback, reachable from here only
    with caplog.at_level(logging.WARNING, logger="llama_proc.rpc"), RpcWorker(rpc_exe, host=address) as worker:
        worker.check(1.0)
    assert any("without authentication" in r.getMessage() and address in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_proc.rpc"), RpcWorker(rpc_exe):
        pass
    assert not caplog.records


def test_a_worker_that_exits_while_starting_fails_at_once_with_its_lines(rpc_exe: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StartupError) as info:
        RpcWorker(rpc_exe, device="NoSuchDevice").start()
    assert time.monotonic() - started < 5
    assert info.value.exit_code == 1 and "unknown device: NoSuchDevice" in str(info.value)
    assert _rpc_children() == []


# -- a cluster on loopback ----------------------------------------------------------------------------


def _args(tiny_model: Path) -> LlamaServerArgs:
    # verbosity 4: llama-server logs where each model buffer lives
    return LlamaServerArgs(model=tiny_model, n_ctx=256, extra_args=("-lv", "4"))


def test_cluster_serves_from_local_workers_and_stops_server_first(
    llama_exe: Path, rpc_exe: Path, tiny_model: Path
) -> None:
    workers = [RpcWorker(rpc_exe), RpcWorker(rpc_exe)]
    with RpcCluster(_args(tiny_model), workers, executable=llama_exe) as cluster:
        assert cluster.chat_completions(CHAT)["usage"]["completion_tokens"] > 0
        assert [w.pid for w in cluster.workers] == [w.pid for w in workers]
        log = "\n".join(cluster.log_tail(400))
        for worker in workers:  # (this build names every RPC buffer RPC0[address])
            assert re.search(rf"RPC\d+\[{re.escape(worker.address)}\] model buffer size", log), log
        server_pid = cluster.pid
    assert not pid_alive(server_pid or 0)
    assert _rpc_children() == [] and all(w.pid is None for w in workers)


def test_an_unreachable_worker_is_named_within_the_connect_timeout(
    llama_exe: Path, rpc_exe: Path, tiny_model: Path
) -> None:
    with socket.socket() as held:  # bound, never listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        local = RpcWorker(rpc_exe)
        cluster = RpcCluster(_args(tiny_model), [local, address], executable=llama_exe, connect_timeout=1.0)
        with pytest.raises(RpcWorkerUnreachable, match=re.escape(f"RPC worker {address}: Connection refused")):
            cluster.start()
    assert _rpc_children() == [] and local.pid is None  # the worker it had started is stopped again


def test_a_lost_worker_is_named_and_a_restart_policy_brings_the_cluster_back(
    llama_exe: Path, rpc_exe: Path, tiny_model: Path
) -> None:
    workers = [RpcWorker(rpc_exe), RpcWorker(rpc_exe)]
    policy = RestartPolicy(max_restarts=3, window=60, backoff=0.1)
    with RpcCluster(_args(tiny_model), workers, executable=llama_exe, restart=policy) as cluster:
        cluster.chat_completions(CHAT)
        lost = workers[0].pid
        os.kill(lost or 0, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RpcWorkerError, match=re.escape(f"RPC worker {workers[0].address}: ")):
            cluster.chat_completions(CHAT)
        assert time.monotonic() - started < 5
        # the cluster starts its own worker again, then the server
        assert wait_until(lambda: _serves(cluster), 30), cluster.log_tail()
        assert workers[0].pid not in (None, lost)
    assert _rpc_children() == []


def test_calls_outside_a_run_and_slow_answers_are_not_blamed_on_workers(
    llama_exe: Path, rpc_exe: Path, tiny_model: Path
) -> None:
    cluster = RpcCluster(_args(tiny_model), [RpcWorker(rpc_exe)], executable=llama_exe)
    with pytest.raises(ServerNotRunning, match="has not been started"):
        cluster.chat_completions(CHAT)
    with cluster:
        for _ in range(4):  # each failed call leaves the single-client worker alone
            with pytest.raises(APITimeoutError):
                cluster.chat_completions({**CHAT, "max_tokens": 2000, "ignore_eos": True}, timeout=(5, 0.001))
        assert cluster.chat_completions(CHAT)["choices"]
    with pytest.raises(ServerNotRunning):
        cluster.chat_completions(CHAT)


def test_stop_interrupts_a_start(llama_exe: Path, tiny_model: Path, hosts: list[Host]) -> None:
    import threading

    silent = f"{hosts[1].silent}:50052"
    cluster = RpcCluster(_args(tiny_model), [silent], executable=llama_exe, connect_timeout=20)
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            cluster.start()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    from llama_proc.rpc import _running_clusters

    assert wait_until(lambda: cluster in _running_clusters, 5)  # the start is under way
    time.sleep(0.2)
    started = time.monotonic()
    cluster.stop()
    thread.join(30)
    assert time.monotonic() - started < 3, "stop() waited for the worker's connect timeout"
    assert outcome and isinstance(outcome[0], StartupAborted), outcome


def _serves(cluster: RpcCluster) -> bool:
    try:
        return bool(cluster.chat_completions(CHAT)["choices"])
    except Exception:
        return False


_OWNER = """
import sys, time
from llama_proc import LlamaServerArgs
from llama_proc.rpc import RpcCluster, RpcWorker
cluster = RpcCluster(LlamaServerArgs(model=sys.argv[1], n_ctx=256), [RpcWorker(sys.argv[3])], local_worker=False,
                     executable=sys.argv[2])
cluster.start()
print(cluster.pid, *[w.pid for w in cluster.workers], flush=True)
time.sleep(600)
"""


def test_a_killed_owner_leaves_no_server_and_no_worker(llama_exe: Path, rpc_exe: Path, tiny_model: Path) -> None:
    orphans = []
    for _ in range(10):
        owner = subprocess.Popen(
            [sys.executable, "-c", _OWNER, str(tiny_model), str(llama_exe), str(rpc_exe)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert owner.stdout is not None
            ready, _, _ = select.select([owner.stdout], [], [], 60)
            pids = [int(p) for p in owner.stdout.readline().split()] if ready else []
            assert len(pids) == 2, owner.stderr.read() if owner.stderr else ""
        finally:
            owner.kill()
            owner.communicate()
        if not wait_until(lambda pids=pids: not any(pid_alive(p) for p in pids), 10):
            left = [p for p in pids if pid_alive(p)]
            orphans += left
            for pid in left:
                os.kill(pid, signal.SIGKILL)
    assert orphans == []


# -- workers on other hosts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    with make_hosts(2) as made:
        yield made


class CliWorker:
    """``llama-proc rpc-worker`` run in a test host."""

    def __init__(self, host: Host, rpc_exe: Path, port: int = 50052) -> None:
        self.host = host
        self.address = f"{host.address}:{port}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.name, sys.executable, "-m", "llama_proc", "rpc-worker",
             "--executable", str(rpc_exe), "--host", host.address, "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"rpc-server pid (\d+) listening", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"rpc-worker did not start: {line!r} {self.proc.communicate()[1]}")
        self.server_pid = int(match[1])

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out


def test_a_cluster_over_two_hosts(llama_exe: Path, rpc_exe: Path, tiny_model: Path, hosts: list[Host]) -> None:
    remote = [CliWorker(host, rpc_exe) for host in hosts]
    try:
        cluster = RpcCluster(_args(tiny_model), [w.address for w in remote], executable=llama_exe)
        with cluster:
            assert cluster.chat_completions(CHAT)["choices"][0]["message"]["content"] is not None
            with cluster.chat_completions(CHAT, stream=True) as stream:
                assert any(chunk["choices"] for chunk in stream)
            assert cluster.tokenize("hello world")["tokens"]
            log = "\n".join(cluster.log_tail(400))
            for worker in remote:
                assert re.search(rf"RPC\d+\[{re.escape(worker.address)}\] model buffer size", log), log
            # a worker killed mid-run is named by the next call, within 5 s
            os.kill(remote[1].server_pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(RpcWorkerError, match=re.escape(f"RPC worker {remote[1].address}: ")):
                cluster.chat_completions(CHAT)
            assert time.monotonic() - started < 5
            remote[1].proc.wait(5)  # rpc-worker notices its rpc-server died, and ends
        assert cluster.pid is None
    finally:
        codes = [w.stop() for w in remote]
    assert codes[0] == (0, "stopped\n")  # SIGTERM stops it cleanly
    assert codes[1][0] == 1 and "exited by itself" in codes[1][1], codes  # its rpc-server was killed
    assert all(pids_in(h.name) == [] for h in hosts)


def test_a_remote_worker_lost_and_restarted(
    llama_exe: Path, rpc_exe: Path, tiny_model: Path, hosts: list[Host]
) -> None:
    worker = CliWorker(hosts[0], rpc_exe, port=50060)
    policy = RestartPolicy(max_restarts=5, window=60, backoff=0.1)
    try:
        with RpcCluster(_args(tiny_model), [worker.address], executable=llama_exe, restart=policy) as cluster:
            cluster.chat_completions(CHAT)
            os.kill(worker.server_pid, signal.SIGKILL)
            with pytest.raises(RpcWorkerError, match=re.escape(worker.address)):
                cluster.chat_completions(CHAT)
            worker.stop()
            worker = CliWorker(hosts[0], rpc_exe, port=50060)  # back on the same address
            assert wait_until(lambda: _serves(cluster), 30), cluster.log_tail()
    finally:
        worker.stop()
    assert pids_in(hosts[0].name) == []


def test_a_silent_host_is_named_within_the_connect_timeout(
    llama_exe: Path, tiny_model: Path, hosts: list[Host]
) -> None:
    address = f"{hosts[0].silent}:50052"  # on the link, but nothing answers: connections time out
    cluster = RpcCluster(_args(tiny_model), [address], executable=llama_exe, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RpcWorkerUnreachable, match=re.escape(f"RPC worker {address}: ")):
        cluster.start()
    assert time.monotonic() - started < 3


def test_shared_server_manager_and_stop_all_take_clusters(llama_exe: Path, rpc_exe: Path, tiny_model: Path) -> None:
    from llama_proc import ServerManager, shared_server, stop_all
    from llama_proc import manager as manager_module

    cluster = RpcCluster(_args(tiny_model), [RpcWorker(rpc_exe)], executable=llama_exe)
    try:
        shared = shared_server(cluster, replace=True)
        assert shared is cluster and shared_server(cluster) is cluster
        assert shared.chat_completions(CHAT)["choices"]  # started by the first call
        assert len(_rpc_children()) == 1
        stop_all()  # the server, then the worker
        assert cluster.pid is None and _rpc_children() == []
        assert shared.chat_completions(CHAT)["choices"]  # the next call starts it again
        stop_all()
    finally:
        cluster.stop()
        manager_module._shared = None  # the slot is the process's: give it back to other tests
    with ServerManager(max_loaded=1) as manager:
        manager.register("big", RpcCluster(_args(tiny_model), [RpcWorker(rpc_exe)], executable=llama_exe))
        manager.register("small", LlamaServerArgs(model=tiny_model, n_ctx=256))
        reply = manager.chat_completions({**CHAT, "model": "big"})
        assert reply["choices"] and len(_rpc_children()) == 1
        manager.chat_completions({**CHAT, "model": "small"})  # evicts the cluster, worker included
        assert _rpc_children() == []
        assert manager.chat_completions({**CHAT, "model": "big"})["choices"]  # and loads it again
    assert _rpc_children() == []


def test_a_busy_worker_is_named_and_survives_a_client_that_gives_up(
    llama_exe: Path, rpc_exe: Path, tiny_model: Path
) -> None:
    from llama_proc import LlamaServer

    worker = RpcWorker(rpc_exe)
    worker.start()  # the worker outlives the clusters that use it
    with RpcCluster(_args(tiny_model), [worker], executable=llama_exe) as first:
        second = RpcCluster(_args(tiny_model), [worker.address], executable=llama_exe, connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(RpcWorkerError, match=re.escape(f"RPC worker {worker.address}: ") + ".*serves another"):
            second.start()
        assert time.monotonic() - started < 3
        # a llama-server started by hand on the busy worker waits, times out and is killed: the
        # worker, whose socket to it breaks, lives on (rpc-server runs with SIGPIPE ignored)
        by_hand = LlamaServer(llama_exe, _args(tiny_model).evolve(rpc=(worker.address,)), startup_timeout=2)
        with pytest.raises(StartupError):
            by_hand.start()
        assert first.chat_completions(CHAT)["choices"]
    # stopping the first client lets the worker take the dead one's queued connection
    try:
        time.sleep(1.0)
        assert worker.is_running(), worker.log_tail()
        with RpcCluster(_args(tiny_model), [worker.address], executable=llama_exe) as third:
            assert third.chat_completions(CHAT)["choices"]
    finally:
        worker.stop()


def test_a_worker_lost_mid_stream_is_named(llama_exe: Path, rpc_exe: Path, tiny_model: Path) -> None:
    from llama_proc import APIConnectionError

    workers = [RpcWorker(rpc_exe), RpcWorker(rpc_exe)]
    with RpcCluster(_args(tiny_model), workers, executable=llama_exe) as cluster:
        stream = cluster.chat_completions({**CHAT, "max_tokens": 2000}, stream=True)
        with pytest.raises(APIConnectionError) as info, stream:
            for n, _chunk in enumerate(stream):
                if n == 3:
                    os.kill(workers[1].pid or 0, signal.SIGKILL)
        assert f"RPC worker {workers[1].address}: its rpc-server (pid" in str(info.value)


def test_serve_with_rpc_workers_runs_a_cluster(llama_exe: Path, rpc_exe: Path, tiny_model: Path) -> None:
    import requests

    with RpcWorker(rpc_exe) as worker, socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: refused
        dead = f"127.0.0.1:{held.getsockname()[1]}"
        serve = [sys.executable, "-m", "llama_proc", "serve", "--executable", str(llama_exe), "--model", str(tiny_model),
                 "--n-ctx", "256", "--rpc", worker.address]  # fmt: skip
        started = time.monotonic()
        refused = subprocess.run([*serve, "--rpc", dead], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and f"RPC worker {dead}" in refused.stderr, refused.stderr
        assert "rpc_worker_unreachable" in refused.stderr and time.monotonic() - started < 30

        proc, url, key = _serving([*serve, "--api-key", "auto"])
        try:
            answer = requests.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                                   timeout=30)  # fmt: skip
            assert answer.status_code == 200
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        finally:
            _end(proc)
        assert worker.is_running()  # a worker started elsewhere is left running

        proc, url, _ = _serving(serve)
        try:
            os.kill(worker.pid or 0, signal.SIGKILL)  # llama-server aborts at its next use of the worker
            with pytest.raises(requests.RequestException):
                requests.post(url + "/v1/chat/completions", json=CHAT, timeout=30).raise_for_status()
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 1 and f"RPC worker {worker.address}" in out, out  # named as it exits
        finally:
            _end(proc)


def _serving(command: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    """``llama-proc serve`` started and ready: the process, its URL, and its key if it printed one."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    match = re.search(r"ready at (http://\S+)", proc.stdout.readline() if ready else "")
    if not match:
        _end(proc)
        raise AssertionError(f"not ready: {proc.returncode}")
    key = proc.stdout.readline().removeprefix("API key: ").strip() if "--api-key" in command else ""
    return proc, match[1], key


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
