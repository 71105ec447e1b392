"""Soak and load: many start/stop cycles leak nothing; many threads of mixed calls all succeed."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from llama_proc import LlamaServer, LlamaServerArgs

from .conftest import children_of, open_fds

pytestmark = pytest.mark.integration


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_200_start_stop_cycles_leak_nothing(llama_exe: Path, tiny_model: Path) -> None:
    args = LlamaServerArgs(model=tiny_model, n_ctx=128, n_parallel=1)

    def cycle() -> None:
        with LlamaServer(llama_exe, args) as server:
            assert server.tokenize("x")["tokens"]

    for _ in range(10):  # warm up: caches, the guardian, imports
        cycle()
    gc.collect()
    threads, fds, children, rss = set(threading.enumerate()), open_fds(), set(children_of(os.getpid())), rss_kib()
    for _ in range(200):
        cycle()
    gc.collect()
    assert set(threading.enumerate()) == threads
    assert open_fds() == fds
    assert set(children_of(os.getpid())) == children
    grown = rss_kib() - rss
    assert grown < 8 * 1024, f"resident memory grew by {grown} KiB over 200 cycles"


def test_32_threads_x_100_mixed_requests(shared_server: LlamaServer) -> None:
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            for j in range(100):
                kind = (i + j) % 4
                if kind == 0:
                    assert shared_server.tokenize(f"t{i}-{j}")["tokens"]
                elif kind == 1:
                    reply = shared_server.chat_completions(
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                    )
                    assert reply["usage"]["completion_tokens"] == 2
                elif kind == 2:
                    with shared_server.chat_completions(
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
                    ) as s:
                        assert sum(1 for _ in s) >= 2
                else:
                    assert shared_server.health()["status"] == "ok"
                with lock:
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert done[0] == 3200
