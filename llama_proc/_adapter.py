"""The requests side of :class:`~llama_proc.LlamaClient`, loaded with the first client.

An adapter bound to exactly one plain-HTTP server: the per-call work of the general adapter (URL
parsing to pick a pool, proxy and TLS checks, cookie extraction) is done once or not at all, and
requests go out over :mod:`llama_proc._wire`. urllib3 remains for bodies that are not bytes and
for code that replaces ``HTTPAdapter.send`` (mocking libraries).
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any, Mapping

import requests
from requests import RequestException
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3.connection import HTTPConnection
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
from urllib3.util.url import parse_url

from ._version import __version__
from ._wire import ProbeTimeout, WirePool, WireResponse, encode_head

__all__ = ["Adapter", "RequestException", "new_session", "prepare"]

_SOCKET_OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
]


class _Connection(HTTPConnection):
    """Sends a small request body in the same write as the headers: one segment on the wire instead
    of two, which spares the server a wake-up and avoids delayed-ACK stalls on fresh connections."""

    _coalesce = False
    _held: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any) -> None:
        self._coalesce = isinstance(body, (bytes, bytearray)) and 0 < len(body) <= _COALESCE_LIMIT
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)
        finally:
            self._coalesce = False
            self._held = None

    def send(self, data: Any) -> None:
        if self._coalesce:
            if self._held is None:
                self._held = bytes(data)  # the header block: wait for the body
                return
            data, self._held, self._coalesce = self._held + bytes(data), None, False
        super().send(data)


_COALESCE_LIMIT = 256 * 1024


class _Pool(HTTPConnectionPool):
    """A pool that drops connections marked as not reusable instead of keeping them."""

    ConnectionCls = _Connection

    def _put_conn(self, conn: Any) -> None:
        if conn is not None and getattr(conn, "_llama_proc_discard", False):
            conn.close()
            conn = None  # keeps the slot: the next request opens a fresh connection
        super()._put_conn(conn)


class Adapter(HTTPAdapter):
    """An adapter for exactly one plain-HTTP server: :meth:`send` goes straight to the one pool, so
    the per-call work of the general adapter (URL parsing to pick a pool, proxy and TLS checks,
    cookie extraction) is done once or not at all."""

    def __init__(self, base_url: str, pool_maxsize: int, max_retries: Retry) -> None:
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=max_retries)
        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, "http": _Pool}
        self._pool = self.poolmanager.connection_from_url(base_url)
        url = parse_url(base_url)
        if url.scheme != "http" or not url.host:
            raise ValueError(f"not a plain-HTTP base URL: {base_url!r}")
        retries = max_retries.connect if max_retries.connect is not None else max_retries.total
        self._wire = WirePool(
            url.host.strip("[]"), url.port or 80, pool_maxsize, int(retries or 0), max_retries.backoff_factor
        )

    @property
    def probe_path(self) -> str | None:
        """The path a new connection is probed with (see :class:`~llama_proc.LlamaClient`)."""
        return self._wire.probe_path

    @probe_path.setter
    def probe_path(self, path: str | None) -> None:
        self._wire.probe_path = path

    def close(self) -> None:
        """Close the pools' idle connections now (clearing a PoolManager only forgets its pools)."""
        super().close()
        self._pool.close()
        self._wire.close()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs.setdefault("socket_options", _SOCKET_OPTIONS)
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        """Send over the lean transport of :mod:`llama_proc._wire`; a non-streamed body is read in
        one go. A body that is not bytes (a file, a generator) goes through urllib3 instead, and
        where ``HTTPAdapter.send`` has been replaced (for example by the ``responses`` mocking
        library) that replacement is used."""
        if HTTPAdapter.send is not _BASE_SEND:
            return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
        body = request.body
        if body is not None and not isinstance(body, bytes):
            return self._send_urllib3(request, stream, timeout)
        method = request.method or "GET"
        target = getattr(request, "_llama_proc_target", None) or request.path_url
        head = encode_head(method, target, self._wire.host_header, request.headers)  # InvalidRequest: caller's mistake
        data = head + body if body else head
        connect_timeout, read_timeout = _timeout_pair(timeout)
        url = request.url or ""
        retry_stale = method in _IDEMPOTENT
        while True:
            try:
                conn, reused = self._wire.get(connect_timeout, not stream, read_timeout)
            except ProbeTimeout as exc:
                raise requests.exceptions.ReadTimeout(f"Read timed out. ({exc})", request=request) from None
            except TimeoutError as exc:
                raise requests.exceptions.ConnectTimeout(exc, request=request) from None
            except (OSError, ClosedPoolError) as exc:
                raise requests.exceptions.ConnectionError(exc, request=request) from None
            try:
                conn.set_timeout(read_timeout)
                conn.sock.sendall(data)
                raw = WireResponse(self._wire, conn, method, url, read_timeout)
                content = None if stream else raw.read_all()
                break
            except TimeoutError:
                conn.close()
                raise requests.exceptions.ReadTimeout(
                    f"Read timed out. (read timeout={read_timeout})", request=request
                ) from None
            except (ProtocolError, OSError) as exc:
                conn.close()
                # a reused connection the server closed just as the request went out: an
                # idempotent request is sent once more on a fresh connection
                if reused and retry_stale and _never_answered(exc):
                    retry_stale = False
                    continue
                if isinstance(exc, OSError):
                    exc = ProtocolError("Connection aborted.", exc)
                raise requests.exceptions.ConnectionError(exc, request=request) from None
        response = self.build_response(request, raw)
        if content is not None:
            response._content = content
            response._content_consumed = True  # type: ignore[attr-defined]
        return response

    def _send_urllib3(self, request: requests.PreparedRequest, stream: bool, timeout: Any) -> requests.Response:
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
            connection = getattr(raw, "_connection", None)
            if connection is not None:
                connection._llama_proc_discard = True  # see WireResponse: streams are not reused
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


_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS"))


def _never_answered(exc: BaseException) -> bool:
    """True for a failure that shows the server read nothing of the request: the connection was
    reset or closed before a single byte of an answer."""
    if isinstance(exc, ProtocolError):
        return exc.args[:1] == ("Connection aborted.",)
    return isinstance(exc, (ConnectionResetError, BrokenPipeError))


def _timeout_pair(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        return timeout[0], timeout[1]
    return timeout, timeout


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


def new_session(
    base_url: str, api_key: str | None, pool_maxsize: int, connect_retries: int
) -> tuple[requests.Session, Adapter]:
    """A Session that ignores the environment, with one :class:`Adapter` mounted on ``base_url``."""
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
    adapter = Adapter(base_url, pool_maxsize, retry)
    session.mount(base_url + "/", adapter)
    return session, adapter


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
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            if "Content-Type" not in hdrs:
                hdrs["Content-Type"] = "application/json"
        hdrs["Content-Length"] = str(len(data))
        request.body = data
    elif method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = "0"
    request.headers = hdrs
    request.hooks = {"response": []}
    return request
