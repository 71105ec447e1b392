"""``LlamaClient``: one pooled ``requests.Session`` per server, and the endpoints of llama-server.

Design points:

* ``trust_env=False``: a user's ``HTTP_PROXY``/``ALL_PROXY``/``.netrc`` never captures loopback calls
  (and skipping those lookups is most of what makes a default Session slow per call).
* One :class:`~requests.adapters.HTTPAdapter` mounted on exactly the server's base URL, with a
  keep-alive pool sized for concurrent threads, ``TCP_NODELAY`` and ``SO_KEEPALIVE``.
* ``Retry(connect=N, read=0, status=0)``: only what never reached the server is retried; a
  generation is never sent twice.
* Timeouts are ``(connect, read)``; the read timeout is between bytes, which suits streams.
* All transport errors are translated in :func:`translate_error`; every status >= 400 becomes a typed
  :class:`~llama_proc.errors.APIStatusError` with the server's body attached.
"""

from __future__ import annotations

import contextlib
import json as _json
import os
import socket
import weakref
from typing import Any, Callable, Mapping, Union

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout as Urllib3Timeout

from ._transport import translate_error
from ._version import __version__
from .errors import make_status_error
from .streaming import Stream

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

_SOCKET_OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
]


class _Pool(HTTPConnectionPool):
    """A pool that drops connections marked as not reusable instead of keeping them."""

    def _put_conn(self, conn: Any) -> None:
        if conn is not None and getattr(conn, "_llama_proc_discard", False):
            conn.close()
            conn = None  # keeps the slot: the next request opens a fresh connection
        super()._put_conn(conn)


