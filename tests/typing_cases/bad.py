"""A user's script with mistakes that llama_proc's types let ``mypy --strict`` catch: each line
marked ``# error: CODE`` must be reported with that code, and nothing else.

Only type-checked by tests/test_typing.py.
"""

from __future__ import annotations

from typing import Any

from llama_proc import LlamaServer
from llama_proc.types import ChatCompletionRequest


def mistakes(server: LlamaServer, untyped: dict[str, Any]) -> None:
    request: ChatCompletionRequest = {"messages": [], "max_tokenz": 8}  # error: typeddict-unknown-key
    reply = server.chat_completions(request)
    print(reply.choices)  # error: attr-defined
    for chunk in reply:  # a ChatCompletion iterates over its keys
        print(chunk["choices"][0]["delta"])  # error: index
    with server.chat_completions(request) as stream:  # error: attr-defined
        print(stream)
    streamed: ChatCompletionRequest = {"messages": [], "stream": True}  # error: typeddict-item
    print(streamed)
    typed = server.chat_completions(untyped, stream=False)  # stream= says which, even for a plain dict
    print(typed["choices"][0]["delta"])  # error: typeddict-item
