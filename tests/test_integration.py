"""The real llama-server (built from the pinned llama.cpp source) with the tiny model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llama_proc import LlamaServer, LlamaServerArgs, Server
from llama_proc.errors import BadRequestError, ConfigError

from .conftest import children_of, in_threads, pid_alive

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}


def test_is_a_server(shared_server: LlamaServer) -> None:
    assert isinstance(shared_server, Server)


def test_chat_plain(shared_server: LlamaServer) -> None:
    reply = shared_server.chat_completions(CHAT)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["completion_tokens"] == 8


def test_chat_streamed_matches_plain(shared_server: LlamaServer) -> None:
    plain = shared_server.chat_completions({**CHAT, "seed": 3})["choices"][0]["message"]["content"]
    pieces = []
    with shared_server.chat_completions({**CHAT, "seed": 3, "stream": True}) as stream:
        for chunk in stream:
            assert chunk["object"] == "chat.completion.chunk"
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            pieces.append(delta.get("content") or "")
    assert "".join(pieces) == plain
    assert stream.closed


def test_completions(shared_server: LlamaServer) -> None:
    reply = shared_server.completions({"prompt": "Once upon a time", "max_tokens": 5})
    assert reply["object"] == "text_completion"
    chunks = list(shared_server.completions({"prompt": "Once", "max_tokens": 4, "stream": True}))
    assert len(chunks) >= 4


def test_tokenize_detokenize_round_trip(shared_server: LlamaServer) -> None:
    tokens = shared_server.tokenize("hello world")["tokens"]
    assert tokens == [22172, 3186]  # the llama SPM vocabulary
    assert shared_server.detokenize(tokens)["content"].strip() == "hello world"


def test_props_models_health_metrics_slots(shared_server: LlamaServer) -> None:
    assert shared_server.health() == {"status": "ok"}
    props = shared_server.props()
    assert props["total_slots"] == 4
    models = shared_server.models()
    assert models["data"][0]["id"] == "tiny"
    assert "llamacpp:prompt_tokens_total" in shared_server.metrics()
    assert len(shared_server.slots()) == 4


def test_32_threads_in_parallel(shared_server: LlamaServer) -> None:
    def work(i: int) -> int:
        done = 0
        for _ in range(3):
            assert shared_server.tokenize(f"thread {i}")["tokens"]
            assert shared_server.chat_completions({**CHAT, "max_tokens": 2})["usage"]["completion_tokens"] == 2
            done += 1
        return done

    assert sum(in_threads(work, 32)) == 96


def test_embeddings(llama_exe: Path, tiny_model: Path) -> None:
    args = LlamaServerArgs(model=tiny_model, embeddings=True, pooling="mean", n_ctx=512)
    with LlamaServer(llama_exe, args) as server:
        data = server.embeddings({"input": ["hello", "world"]})["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) == 64
        assert data[0]["embedding"] != data[1]["embedding"]


def test_embeddings_without_a_pooling_type_say_how_to_set_one(llama_exe: Path, tiny_model: Path) -> None:
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, embeddings=True, n_ctx=256)) as server:
        with pytest.raises(BadRequestError, match='pooling="mean"') as caught:
            server.embeddings({"input": ["hello"]})
        assert caught.value.status == 400 and "Pooling type 'none'" in str(caught.value)


def test_stop_leaves_no_process_and_no_thread(llama_exe: Path, tiny_model: Path, no_leaks: None) -> None:
    server = LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=512))
    server.start()
    pid = server.pid
    assert pid is not None and pid in children_of(__import__("os").getpid())
    assert server.stop() == 0
    assert not pid_alive(pid)


def test_port_taken_by_another_process_retries(
    llama_exe: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, no_leaks: None
) -> None:
    import socket

    from llama_proc import server as server_mod

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        picks = iter([taken])
        real = server_mod.free_port
        monkeypatch.setattr(server_mod, "free_port", lambda host: next(picks, None) or real(host))
        with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256)) as server:
            assert server.port != taken
            assert server.health() == {"status": "ok"}


def test_calls_right_after_a_stream_never_hit_a_closing_socket(shared_server: LlamaServer) -> None:
    # llama-server closes the connection after every streamed answer; the pool must not reuse it
    for _ in range(30):
        with shared_server.chat_completions({**CHAT, "max_tokens": 2, "stream": True}) as stream:
            for _chunk in stream:
                pass
        assert shared_server.tokenize("x")["tokens"]


def test_a_server_made_from_args_alone_finds_its_executable(llama_exe: Path, tiny_model: Path) -> None:
    args = LlamaServerArgs(model=tiny_model, n_ctx=256)
    with LlamaServer(args) as server:  # the executable is found as LlamaServer(None, args) finds it
        assert server.tokenize("hello")["tokens"]
    with pytest.raises(ConfigError, match="executable_path"):
        LlamaServer(args, args)


def test_running_without_a_key_on_loopback_is_not_a_warning(
    llama_exe: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llama_proc.server")
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256)):
        pass
    no_key = [r for r in caplog.records if "no API key is set" in r.getMessage()]
    assert no_key and all(r.levelno == logging.INFO for r in no_key)


def test_openai_clients_get_the_v1_url_and_the_key(llama_exe: Path, tiny_model: Path) -> None:
    import asyncio

    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, api_key="auto")) as server:
        assert server.openai_base_url == server.base_url + "/v1"
        with server.openai_client(max_retries=0) as client:
            reply = client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 3
            assert client.models.list().data

        async def chat() -> int:
            async with server.openai_async_client(max_retries=0) as client:
                reply = await client.chat.completions.create(
                    model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                assert reply.usage is not None
                return reply.usage.completion_tokens

        assert asyncio.run(chat()) == 2


def test_importing_llama_proc_imports_no_openai() -> None:
    import subprocess
    import sys

    code = "import sys, llama_proc; print('openai' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
