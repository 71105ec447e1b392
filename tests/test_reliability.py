"""Faults found by using llama_proc from the outside, with the real llama-server: a fixed port used
again, Ctrl-C during start(), stop_all() during a start, a forked child when its owner is killed,
the API key's visibility, and what a restart keeps. Each test counts this process's llama-server
children from /proc."""

from __future__ import annotations

import gc
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from llama_proc import (
    EventKind,
    LlamaServer,
    LlamaServerArgs,
    RestartPolicy,
    ServerEvent,
    shared_server,
    stop_all,
)
from llama_proc import manager as manager_mod
from llama_proc.errors import LlamaProcError, StartupAborted
from llama_proc.readiness import free_port
from llama_proc.server import owned_servers

from .conftest import children_of, pid_alive, wait_until, within

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leaks")]

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}


_OTHERS: set[int] = set()  # servers of other tests (a session-wide one) running when a test began


@pytest.fixture(autouse=True)
def _baseline() -> Iterator[None]:
    _OTHERS.clear()
    _OTHERS.update(llama_children())
    yield
    manager_mod._shared = None  # a shared_server entry of a test here is not another test's


def llama_children() -> list[int]:
    """This process's llama-server children, except those running before the test began."""
    found = []
    for pid in children_of(os.getpid()):
        if pid in _OTHERS:
            continue
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == "llama-server":
                    found.append(pid)
        except OSError:
            pass
    return found


def time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is ``port`` (from /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "06":
                count += 1
    return count


def serve_a_little(server: LlamaServer) -> None:
    """Calls and streams: llama-server closes each stream's connection, leaving TIME_WAIT on its port."""
    for _ in range(3):
        assert server.chat_completions(CHAT)["choices"]
        with server.chat_completions({**CHAT, "stream": True}) as stream:
            assert list(stream)


def test_a_fixed_port_can_be_used_again_at_once(llama_exe: Path, tiny_model: Path) -> None:
    port = free_port("127.0.0.1")
    server = LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, port=port))
    try:
        server.start()
        serve_a_little(server)
        server.stop()
        assert llama_children() == []
        assert time_wait_on(port) > 0  # what used to block the port for a minute
        with within(10):
            server.start()
        assert server.port == port and server.tokenize("x")["tokens"]
        assert llama_children() == [server.pid]
    finally:
        server.stop()
    assert llama_children() == []


def test_a_killed_server_on_a_fixed_port_is_restarted_on_it(llama_exe: Path, tiny_model: Path) -> None:
    events: list[ServerEvent] = []
    port = free_port("127.0.0.1")
    server = LlamaServer(
        llama_exe,
        LlamaServerArgs(model=tiny_model, n_ctx=256, port=port),
        restart=RestartPolicy(backoff=0.05),
        listeners=[events.append],
    )
    try:
        server.start()
        serve_a_little(server)
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: EventKind.RESTART in [e.kind for e in events], 15), events
        assert [e.kind for e in events].count(EventKind.CRASH) == 1
        assert not pid_alive(first)
        assert server.port == port and server.tokenize("x")["tokens"]
        assert llama_children() == [server.pid]
    finally:
        server.stop()
    assert llama_children() == []


def interrupted_start(server: LlamaServer, delay: float) -> bool:
    """Start ``server`` while a SIGINT arrives ``delay`` seconds in; True when the KeyboardInterrupt
    came out of start() (False: start() had returned first, and the server runs)."""
    fired = threading.Event()

    def fire() -> None:
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGINT)
        fired.set()

    thread = threading.Thread(target=fire)
    in_start = True
    try:
        thread.start()
        server.start()
        in_start = False
        fired.wait(10)
        time.sleep(1.0)  # the KeyboardInterrupt arrives here at the latest, unless Python dropped it
        return False  # (raised inside a weakref callback or __del__, it is printed and lost)
    except KeyboardInterrupt:
        return in_start
    finally:
        thread.join(10)


# a KeyboardInterrupt inside a readiness probe's connect() leaves the half-made socket to the
# garbage collector (urllib3 closes it on OSError only), which then warns that it closes it
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_during_start_leaves_no_server(llama_exe: Path, tiny_model: Path) -> None:
    assert threading.current_thread() is threading.main_thread()
    server = LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256))
    server.start()  # the first start also reads the build's --help: time the second
    server.stop()
    started = time.monotonic()
    server.start()
    startup = time.monotonic() - started
    server.stop()
    interrupted = 0
    rng = random.Random(10)
    for trial in range(40):
        delay = rng.uniform(0, startup * 1.2)
        if interrupted_start(server, delay):
            interrupted += 1
            assert llama_children() == [], f"trial {trial}: a server was left after Ctrl-C {delay * 1e3:.0f} ms in"
            assert not server.is_running() and server.pid is None
        else:
            server.stop()
    assert interrupted >= 20  # most interrupts landed inside start()
    with server:  # the object is still usable
        assert server.tokenize("x")["tokens"]
    assert llama_children() == []
    gc.collect()  # the sockets of interrupted probes are closed now, before the leak check


