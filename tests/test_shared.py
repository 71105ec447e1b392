"""shared_server, stop_all, attach and fork behaviour, with the real llama-server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

import llama_proc
from llama_proc import LlamaServer, LlamaServerArgs, SharedServerConflict, shared_server, stop_all
from llama_proc import manager as manager_mod

from .conftest import children_of, in_forked_child, in_threads, pid_alive, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def args(tiny_model: Path) -> LlamaServerArgs:
    return LlamaServerArgs(model=tiny_model, alias="shared", n_ctx=256)


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    yield
    stop_all()
    manager_mod._shared = None


def llama_children() -> list[int]:
    out = []
    for pid in children_of(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"llama-server" in fh.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_fifty_threads_start_exactly_one_server(llama_exe: Path, args: LlamaServerArgs) -> None:
    before = set(llama_children())

    def work(i: int) -> LlamaServer:
        server = shared_server(args, llama_exe)
        assert server.models()["data"][0]["id"] == "shared"  # first use starts it
        return server

    servers = in_threads(work, 50)
    assert len({id(s) for s in servers}) == 1
    assert len(set(llama_children()) - before) == 1
    assert shared_server(args, llama_exe) is servers[0]


def test_lazy_start_conflict_and_replace(llama_exe: Path, args: LlamaServerArgs) -> None:
    server = shared_server(args, llama_exe)
    assert not server.is_running()  # nothing started until first use
    assert server.tokenize("hi")["tokens"]
    assert server.is_running()
    other = args.evolve(alias="other")
    with pytest.raises(SharedServerConflict, match="replace=True") as caught:
        shared_server(other, llama_exe)
    assert "runs alias='shared', but alias='other' was asked for" in str(caught.value)  # what differs, only
    with pytest.raises(SharedServerConflict, match=r"api_key=\*\*\*") as caught:
        shared_server(args.evolve(api_key="sekrit"), llama_exe)
    assert "sekrit" not in str(caught.value)
    first_pid = server.pid
    replacement = shared_server(other, llama_exe, replace=True)
    assert replacement is not server
    assert not server.is_running() and first_pid is not None and not pid_alive(first_pid)
    assert replacement.models()["data"][0]["id"] == "other"


def test_stop_all(llama_exe: Path, tiny_model: Path, args: LlamaServerArgs) -> None:
    one = shared_server(args, llama_exe).ensure_started()
    two = LlamaServer(llama_exe, args.evolve(alias="two"))
    two.start()
    pids = [one.pid, two.pid]
    codes = stop_all()
    assert sorted(c for c in codes if c is not None) == [0, 0]
    assert not any(pid_alive(p) for p in pids if p)
    assert one.health()["status"] == "ok"  # a shared server starts again on the next use
    assert one.pid not in pids


def test_attach_owns_no_process(llama_exe: Path, args: LlamaServerArgs) -> None:
    with LlamaServer(llama_exe, args.evolve(api_key="k-attach")) as owner:
        client = LlamaServer.attach(owner.base_url, api_key="k-attach")
        client.start()  # only checks that it answers
        assert client.attached and client.is_running() and client.pid is None
        assert client.models()["data"][0]["id"] == "shared"
        assert "attached" in repr(client) and "attached" in client._repr_html_()
        assert client.stop() is None
        assert owner.health()["status"] == "ok"  # untouched
        with pytest.raises(llama_proc.ServerNotRunning, match="start"):
            client.models()
        client.start()  # a new pool: the attached server is usable again
        assert client.models()["data"][0]["id"] == "shared"
        client.stop()
    with pytest.raises(llama_proc.ConfigError):
        LlamaServer.attach("localhost")


def test_forked_worker_starts_its_own_and_never_kills_the_parents(llama_exe: Path, args: LlamaServerArgs) -> None:
    parent = shared_server(args, llama_exe).ensure_started()
    parent_pid = parent.pid

    def child() -> dict[str, object]:
        mine = shared_server(args, llama_exe)
        assert mine is not parent
        mine.ensure_started()
        # the inherited object works over HTTP (fresh pool) but cannot stop the parent's process
        assert parent.health()["status"] == "ok"
        assert parent.stop() is None
        stop_all()  # stops only the child's own server
        assert not mine.is_running()
        mine.ensure_started()  # and it may start again; exit will stop it
        return {"child_server": mine.pid}

    result = in_forked_child(child)
    assert result["ok"], result
    assert parent_pid is not None and pid_alive(parent_pid)
    assert parent.health()["status"] == "ok"
    assert wait_until(lambda: not pid_alive(int(result["child_server"])), 10)  # type: ignore[arg-type]


def test_forked_worker_uses_the_parents_server_through_attach(llama_exe: Path, args: LlamaServerArgs) -> None:
    parent = shared_server(args, llama_exe).ensure_started()
    url = parent.base_url

    def child() -> dict[str, object]:
        remote = LlamaServer.attach(url)
        return {"tokens": remote.tokenize("hello world")["tokens"]}

    result = in_forked_child(child)
    assert result == {"ok": True, "tokens": [22172, 3186]}
    assert parent.is_running()


def test_notebook_repr(llama_exe: Path, args: LlamaServerArgs) -> None:
    server = shared_server(args, llama_exe)
    assert "not started" in repr(server)
    server.ensure_started()
    text = repr(server)
    assert "running" in text and server.base_url in text and str(server.pid) in text
    page = server._repr_html_()
    for part in ("running", "shared", server.base_url, str(server.pid), "uptime", "last log lines"):
        assert part in page
    assert "<script" not in page