class _Adapter(HTTPAdapter):
    """An adapter for exactly one plain-HTTP server: the per-call work of the general adapter
    (URL parsing to pick a pool, proxy and TLS checks, cookie extraction) is done once or not at all."""

    def __init__(self, base_url: str, pool_maxsize: int, max_retries: Retry) -> None:
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=max_retries)
        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, "http": _Pool}
        self._pool = self.poolmanager.connection_from_url(base_url)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs.setdefault("socket_options", _SOCKET_OPTIONS)
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        return self._pool

    def cert_verify(self, conn: Any, url: Any, verify: Any, cert: Any) -> None:
        return None  # plain HTTP on a local address: nothing to verify

    def request_url(self, request: Any, proxies: Any) -> str:
        return str(request.path_url)

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        """The general adapter's send, less what a single local plain-HTTP server never needs; a
        non-streamed body is read in one go. (Where ``HTTPAdapter.send`` has been replaced, for
        example by the ``responses`` mocking library, that replacement is used.)"""
        if HTTPAdapter.send is not _BASE_SEND:
            return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
        try:
            raw = self._pool.urlopen(
                method=request.method,
                url=request.path_url,
                body=request.body,
                headers=request.headers,
                redirect=False,
                assert_same_host=False,
                preload_content=not stream,
                decode_content=False,
                retries=self.max_retries,
                timeout=_timeout_of(timeout),
                chunked=False,
            )
        except MaxRetryError as exc:
            if isinstance(exc.reason, ConnectTimeoutError) and not isinstance(exc.reason, NewConnectionError):
                raise requests.exceptions.ConnectTimeout(exc, request=request) from None
            raise requests.exceptions.ConnectionError(exc, request=request) from None
        except ReadTimeoutError as exc:
            raise requests.exceptions.ReadTimeout(exc, request=request) from None
        except (ProtocolError, ClosedPoolError, OSError) as exc:
            raise requests.exceptions.ConnectionError(exc, request=request) from None
        if stream:
            # llama-server closes the connection after a streamed answer: never offer it for reuse,
            # or the next request could be written into a socket the server is closing
            connection = getattr(raw, "_connection", None)
            if connection is not None:
                connection._llama_proc_discard = True
        response = self.build_response(request, raw)
        if not stream:
            response._content = raw.data
            response._content_consumed = True  # type: ignore[attr-defined]
        return response

    def build_response(self, req: Any, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


_live_clients: weakref.WeakSet[LlamaClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_BASE_SEND = HTTPAdapter.send
_timeouts: dict[Any, Urllib3Timeout] = {}


def _timeout_of(timeout: Any) -> Urllib3Timeout:
    """A urllib3 Timeout for a number, a (connect, read) pair or None; the few distinct ones are cached."""
    try:
        return _timeouts[timeout]
    except (KeyError, TypeError):
        pass
    if isinstance(timeout, tuple):
        connect, read = timeout
        made = Urllib3Timeout(connect=connect, read=read)
    else:
        made = Urllib3Timeout(connect=timeout, read=timeout)
    if len(_timeouts) < 64:
        with contextlib.suppress(TypeError):
            _timeouts[timeout] = made
    return made


def _body_of(response: requests.Response) -> Any:
    content = response.content
    try:
        return _json.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace")


class Endpoints:
    """llama-server's endpoints, written once over :meth:`_http`: the :class:`LlamaClient` that
    sends the requests (the client itself, or the client of a running server)."""

    def _http(self) -> LlamaClient:
        raise NotImplementedError

    def _call(
        self, method: str, path: str, body: Any = None, *, stream: bool = False, timeout: Timeout | object = ...
    ) -> requests.Response:
        """One request; a status >= 400 raises the matching :class:`~llama_proc.errors.APIStatusError`."""
        response = self._http()._send_raw(method, path, body, stream=stream, timeout=timeout)
        if response.status_code >= 400:
            try:
                error_body = _body_of(response)
            finally:
                response.close()
            raise make_status_error(response.status_code, error_body, response.url)
        return response

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
        return self._http()._send_raw(method.upper(), path, body, headers=headers, stream=stream, timeout=timeout)

    # -- helpers ------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: Any = None, timeout: Timeout | object = ...) -> Any:
        response = self._call(method, path, body, timeout=timeout)
        try:
            return _json.loads(response.content)
        except ValueError:
            raise make_status_error(
                502, {"error": {"message": "the server answered with invalid JSON"}}, response.url
            ) from None

    def _maybe_stream(self, path: str, request: Mapping[str, Any], timeout: Timeout | object) -> Any:
        if request.get("stream"):
            http = self._http()
            response = http._call("POST", path, request, stream=True, timeout=timeout)
            return Stream(response, url=response.url, error_hint=http._error_hint)
        return self._json("POST", path, request, timeout)

    # -- generation ---------------------------------------------------------------------------

    def chat_completions(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> Any:
        """POST ``/v1/chat/completions``; returns the response dict, or a :class:`Stream` when ``"stream": True``."""
        return self._maybe_stream("/v1/chat/completions", request, timeout)

    def completions(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> Any:
        """POST ``/v1/completions``; returns the response dict, or a :class:`Stream` when ``"stream": True``."""
        return self._maybe_stream("/v1/completions", request, timeout)

    def infill(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> Any:
        """POST ``/infill`` (code infilling); a :class:`Stream` when ``"stream": True``."""
        return self._maybe_stream("/infill", request, timeout)

    def embeddings(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """POST ``/v1/embeddings`` (the server needs ``embeddings=True`` and a pooling type)."""
        result: dict[str, Any] = self._json("POST", "/v1/embeddings", request, timeout)
        return result

    def rerank(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """POST ``/v1/rerank`` (the server needs ``reranking=True`` and a reranking model)."""
        result: dict[str, Any] = self._json("POST", "/v1/rerank", request, timeout)
        return result

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(self, request: Mapping[str, Any] | str, *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """POST ``/tokenize``; ``request`` is ``{"content": ...}`` or just the text."""
        body = {"content": request} if isinstance(request, str) else request
        result: dict[str, Any] = self._json("POST", "/tokenize", body, timeout)
        return result

    def detokenize(self, request: Mapping[str, Any] | list[int], *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """POST ``/detokenize``; ``request`` is ``{"tokens": [...]}`` or just the token list."""
        body = {"tokens": request} if isinstance(request, list) else request
        result: dict[str, Any] = self._json("POST", "/detokenize", body, timeout)
        return result

    # -- state --------------------------------------------------------------------------------

    def health(self, *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """GET ``/health``: ``{"status": "ok"}`` when ready (503 raises while loading)."""
        result: dict[str, Any] = self._json("GET", "/health", None, timeout)
        return result

    def props(self, *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """GET ``/props``: the server's settings, chat template and build."""
        result: dict[str, Any] = self._json("GET", "/props", None, timeout)
        return result

    def models(self, *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """GET ``/v1/models``: the loaded model, under its alias."""
        result: dict[str, Any] = self._json("GET", "/v1/models", None, timeout)
        return result

    def slots(self, *, timeout: Timeout | object = ...) -> list[dict[str, Any]]:
        """GET ``/slots``: the state of each processing slot."""
        result: list[dict[str, Any]] = self._json("GET", "/slots", None, timeout)
        return result

    def metrics(self, *, timeout: Timeout | object = ...) -> str:
        """GET ``/metrics``: Prometheus text (the server needs ``metrics=True``)."""
        return self._call("GET", "/metrics", None, timeout=timeout).text


class LlamaClient(Endpoints):
    """A client for one llama-server at ``base_url``.

    :param base_url: ``http://host:port`` of the server.
    :param api_key: sent as ``Authorization: Bearer`` on every call.
    :param timeout: the default ``(connect, read)`` timeout of calls.
    :param pool_maxsize: keep-alive connections kept for concurrent threads.
    :param connect_retries: retries of connection attempts that never reached the server.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        pool_maxsize: int = DEFAULT_POOL_SIZE,
        connect_retries: int = DEFAULT_CONNECT_RETRIES,
        error_hint: Callable[[], str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._error_hint = error_hint
        session = requests.Session()
        session.trust_env = False
        session.headers.update({"User-Agent": f"llama-proc/{__version__}", "Accept": "application/json"})
        del session.headers["Accept-Encoding"]  # llama-server does not compress; skip the decoder
        del session.headers["Connection"]  # keep-alive is HTTP/1.1's default
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"
        retry = Retry(
            total=connect_retries,
            connect=connect_retries,
            read=0,
            status=0,
            other=0,
            redirect=0,
            backoff_factor=0.05,
            raise_on_status=False,
        )
        self._pool_maxsize = pool_maxsize
        self._adapter = _Adapter(self.base_url, pool_maxsize, retry)
        session.mount(self.base_url + "/", self._adapter)
        self.session = session
        _live_clients.add(self)
        self._headers = {k: v if isinstance(v, str) else v.decode() for k, v in session.headers.items()}
        self._proxies: dict[str, str] = {}

    # -- the two primitives -------------------------------------------------------------------

    def _prepare(
        self, method: str, path: str, body: Any, headers: Mapping[str, str] | None
    ) -> requests.PreparedRequest:
        request = requests.PreparedRequest()
        request.method = method
        request.url = self.base_url + path
        hdrs: CaseInsensitiveDict[str] = CaseInsensitiveDict(self._headers)
        if headers:
            hdrs.update(headers)
            hdrs = CaseInsensitiveDict({k: v for k, v in hdrs.items() if v})  # an empty value removes a header
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
            else:
                data = _json.dumps(body, ensure_ascii=False).encode("utf-8")
                hdrs.setdefault("Content-Type", "application/json")
            hdrs["Content-Length"] = str(len(data))
            request.body = data
        elif method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Length"] = "0"
        request.headers = hdrs
        request.hooks = {"response": []}
        return request

    def _send_raw(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: Timeout | object = ...,
    ) -> requests.Response:
        request = self._prepare(method, path, body, headers)
        effective = self.timeout if timeout is ... else timeout
        try:
            return self._adapter.send(
                request,
                stream=stream,
                timeout=effective,
                verify=True,
                cert=None,
                proxies=self._proxies,
            )
        except requests.RequestException as exc:
            raise translate_error(exc, request.url or "", self._error_hint() if self._error_hint else "") from None

    def _http(self) -> LlamaClient:
        return self

    def _reset_after_fork(self) -> None:
        # Pooled sockets are shared with the parent after fork(): reusing them would mix the two
        # processes' requests on one connection. Drop the child's copies and start a fresh pool.
        old = self._adapter
        self._adapter = _Adapter(self.base_url, self._pool_maxsize, old.max_retries)
        self.session.mount(self.base_url + "/", self._adapter)
        with contextlib.suppress(Exception):
            old.close()

    def close(self) -> None:
        """Close the pooled connections (idempotent)."""
        self.session.close()

    def __enter__(self) -> LlamaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaClient({self.base_url!r})"
