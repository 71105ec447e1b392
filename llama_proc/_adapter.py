"""The requests side of :class:`~llama_proc.LlamaClient`, loaded with the first client.

One urllib3 connection pool per server, shared by the :class:`Adapter` objects of one client. The
pool and its connections add what llama-server needs and urllib3 leaves to its users:

* a request's header block and a small body go out in one write (one system call and one TCP
  segment instead of two, which spares the server a wake-up);
* a pooled connection idle for :data:`IDLE_LIMIT` seconds is closed when it is next taken from the
  pool instead of being used, so a call is never sent on a connection the server is closing at that
  very moment (its keep-alive ends at 5 s);
* the pool blocks instead of opening more connections than it holds, so the server's HTTP threads
  (each held by one keep-alive connection) always outnumber the client's connections;
* a connection that carried a stream to its end (llama-server closes it then) is replaced at once by
  a freshly connected one, so the next call does not wait for a connect.

HTTP framing, keep-alive, TLS and retries are urllib3's; :class:`Adapter` only skips the per-call
work of the general requests adapter that one fixed server does not need (picking a pool by URL,
proxies, cookies).
"""

from __future__ import annotations

import json
import socket
import time
from types import TracebackType
from typing import Any, Mapping

import requests
from requests import RequestException
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from ._version import __version__

__all__ = [
    "IDLE_LIMIT",
    "MAX_BODY",
    "BodyTooLarge",
    "TRANSPORT_ERRORS",
    "Adapter",
    "RequestException",
    "keep_spare",
    "new_adapters",
    "new_session",
    "prepare",
    "read_body",
]

_SOCKET_OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
]

#: Seconds a pooled connection may stay idle before it is closed instead of reused. llama-server
#: closes a keep-alive connection after 5 idle seconds; a request sent just then would be lost.
IDLE_LIMIT = 4.0

#: Bodies up to this size are sent in the same write as the header block.
_COALESCE_LIMIT = 64 * 1024

#: Answers are read at most this many bytes at a time, so a length the server only claims (or a
#: runaway chunk size) never makes one huge allocation.
READ_CHUNK = 64 * 1024

#: A whole answer (decoded) larger than this many bytes is refused rather than held in memory;
#: ``forward(..., stream=True)`` reads any size in pieces.
MAX_BODY = 256 * 1024 * 1024

#: What sending a request or reading its answer can raise; :func:`~llama_proc._transport.translate_error`
#: turns each into a :class:`~llama_proc.errors.LlamaProcError`.
TRANSPORT_ERRORS = (RequestException, HTTPError, OSError, ValueError, OverflowError)


class _Coalescing:
    """Holds back the header block of a request with a small ``bytes`` body and sends both at once."""

    _coalesce = False
    _held: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any) -> None:
        self._coalesce = isinstance(body, bytes) and 0 < len(body) <= _COALESCE_LIMIT
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)  # type: ignore[misc]
        finally:
            self._coalesce = False
            self._held = None

    def send(self, data: Any) -> None:
        if self._coalesce:
            if self._held is None:
                self._held = bytes(data)  # the header block: wait for the body
                return
            data, self._held, self._coalesce = self._held + bytes(data), None, False
        super().send(data)  # type: ignore[misc]


class _Connection(_Coalescing, HTTPConnection):
    pass


class _TLSConnection(_Coalescing, HTTPSConnection):
    pass


