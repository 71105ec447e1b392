"""A user's script that uses llama_proc's types as intended: ``mypy --strict`` must find nothing.

Only type-checked by tests/test_typing.py (it would run, given a model and a llama-server).
"""

from __future__ import annotations

import sys
from typing import Any

from llama_proc import LlamaServer, LlamaServerArgs, RemoteServer, Server, ServerManager, Stream
from llama_proc.testing import FakeServer, FakeStream
from llama_proc.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionStreamRequest,
    ChunkStream,
    Completion,
    CompletionChunk,
    CompletionRequest,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type

REQUEST: ChatCompletionRequest = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ],
    "max_tokens": 16,
    "temperature": 0.2,
    "cache_prompt": True,
}


def chat(server: LlamaServer) -> str:
    reply = server.chat_completions(REQUEST)
    assert_type(reply, ChatCompletion)
    text = reply["choices"][0]["message"]["content"] or ""
    assert_type(server.chat_completions({"messages": [{"role": "user", "content": "Hi"}]}), ChatCompletion)
    assert_type(server.chat_completions(REQUEST, stream=False), ChatCompletion)
    with server.chat_completions(REQUEST, stream=True) as stream:
        assert_type(stream, Stream[ChatCompletionChunk])
        for chunk in stream:
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def stream_forms(server: LlamaServer, untyped: dict[str, Any]) -> None:
    literal = server.chat_completions({"messages": [{"role": "user", "content": "Hi"}], "stream": True})
    assert_type(literal, Stream[ChatCompletionChunk])
    streamed: ChatCompletionStreamRequest = {**REQUEST, "stream": True, "stream_options": {"include_usage": True}}
    assert_type(server.chat_completions(streamed), Stream[ChatCompletionChunk])
    either = server.chat_completions(untyped)  # only its contents at run time say which: Any, as before
    assert_type(either, Any)
    print(either["choices"][0]["message"]["content"])  # existing untyped code keeps type-checking
    assert_type(server.chat_completions(untyped, stream=True), Stream[ChatCompletionChunk])


def completions(server: LlamaServer) -> str:
    request: CompletionRequest = {"prompt": "Once upon a time", "max_tokens": 8, "top_k": 40}
    reply = server.completions(request)
    assert_type(reply, Completion)
    text = reply["choices"][0]["text"]
    with server.completions(request, stream=True) as stream:
        assert_type(stream, Stream[CompletionChunk])
        text += "".join(chunk["choices"][0]["text"] for chunk in stream)
    return text


def other_endpoints(server: LlamaServer) -> None:
    vector: list[float] = server.embeddings({"input": "hello"})["data"][0]["embedding"]
    tokens: list[int] = server.tokenize("hello")["tokens"]
    text: str = server.detokenize(server.tokenize({"content": "hi", "add_special": True})["tokens"])["content"]
    status: str = server.health()["status"]
    n_ctx = server.props()["default_generation_settings"].get("n_ctx")
    alias: str = server.models()["data"][0]["id"]
    busy = [slot["id"] for slot in server.slots() if slot["is_processing"]]
    print(vector, tokens, text, status, n_ctx, alias, busy)


def app(server: Server, question: str) -> str:
    """Code that depends only on the protocol, tested with a FakeServer."""
    request: ChatCompletionRequest = {"messages": [{"role": "user", "content": question}]}
    with server.chat_completions(request, stream=True) as stream:
        assert_type(stream, ChunkStream[ChatCompletionChunk])
        return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in stream)


def servers(manager: ServerManager) -> None:
    fake = FakeServer()
    app(fake, "a")
    assert_type(fake.chat_completions(REQUEST, stream=True), FakeStream[ChatCompletionChunk])
    app(LlamaServer(LlamaServerArgs(model="model.gguf")), "b")
    app(RemoteServer("http://127.0.0.1:8080"), "c")
    routed = manager.chat_completions({**REQUEST, "model": "chat"}, stream=True)
    assert_type(routed, Stream[ChatCompletionChunk])
