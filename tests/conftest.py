"""Shared fixtures: the real llama-server (built once into the user cache), the tiny model, leak checks."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from llama_proc import LlamaServer, LlamaServerArgs, binaries
from llama_proc.errors import ExecutableNotFound
from llama_proc.tiny_model import ensure_tiny_model

# llama_proc's own pytest plugin is loaded here rather than through its entry point (turned off in
# tox.ini), so that coverage, which starts after entry points load, sees the package imported
pytest_plugins = ("pytester", "llama_proc.testing")

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
FAKE_SERVER = HERE / "fake_llama_server.py"


def fake_executable(tmp_path: Path) -> Path:
    """A launcher script that runs the stdlib fake llama-server with this interpreter."""
    exe = tmp_path / "llama-server"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_SERVER} "$@"\n')
    exe.chmod(0o755)
    return exe


@pytest.fixture
def fake_exe(tmp_path: Path) -> Path:
    return fake_executable(tmp_path)


def _ensure_real_server(config: pytest.Config) -> Path:
    try:
        return binaries.find_executable("cpu")
    except ExecutableNotFound:
        pass
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def say(text: str) -> None:
        if reporter is not None:
            reporter.write_line(text)

    say("llama-server not found: building it from the pinned llama.cpp source into the user cache (once)")
    started = time.monotonic()
    last = [-1]

    def progress(fraction: float | None, line: str) -> None:
        if fraction is not None and int(fraction * 10) > last[0]:
            last[0] = int(fraction * 10)
            say(f"  build {fraction:.0%} after {time.monotonic() - started:.0f}s")

    return binaries.build_from_source(binaries.fetch_source(), "cpu", progress=progress).llama_server


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binary and write the model before any test runs, outside the per-test timeout."""
    if any(item.get_closest_marker("integration") for item in session.items):
        session.config.stash[_EXE] = _ensure_real_server(session.config)
        session.config.stash[_MODEL] = ensure_tiny_model()


_EXE = pytest.StashKey[Path]()
_MODEL = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def llama_exe(pytestconfig: pytest.Config) -> Path:
    """The real llama-server: found, or built from the pinned source into the user cache once."""
    exe = pytestconfig.stash.get(_EXE, None)
    return exe if exe is not None else _ensure_real_server(pytestconfig)


@pytest.fixture(scope="session")
def tiny_model(pytestconfig: pytest.Config) -> Path:
    model = pytestconfig.stash.get(_MODEL, None)
    return model if model is not None else ensure_tiny_model()


@pytest.fixture(scope="session")
def shared_server(llama_exe: Path, tiny_model: Path) -> Iterator[LlamaServer]:
    """One real server for the read-only integration tests."""
    args = LlamaServerArgs(model=tiny_model, alias="tiny", n_ctx=1024, n_parallel=4, metrics=True, seed=7)
    # autostart: tests of stop_all() stop every server of this process, this one included
    with LlamaServer(llama_exe, args, autostart=True) as server:
        yield server


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def process_name(pid: int) -> str:
    """The command name of ``pid`` from /proc ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pids_named(name: str) -> set[int]:
    """The pids of this machine's processes whose command name is ``name``."""
    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit() and process_name(int(entry)) == name}


def argv_of(pid: int) -> list[str]:
    """The command line of ``pid`` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def listens_on(pid: int, port: int | str) -> bool:
    """``pid`` was started with ``--port port`` (llama-server and rpc-server both take it)."""
    argv = argv_of(pid)
    return "--port" in argv and argv[argv.index("--port") + 1] == str(port)


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_state(pid: int | None) -> str:
    """The state letter of ``pid`` in /proc (R, S, T for stopped, Z, ...)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Assert that the block finishes within ``seconds``."""
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"took {elapsed:.2f} s, bound {seconds} s"


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a thread, a file descriptor or a child llama-server behind."""
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    children_before = set(children_of(os.getpid()))
    yield
    known = children_before | {_guardian_pid()}
    assert wait_until(lambda: not set(children_of(os.getpid())) - known, 5.0), "child process leaked"
    assert wait_until(lambda: not [t for t in threading.enumerate() if t not in threads_before], 5.0), (
        f"threads leaked: {[t.name for t in threading.enumerate() if t not in threads_before]}"
    )
    leaked = open_fds() - fds_before
    guardian_fds = _guardian_fds()
    assert not (leaked - guardian_fds), f"file descriptors leaked: {sorted(leaked - guardian_fds)}"


def _guardian_pid() -> int | None:
    from llama_proc.process import _guardian

    return _guardian.pid


def _guardian_fds() -> set[int]:
    from llama_proc.process import _guardian

    proc = _guardian._proc
    if proc is None or proc.stdin is None or proc.stdin.closed:
        return set()
    return {proc.stdin.fileno()}


def in_threads(work: Callable[[int], T], count: int, timeout: float = 120.0) -> list[T]:
    """Run ``work(i)`` for i in range(count) in as many threads, released together by a barrier.

    Returns the results in index order; the first exception a worker raised is re-raised here.
    """
    barrier = threading.Barrier(count)
    results: list[T | None] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), name=f"test-worker-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), f"workers still running after {timeout} s"
    if errors:
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise first
    return results  # type: ignore[return-value]


def in_forked_child(fn, timeout: float = 60.0) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a forked child that then exits the way an interpreter does (atexit included);
    a child that gives no result within ``timeout`` seconds is killed and the test fails."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        try:
            result = {"ok": True, **fn()}
        except BaseException as exc:
            result = {"ok": False, "error": repr(exc)}
        os.write(write_fd, json.dumps(result).encode())
        os.close(write_fd)
        try:
            atexit._run_exitfuncs()
        finally:
            os._exit(0)
    os.close(write_fd)
    data = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb", buffering=0) as fh:
        while time.monotonic() < deadline:
            if select.select([fh], [], [], 0.1)[0]:
                chunk = fh.read(65536)
                if not chunk:
                    break
                data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert data, f"the forked child gave no result within {timeout} s (hung)"
    return json.loads(data)  # type: ignore[no-any-return]