class _PoolBehaviour:
    """Idle connections are closed before reuse; a connection that ended a stream is replaced by a
    connected spare (see the module docstring). Mixed into urllib3's pools."""

    #: seconds a caller waits for a free connection when every one is in use, unless its call has a
    #: read timeout of its own (None: no limit)
    wait_timeout: float | None = None
    #: seconds the spare connection opened after a stream may take to connect
    spare_connect_timeout: float = 5.0

    def urlopen(self, *args: Any, **kwargs: Any) -> Any:
        # a call waits for a free connection no longer than its own read timeout
        timeout = kwargs.get("timeout")
        if kwargs.get("pool_timeout") is None and isinstance(timeout, Timeout) and timeout.read_timeout is not None:
            kwargs["pool_timeout"] = timeout.read_timeout
        return super().urlopen(*args, **kwargs)  # type: ignore[misc]

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(self.wait_timeout if timeout is None else timeout)  # type: ignore[misc]
        idle_since = getattr(conn, "_llama_proc_idle_since", None)
        if idle_since is not None and conn.sock is not None and time.monotonic() - idle_since > IDLE_LIMIT:
            conn.close()  # reconnected when the request goes out
        return conn

    def _put_conn(self, conn: Any) -> None:
        try:
            if conn is not None and getattr(conn, "_llama_proc_spare", False):
                conn.close()
                conn = None  # the pool's slot comes back empty if no spare can be connected
                conn = self._spare()
        finally:
            if conn is not None:
                conn._llama_proc_idle_since = time.monotonic()
            super()._put_conn(conn)  # type: ignore[misc]

    def _spare(self) -> Any:
        if getattr(self, "pool", None) is None:  # the pool was closed
            return None
        conn = self._new_conn()  # type: ignore[attr-defined]
        conn.timeout = self.spare_connect_timeout
        try:
            conn.connect()
        except (OSError, HTTPError):  # refused, unreachable, timed out, a TLS handshake that failed
            conn.close()
            return None
        return conn  # each request sets its own timeouts on it


