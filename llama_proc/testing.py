"""Test kit for code that uses llama_proc: :class:`FakeServer` and a pytest plugin.

:class:`FakeServer` implements the :class:`~llama_proc.Server` protocol without a process: it answers
with OpenAI-shaped defaults or with responses you script, streams chunks, raises errors you script,
and records every call.

The pytest plugin (registered as ``llama_proc`` through the ``pytest11`` entry point) provides:

* ``fake_llama_server``: a started :class:`FakeServer`, stopped after the test;
* ``llama_server``: a real :class:`~llama_proc.LlamaServer`, one per session, built from the
  ``llama_server_args`` fixture (override it in your ``conftest.py``; by default the tiny model of
  :mod:`llama_proc.tiny_model`) and skipped with the reason when no ``llama-server`` is available.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, TypeVar, cast, overload

import attrs
import pytest

from .client import Timeout
from .config import HubModel, LlamaServerArgs
from .errors import ExecutableNotFound, LlamaProcError, ServerAlreadyRunning, ServerNotRunning

if TYPE_CHECKING:
    from .types import (
        ChatCompletion,
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionStreamRequest,
        Completion,
        CompletionChunk,
        CompletionRequest,
        CompletionStreamRequest,
        DetokenizeRequest,
        DetokenizeResponse,
        EmbeddingsRequest,
        EmbeddingsResponse,
        HealthResponse,
        ModelsResponse,
        TokenizeRequest,
        TokenizeResponse,
    )

__all__ = ["FakeCall", "FakeServer", "FakeStream"]

T_co = TypeVar("T_co", covariant=True)


@attrs.frozen
class FakeCall:
    """One recorded call: the method name and the request it got."""

    method: str
    request: Any


class FakeStream(Iterator[T_co]):
    """A scripted stream: iterates chunk dicts; a scripted exception is raised where it stands.

    Generic in the chunk's type, as :class:`~llama_proc.Stream` is (a
    :class:`~llama_proc.types.ChunkStream`)."""

    def __init__(self, items: list[Any]) -> None:
        self._items = deque(items)
        self.closed = False

    def __iter__(self) -> FakeStream[T_co]:
        return self

    def __next__(self) -> T_co:
        if self.closed or not self._items:
            self.close()
            raise StopIteration
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return cast("T_co", dict(item))

    def __enter__(self) -> FakeStream[T_co]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the stream (idempotent)."""
        self.closed = True


