"""Restart policy: crashes restarted with backoff and a bound, callers waiting during a restart, hangs."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from llama_proc import EventKind, LlamaServer, LlamaServerArgs, RestartPolicy, ServerEvent
from llama_proc.errors import APITimeoutError, ServerNotReady, ServerNotRunning
from llama_proc.readiness import free_port

from .conftest import pid_alive, proc_state, wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")


class Events:
    def __init__(self) -> None:
        self.items: list[ServerEvent] = []

    def __call__(self, event: ServerEvent) -> None:
        self.items.append(event)

    def kinds(self) -> list[EventKind]:
        return [e.kind for e in self.items]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def kill_and_see_crash(server: LlamaServer, events: Events) -> int:
    """SIGKILL the server's process and wait for the CRASH event; returns the killed pid."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: EventKind.CRASH in events.kinds(), 10)
    return pid


def make(
    fake_exe: Path, model: Path, events: Events, policy: RestartPolicy | None, modes: str = "", **env: str
) -> LlamaServer:
    return LlamaServer(
        fake_exe, LlamaServerArgs(model=model, alias="sup"), env={"FAKE_MODE": modes, **env}, restart=policy,
        listeners=[events], stop_timeout=2,
    )  # fmt: skip


def test_crash_is_restarted(fake_exe: Path, model: Path) -> None:
    events = Events()
    server = make(fake_exe, model, events, RestartPolicy(backoff=0.05))
    server.start()
    try:
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: EventKind.RESTART in events.kinds(), 10)
        assert server.pid not in (None, first) and not pid_alive(first)
        assert server.health() == {"status": "ok"}
        assert events.kinds() == [EventKind.START, EventKind.CRASH, EventKind.RESTART]
        assert "exit status -9" in events.items[1].detail
    finally:
        server.stop()
    assert events.kinds()[-1] == EventKind.STOP


def test_no_policy_leaves_it_down_but_reports(fake_exe: Path, model: Path) -> None:
    events = Events()
    server = make(fake_exe, model, events, None, "die-after")
    server.start()
    try:
        assert wait_until(lambda: EventKind.CRASH in events.kinds(), 10)
        assert "exit status 7" in events.items[-1].detail
        assert not server.is_running()
    finally:
        server.stop()


def test_restarts_are_bounded(fake_exe: Path, model: Path) -> None:
    events = Events()
    policy = RestartPolicy(max_restarts=2, window=60, backoff=0.05)
    server = make(fake_exe, model, events, policy, "die-after", FAKE_DIE_SECONDS="0.2")
    server.start()
    try:
        assert wait_until(lambda: events.items and events.items[-1].detail == "gave up restarting", 20)
        assert events.kinds().count(EventKind.RESTART) == 2
        assert events.kinds().count(EventKind.CRASH) == 3
        with pytest.raises(
            ServerNotRunning, match=r"crashed 3 times and 0 restarts failed \(last: the server exited: exit status"
        ):
            server.health()
    finally:
        server.stop()


def test_calls_wait_for_the_restart(fake_exe: Path, model: Path) -> None:
    events = Events()
    policy = RestartPolicy(backoff=0.05, wait_timeout=20)
    server = make(fake_exe, model, events, policy, "slow-load", FAKE_LOAD_SECONDS="0.8")
    server.start()
    try:
        kill_and_see_crash(server, events)
        t = time.monotonic()
        assert server.health() == {"status": "ok"}  # waited for the restart instead of failing
        assert time.monotonic() - t >= 0.5
    finally:
        server.stop()


def test_calls_during_a_long_restart_get_not_ready(fake_exe: Path, model: Path) -> None:
    events = Events()
    policy = RestartPolicy(backoff=0.05, wait_timeout=0.3)
    server = make(fake_exe, model, events, policy, "slow-load", FAKE_LOAD_SECONDS="3")
    server.start()
    try:
        kill_and_see_crash(server, events)
        t = time.monotonic()
        with pytest.raises(ServerNotReady) as info:
            server.health()
        assert 0.25 <= time.monotonic() - t < 2 and info.value.http_status == 503
    finally:
        server.stop()  # also aborts the restart in progress
    assert EventKind.RESTART not in events.kinds()


def test_hung_server_is_killed_and_restarted(fake_exe: Path, model: Path) -> None:
    events = Events()
    server = make(fake_exe, model, events, RestartPolicy(backoff=0.05))
    server.start()
    try:
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # answers nothing, like a wedged server
        assert wait_until(lambda: proc_state(pid) == "T", 5)
        with pytest.raises(APITimeoutError):
            server.chat_completions({"messages": []}, timeout=(1.0, 0.5))
        assert wait_until(lambda: EventKind.RESTART in events.kinds(), 10)
        assert "hung" in events.items[1].detail
        assert server.chat_completions({"messages": []})["choices"][0]["message"]["content"] == "ok"
        assert not pid_alive(pid)
    finally:
        server.stop()


def test_stop_during_backoff_ends_supervision(fake_exe: Path, model: Path) -> None:
    events = Events()
    server = make(fake_exe, model, events, RestartPolicy(backoff=5.0))
    server.start()
    kill_and_see_crash(server, events)
    t = time.monotonic()
    server.stop()
    assert time.monotonic() - t < 2
    assert EventKind.RESTART not in events.kinds()
    assert not any(t.name.endswith("-watch") for t in threading.enumerate())


def exited(pid: int) -> bool:
    """True once this process's child ``pid`` has exited (reaped or not)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # reaped already


def test_a_crash_is_reported_even_when_stop_comes_first(fake_exe: Path, model: Path) -> None:
    events = Events()
    server = make(fake_exe, model, events, None)
    server.start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # exited as its parent sees it: a killed process shows as a zombie while its threads still exit
    assert wait_until(lambda: exited(pid), 5)
    server.stop()  # possibly before the watcher noticed: the crash must still be reported
    assert wait_until(lambda: EventKind.CRASH in events.kinds(), 5)
    assert events.kinds().count(EventKind.CRASH) == 1


def test_a_requested_stop_is_not_a_crash(fake_exe: Path, model: Path) -> None:
    events = Events()
    server = make(fake_exe, model, events, RestartPolicy(backoff=0.05))
    server.start()
    server.stop()
    time.sleep(0.3)
    assert events.kinds() == [EventKind.START, EventKind.STOP]


def test_a_give_up_counts_crashes_and_failed_restarts_apart(fake_exe: Path, model: Path) -> None:
    events = Events()
    port = free_port("127.0.0.1")
    server = LlamaServer(
        fake_exe, LlamaServerArgs(model=model, alias="sup", port=port), env={"FAKE_MODE": ""},
        restart=RestartPolicy(max_restarts=2, window=60, backoff=0.5), listeners=[events], stop_timeout=2,
    )  # fmt: skip
    server.start()
    try:
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: EventKind.CRASH in events.kinds(), 10)
        with socket.create_server(("127.0.0.1", port)):  # someone takes the fixed port during the backoff
            assert wait_until(lambda: events.items and events.items[-1].detail == "gave up restarting", 20)
        message = r"crashed 1 time and 2 restarts failed \(last: the restart failed: .*port \d+ on 127\.0\.0\.1 is already in use"
        with pytest.raises(ServerNotRunning, match=message):
            server.health()
    finally:
        server.stop()