class _Pool(_PoolBehaviour, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_PoolBehaviour, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Retry(Retry):
    """urllib3's Retry, except that a read error is retried only when the connection died before
    any answer (closed or reset as the request went out, typically a keep-alive connection the
    server closed at that moment): never after a read timeout, where the server may still be working
    on the request, nor after a broken answer."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> _Retry:
        if isinstance(error, ReadTimeoutError) or (isinstance(error, ProtocolError) and not _died_unanswered(error)):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _died_unanswered(error: ProtocolError) -> bool:
    cause = error.args[1] if len(error.args) > 1 else None
    return isinstance(cause, (ConnectionResetError, BrokenPipeError))  # RemoteDisconnected included


def _retries(connect: int) -> Retry:
    """Connection attempts that never reached the server are retried ``connect`` times; a GET or HEAD
    whose connection broke before any answer is sent once more; nothing else is ever resent."""
    return _Retry(
        total=None,
        connect=connect,
        read=1,
        status=0,
        other=0,
        redirect=0,
        allowed_methods=frozenset(("GET", "HEAD")),
        backoff_factor=0.05,
        raise_on_status=False,
        raise_on_redirect=False,
    )


class Adapter(HTTPAdapter):
    """A requests adapter for exactly one server, over a pool made by :func:`new_adapters`.

    :meth:`send` is requests' own; the hooks it calls are cheap here: the pool is fixed, TLS settings
    were applied to it once, the request target is the one :func:`prepare` computed, and no cookies
    are extracted.
    """

    def __init__(self, pool: HTTPConnectionPool, max_retries: Retry) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=max_retries)
        self.pool = pool

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        return self.pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        pass  # applied to the pool when it was made

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        target: str | None = getattr(request, "_llama_proc_target", None)
        return target or request.path_url

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        """Close the pool's idle connections now (connections in use close when they come back)."""
        super().close()
        self.pool.close()


def new_adapters(
    base_url: str,
    pool_maxsize: int,
    connect_retries: int,
    *,
    verify: bool | str = True,
    cert: str | tuple[str, str] | None = None,
    wait_timeout: float | None = None,
    connect_timeout: float = 5.0,
) -> tuple[Adapter, Adapter]:
    """Two adapters over one new blocking pool of ``pool_maxsize`` connections to ``base_url``: one
    for calls (retries as :func:`_retries` says) and one for readiness probes (no retries, so a
    server that is not listening yet answers at once).

    ``verify`` and ``cert`` mean what they mean to requests (https only).
    """
    maker = HTTPAdapter(pool_connections=1, pool_maxsize=pool_maxsize, pool_block=True)
    manager = maker.poolmanager
    manager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
    manager.connection_pool_kw["socket_options"] = _SOCKET_OPTIONS
    probe_request = requests.PreparedRequest()
    probe_request.prepare(method="GET", url=base_url)
    # requests' own TLS settings for verify= and cert=, applied once to the pool
    pool = maker.get_connection_with_tls_context(probe_request, verify, cert=cert)
    maker.cert_verify(pool, base_url, verify, cert)  # type: ignore[no-untyped-call]
    assert isinstance(pool, (_Pool, _TLSPool))
    pool.wait_timeout = wait_timeout
    pool.spare_connect_timeout = connect_timeout
    return Adapter(pool, _retries(connect_retries)), Adapter(pool, Retry(0, read=False, redirect=False))


def new_session(api_key: str | None) -> requests.Session:
    """A Session that ignores the environment (proxies, ``.netrc``), with llama_proc's headers."""
    session = requests.Session()
    session.trust_env = False
    session.headers.update({"User-Agent": f"llama-proc/{__version__}", "Accept": "application/json"})
    del session.headers["Accept-Encoding"]  # llama-server does not compress (an answer that is, is decoded)
    del session.headers["Connection"]  # keep-alive is HTTP/1.1's default
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session


def prepare(
    base_url: str,
    prefix: str,
    path: str,
    method: str,
    base_headers: Mapping[str, str],
    body: Any,
    headers: Mapping[str, str] | None,
) -> requests.PreparedRequest:
    """A PreparedRequest for ``base_url + path`` built directly (``prefix`` is the base URL's own
    path): JSON bodies encoded once, an empty header value removes it."""
    request = requests.PreparedRequest()
    request.method = method
    request.url = base_url + path
    request._llama_proc_target = prefix + path  # type: ignore[attr-defined]  # spares parsing the URL again
    hdrs: Any
    if headers:
        hdrs = CaseInsensitiveDict(base_headers)
        hdrs.update(headers)
        hdrs = CaseInsensitiveDict({k: v for k, v in hdrs.items() if v})
    else:
        hdrs = dict(base_headers)  # the usual case: canonical names only, a plain dict is enough
    if body is not None:
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        else:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")  # NaN is not JSON
            if "Content-Type" not in hdrs:
                hdrs["Content-Type"] = "application/json"
        hdrs["Content-Length"] = str(len(data))
        request.body = data
    elif method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = "0"
    request.headers = hdrs
    request.hooks = {"response": []}
    return request


class BodyTooLarge(ValueError):
    """An answer (decoded) larger than :data:`MAX_BODY`."""


def read_body(raw: BaseHTTPResponse) -> bytes:
    """The whole (decoded) body of an answer, read :data:`READ_CHUNK` bytes at a time.

    :raises BodyTooLarge: past :data:`MAX_BODY` bytes (a runaway or hostile server, a gzip bomb).
    """
    remaining = raw.length_remaining
    if remaining is not None and remaining <= READ_CHUNK and not raw.headers.get("Content-Encoding"):
        return raw.read(decode_content=False)  # small and not compressed: one read
    parts: list[bytes] = []
    size = 0
    while True:
        part = raw.read(READ_CHUNK, decode_content=True)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > MAX_BODY:
            raise BodyTooLarge(
                f"the answer is larger than {MAX_BODY >> 20} MiB; read it in pieces with forward(..., stream=True)"
            )
        parts.append(part)


def keep_spare(response: requests.Response) -> None:
    """Mark the connection of a stream that reached its end: when it comes back to the pool, a
    freshly connected one takes its place (llama-server closes a connection after a stream)."""
    conn = getattr(response.raw, "connection", None)
    if conn is not None:
        conn._llama_proc_spare = True
