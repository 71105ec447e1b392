"""A lean HTTP/1.1 transport to one plain-HTTP server, used by :class:`~llama_proc._adapter.Adapter`.

urllib3's connections are ``http.client`` connections, and ``http.client`` alone spends about
100 µs of Python per call (headers parsed through the ``email`` package, separate writes for
header and body, a buffered file object per answer). With many threads sharing one GIL that is
what limits a client's throughput. This module speaks what a client of llama-server needs and
nothing more: persistent connections, ``Content-Length``, chunked and close-delimited bodies, and
interim ``1xx`` answers; a request is one ``sendall`` and an answer one buffered read loop.

Errors are raised as the urllib3 exceptions that requests already knows how to translate
(:class:`~urllib3.exceptions.ProtocolError`, :class:`~urllib3.exceptions.ReadTimeoutError`), or as
``OSError`` from the socket.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import re
import select
import socket
import threading
import time
from typing import Iterator, Mapping

from urllib3.exceptions import ClosedPoolError, ProtocolError, ReadTimeoutError

from .errors import InvalidRequest

__all__ = ["ProbeTimeout", "WireConnection", "WirePool", "WireResponse", "encode_head"]

#: Longest status line plus header block accepted from a server.
MAX_HEAD = 64 * 1024
_RECV = 65536
#: What may not appear in a request target or a header (CR, LF, NUL and the other controls).
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY_STATUS = (204, 304)
#: Seconds a new connection has to answer its probe before another one is tried.
PROBE_WAIT = 0.5
_PROBE_ATTEMPTS = 3
_SPARE_CONNECT_TIMEOUT = 1.0


class ProbeTimeout(TimeoutError):
    """New connections were probed for the whole read timeout and none was answered."""


class _NotBuffered(Exception):
    """The rest of an answer has not arrived yet (see WireResponse.close)."""


class WireConnection:
    """One TCP connection: a socket, the bytes read ahead of what was consumed, and a poller that
    tells, while idle, whether the server has closed it."""

    __slots__ = ("_buffer", "_pid", "_poll", "_timeout", "buffered_only", "served", "sock")

    def __init__(self, address: tuple[str, int], connect_timeout: float | None) -> None:
        sock = socket.create_connection(address, connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._poll = select.poll()
            self._poll.register(sock, select.POLLIN)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._pid = os.getpid()
        self._timeout = connect_timeout
        self._buffer = b""
        #: True once the server has answered on this connection.
        self.served = False
        #: While True, reading past the buffered bytes raises _NotBuffered instead of waiting.
        self.buffered_only = False

    def is_dropped(self) -> bool:
        """True when an idle connection cannot carry a request: the server closed it (or sent
        bytes nobody asked for)."""
        return bool(self._buffer) or bool(self._poll.poll(0))

    def set_timeout(self, timeout: float | None) -> None:
        """Seconds each later send or receive may block (None: no limit)."""
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def close(self) -> None:
        """Close the socket (no ``shutdown``: after fork the parent may still use it)."""
        self.sock.close()

    def abort(self) -> None:
        """End a connection in the middle of an answer: ``shutdown`` first, which wakes a thread
        blocked reading it and tells the server at once (a plain close waits for that read to
        return). Only in the process that opened it; a forked copy just closes its descriptor."""
        if self._pid == os.getpid():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- reading --------------------------------------------------------------------------------

    def _fill(self, started: bool = True) -> None:
        """Read what the server sent next into the buffer; at end of input, ``started`` tells a
        broken answer from one that never began."""
        if self.buffered_only:
            raise _NotBuffered
        data = self.sock.recv(_RECV)
        if data:
            self._buffer += data
        elif started:
            raise ProtocolError("Connection broken", http.client.IncompleteRead(b"", None))
        else:
            reason = http.client.RemoteDisconnected("Remote end closed connection without response")
            raise ProtocolError("Connection aborted.", reason)

    def read_head(self) -> tuple[int, str, dict[str, str], bool]:
        """Status, reason, headers (lower-case names; repeats joined with ", ") and whether the
        server speaks HTTP/1.1, for the next final (non-1xx) answer."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            while end < 0 and len(self._buffer) <= MAX_HEAD:
                self._fill(bool(self._buffer))
                end = self._buffer.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                raise ProtocolError("Connection broken", "the answer's header block is too long")
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ProtocolError("Connection broken", f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            headers: dict[str, str] = {}
            name = ""
            for line in lines[1:]:
                if line[:1] in (" ", "\t") and name:  # obsolete line folding
                    headers[name] += " " + line.strip()
                    continue
                name, sep, value = line.partition(":")
                if not sep:
                    raise ProtocolError("Connection broken", f"malformed header line: {line[:80]!r}")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            return status, parts[2] if len(parts) > 2 else "", headers, parts[0] == "HTTP/1.1"

    def read_exact(self, size: int) -> bytes:
        """Exactly ``size`` bytes of body."""
        buffer = self._buffer
        if len(buffer) >= size:
            self._buffer = buffer[size:]
            return buffer[:size]
        out = bytearray(size)
        out[: len(buffer)] = buffer
        self._buffer = b""
        view = memoryview(out)
        got = len(buffer)
        while got < size:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ProtocolError("Connection broken", http.client.IncompleteRead(bytes(out[:got]), size - got))
            got += n
        return bytes(out)

    def iter_length(self, size: int) -> Iterator[bytes]:
        """``size`` bytes of body, in pieces as they arrive."""
        while size > 0:
            if not self._buffer:
                self._fill()
            piece, self._buffer = self._buffer[:size], self._buffer[size:]
            size -= len(piece)
            yield piece

    def iter_chunked(self) -> Iterator[bytes]:
        """A chunked body, decoded, in pieces as they arrive (trailers are read and dropped)."""
        while True:
            end = self._buffer.find(b"\r\n")
            while end < 0:
                self._fill()
                end = self._buffer.find(b"\r\n")
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("Connection broken", f"invalid chunk size: {line[:40]!r}") from None
            if size == 0:
                while True:  # trailer lines up to an empty one
                    end = self._buffer.find(b"\r\n")
                    while end < 0:
                        self._fill()
                        end = self._buffer.find(b"\r\n")
                    line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                    if not line:
                        return
            yield from self.iter_length(size)
            while len(self._buffer) < 2:
                self._fill()
            if self._buffer[:2] != b"\r\n":
                raise ProtocolError("Connection broken", "a chunk does not end with CRLF")
            self._buffer = self._buffer[2:]

    def iter_until_close(self) -> Iterator[bytes]:
        """A body delimited by the end of the connection."""
        if self._buffer:
            piece, self._buffer = self._buffer, b""
            yield piece
        while True:
            data = self.sock.recv(_RECV)
            if not data:
                return
            yield data


def encode_head(method: str, target: str, host: str, headers: Mapping[str, str]) -> bytes:
    """The request line and header block. Raises :class:`~llama_proc.errors.InvalidRequest` (a
    ValueError) for CR, LF and other controls: no header injection through a path, a key or a
    header a caller passes on."""
    if _BAD_TARGET.search(target) or not target.isascii() or not method.isalpha():
        raise InvalidRequest(f"{method} {target!r}: percent-encode spaces, control characters and non-ASCII in a path")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        if _BAD_HEADER.search(name) or _BAD_HEADER.search(value) or ":" in name:
            raise InvalidRequest(f"header {name!r}: no CR, LF or other control characters in header names or values")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidRequest("a header holds characters outside Latin-1; encode its value") from None


class WireResponse:
    """One answer: status and headers read, body read on demand. Serves as ``Response.raw`` for
    requests (``stream``, ``read``, ``close``, ``release_conn``)."""

    def __init__(
        self,
        pool: WirePool,
        conn: WireConnection,
        method: str,
        url: str,
        read_timeout: float | None,
    ) -> None:
        self.status, self.reason, self.headers, http11 = conn.read_head()
        self.version = 11 if http11 else 10
        self.url = url
        self._pool: WirePool | None = pool
        self._conn: WireConnection | None = conn
        self._read_timeout = read_timeout
        self._reusable = _keeps_alive(self.headers, http11)
        self._done = False
        self._pending = b""
        self._pieces: Iterator[bytes] | None = None
        self._streamed = False
        self._end_seen = False
        length = self.headers.get("content-length")
        if method == "HEAD" or self.status in _NO_BODY_STATUS:
            self._body: Iterator[bytes] | None = None
            self._length: int | None = 0
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            # llama-server closes the connection after a chunked (streamed) answer: never reuse it,
            # or the next request could be written into a socket the server is closing
            self._reusable = False
            self._streamed = True
            self._body, self._length = conn.iter_chunked(), None
        elif length is not None and length.isdigit():
            self._length = int(length)
            self._body = None
        else:
            self._reusable = False
            self._body, self._length = conn.iter_until_close(), None
        if self._length == 0:
            self._finish()

    @property
    def closed(self) -> bool:
        """True once the body is read to its end or the connection is closed."""
        return self._conn is None

    def read_all(self) -> bytes:
        """The whole body (used for answers that are not streamed)."""
        conn = self._conn
        if conn is None:
            return b""
        try:
            data = conn.read_exact(self._length or 0) if self._body is None else b"".join(self._body)
        except BaseException:
            self._drop()  # broken or timed out: nothing left to drain
            raise
        self._finish()
        return data

    def stream(self, amt: int | None = None, decode_content: bool | None = None) -> Iterator[bytes]:
        """The body in pieces of at most ``amt`` bytes (any size when None), each as soon as it
        arrives. A read timeout raises :class:`~urllib3.exceptions.ReadTimeoutError`."""
        if self._pending:
            piece, self._pending = self._pending, b""
            yield from _split(piece, amt)
        for piece in self._piece_iterator():
            yield from _split(piece, amt)

    def read(self, amt: int | None = None, decode_content: bool | None = None, cache_content: bool = False) -> bytes:
        """Up to ``amt`` bytes of the body (all that is left when None); b"" at its end."""
        if amt is None:
            return b"".join(self.stream())
        pieces, have = [self._pending], len(self._pending)
        self._pending = b""
        more = self._piece_iterator()
        while have < amt:
            piece = next(more, None)
            if piece is None:
                break
            pieces.append(piece)
            have += len(piece)
        data = b"".join(pieces)
        self._pending = data[amt:]
        return data[:amt]

    def _piece_iterator(self) -> Iterator[bytes]:
        if self._pieces is None:
            self._pieces = self._read_pieces()
        return self._pieces

    def _read_pieces(self) -> Iterator[bytes]:
        """The one iterator over the rest of the body: whoever reads, reads on from here."""
        conn = self._conn
        if conn is None:
            return
        body = self._body if self._body is not None else conn.iter_length(self._length or 0)
        try:
            yield from body
        except TimeoutError:
            self._drop()
            message = f"Read timed out. (read timeout={self._read_timeout})"
            raise ReadTimeoutError(None, self.url, message) from None  # type: ignore[arg-type]
        except OSError as exc:  # reset, or closed under the reader: requests reports it as broken
            self._drop()
            raise ProtocolError("Connection broken", exc) from None
        except BaseException:
            self._drop()
            raise
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self.release_conn()

    def release_conn(self) -> None:
        """Give the connection back to the pool if its answer was read to the end and it may be
        reused; close it otherwise."""
        conn, pool = self._conn, self._pool
        if conn is None or pool is None:
            return
        self._conn = self._pool = None
        if self._done and self._reusable:
            conn.served = True
            pool.put(conn)
        else:
            conn.close()
            if self._done and self._streamed:
                pool.replenish()

    def close(self) -> None:
        """Drop the connection; an unread rest of the body is discarded.

        A stream's reader stops at its last event (``data: [DONE]``), usually with the chunked
        body's end already in the buffer: that is read first, so the stream counts as finished
        (and a spare connection is opened for the next one)."""
        conn, pool = self._conn, self._pool
        if conn is not None and self._streamed and not self._done:
            conn.buffered_only = True
            try:
                for _ in self._piece_iterator():
                    break  # more data: the stream was abandoned, not finished
            except _NotBuffered:
                pass
            except ValueError:  # closed from another thread while its reader is reading: just drop
                pass
            finally:
                conn.buffered_only = False
        self._drop()
        if not self._done and self._end_seen and pool is not None:  # (done: the drain opened one)
            pool.replenish()

    def note_end(self) -> None:
        """The reader has seen the stream's last event (``data: [DONE]``): when closed, a spare
        connection follows even if the body's closing bytes have not arrived yet."""
        self._end_seen = True

    def _drop(self) -> None:
        conn = self._conn
        self._conn = self._pool = None
        if conn is not None:
            conn.abort()


def _keeps_alive(headers: Mapping[str, str], http11: bool) -> bool:
    """Whether the server leaves the connection open after this answer (HTTP/1.1 unless it says
    ``close``, HTTP/1.0 only when it says ``keep-alive``)."""
    connection = headers.get("connection", "").lower()
    return ("close" not in connection) if http11 else ("keep-alive" in connection)


def _split(piece: bytes, amt: int | None) -> Iterator[bytes]:
    if amt is None or len(piece) <= amt:
        yield piece
    else:
        for i in range(0, len(piece), amt):
            yield piece[i : i + amt]


class WirePool:
    """Idle keep-alive connections to one ``host:port``, last used first (a LIFO keeps the fewest
    sockets warm). ``get`` and ``put`` are safe from any number of threads."""

    def __init__(self, host: str, port: int, maxsize: int, connect_retries: int, backoff: float = 0.05) -> None:
        self.address = (host, port)
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.maxsize = maxsize
        self.connect_retries = connect_retries
        self.backoff = backoff
        self._idle: collections.deque[WireConnection] = collections.deque()
        self._closed = False
        self._connect_lock = threading.Lock()
        #: A path to GET on a new connection before its first request, or None (see :meth:`_served`).
        self.probe_path: str | None = None

    def get(
        self, connect_timeout: float | None, probe: bool = False, read_timeout: float | None = None
    ) -> tuple[WireConnection, bool]:
        """A live idle connection, or a new one; and whether it was reused. Connection attempts
        that fail are retried ``connect_retries`` times (the last error is raised). With ``probe``
        and a :attr:`probe_path`, a new connection is first shown to be served (see :meth:`_served`);
        probes that go unanswered for ``read_timeout`` in all raise :class:`ProbeTimeout`."""
        if self._closed:
            raise ClosedPoolError(None, "the client is closed")  # type: ignore[arg-type]
        probing = bool(probe and self.probe_path)
        conn = self._pop_idle()
        if conn is not None and (conn.served or not probing):
            return conn, True
        if not probing:
            return self._connect(connect_timeout), False
        # Here conn is None or a spare opened after a stream, not yet probed. One new connection
        # at a time, each until the server has shown it serves it: a burst of connections is what
        # can leave one of them unserved (see _served).
        deadline = None if read_timeout is None else time.monotonic() + read_timeout
        with self._connect_lock:
            for _ in range(_PROBE_ATTEMPTS):
                if conn is None:
                    conn = self._pop_idle()  # one may have come back while this thread waited
                if conn is not None and conn.served:
                    return conn, True
                reused = conn is not None
                if conn is None:
                    conn = self._connect(connect_timeout)
                wait = PROBE_WAIT if deadline is None else min(PROBE_WAIT, deadline - time.monotonic())
                if wait > 0 and self._served(conn, wait):
                    conn.served = True
                    return conn, reused
                conn.close()
                conn = None
                if deadline is not None and time.monotonic() >= deadline:
                    raise ProbeTimeout(f"no answer to GET {self.probe_path} within the read timeout")
        return self._connect(connect_timeout), False  # the server answers nothing quickly: just send

    def _pop_idle(self) -> WireConnection | None:
        idle = self._idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                break
            if not conn.is_dropped():
                return conn
            conn.close()
        return None

    def _connect(self, connect_timeout: float | None) -> WireConnection:
        attempt = 0
        while True:
            try:
                return WireConnection(self.address, connect_timeout)
            except OSError:
                if attempt >= self.connect_retries:
                    raise
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                attempt += 1

    def _served(self, conn: WireConnection, wait: float) -> bool:
        """Whether the server answers ``GET probe_path`` on ``conn`` within ``wait`` seconds.

        llama-server's HTTP thread pool can miss that it must start a thread when connections
        arrive in a burst; such a connection then waits, unread, until another connection ends,
        which for an idle keep-alive connection is its 5 s timeout. A request sent on it would
        stall that long, and could not be resent elsewhere without risking running it twice. A
        probe can: a connection that does not answer it is closed before anything else is sent."""
        head = encode_head("GET", self.probe_path or "/", self.host_header, {})
        try:
            conn.set_timeout(wait)
            conn.sock.sendall(head)
            _status, _reason, headers, http11 = conn.read_head()
            length = headers.get("content-length", "")
            if "chunked" in headers.get("transfer-encoding", "").lower():
                for _ in conn.iter_chunked():  # the whole answer, so none of it is left for the call
                    pass
            elif length.isdigit():
                conn.read_exact(int(length))
            else:
                return False  # its end is the connection's end
        except (OSError, ProtocolError, ValueError):
            return False
        return _keeps_alive(headers, http11)

    def replenish(self) -> None:
        """Open a spare connection when none is idle. llama-server closes the connection after
        every streamed answer, so without a spare each stream would wait for a new connection
        to be accepted and handed to a server thread before its request could even be read."""
        if self._closed or self._idle:
            return
        try:
            conn = WireConnection(self.address, _SPARE_CONNECT_TIMEOUT)
        except OSError:
            return  # the server is gone or going: the next request reports it
        self.put(conn)

    def put(self, conn: WireConnection) -> None:
        """Keep ``conn`` for reuse (closed instead when the pool is full or closed)."""
        if self._closed or len(self._idle) >= self.maxsize:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        """Close the idle connections; later ``get`` calls fail, later ``put`` calls close."""
        self._closed = True
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break
