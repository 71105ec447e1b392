"""``LlamaClient``: one pooled ``requests.Session`` per server, and the endpoints of llama-server.

Design points:

* ``trust_env=False``: a user's ``HTTP_PROXY``/``ALL_PROXY``/``.netrc`` never captures loopback calls
  (and skipping those lookups is most of what makes a default Session slow per call).
* One :class:`~requests.adapters.HTTPAdapter` subclass mounted on exactly the server's base URL, over
  one blocking urllib3 pool with ``TCP_NODELAY`` and ``SO_KEEPALIVE`` (see :mod:`llama_proc._adapter`
  for what the pool adds for llama-server: idle connections closed before the server closes them,
  and a connected spare after each stream).
* Only what never reached the server is retried (connection attempts, and a GET whose connection
  broke before any answer); a generation is never sent twice, and nothing is resent after a read
  timeout.
* Timeouts are ``(connect, read)``; the read timeout is between bytes, which suits streams.
* All transport errors are translated in :func:`~llama_proc._transport.translate_error`; every
  status >= 400 becomes a typed :class:`~llama_proc.errors.APIStatusError` with the server's body.
"""

from __future__ import annotations

import contextlib
import json as _json
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Union, cast, overload
from urllib.parse import urlsplit

from ._transport import translate_error
from .errors import (
    APITimeoutError,
    BadRequestError,
    ConfigError,
    ConnectTimeout,
    InvalidRequest,
    LlamaProcError,
    PoolTimeout,
    make_status_error,
)
from .streaming import Stream

if TYPE_CHECKING:
    import openai
    import requests

    from . import _adapter as _adapter_module
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
        InfillChunk,
        InfillRequest,
        InfillResponse,
        InfillStreamRequest,
        ModelsResponse,
        PropsResponse,
        RerankRequest,
        RerankResponse,
        Slot,
        TokenizeRequest,
        TokenizeResponse,
    )

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_READ_TIMEOUT",
    "Endpoints",
    "LlamaClient",
    "Timeout",
]

#: Seconds to establish a connection (loopback: anything longer means the server is wedged).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds to wait for the next bytes of an answer. Generous, so long generations are not cut off;
#: pass ``timeout=`` per call or ``request_timeout=`` per server to change it (None waits forever).
DEFAULT_READ_TIMEOUT = 600.0
#: Keep-alive connections kept per server, at least.
DEFAULT_POOL_SIZE = 32
#: Connection attempts retried when the server could not be reached at all.
DEFAULT_CONNECT_RETRIES = 2

#: A timeout: seconds for both phases, a ``(connect, read)`` pair, or None for no limit.
Timeout = Union[float, "tuple[float | None, float | None]", None]