class FakeServer:
    """A :class:`~llama_proc.Server` without a process, for unit tests of code that uses one.

    :param args: what :meth:`get_server_args` returns (default: a placeholder model path).
    :param reply: the assistant text of default chat and completion answers.
    :param dimensions: the length of default embedding vectors.
    :param require_start: raise :class:`~llama_proc.errors.ServerNotRunning` for calls before
        :meth:`start`, as the real server does.
    """

    def __init__(
        self,
        args: LlamaServerArgs | None = None,
        *,
        reply: str = "Hello from FakeServer.",
        dimensions: int = 8,
        require_start: bool = True,
    ) -> None:
        self.args = args or LlamaServerArgs(model=Path("fake.gguf"), alias="fake")
        self.reply = reply
        self.dimensions = dimensions
        self.require_start = require_start
        #: Every call, in order.
        self.calls: list[FakeCall] = []
        self._scripted: dict[str, deque[Any]] = {}
        self._running = False
        self._lock = threading.Lock()
        self.starts = 0
        self.stops = 0

    # -- scripting ----------------------------------------------------------------------------

    def script(self, method: str, *responses: Any) -> FakeServer:
        """Queue answers for ``method`` (``"chat_completions"``, ``"embeddings"``, ...), used in order
        before the defaults. An answer is a dict, an exception instance to raise, or for a streamed
        call a list of chunk dicts (which may contain an exception to raise mid-stream)."""
        with self._lock:
            self._scripted.setdefault(method, deque()).extend(responses)
        return self

    def calls_to(self, method: str) -> list[Any]:
        """The requests of every call to ``method``."""
        return [c.request for c in self.calls if c.method == method]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Mark the server as running."""
        with self._lock:
            if self._running:
                raise ServerAlreadyRunning(0, "fake://")
            self._running = True
            self.starts += 1

    def stop(self) -> int | None:
        """Mark the server as stopped; returns 0 like a clean exit."""
        with self._lock:
            was = self._running
            self._running = False
            self.stops += 1
        return 0 if was else None

    def is_running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._running

    def get_server_args(self) -> LlamaServerArgs:
        """The configured args."""
        return self.args

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- calls --------------------------------------------------------------------------------

    def _answer(self, method: str, request: Any, default: Any) -> Any:
        with self._lock:
            self.calls.append(FakeCall(method, request))
            if self.require_start and not self._running:
                raise ServerNotRunning("start() has not been called")
            queue = self._scripted.get(method)
            answer = queue.popleft() if queue else None
        if answer is None:
            answer = default() if callable(default) else default
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, list):
            return FakeStream(answer)
        return answer

    def _completion(self, request: Mapping[str, Any], chat: bool) -> Any:
        created = int(time.time())
        model = request.get("model") or self.args.alias or "fake"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-fake{len(self.calls)}"
        if request.get("stream"):
            kind = "chat.completion.chunk" if chat else "text_completion"
            words: list[str | None] = [*self.reply.split(" "), None]  # None: the closing chunk
            chunks: list[Any] = []
            for i, word in enumerate(words):
                text = "" if word is None else (word if i == 0 else " " + word)
                piece: dict[str, Any] = (
                    ({"delta": {"content": text}} if word is not None else {"delta": {}})
                    if chat
                    else {"text": text, "logprobs": None}
                )
                choice = {"index": 0, "finish_reason": None if word is not None else "stop", **piece}
                chunks.append({"id": ident, "object": kind, "model": model, "created": created, "choices": [choice]})
            return chunks
        usage = {
            "prompt_tokens": 1,
            "completion_tokens": len(self.reply.split()),
            "total_tokens": 1 + len(self.reply.split()),
        }
        if chat:
            message = {"role": "assistant", "content": self.reply}
            return {"id": ident, "object": "chat.completion", "model": model, "created": created, "usage": usage,
                    "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}  # fmt: skip
        return {"id": ident, "object": "text_completion", "model": model, "created": created, "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop", "text": self.reply, "logprobs": None}]}  # fmt: skip

    def _generate(self, method: str, request: Mapping[str, Any], stream: bool | None) -> Any:
        if stream is not None:
            request = {**request, "stream": stream}
        return self._answer(method, request, lambda: self._completion(request, chat=method == "chat_completions"))

    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> FakeStream[ChatCompletionChunk]: ...
    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> ChatCompletion: ...
    @overload
    def chat_completions(
        self, request: ChatCompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> FakeStream[ChatCompletionChunk]: ...
    @overload
    def chat_completions(
        self, request: ChatCompletionRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> ChatCompletion: ...
    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Any: ...

    def chat_completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> ChatCompletion | FakeStream[ChatCompletionChunk]:
        """A chat completion (a :class:`FakeStream` when ``stream=True`` or ``"stream": True``)."""
        result: ChatCompletion | FakeStream[ChatCompletionChunk] = self._generate("chat_completions", request, stream)
        return result

    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> FakeStream[CompletionChunk]: ...
    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> Completion: ...
    @overload
    def completions(
        self, request: CompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> FakeStream[CompletionChunk]: ...
    @overload
    def completions(
        self, request: CompletionRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Completion: ...
    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Any: ...

    def completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Completion | FakeStream[CompletionChunk]:
        """A text completion (a :class:`FakeStream` when ``stream=True`` or ``"stream": True``)."""
        result: Completion | FakeStream[CompletionChunk] = self._generate("completions", request, stream)
        return result

    def _vector(self, text: str) -> list[float]:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        return [(digest[i % len(digest)] - 128) / 128 for i in range(self.dimensions)]

    def embeddings(
        self, request: EmbeddingsRequest | Mapping[str, Any], *, timeout: Timeout | object = ...
    ) -> EmbeddingsResponse:
        """Deterministic embeddings: the same text always gets the same vector."""
        texts = request.get("input", "")
        items = [texts] if isinstance(texts, str) else list(texts)
        default = {
            "object": "list",
            "model": self.args.alias or "fake",
            "data": [
                {"object": "embedding", "index": i, "embedding": self._vector(str(t))} for i, t in enumerate(items)
            ],
            "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
        }
        result: EmbeddingsResponse = self._answer("embeddings", request, default)
        return result

    def tokenize(
        self, request: TokenizeRequest | Mapping[str, Any] | str, *, timeout: Timeout | object = ...
    ) -> TokenizeResponse:
        """One token per character: its code point."""
        text = request if isinstance(request, str) else str(request.get("content", ""))
        result: TokenizeResponse = self._answer("tokenize", request, {"tokens": [ord(c) for c in text]})
        return result

    def detokenize(
        self, request: DetokenizeRequest | Mapping[str, Any] | list[int], *, timeout: Timeout | object = ...
    ) -> DetokenizeResponse:
        """The inverse of :meth:`tokenize`."""
        tokens = request if isinstance(request, list) else list(request.get("tokens", []))
        result: DetokenizeResponse = self._answer("detokenize", request, {"content": "".join(chr(t) for t in tokens)})
        return result

    def health(self, *, timeout: Timeout | object = ...) -> HealthResponse:
        """``{"status": "ok"}`` while running."""
        result: HealthResponse = self._answer("health", None, {"status": "ok"})
        return result

    def models(self, *, timeout: Timeout | object = ...) -> ModelsResponse:
        """The configured alias as the one model."""
        model = self.args.model
        alias = self.args.alias or (model.ref if isinstance(model, HubModel) else str(model))
        result: ModelsResponse = self._answer(
            "models", None, {"object": "list", "data": [{"id": alias, "object": "model"}]}
        )
        return result

    def __repr__(self) -> str:
        return f"<FakeServer {'running' if self._running else 'stopped'} calls={len(self.calls)}>"


# ---------------------------------------------------------------------------------------------
# the pytest plugin


@pytest.fixture
def fake_llama_server() -> Iterator[FakeServer]:
    """A started :class:`FakeServer`, stopped after the test."""
    server = FakeServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_server_args() -> LlamaServerArgs:
    """What the ``llama_server`` fixture runs: override this fixture to use your own model."""
    try:
        from .tiny_model import ensure_tiny_model

        model = ensure_tiny_model()
    except (ImportError, LlamaProcError) as exc:
        pytest.skip(f"llama_server: no model (override the llama_server_args fixture): {exc}")
    return LlamaServerArgs(model=model, alias="tiny", n_ctx=512)


@pytest.fixture(scope="session")
def llama_server(llama_server_args: LlamaServerArgs) -> Iterator[Any]:
    """A real, started :class:`~llama_proc.LlamaServer` shared by the session (skipped when no
    ``llama-server`` binary is available)."""
    from .binaries import find_executable
    from .server import LlamaServer

    try:
        executable = find_executable()
    except ExecutableNotFound as exc:
        pytest.skip(f"llama_server: no llama-server available ({exc.hint})")
    with LlamaServer(executable, llama_server_args) as server:
        yield server
