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


@pytest.mark.parametrize("trial", range(20))
def test_sigkilled_parent_twenty_trials(llama_exe: Path, tiny_model: Path, trial: int) -> None:
    child, server_pid = _start_child(llama_exe, tiny_model)
    try:
        child.kill()
        child.wait(10)
        assert wait_until(lambda: not pid_alive(server_pid), 10), f"trial {trial}: llama-server outlived its parent"
    finally:
        if child.stdout:
            child.stdout.close()
        if pid_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


FORKING_CHILD = textwrap.dedent(
    """
    import multiprocessing, sys, time
    from llama_proc import LlamaServer, LlamaServerArgs
    server = LlamaServer(sys.argv[1], LlamaServerArgs(model=sys.argv[2], n_ctx=256))
    server.start()
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()  # inherits everything the owner has open
    print(server.pid, worker.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("trial", range(10))
def test_a_forked_worker_does_not_keep_a_killed_owners_servers_alive(
    llama_exe: Path, tiny_model: Path, trial: int
) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", FORKING_CHILD, str(llama_exe), str(tiny_model)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert owner.stdout is not None
    server_pid, worker_pid = map(int, owner.stdout.readline().split())
    try:
        assert pid_alive(worker_pid)
        owner.kill()
        owner.wait(10)
        assert wait_until(lambda: not pid_alive(server_pid), 5), f"trial {trial}: the worker kept the server alive"
        assert pid_alive(worker_pid)  # the worker still runs: it did not take the server down by exiting
    finally:
        owner.stdout.close()
        for pid in (worker_pid, server_pid):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


REAP_CHILD = textwrap.dedent(
    """
    import sys, time
    from llama_proc import LlamaServer, LlamaServerArgs
    from llama_proc.process import _guardian
    server = LlamaServer(sys.argv[1], LlamaServerArgs(model=sys.argv[2], n_ctx=256))
    server.start()
    print(server.pid, _guardian.pid, flush=True)
    time.sleep(600)
    """
)


def test_stale_server_is_reaped_and_strangers_are_not(llama_exe: Path, tiny_model: Path, tmp_path: Path) -> None:
    import json

    from llama_proc import _registry
    from llama_proc.cli import main

    child = subprocess.Popen(
        [sys.executable, "-c", REAP_CHILD, str(llama_exe), str(tiny_model)], stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    server_pid, guardian_pid = map(int, child.stdout.readline().split())
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        os.kill(guardian_pid, signal.SIGKILL)  # what an OOM killer or `pkill python` might do
        child.kill()
        child.wait(10)
        time.sleep(0.5)
        assert pid_alive(server_pid), "the server should be orphaned for this test"
        # a forged record pointing at someone else's process must be left alone
        run = _registry._run_dir()
        forged = {"pid": stranger.pid, "start": _registry.start_time(stranger.pid), "executable": str(llama_exe),
                  "owner": 999_999_999, "owner_start": 1}  # fmt: skip
        (run / f"{stranger.pid}.json").write_text(json.dumps(forged))
        import io

        out = io.StringIO()
        assert main(["doctor", "--reap"], out=out) in (0, 1)
        assert f"stopped 1 stale llama-server(s): {server_pid}" in out.getvalue()
        assert wait_until(lambda: not pid_alive(server_pid), 10)
        assert stranger.poll() is None  # not ours: untouched
        assert not (run / f"{stranger.pid}.json").exists() and not (run / f"{server_pid}.json").exists()
    finally:
        stranger.kill()
        stranger.wait()
        child.kill()
        child.wait()
        child.stdout.close()
        if pid_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_a_running_owners_servers_are_not_reaped(llama_exe: Path, tiny_model: Path) -> None:
    from llama_proc import _registry

    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256)) as server:
        pid = server.pid
        assert pid is not None and (_registry._run_dir() / f"{pid}.json").exists()
        assert pid not in _registry.reap_stale()
        assert server.health()["status"] == "ok"
    assert not (_registry._run_dir() / f"{pid}.json").exists()  # the record goes with the server


def test_guardian_never_signals_a_reused_pid() -> None:
    from llama_proc import _registry
    from llama_proc.process import __file__ as process_file

    guardian_script = Path(process_file).with_name("_guardian.py")
    mine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        guardian = subprocess.Popen([sys.executable, "-I", "-S", str(guardian_script)], stdin=subprocess.PIPE)
        assert guardian.stdin is not None
        start = _registry.start_time(stranger.pid)
        assert start is not None
        guardian.stdin.write(b"+ %d %d\n" % (mine.pid, _registry.start_time(mine.pid) or 0))
        guardian.stdin.write(b"+ %d %d\n" % (stranger.pid, start + 1))  # as if its pid had been reused
        guardian.stdin.close()  # the owner "dies"
        guardian.wait(15)
        assert wait_until(lambda: mine.poll() is not None, 5), "the registered group was not stopped"
        assert stranger.poll() is None, "a process whose start time differs was signalled"
    finally:
        for proc in (mine, stranger):
            proc.kill()
            proc.wait()
