"""No orphans: the server dies with the Python process, even on SIGKILL, but not with a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llama_proc import LlamaServer, LlamaServerArgs

from .conftest import pid_alive, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")]

CHILD = textwrap.dedent(
    """
    import sys, time
    from llama_proc import LlamaServer, LlamaServerArgs
    server = LlamaServer(sys.argv[1], LlamaServerArgs(model=sys.argv[2], n_ctx=256))
    server.start()
    print(server.pid, flush=True)
    time.sleep(600)
    """
)


def _start_child(llama_exe: Path, tiny_model: Path) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(llama_exe), str(tiny_model)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip().isdigit(), line
    return child, int(line)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_parent_killed_leaves_no_server(llama_exe: Path, tiny_model: Path, sig: int) -> None:
    child, server_pid = _start_child(llama_exe, tiny_model)
    try:
        assert pid_alive(server_pid)
        child.send_signal(sig)
        child.wait(10)
        assert wait_until(lambda: not pid_alive(server_pid), 10.0), f"llama-server {server_pid} outlived its parent"
    finally:
        child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()
        if pid_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_server_outlives_the_thread_that_started_it(llama_exe: Path, tiny_model: Path) -> None:
    server = LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256))
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join(60)
    assert not starter.is_alive()
    try:
        time.sleep(0.5)
        assert server.is_running()
        assert server.health() == {"status": "ok"}
    finally:
        server.stop()