def test_an_interrupt_held_back_until_the_child_is_owned_still_stops_it(
    llama_exe: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_proc import process

    record = process._registry.record

    def interrupted_record(pid: int, argv0: str, argv: Sequence[str] = ()) -> None:  # Ctrl-C is held back here
        record(pid, argv0, argv)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(process._registry, "record", interrupted_record)
    server = LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256))
    kept: BaseException | None = None
    try:
        server.start()
    except KeyboardInterrupt as exc:
        kept = exc  # its traceback (and every frame's locals) stays alive, as in a notebook
    assert kept is not None
    assert llama_children() == []  # stopped before the interrupt went on, not by a finalizer
    assert server.pid is None and server not in owned_servers()
    monkeypatch.undo()
    with server:
        assert server.tokenize("x")["tokens"]
    del kept


def first_call(server: LlamaServer, outcome: list[object]) -> None:
    try:
        outcome.append(server.tokenize("x"))
    except LlamaProcError as exc:
        outcome.append(exc)


def test_stop_all_aborts_a_server_that_is_still_starting(llama_exe: Path, tiny_model: Path) -> None:
    args = LlamaServerArgs(model=tiny_model, n_ctx=256, alias="aborted")
    aborted = 0
    for delay in (0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.02, 0.05):
        server = shared_server(args, llama_exe)  # autostarts on its first call
        outcome: list[object] = []
        caller = threading.Thread(target=first_call, args=(server, outcome))
        caller.start()
        assert wait_until(lambda s=server, o=outcome: s._starting or s.is_running() or bool(o), 10)  # type: ignore[misc]
        time.sleep(delay)
        with within(10):
            stopped = stop_all()
        caller.join(30)
        assert not caller.is_alive() and len(outcome) == 1
        assert llama_children() == [], f"a server kept running after stop_all() {delay * 1e3:.0f} ms in"
        assert stopped  # it saw the server, starting or up
        if isinstance(outcome[0], StartupAborted):
            assert "stop_all() was called while the server was starting" in str(outcome[0])
            aborted += 1
    assert aborted >= 3, aborted


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [part.decode() for part in fh.read().split(b"\0") if part]


def test_the_api_key_is_not_on_the_command_line(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, api_key="auto")) as server:
        key = server.api_key
        assert key and server.pid is not None
        argv = cmdline(server.pid)
        assert not any(key in part for part in argv)  # what every local user can read (ps, /proc)
        assert argv[argv.index("--api-key-file") + 1].startswith("/dev/fd/")  # a pipe: no file to leak
        assert server.models()["data"]  # the key works
        assert server.forward("GET", "/v1/models", headers={"Authorization": ""}).status_code == 401
        assert llama_children() == [server.pid]
    assert llama_children() == []


def test_a_restart_keeps_the_port_and_the_key(llama_exe: Path, tiny_model: Path) -> None:
    events: list[ServerEvent] = []
    args = LlamaServerArgs(model=tiny_model, n_ctx=256, api_key="auto")  # port=None: llama_proc picks it
    server = LlamaServer(llama_exe, args, restart=RestartPolicy(backoff=0.05), listeners=[events.append])
    server.start()
    url, key = server.base_url, server.api_key
    worker = LlamaServer.attach(url, key)  # as a forked web worker would
    try:
        assert worker.tokenize("x")["tokens"]
        for crash in (1, 2):
            first = server.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            assert wait_until(lambda n=crash: [e.kind for e in events].count(EventKind.RESTART) == n, 15), events
            assert server.pid != first and server.base_url == url and server.api_key == key
            assert worker.tokenize("x")["tokens"]  # the worker's URL and key still reach it
            assert llama_children() == [server.pid]
    finally:
        worker.stop()
        server.stop()
    assert llama_children() == []


def test_a_restart_whose_port_was_taken_moves_and_says_so(llama_exe: Path, tiny_model: Path) -> None:
    events: list[ServerEvent] = []
    args = LlamaServerArgs(model=tiny_model, n_ctx=256)
    server = LlamaServer(llama_exe, args, restart=RestartPolicy(backoff=1.0), listeners=[events.append])
    try:
        server.start()
        old_port = server.port
        assert server.pid is not None and old_port is not None
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: EventKind.CRASH in [e.kind for e in events], 10)
        with socket.create_server(("127.0.0.1", old_port)):  # someone takes it during the backoff
            assert wait_until(lambda: EventKind.RESTART in [e.kind for e in events], 15), events
        restart = next(e for e in events if e.kind is EventKind.RESTART)
        assert f"port {old_port} was taken" in restart.detail
        assert server.port != old_port and server.tokenize("x")["tokens"]
    finally:
        server.stop()
    assert llama_children() == []
