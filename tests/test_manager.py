"""ServerManager with the real llama-server: load once, LRU, busy never evicted, keep-alive, crashes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from llama_proc import EventKind, LlamaServerArgs, ModelNotRegistered, ServerBusy, ServerEvent, ServerManager
from llama_proc.errors import ConfigError

from .conftest import in_threads, pid_alive, wait_until

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.events: list[ServerEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: ServerEvent) -> None:
        with self.lock:
            self.events.append(event)

    def kinds(self, alias: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if alias is None or e.alias == alias]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def make(llama_exe: Path, tiny_model: Path, recorder: Recorder, aliases: str = "a,b,c", **kw: object) -> ServerManager:
    manager = ServerManager(llama_exe, listeners=[recorder], **kw)  # type: ignore[arg-type]
    manager.register_all({alias: {"model": str(tiny_model), "n_ctx": 256} for alias in aliases.split(",")})
    return manager


def chat(manager: ServerManager, alias: str, **extra: object) -> dict:  # type: ignore[type-arg]
    return manager.chat_completions(
        {"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    )  # type: ignore[no-any-return]


@pytest.fixture
def manager_factory(llama_exe: Path, tiny_model: Path, recorder: Recorder) -> Iterator:  # type: ignore[type-arg]
    made: list[ServerManager] = []

    def factory(**kw: object) -> ServerManager:
        m = make(llama_exe, tiny_model, recorder, **kw)  # type: ignore[arg-type]
        made.append(m)
        return m

    yield factory
    for m in made:
        m.close()


def test_concurrent_requests_load_once(manager_factory, recorder: Recorder) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(max_loaded=1)
    assert in_threads(lambda i: chat(manager, "a")["model"], 20) == ["a"] * 20
    assert recorder.kinds("a").count(EventKind.LOAD) == 1
    assert manager.loaded() == ["a"]


def test_lru_eviction(manager_factory, recorder: Recorder) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(max_loaded=2)
    chat(manager, "a")
    chat(manager, "b")
    chat(manager, "a")  # b is now the least recently used
    a_pid = manager.server("a").pid
    chat(manager, "c")
    assert sorted(manager.loaded()) == ["a", "c"]
    assert EventKind.EVICT in recorder.kinds("b")
    assert manager.server("a").pid == a_pid  # a was kept
    assert [e.kind for e in recorder.events if e.kind in (EventKind.LOAD, EventKind.EVICT)] == [
        EventKind.LOAD, EventKind.LOAD, EventKind.EVICT, EventKind.LOAD,
    ]  # fmt: skip


def test_busy_server_is_never_evicted(manager_factory, recorder: Recorder) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(max_loaded=1, wait_timeout=1.0)
    stream = chat(manager, "a", stream=True, max_tokens=50)
    next(stream)  # a request in flight on a
    t = time.monotonic()
    with pytest.raises(ServerBusy, match="within 1 s"):
        chat(manager, "b")
    assert 0.9 <= time.monotonic() - t < 5
    assert manager.loaded() == ["a"] and EventKind.EVICT not in recorder.kinds()
    # once the stream ends, b may take the slot
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(chat(manager, "b")["model"]))
    manager.wait_timeout = 30
    waiter.start()
    time.sleep(0.2)
    assert not got  # still waiting for a's stream
    stream.close()
    waiter.join(60)
    assert got == ["b"] and manager.loaded() == ["b"]


def test_waiting_is_bounded(manager_factory) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(max_loaded=1, max_waiting=0)
    with chat(manager, "a", stream=True, max_tokens=50) as stream:
        next(stream)
        t = time.monotonic()
        with pytest.raises(ServerBusy, match="max_waiting=0"):
            chat(manager, "b")
        assert time.monotonic() - t < 2.0  # refused at once, not after waiting for a's stream


def test_keep_alive_counts_from_the_end_of_the_stream(manager_factory, recorder: Recorder) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(keep_alive=0.5)
    request = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    stream = manager.chat_completions(request, stream=True)  # the keyword, where other tests set "stream"
    next(stream)
    pid = manager.server("a").pid
    time.sleep(1.0)  # longer than keep_alive, but the stream is still open
    assert manager.loaded() == ["a"] and pid is not None and pid_alive(pid)
    ended = time.monotonic()
    for _ in stream:
        pass
    assert wait_until(lambda: manager.loaded() == [], 5)
    assert time.monotonic() - ended >= 0.45
    assert wait_until(lambda: not pid_alive(pid) and recorder.kinds("a")[-1:] == [EventKind.STOP], 5)


def test_keep_alive_zero_and_forever(manager_factory) -> None:  # type: ignore[no-untyped-def]
    zero = manager_factory(keep_alive=0)
    chat(zero, "a")
    assert zero.loaded() == []
    forever = manager_factory(keep_alive=-1)
    chat(forever, "a")
    time.sleep(0.3)
    assert forever.loaded() == ["a"]


def test_crashed_server_is_loaded_again(manager_factory, recorder: Recorder) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory()
    chat(manager, "a")
    server = manager.server("a")
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    # a killed multi-threaded process can be reaped only once all its threads are gone
    assert wait_until(lambda: not server.is_running(), 5)
    assert chat(manager, "a")["model"] == "a"
    assert wait_until(lambda: EventKind.CRASH in recorder.kinds("a"), 5)  # reported by the server's watcher
    assert recorder.kinds("a").count(EventKind.LOAD) == 2


def test_unknown_model_and_bad_registration(manager_factory) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory()
    with pytest.raises(ModelNotRegistered) as info:
        chat(manager, "zzz")
    assert info.value.http_status == 404 and "a, b, c" in str(info.value)
    with pytest.raises(ConfigError) as bad:
        manager.register_all({"x": {"model": "m", "n_ctx": "big"}, "y": {"modle": "m"}})
    assert any(p.startswith("x.n_ctx") for p in bad.value.problems)
    assert any(p.startswith("y.modle") for p in bad.value.problems)
    with pytest.raises(ConfigError):
        ServerManager(max_loaded=0)


def test_forward_stream_holds_the_server_until_closed(manager_factory) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(keep_alive=0)
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    response = manager.forward("POST", "/v1/chat/completions", json=body, stream=True)
    assert manager.loaded() == ["a"]
    data = b"".join(response.iter_content(None))
    assert b"data: [DONE]" in data
    response.close()
    assert manager.loaded() == []


def test_manager_args_alias_and_close(manager_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    manager = manager_factory(aliases="only")
    reply = manager.chat_completions(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    )  # one model: no name needed
    assert reply["model"] == "only"
    server = manager.server("only")
    assert server.get_server_args() == LlamaServerArgs(model=tiny_model, n_ctx=256, alias="only", port=server.port)
    manager.close()
    assert not server.is_running()


def test_register_from_toml_and_ini(tmp_path: Path, tiny_model: Path) -> None:
    toml = tmp_path / "models.toml"
    toml.write_text(
        f'[models.chat]\nmodel = "{tiny_model}"\nn_ctx = 512\n\n[models.embed]\nmodel = "{tiny_model}"\nembeddings = true\npooling = "mean"\n'
    )
    manager = ServerManager()
    assert manager.register_file(toml) == ["chat", "embed"]
    ini = tmp_path / "models.ini"
    ini.write_text(
        f"[coder]\nmodel = {tiny_model}\nn_ctx = 1024\njinja = yes\nextra_args = --system-prompt 'be brief'\n"
    )
    assert manager.register_file(ini) == ["coder"]
    assert sorted(manager.aliases) == ["chat", "coder", "embed"]
    coder = manager._entries["coder"].args
    assert coder.n_ctx == 1024 and coder.jinja is True and coder.extra_args == ("--system-prompt", "be brief")
    bad = tmp_path / "bad.ini"
    bad.write_text(f"[x]\nmodel = {tiny_model}\nn_ctx = lots\n[y]\nmodle = m\n")
    with pytest.raises(ConfigError) as info:
        manager.register_file(bad)
    assert any(p.startswith("x.n_ctx") for p in info.value.problems)
    assert any(p.startswith("y.modle") for p in info.value.problems)


def test_server_restarts_are_relayed(manager_factory, recorder: Recorder) -> None:  # type: ignore[no-untyped-def]
    from llama_proc import RestartPolicy

    manager = manager_factory(restart=RestartPolicy(backoff=0.05))
    chat(manager, "a")
    server = manager.server("a")
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    assert wait_until(lambda: EventKind.RESTART in recorder.kinds("a"), 10)
    assert EventKind.CRASH in recorder.kinds("a")
    assert chat(manager, "a")["model"] == "a"
    assert recorder.kinds("a").count(EventKind.LOAD) == 1  # the server restarted itself: no reload
