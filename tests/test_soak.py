"""Soak and load: many start/stop cycles leak nothing; many threads of mixed calls all succeed."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from llama_proc import LlamaServer, LlamaServerArgs

from .conftest import children_of, in_threads, open_fds

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
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def work(i: int) -> int:
        done = 0
        for j in range(100):
            kind = (i + j) % 4
            if kind == 0:
                assert shared_server.tokenize(f"t{i}-{j}")["tokens"]
            elif kind == 1:
                assert shared_server.chat_completions(chat)["usage"]["completion_tokens"] == 2
            elif kind == 2:
                with shared_server.chat_completions({**chat, "stream": True}) as stream:
                    assert sum(1 for _ in stream) >= 2
            else:
                assert shared_server.health()["status"] == "ok"
            done += 1
        return done

    assert sum(in_threads(work, 32, timeout=600)) == 3200