_live_clients: weakref.WeakSet[LlamaClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client._drop_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise ImportError("the OpenAI client needs the openai package: pip install 'llama-proc[openai]'") from None
    return openai


def _body_of(content: bytes) -> Any:
    try:
        return _json.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace")


class Endpoints:
    """llama-server's endpoints, written once over :meth:`_http`: the :class:`LlamaClient` that
    sends the requests (the client itself, or the client of a running server)."""

    def _http(self) -> LlamaClient:
        raise NotImplementedError

    # -- OpenAI SDKs ----------------------------------------------------------------------------

    @property
    def openai_base_url(self) -> str:
        """The base URL for OpenAI-compatible clients: the server's URL with ``/v1`` (without it,
        the SDKs reach llama-server's own endpoints, and some answers then lack what they expect)."""
        return self._http().base_url + "/v1"

    def openai_client(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for this server: its ``/v1`` base URL and API key, and
        ``kwargs`` for the rest (``max_retries``, ``timeout``, ...).

        :raises ImportError: when the ``openai`` package is not installed (``llama-proc[openai]``).
        """
        client: openai.OpenAI = _openai().OpenAI(**self._openai_options(kwargs))
        return client

    def openai_async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` client for this server (see :meth:`openai_client`)."""
        client: openai.AsyncOpenAI = _openai().AsyncOpenAI(**self._openai_options(kwargs))
        return client

    def _openai_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        client = self._http()
        # the SDK insists on a key; llama-server ignores it when it has none
        return {"base_url": client.base_url + "/v1", "api_key": client._api_key or "no-key", **kwargs}

    def _call(
        self, method: str, path: str, body: Any = None, *, stream: bool = False, timeout: Timeout | object = ...
    ) -> requests.Response:
        """One request; a status >= 400 raises the matching :class:`~llama_proc.errors.APIStatusError`."""
        try:
            client, response = self._send(method, path, body, stream=stream, timeout=timeout)
        except APITimeoutError as exc:
            if not isinstance(exc, (ConnectTimeout, PoolTimeout)):  # the server got it and did not answer
                self._on_timeout(path)
            raise
        if response.status_code >= 400:
            try:
                error_body = _body_of(client._read_all(response))
            finally:
                response.close()
            raise make_status_error(response.status_code, error_body, response.url)
        return response

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: Timeout | object = ...,
    ) -> tuple[LlamaClient, requests.Response]:
        """Send one request with :meth:`_http`'s client: where every call and :meth:`forward` go
        out, whatever their status (a subclass that spreads calls over servers wraps this).

        :returns: the client that sent it, and its response.
        """
        client = self._http()
        return client, client._send_raw(method, path, body, headers=headers, stream=stream, timeout=timeout)

    def _on_timeout(self, path: str) -> None:
        """Called when a call or a stream to ``path`` got no answer within its read timeout (a
        supervised server takes that as a sign that it hangs)."""

    def forward(
        self,
        method: str,
        path: str,
        json: Any = None,
        stream: bool = False,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout | object = ...,
    ) -> requests.Response:
        """Send a request as it is and return the raw response, whatever its status (for proxies).

        With ``stream=True`` the body is not read: iterate ``response.iter_content(None)`` to pass
        bytes on as they arrive, and close the response when done. A header given an empty value
        is removed (``headers={"Authorization": ""}`` sends no key).

        :raises APIConnectionError: when the server cannot be reached.
        """
        if not path.startswith("/"):
            path = "/" + path
        body = data if data is not None else json
        return self._send(method.upper(), path, body, headers=headers, stream=stream, timeout=timeout)[1]

    # -- helpers ------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: Any = None, timeout: Timeout | object = ...) -> Any:
        response = self._call(method, path, body, timeout=timeout)
        try:
            return _json.loads(response.content)
        except ValueError:
            raise make_status_error(
                502, {"error": {"message": "the server answered with invalid JSON"}}, response.url
            ) from None

    def _maybe_stream(
        self, path: str, request: Mapping[str, Any], stream: bool | None, timeout: Timeout | object
    ) -> Any:
        if stream is not None:
            request = {**request, "stream": stream}
        if request.get("stream"):
            response = self._call("POST", path, request, stream=True, timeout=timeout)
            http = self._http()
            return Stream(
                response,
                url=response.url,
                error_hint=http._error_hint,
                on_done=lambda: http._http_layer.keep_spare(response),
                on_timeout=lambda: self._on_timeout(path),
            )
        return self._json("POST", path, request, timeout)

    # -- generation ---------------------------------------------------------------------------

    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> Stream[ChatCompletionChunk]: ...
    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> ChatCompletion: ...
    @overload
    def chat_completions(
        self, request: ChatCompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Stream[ChatCompletionChunk]: ...
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
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """POST ``/v1/chat/completions``; returns the answer, or a :class:`Stream` of chunks when the
        request has ``"stream": True``.

        :param request: a :class:`~llama_proc.types.ChatCompletionRequest` or any mapping (see
            :mod:`llama_proc.types` for how its type decides the return type).
        :param stream: when given, sets the request's ``"stream"`` key (and the return type).
        """
        result: ChatCompletion | Stream[ChatCompletionChunk] = self._maybe_stream(
            "/v1/chat/completions", request, stream, timeout
        )
        return result

    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> Stream[CompletionChunk]: ...
    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> Completion: ...
    @overload
    def completions(
        self, request: CompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Stream[CompletionChunk]: ...
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
    ) -> Completion | Stream[CompletionChunk]:
        """POST ``/v1/completions``; returns the answer, or a :class:`Stream` of chunks when the
        request has ``"stream": True``.

        :param request: a :class:`~llama_proc.types.CompletionRequest` or any mapping.
        :param stream: when given, sets the request's ``"stream"`` key (and the return type).
        """
        result: Completion | Stream[CompletionChunk] = self._maybe_stream("/v1/completions", request, stream, timeout)
        return result

    @overload
    def infill(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> Stream[InfillChunk]: ...
    @overload
    def infill(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> InfillResponse: ...
    @overload
    def infill(
        self, request: InfillStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Stream[InfillChunk]: ...
    @overload
    def infill(
        self, request: InfillRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> InfillResponse: ...
    @overload
    def infill(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Any: ...

    def infill(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> InfillResponse | Stream[InfillChunk]:
        """POST ``/infill`` (code infilling, in llama-server's own format); a :class:`Stream` of
        chunks when the request has ``"stream": True``.

        :param request: an :class:`~llama_proc.types.InfillRequest` or any mapping.
        :param stream: when given, sets the request's ``"stream"`` key (and the return type).
        """
        result: InfillResponse | Stream[InfillChunk] = self._maybe_stream("/infill", request, stream, timeout)
        return result

    def embeddings(
        self, request: EmbeddingsRequest | Mapping[str, Any], *, timeout: Timeout | object = ...
    ) -> EmbeddingsResponse:
        """POST ``/v1/embeddings`` (the server needs ``embeddings=True`` and a pooling type).

        :raises BadRequestError: saying to set ``pooling`` when the model has no pooling type.
        """
        try:
            result: EmbeddingsResponse = self._json("POST", "/v1/embeddings", request, timeout)
        except BadRequestError as exc:
            if "pooling type 'none'" not in str(exc).lower():
                raise
            hint = 'start the server with a pooling type: LlamaServerArgs(..., embeddings=True, pooling="mean")'
            body = dict(exc.body) if isinstance(exc.body, Mapping) else {}
            error = dict(body.get("error") or {}) if isinstance(body.get("error"), Mapping) else {}
            error["message"] = f"{error.get('message', 'no pooling type')} ({hint})"
            raise BadRequestError(exc.status, {**body, "error": error}, exc.url) from None
        return result

    def rerank(self, request: RerankRequest | Mapping[str, Any], *, timeout: Timeout | object = ...) -> RerankResponse:
        """POST ``/v1/rerank`` (the server needs ``reranking=True`` and a reranking model)."""
        result: RerankResponse = self._json("POST", "/v1/rerank", request, timeout)
        return result

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(
        self, request: TokenizeRequest | Mapping[str, Any] | str, *, timeout: Timeout | object = ...
    ) -> TokenizeResponse:
        """POST ``/tokenize``; ``request`` is ``{"content": ...}`` or just the text."""
        body = {"content": request} if isinstance(request, str) else request
        result: TokenizeResponse = self._json("POST", "/tokenize", body, timeout)
        return result

    def detokenize(
        self, request: DetokenizeRequest | Mapping[str, Any] | list[int], *, timeout: Timeout | object = ...
    ) -> DetokenizeResponse:
        """POST ``/detokenize``; ``request`` is ``{"tokens": [...]}`` or just the token list."""
        body = {"tokens": request} if isinstance(request, list) else request
        result: DetokenizeResponse = self._json("POST", "/detokenize", body, timeout)
        return result

    # -- state --------------------------------------------------------------------------------

    def health(self, *, timeout: Timeout | object = ...) -> HealthResponse:
        """GET ``/health``: ``{"status": "ok"}`` when ready (503 raises while loading)."""
        result: HealthResponse = self._json("GET", "/health", None, timeout)
        return result

    def props(self, *, timeout: Timeout | object = ...) -> PropsResponse:
        """GET ``/props``: the server's settings, chat template and build."""
        result: PropsResponse = self._json("GET", "/props", None, timeout)
        return result

    def models(self, *, timeout: Timeout | object = ...) -> ModelsResponse:
        """GET ``/v1/models``: the loaded model, under its alias."""
        result: ModelsResponse = self._json("GET", "/v1/models", None, timeout)
        return result

    def slots(self, *, timeout: Timeout | object = ...) -> list[Slot]:
        """GET ``/slots``: the state of each processing slot."""
        result: list[Slot] = self._json("GET", "/slots", None, timeout)
        return result

    def metrics(self, *, timeout: Timeout | object = ...) -> str:
        """GET ``/metrics``: Prometheus text (the server needs ``metrics=True``)."""
        return self._call("GET", "/metrics", None, timeout=timeout).text


class LlamaClient(Endpoints):
    """A client for one llama-server at ``base_url``.

    :param base_url: ``http://host:port`` of the server (``https`` works too, and a path such as
        ``http://proxy/llama`` is kept in front of every request's path).
    :param api_key: sent as ``Authorization: Bearer`` on every call.
    :param timeout: the default ``(connect, read)`` timeout of calls.
    :param pool_maxsize: connections kept open for concurrent threads. The pool blocks: a thread
        that finds every connection in use waits for one (up to its read timeout) rather than
        opening more, because each open connection holds one of the server's HTTP threads
        (``--threads-http``) and a connection beyond them waits unserved.
    :param connect_retries: retries of connection attempts that never reached the server.
    :param verify: for ``https``: True checks the certificate against the system's CA bundle, a
        path uses that CA bundle (or folder), False checks nothing; as in requests.
    :param cert: for ``https``: a client certificate file, or a ``(cert, key)`` pair.

    Calls go through a private :class:`requests.Session` whose headers are fixed when the client is
    made; per-call headers go in ``forward(..., headers=...)``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        pool_maxsize: int = DEFAULT_POOL_SIZE,
        connect_retries: int = DEFAULT_CONNECT_RETRIES,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        error_hint: Callable[[], str] | None = None,
    ) -> None:
        from . import _adapter  # requests and urllib3 load with the first client, not with the package

        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError([f"base_url: {base_url!r} is not like http://host:port (or https://host/path)"])
        if "@" in parts.netloc:  # never sent (requests' auth step is not used) and would show in errors
            raise ConfigError(["base_url: a user or password in the URL is not supported; pass api_key= instead"])
        try:
            parts.port  # noqa: B018  # raises for a port that is not a number in range
        except ValueError as exc:
            raise ConfigError([f"base_url: {base_url!r}: {exc}"]) from None
        if pool_maxsize < 1:
            raise ConfigError([f"pool_maxsize: must be >= 1, got {pool_maxsize!r}"])
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._error_hint = error_hint
        self._http_layer = _adapter
        self._pool_args = (pool_maxsize, connect_retries, verify, cert)
        self._api_key = api_key
        self._session = _adapter.new_session(api_key)
        try:
            self._adapter, self._probe_adapter = self._new_adapters()
        except OSError as exc:  # requests checks that the files named by verify= and cert= exist
            self._session.close()
            raise ConfigError([f"verify/cert: {exc}"]) from None
        # a base URL may carry a path (a server behind a proxy): request targets start with it
        self._prefix = urlsplit(self.base_url).path
        self._pid = os.getpid()  # the process whose pool this is (see _drop_inherited)
        self._closed = False
        _live_clients.add(self)
        self._headers = {k: v if isinstance(v, str) else v.decode() for k, v in self._session.headers.items()}

    def _new_adapters(self) -> tuple[_adapter_module.Adapter, _adapter_module.Adapter]:
        pool_maxsize, connect_retries, verify, cert = self._pool_args
        connect_timeout, read_timeout = self.timeout if isinstance(self.timeout, tuple) else (self.timeout,) * 2
        adapters = self._http_layer.new_adapters(
            self.base_url,
            pool_maxsize,
            connect_retries,
            verify=verify,
            cert=cert,
            wait_timeout=read_timeout,
            connect_timeout=DEFAULT_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout,
        )
        self._session.mount(self.base_url + "/", adapters[0])
        return adapters

    @property
    def pool_maxsize(self) -> int:
        """How many connections the client keeps open to the server at most."""
        return self._pool_args[0]

    # -- the primitives -----------------------------------------------------------------------

    def _prepare(
        self, method: str, path: str, body: Any, headers: Mapping[str, str] | None
    ) -> requests.PreparedRequest:
        return self._http_layer.prepare(self.base_url, self._prefix, path, method, self._headers, body, headers)

    def _send_raw(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: Timeout | object = ...,
        probe: bool = False,
    ) -> requests.Response:
        """Send one request; unless ``stream``, its body is read before this returns. ``probe``
        sends it without retries (readiness checks)."""
        try:
            request = self._prepare(method, path, body, headers)
        except (TypeError, ValueError) as exc:  # a body json cannot encode
            raise InvalidRequest(f"the body cannot be sent as JSON: {exc}; nothing was sent") from None
        if self._pid != os.getpid():
            self._own_pool()
        adapter = self._probe_adapter if probe else self._adapter
        errors = self._http_layer.TRANSPORT_ERRORS
        try:
            effective = self.timeout if timeout is ... else timeout
            response = adapter.send(request, stream=stream, timeout=cast(Any, effective))
        except errors as exc:
            raise self._translate(exc, request, sending=True) from None
        if not stream:
            self._read_all(response)
        return response

    def _read_all(self, response: requests.Response) -> bytes:
        """The answer's whole body (read once); a failure closes it and raises a typed error."""
        if not getattr(response, "_content_consumed", False):
            try:
                response._content = self._http_layer.read_body(response.raw)
            except self._http_layer.TRANSPORT_ERRORS as exc:
                response.close()
                raise self._translate(exc, response.request) from None
            response._content_consumed = True  # type: ignore[attr-defined]
        return response.content

    def _translate(self, exc: BaseException, request: requests.PreparedRequest, *, sending: bool = False) -> Exception:
        url = request.url or ""
        error = translate_error(exc, url, sending=sending)
        if (
            self._error_hint is None
            or isinstance(error, (InvalidRequest, PoolTimeout))
            or not isinstance(error, LlamaProcError)
        ):
            return error
        # the hint (how the server's process ended, if it did) only on the error path: it may wait a moment
        hint = self._error_hint()
        return translate_error(exc, url, hint, sending=sending) if hint else error

    def _probe(self, path: str, timeout: Timeout) -> tuple[int, bytes]:
        """GET ``path`` once, without retries: ``(status, body)``.

        :raises APIConnectionError: when the server does not answer (yet).
        """
        response = self._send_raw("GET", path, None, timeout=timeout, probe=True)
        return response.status_code, response.content

    def _http(self) -> LlamaClient:
        return self

    def _drop_inherited(self) -> None:
        # In a forked child, at once: pooled sockets are shared with the parent, and reusing them
        # would mix the two processes' requests on one connection. The child closes its copies of
        # the idle ones; its first call then makes a pool of its own. The inherited pool's lock
        # may have been held by a parent thread at the fork, and no such thread runs here to
        # release it: it is made anew, so that closing that pool (urllib3 does at exit) cannot hang.
        waiting = self._adapter.pool.pool
        if waiting is None:
            return
        waiting.mutex = threading.Lock()
        waiting.not_empty = threading.Condition(waiting.mutex)
        waiting.not_full = threading.Condition(waiting.mutex)
        waiting.all_tasks_done = threading.Condition(waiting.mutex)
        for conn in list(waiting.queue):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def _own_pool(self) -> None:
        """A pool of this process's own, after a fork (the inherited one is dropped, never used)."""
        if not self._closed:
            self._adapter, self._probe_adapter = self._new_adapters()
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the pooled connections (idempotent); later calls raise
        :class:`~llama_proc.errors.APIConnectionError`."""
        self._closed = True
        _live_clients.discard(self)
        self._session.close()
        self._probe_adapter.close()

    def __enter__(self) -> LlamaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaClient({self.base_url!r})"
