"""llama-server's HTTP threads against the client's connections, and streams under supervision,
with the real llama-server.

Each keep-alive connection holds one of llama-server's HTTP threads until it has been idle for
5 s; a connection beyond the threads waits, unserved, until one frees. The client must never
open more connections than the server has threads.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from pathlib import Path

import pytest

from llama_proc import EventKind, LlamaServer, LlamaServerArgs, RestartPolicy, ServerEvent
from llama_proc.errors import APITimeoutError
from llama_proc.server import HTTP_THREAD_MARGIN

from .conftest import in_threads, pid_alive, proc_state, wait_until, within

pytestmark = pytest.mark.integration

#: No call may take this long: a stalled connection waits 5 s (until a served connection's
#: keep-alive runs out); queueing for the server's slots on a busy machine stays well below it.
STALL_BOUND = 4.0

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}


def timed_calls(call, threads: int, calls: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds each call took, ``calls`` calls in each of ``threads`` threads released together."""

    def work(_: int) -> list[float]:
        out = []
        for _ in range(calls):
            t = time.monotonic()
            call()
            out.append(time.monotonic() - t)
        return out

    return [t for per_thread in in_threads(work, threads, timeout=60) for t in per_thread]


REQUEST = b'POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n{"content":"x"}'


def _schedule(pid: int, *, one_cpu_fifo: bool) -> None:
    """Every thread of ``pid`` on CPU 0 under SCHED_FIFO (or back to normal)."""
    for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(ProcessLookupError):
            if one_cpu_fifo:
                os.sched_setaffinity(tid, {0})
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
            else:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.sched_setaffinity(tid, range(os.cpu_count() or 1))


def late_in_a_burst(pid: int, port: int, connections: int) -> int:
    """How many of ``connections`` new connections, each with a request sent, get no answer within
    1 s when they all reach the server at once.

    The server is frozen while they connect and send (the kernel completes the handshakes and queues
    the bytes), then thawed with all its threads on one CPU under SCHED_FIFO: its accept loop then
    hands out every connection before any woken HTTP thread runs, as happens by chance in a burst on
    a busy machine. cpp-httplib starts an extra thread only when none counts as idle, so each
    connection beyond the idle threads waits until one frees: 5 s, when a served connection's
    keep-alive runs out."""
    os.kill(pid, signal.SIGSTOP)
    socks: list[socket.socket] = []
    try:
        try:
            _schedule(pid, one_cpu_fifo=True)
        except PermissionError:
            pytest.skip("needs SCHED_FIFO (CAP_SYS_NICE) to line the server's threads up deterministically")
        for _ in range(connections):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            socks[-1].sendall(REQUEST)
        thawed = time.monotonic()
        os.kill(pid, signal.SIGCONT)
        answered: dict[socket.socket, float] = {}
        while len(answered) < connections and time.monotonic() - thawed < 2.0:
            ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.1)
            for sock in ready:
                sock.recv(65536)
                answered[sock] = time.monotonic() - thawed
        return sum(1 for sock in socks if answered.get(sock, 99.0) > 1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
        for sock in socks:
            sock.close()
        _schedule(pid, one_cpu_fifo=False)


def test_a_burst_beyond_the_servers_idle_threads_stalls(llama_exe: Path, tiny_model: Path) -> None:
    """The stall itself, shown on a server with fewer HTTP threads than the burst (what a pool of
    32 does to llama-server's default of ``max(n_parallel + 4, cores - 1)`` threads)."""
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, threads_http=4)) as server:
        assert server.pid is not None and server.port is not None
        for _ in range(2):
            assert late_in_a_burst(server.pid, server.port, 24) >= 20  # all but the 4 threads' own
            time.sleep(5.5)  # until the served connections' keep-alive ran out


def test_a_burst_of_a_whole_pool_never_stalls_a_started_server(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256)) as server:
        assert server.pid is not None and server.port is not None
        for _ in range(3):  # every connection the client may open, at once
            assert late_in_a_burst(server.pid, server.port, server.client.pool_maxsize) == 0


def test_llama_procs_pool_stays_below_the_servers_threads(llama_exe: Path, tiny_model: Path) -> None:
    args = LlamaServerArgs(model=tiny_model, n_ctx=256, threads_http=4 + HTTP_THREAD_MARGIN)
    with LlamaServer(llama_exe, args) as server:
        assert server.client.pool_maxsize == 4
        with within(20):
            times = timed_calls(lambda: server.tokenize("x"), 12, 3)
    assert max(times) < STALL_BOUND


def test_a_started_server_gets_more_threads_than_its_pool(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, n_parallel=2)) as server:
        assert server.process is not None
        argv = server.process.argv
        threads = int(argv[argv.index("--threads-http") + 1])
        assert threads == server.client.pool_maxsize + HTTP_THREAD_MARGIN
        # a burst of new connections, then another 3.5 s later on the kept-alive ones, which the
        # server still holds threads for (where plain clients with a pool of 32 stalled)
        for _burst in range(2):
            with within(20):
                times = timed_calls(lambda: server.chat_completions(CHAT), 32, 1)
            assert max(times) < STALL_BOUND
            time.sleep(3.5)


def test_a_stream_from_a_frozen_server_is_detected_as_hung(llama_exe: Path, tiny_model: Path) -> None:
    events: list[ServerEvent] = []
    args = LlamaServerArgs(model=tiny_model, n_ctx=1024)
    server = LlamaServer(llama_exe, args, restart=RestartPolicy(backoff=0.05), listeners=[events.append])
    server.start()
    try:
        pid = server.pid
        assert pid is not None
        stream = server.chat_completions({**CHAT, "max_tokens": 800, "stream": True}, timeout=(2.0, 1.0))
        next(stream)
        os.kill(pid, signal.SIGSTOP)  # frozen mid-stream
        assert wait_until(lambda: proc_state(pid) == "T", 5)
        with within(5), pytest.raises(APITimeoutError):
            for _ in stream:
                pass
        assert wait_until(lambda: EventKind.RESTART in [e.kind for e in events], 15)
        crash = next(e for e in events if e.kind is EventKind.CRASH)
        assert "hung" in crash.detail
        assert not pid_alive(pid)
        assert server.tokenize("hello world")["tokens"]  # the restarted server answers
    finally:
        server.stop()
