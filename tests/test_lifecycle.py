"""Lifecycle edge cases against a stdlib imitation of llama-server (tests/fake_llama_server.py)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from llama_proc import LlamaServer, LlamaServerArgs
from llama_proc.errors import (
    StartupError,
)

from .conftest import pid_alive, wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def make(fake_exe: Path, model: Path, modes: str = "", **kwargs: object) -> LlamaServer:
    env = {"FAKE_MODE": modes, **{k: str(v) for k, v in kwargs.pop("env", {}).items()}}  # type: ignore[attr-defined]
    args = kwargs.pop("args", None) or LlamaServerArgs(model=model)
    return LlamaServer(fake_exe, args, env=env, **kwargs)  # type: ignore[arg-type]


def test_start_call_stop(fake_exe: Path, model: Path) -> None:
    server = make(fake_exe, model)
    server.start()
    try:
        assert server.is_running() and server.pid and server.port
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        assert server.health() == {"status": "ok"}
        assert server.chat_completions({"messages": []})["choices"][0]["message"]["content"] == "ok"
    finally:
        code = server.stop()
    assert code == 0
    assert not server.is_running()
    assert server.stop() == 0  # idempotent


def test_slow_load_waits_for_200(fake_exe: Path, model: Path) -> None:
    server = make(fake_exe, model, "slow-load", env={"FAKE_LOAD_SECONDS": "0.6"})
    t = time.monotonic()
    with server:
        elapsed = time.monotonic() - t
        assert elapsed >= 0.6
        assert any("loading" in line for line in server.log_tail(50))


def test_crash_at_start_fails_fast_with_exit_code_and_log(fake_exe: Path, model: Path) -> None:
    server = make(fake_exe, model, "crash", startup_timeout=60)
    t = time.monotonic()
    with pytest.raises(StartupError) as info:
        server.start()
    assert time.monotonic() - t < 5
    assert info.value.exit_code == 3
    assert "crash on purpose" in str(info.value)
    assert not server.is_running()


def test_stall_timeout_restarts_on_progress(fake_exe: Path, model: Path) -> None:
    # loads for 1.2 s but logs every 50 ms: a 0.4 s stall timeout must not fire
    with make(fake_exe, model, "slow-load", env={"FAKE_LOAD_SECONDS": "1.2"}, startup_timeout=0.4) as server:
        assert server.is_running()


def test_ignores_sigterm_gets_killed(fake_exe: Path, model: Path) -> None:
    server = make(fake_exe, model, "ignore-term", stop_timeout=0.3)
    server.start()
    pid = server.pid
    t = time.monotonic()
    code = server.stop()
    assert 0.3 <= time.monotonic() - t < 3
    assert code == -9
    assert pid is not None and not pid_alive(pid)


def test_flood_of_output_never_blocks(fake_exe: Path, model: Path) -> None:
    with make(fake_exe, model, "flood", env={"FAKE_FLOOD_LINES": "50000"}) as server:
        for _ in range(20):
            assert server.health()["status"] == "ok"
        assert len(server.log_tail(500)) == 200  # ring buffer bound


def test_restart_after_stop(fake_exe: Path, model: Path) -> None:
    server = make(fake_exe, model)
    for _ in range(2):
        server.start()
        assert server.health()["status"] == "ok"
        server.stop()


def test_bad_executable(tmp_path: Path, model: Path) -> None:
    not_exec = tmp_path / "llama-server"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(StartupError, match="not executable"):
        LlamaServer(not_exec, LlamaServerArgs(model=model)).start()
    garbage = tmp_path / "garbage"
    garbage.write_text("#!/bin/sh\necho 'this is not llama-server'\nexit 1\n")
    garbage.chmod(0o755)
    with pytest.raises(StartupError, match="status 1") as info:
        LlamaServer(garbage, LlamaServerArgs(model=model)).start()
    assert "this is not llama-server" in str(info.value)


def test_log_levels_and_non_utf8(fake_exe: Path, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llama_proc.server")
    with pytest.raises(StartupError):
        make(fake_exe, model, "bad-utf8,crash").start()
    records = [r for r in caplog.records if r.name == "llama_proc.server" and hasattr(r, "llama_pid")]
    levels = {r.getMessage().split(":")[0]: r.levelno for r in records}
    assert levels.get("srv  bad bytes") == logging.WARNING
    assert any(r.levelno == logging.ERROR and "crash on purpose" in r.getMessage() for r in records)
    assert any("\ufffd" in r.getMessage() for r in records)


def test_reader_threads_are_named_daemons(fake_exe: Path, model: Path) -> None:
    with make(fake_exe, model) as server:
        assert server.process is not None
        names = sorted(t.name for t in server.process.threads)
        assert names == [f"llama-server-{server.pid}-stderr", f"llama-server-{server.pid}-stdout"]
        assert all(t.daemon for t in server.process.threads)
        threads = server.process.threads
    assert not any(t.is_alive() for t in threads)


def test_forgotten_server_is_stopped_by_finalizer(fake_exe: Path, model: Path) -> None:
    import gc

    server = make(fake_exe, model)
    server.start()
    pid = server.pid
    assert pid is not None
    del server
    gc.collect()
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(pid)


def test_calls_during_start_are_not_ready_and_stop_aborts_start(fake_exe: Path, model: Path) -> None:
    import threading

    from llama_proc.errors import ServerNotReady

    server = make(fake_exe, model, "slow-load", env={"FAKE_LOAD_SECONDS": "30"})
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:
            failure.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    assert wait_until(lambda: any("loading" in line for line in server.log_tail(5)), 10)
    assert server.pid is not None
    assert "starting" in repr(server)
    with pytest.raises(ServerNotReady) as info:
        server.health()
    assert info.value.http_status == 503
    t = time.monotonic()
    server.stop()
    starter.join(10)
    assert time.monotonic() - t < 5
    assert len(failure) == 1 and isinstance(failure[0], StartupError)
    assert "stop() or stop_all() was called" in str(failure[0])
    assert not server.is_running()


def test_a_small_request_goes_out_in_one_write(fake_exe: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make(fake_exe, model) as server:
        server.health()  # the connection is open
        writes: list[int] = []
        original = socket.socket.sendall

        def counting(self: socket.socket, data: bytes, *args: object) -> None:
            writes.append(len(data))
            original(self, data, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(socket.socket, "sendall", counting)
        assert server.chat_completions({"messages": [{"role": "user", "content": "x" * 1000}]})["choices"]
        assert len(writes) == 1 and writes[0] > 1000  # headers and body together


def test_a_lost_first_sigterm_is_followed_by_a_second(fake_exe: Path, model: Path) -> None:
    with make(fake_exe, model, "lose-first-term", stop_timeout=10) as server:
        t = time.monotonic()
        assert server.stop() == 1  # the second signal's exit status, not SIGKILL's -9
        assert 0.9 < time.monotonic() - t < 3


def test_start_returns_once_the_main_loop_answers(fake_exe: Path, model: Path) -> None:
    with make(fake_exe, model) as server:
        assert any("/slots" in line for line in server.log_tail(50))
