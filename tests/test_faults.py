"""The fault battery: each bad input or fault gets its typed error within a bound, and leaves no
process, thread, file descriptor or partial file behind (the ``no_leaks`` fixture checks /proc,
threading.enumerate and the process table after every test)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from llama_proc import LlamaClient, LlamaServer, LlamaServerArgs
from llama_proc.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ExecutableNotFound,
    IoError,
    LlamaProcError,
    ModelNotFound,
    NotAGGUFFile,
    NotFoundError,
    ServerAlreadyRunning,
    ServerNotRunning,
    StartupError,
    StartupTimeout,
)

from .conftest import proc_state, wait_until, within

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture(scope="module")
def own_server(llama_exe: Path, tiny_model: Path) -> Iterator[LlamaServer]:
    """A real server for this module (set up before the per-test leak snapshot)."""
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=1024)) as server:
        yield server


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


# -- configuration and files ---------------------------------------------------------------------


def test_01_missing_model(fake_exe: Path, tmp_path: Path) -> None:
    with within(1), pytest.raises(ModelNotFound, match="absent.gguf"):
        LlamaServer(fake_exe, LlamaServerArgs(model=tmp_path / "absent.gguf")).start()


def test_02_model_is_a_directory(fake_exe: Path, tmp_path: Path) -> None:
    with within(1), pytest.raises(ModelNotFound):
        LlamaServer(fake_exe, LlamaServerArgs(model=tmp_path)).start()


@pytest.mark.integration
def test_03_non_gguf_file(llama_exe: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"definitely not gguf\n" * 1000)
    with within(1), pytest.raises(NotAGGUFFile, match="Not a GGUF file: .*bogus.gguf") as info:
        LlamaServer(llama_exe, LlamaServerArgs(model=bogus)).start()  # before llama-server's 27 lines
    assert isinstance(info.value, ModelNotFound) and "\n" not in str(info.value)


@pytest.mark.integration
def test_04_truncated_gguf(llama_exe: Path, tiny_model: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[: 3 * 1024 * 1024])
    with within(10), pytest.raises(StartupError) as info:
        LlamaServer(llama_exe, LlamaServerArgs(model=truncated)).start()
    assert info.value.exit_code not in (None, 0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_05_unreadable_model(fake_exe: Path, fake_model: Path) -> None:
    fake_model.chmod(0)
    with within(1), pytest.raises(StartupError, match="not readable"):
        LlamaServer(fake_exe, LlamaServerArgs(model=fake_model)).start()


def test_06_missing_executable(fake_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with within(1), pytest.raises(StartupError, match="does not exist"):
        LlamaServer(tmp_path / "no-such-llama-server", LlamaServerArgs(model=fake_model)).start()
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    with within(1), pytest.raises(ExecutableNotFound, match="llama-proc build"):
        LlamaServer(None, LlamaServerArgs(model=fake_model)).start()


def test_07_non_executable_file(fake_model: Path, tmp_path: Path) -> None:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    with within(1), pytest.raises(StartupError, match="not executable"):
        LlamaServer(exe, LlamaServerArgs(model=fake_model)).start()


def test_08_executable_that_is_not_llama_server(fake_model: Path, tmp_path: Path) -> None:
    exe = tmp_path / "impostor"
    exe.write_text("#!/bin/sh\necho 'garbage \\377 output'\necho more garbage >&2\nexit 4\n")
    exe.chmod(0o755)
    with within(15), pytest.raises(StartupError) as info:
        LlamaServer(exe, LlamaServerArgs(model=fake_model)).start()
    assert info.value.exit_code == 4 and any("garbage" in line for line in info.value.log_tail)


@pytest.mark.integration
def test_09_bad_flag_value(llama_exe: Path, tiny_model: Path) -> None:
    with within(10), pytest.raises(StartupError) as info:
        LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, extra_args=["--batch-size", "many"])).start()
    assert info.value.exit_code not in (None, 0) and info.value.log_tail


def test_10_port_already_in_use(fake_exe: Path, fake_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with within(1), pytest.raises(StartupError, match=f"port {port} on 127.0.0.1 is already in use"):
            LlamaServer(fake_exe, LlamaServerArgs(model=fake_model, port=port)).start()


def test_11_host_that_cannot_bind(fake_exe: Path, fake_model: Path) -> None:
    server = LlamaServer(fake_exe, LlamaServerArgs(model=fake_model, host="192.0.2.1"))  # TEST-NET-1: not ours
    with within(1), pytest.raises(StartupError, match=r"cannot bind 192\.0\.2\.1"):
        server.start()
    assert not server.is_running()


def test_12_invalid_args() -> None:
    with within(1), pytest.raises(ConfigError) as info:
        LlamaServerArgs(model="m.gguf", port=0, n_parallel=-3, pooling="max")
    assert len(info.value.problems) == 3


# -- lifecycle misuse ----------------------------------------------------------------------------


def test_13_start_twice(fake_exe: Path, fake_model: Path) -> None:
    with LlamaServer(fake_exe, LlamaServerArgs(model=fake_model)) as server:
        pid = server.pid
        with within(1), pytest.raises(ServerAlreadyRunning, match="already running"):
            server.start()
        assert server.pid == pid


def test_14_stop_twice(fake_exe: Path, fake_model: Path) -> None:
    server = LlamaServer(fake_exe, LlamaServerArgs(model=fake_model))
    server.start()
    with within(2):
        assert server.stop() == 0
        assert server.stop() == 0


def test_15_16_calls_before_start_and_after_stop(fake_exe: Path, fake_model: Path) -> None:
    server = LlamaServer(fake_exe, LlamaServerArgs(model=fake_model))
    with within(1), pytest.raises(ServerNotRunning, match="start"):
        server.health()
    server.start()
    server.stop()
    for call in (server.health, lambda: server.tokenize("x")):
        with within(1), pytest.raises(ServerNotRunning, match="stopped"):
            call()


# -- calls -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_17_invalid_json_body(own_server: LlamaServer) -> None:
    with within(5), pytest.raises(LlamaProcError) as info:
        own_server._call("POST", "/v1/chat/completions", b"{not json")
    assert info.value.http_status in (400, 500)
    with within(5), pytest.raises(BadRequestError):
        own_server.chat_completions({"messages": "not a list"})


@pytest.mark.integration
def test_18_unknown_endpoint(own_server: LlamaServer) -> None:
    with within(5), pytest.raises(NotFoundError):
        own_server._call("GET", "/v1/nothing/here")
    assert own_server.forward("GET", "/v1/nothing/here").status_code == 404  # forward passes it on


@pytest.mark.integration
def test_19_api_key_wrong_or_missing(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, api_key="sekrit-key", n_ctx=256)) as server:
        assert server.models()["data"]  # the server's own client sends the key
        assert server.forward("GET", "/v1/models", headers={"Authorization": ""}).status_code == 401
        for key in ("wrong", None):
            with LlamaClient(server.base_url, api_key=key) as client, within(5), pytest.raises(AuthenticationError):
                client.models()
        assert all("sekrit-key" not in line for line in server.log_tail(200))
        assert "sekrit-key" not in repr(server)


@pytest.mark.integration
def test_20_server_killed_mid_request(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=2048, slots=True)) as server:
        pid = server.pid
        assert pid is not None
        killed = threading.Event()

        def kill_once_generating() -> None:  # while the call waits for its answer, not before
            if wait_until(lambda: any(slot["is_processing"] for slot in server.slots()), 10, interval=0.01):
                os.kill(pid, signal.SIGKILL)
                killed.set()

        killer = threading.Thread(target=kill_once_generating)
        killer.start()
        request = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 2000, "ignore_eos": True}
        try:
            with within(10), pytest.raises(APIConnectionError, match="exited with status -9") as info:
                server.chat_completions(request)
        finally:
            killer.join(15)
        assert killed.is_set()
        assert not isinstance(info.value, APITimeoutError)


@pytest.mark.integration
def test_21_server_killed_mid_stream(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=2048)) as server:
        request = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        stream = server.chat_completions(request)
        next(stream)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        with within(10), pytest.raises(APIConnectionError, match="exited with status -9"), stream:
            for _ in stream:
                pass
        assert stream.closed


@pytest.mark.integration
def test_22_server_frozen_during_a_call(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256), stop_timeout=1) as server:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        assert wait_until(lambda: proc_state(server.pid) == "T", 5)  # the signal is delivered asynchronously
        try:
            with within(3), pytest.raises(APITimeoutError):
                server.tokenize("x", timeout=(1.0, 1.0))
        finally:
            os.kill(server.pid, signal.SIGCONT)


def test_23_server_frozen_during_start(fake_exe: Path, fake_model: Path) -> None:
    server = LlamaServer(
        fake_exe, LlamaServerArgs(model=fake_model), env={"FAKE_MODE": "silent-hang"}, startup_timeout=0.5
    )
    started = time.monotonic()
    with within(5), pytest.raises(StartupTimeout) as info:
        server.start()
    assert time.monotonic() - started >= 0.5  # silent for the whole startup_timeout, then killed
    assert isinstance(info.value, TimeoutError)


@pytest.mark.integration
def test_24_dead_proxies_in_the_environment(llama_exe: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256)) as server, within(5):
        assert server.tokenize("through no proxy")["tokens"]
        with LlamaClient(server.base_url) as fresh:  # created with the proxies set
            assert fresh.health()["status"] == "ok"


@pytest.mark.integration
def test_25_stream_abandoned_half_way_frees_the_slot(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=2048, n_parallel=1, slots=True)) as server:
        request = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        with server.chat_completions(request) as stream:
            next(stream)
            assert server.slots()[0]["is_processing"]
        # the connection is closed: the server notices and frees the slot
        deadline = time.monotonic() + 10
        while server.slots()[0]["is_processing"]:
            assert time.monotonic() < deadline, "the abandoned stream kept its slot"
            time.sleep(0.05)
        assert server.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})["choices"]


@pytest.mark.integration
def test_26_one_megabyte_prompt(own_server: LlamaServer) -> None:
    with within(30), pytest.raises(BadRequestError):
        own_server.completions({"prompt": "word " * 200_000, "max_tokens": 1})


def test_27_non_utf8_server_output(fake_exe: Path, fake_model: Path) -> None:
    server = LlamaServer(fake_exe, LlamaServerArgs(model=fake_model), env={"FAKE_MODE": "bad-utf8"})
    with server, within(1):
        assert any("\ufffd" in line for line in server.log_tail(50))


def test_28_disk_full_while_writing_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys as _sys

    from llama_proc import binaries, releases
    from llama_proc.platforms import current_target

    from .fake_releases import FakeReleases, release_members, tar_archive

    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tmp_path / "cache"))
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):  # type: ignore[no-untyped-def]
            self.handle = handle

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            self.handle.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llama_proc._download.os.fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with FakeReleases("b11434") as fake:
        fake.add(
            releases.asset_names(current_target(), "cpu", "b11434")[0],
            tar_archive(release_members("b11434", _sys.executable)),
        )
        with within(10), pytest.raises(IoError, match="No space left"):
            binaries.install_prebuilt("cpu", base_url=fake.url, retry_delays=())
    leftovers = [
        p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "locks" not in p.parts and "run" not in p.parts
    ]
    assert leftovers == []


def test_29_lock_held_by_a_dead_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_proc import binaries
    from llama_proc.platforms import current_target

    from .test_binaries import fake_source

    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tmp_path / "cache"))
    lock_file = tmp_path / "cache" / "locks" / f"{current_target()}-cpu.lock"
    lock_file.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)", str(lock_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    with within(60):
        assert binaries.build_from_source(fake_source(tmp_path / "src"), "cpu", lock_timeout=5).built
