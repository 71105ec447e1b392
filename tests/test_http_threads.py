"""llama-server's HTTP threads against the client's connections, and streams under supervision,
with the real llama-server.

Each keep-alive connection holds one of llama-server's HTTP threads until it has been idle for
5 s; a connection beyond the threads waits, unserved, until one frees. The client must never
open more connections than the server has threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_proc import EventKind, LlamaServer, LlamaServerArgs, RestartPolicy, ServerEvent
from llama_proc.errors import APITimeoutError
from llama_proc.server import HTTP_THREAD_MARGIN

from .conftest import in_threads, pid_alive, proc_state, wait_until, within

pytestmark = pytest.mark.integration

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


_BURST = """
import select, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
request = b'POST /tokenize HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 15\\r\\n\\r\\n{"content":"x"}'
socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
started = time.monotonic()
for sock in socks:
    sock.sendall(request)
answered = {}
while len(answered) < len(socks) and time.monotonic() - started < 8:
    ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.5)
    for sock in ready:
        sock.recv(65536)
        answered[sock] = time.monotonic() - started
print(max(answered.get(sock, 99.0) for sock in socks))
"""


def burst(port: int, connections: int) -> float:
    """Open ``connections`` connections at once (as a pool does when that many threads call
    together), then send a request on each; the seconds until the last answer (99: none in 8 s).
    Run in a plain interpreter of its own, so that the test run's tracing does not slow the burst."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", _BURST, str(port), str(connections)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_a_burst_of_a_whole_pool_never_stalls_a_started_server(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256)) as server:
        assert server.port is not None
        for _ in range(3):
            assert burst(server.port, server.client.pool_maxsize) < 1.0  # every connection the client may open


def test_llama_procs_pool_stays_below_the_servers_threads(llama_exe: Path, tiny_model: Path) -> None:
    args = LlamaServerArgs(model=tiny_model, n_ctx=256, threads_http=4 + HTTP_THREAD_MARGIN)
    with LlamaServer(llama_exe, args) as server:
        assert server.client.pool_maxsize == 4
        with within(20):
            times = timed_calls(lambda: server.tokenize("x"), 12, 3)
    assert max(times) < 1.0


def test_a_started_server_gets_more_threads_than_its_pool(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, n_parallel=2)) as server:
        assert server.process is not None
        argv = server.process.argv
        threads = int(argv[argv.index("--threads-http") + 1])
        assert threads == server.client.pool_maxsize + HTTP_THREAD_MARGIN
        for _burst in range(2):  # a burst of new connections, then another after the first went idle
            with within(20):
                times = timed_calls(lambda: server.chat_completions(CHAT), 32, 1)
            assert max(times) < 1.0
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
