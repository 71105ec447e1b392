"""The HTTP layer (requests + urllib3 under LlamaClient) against a scripted socket server: framing,
reuse, staleness, broken and hostile answers. Each case goes through the public client and must end
in a correct answer or a typed error, in bounded time and memory, with no descriptor left open."""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import socket
import threading
import time
import tracemalloc
from typing import Iterator

import attrs
import pytest

from llama_proc import LlamaClient, _adapter
from llama_proc.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ConnectionRefused,
    InvalidRequest,
    LlamaProcError,
    PoolTimeout,
)

from .conftest import in_forked_child, wait_until, within


@attrs.define
class Reply:
    """What the server does with one request: send ``data`` (after ``delay``), then maybe close."""

    data: bytes = b""
    close: bool = False
    delay: float = 0.0


def ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> Reply:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return Reply(head + extra + b"\r\n" + body)


class ScriptedServer:
    """A loopback server that answers the n-th request with the n-th :class:`Reply`."""

    def __init__(self, replies: list[Reply], stuck: int = 0) -> None:
        self.replies = list(replies)
        self.stuck = stuck  # this many connections are accepted first and never read
        self.requests: list[bytes] = []
        self.first_reads: list[bytes] = []  # what the first recv() of each request returned
        self.connections = 0
        self.closed = 0  # connections this server closed after a reply
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(sock)
            if self.connections <= self.stuck:
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                first = not buffer
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if first:
                        self.first_reads.append(data)
                        first = False
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += sock.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                reply = self.replies.pop(0)
                time.sleep(reply.delay)
                sock.sendall(reply.data)
                if reply.close:
                    sock.close()
                    self.closed += 1
                    return
        except OSError:
            return

    def close(self) -> None:
        def end(sock: socket.socket) -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv
            sock.close()

        end(self._listener)
        self._threads[0].join(5)  # no socket is accepted after this
        for sock in self._socks:
            end(sock)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def serve() -> Iterator[object]:
    made: list[tuple[ScriptedServer, LlamaClient]] = []

    def start(*replies: Reply, stuck: int = 0, **client_kwargs: object) -> tuple[ScriptedServer, LlamaClient]:
        server = ScriptedServer(list(replies), stuck)
        client_kwargs.setdefault("timeout", (2.0, 10.0))  # a test that hangs fails in seconds
        client = LlamaClient(f"http://127.0.0.1:{server.port}", **client_kwargs)  # type: ignore[arg-type]
        made.append((server, client))
        return server, client

    yield start
    for server, client in made:
        client.close()
        server.close()


def test_keep_alive_reuses_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(b'{"n": 1}'), ok(b'{"n": 2}'), ok(b'{"n": 3}'))
    assert [client.health()["n"] for _ in range(3)] == [1, 2, 3]
    assert server.connections == 1


def test_headers_and_a_small_body_go_out_in_one_write(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok())
    client.tokenize("hello")
    request = server.requests[0]
    assert request.startswith(b"POST /tokenize HTTP/1.1\r\n") and request.endswith(b'{"content": "hello"}')
    assert server.first_reads[0] == request  # one segment: the server's first read got it all


def test_one_host_header_even_when_the_caller_passes_one(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok())
    client.forward("GET", "/health", headers={"Host": "example.test"})
    assert server.requests[0].lower().count(b"\r\nhost:") == 1
    assert b"\r\nHost: example.test\r\n" in server.requests[0]


def test_chunked_body_is_decoded_and_its_connection_reused(serve) -> None:  # type: ignore[no-untyped-def]
    body = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"n":\r\n3\r\n 1}\r\n0\r\n\r\n'
    server, client = serve(Reply(body), ok(b'{"n": 2}'))
    assert client.health() == {"n": 1}
    assert client.health() == {"n": 2}
    assert server.connections == 1


def test_close_delimited_http10_body(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(b'HTTP/1.0 200 OK\r\n\r\n{"n": 1}', close=True), ok(b'{"n": 2}'))
    assert client.health() == {"n": 1}
    assert client.health() == {"n": 2}
    assert server.connections == 2


def test_connection_close_header_is_honoured(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(ok(extra=b"Connection: close\r\n").data, close=True), ok(b'{"n": 2}'))
    assert client.health() == {"ok": True}
    assert client.tokenize("x") == {"n": 2}  # a POST: sent on a new connection, not the closed one
    assert server.connections == 2


def test_interim_answers_are_skipped(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"n": 1}').data))
    assert client.health() == {"n": 1}


def test_repeated_and_folded_headers(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(ok(extra=b"X-A: 1\r\nX-A: 2\r\nX-B: one\r\n two\r\n"))
    response = client.forward("GET", "/health")
    assert response.headers["X-A"] == "1, 2" and response.json() == {"ok": True}


def test_lf_only_line_endings_are_understood(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(b'HTTP/1.1 200 OK\nContent-Length: 8\n\n{"n": 1}'))
    with within(2):
        assert client.health() == {"n": 1}


def test_a_repeated_identical_content_length_is_accepted(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\nContent-Length: 8\r\n\r\n{"n": 1}'))
    with within(2):
        assert client.health() == {"n": 1}


def test_conflicting_content_lengths_are_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\nContent-Length: 9\r\n\r\n{"n": 1}'))
    with within(2), pytest.raises(APIConnectionError, match="Content-Length"):
        client.health()


def test_a_gzip_answer_is_decoded(serve) -> None:  # type: ignore[no-untyped-def]
    body = gzip.compress(b'{"n": 1}')
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
    _server, client = serve(Reply(head + body))
    assert client.health() == {"n": 1}


def test_a_gzip_bomb_is_refused_in_bounded_memory(serve, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_adapter, "MAX_BODY", 4 * 1024 * 1024)
    body = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB from about 64 KiB
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
    _server, client = serve(Reply(head + body, close=True))
    tracemalloc.start()
    try:
        with within(5), pytest.raises(APIConnectionError, match="larger than 4 MiB"):
            client.health()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


def test_large_body_arrives_whole(serve) -> None:  # type: ignore[no-untyped-def]
    big = b'{"x": "' + b"y" * 3_000_000 + b'"}'
    _server, client = serve(ok(big))
    assert len(client.health()["x"]) == 3_000_000


def test_a_claimed_huge_length_needs_no_huge_memory(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n"
    _server, client = serve(Reply(head + b"x" * 1000, close=True))
    tracemalloc.start()
    try:
        with within(3), pytest.raises(APIConnectionError, match="IncompleteRead"):
            client.health()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffff\r\n",  # a chunk of 256 TiB
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 100_000 + b"\r\n",  # endless size line
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a number
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"t" * 100_000 + b"\r\n\r\n",  # trailer
    ],
)
def test_hostile_chunk_framing_is_an_error_in_bounded_memory(serve, head: bytes) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(head + b"x" * 1000, close=True), Reply(head + b"x" * 1000, close=True))
    tracemalloc.start()
    try:
        with within(3), pytest.raises(APIConnectionError):
            client.health()
        with within(3), pytest.raises(APIConnectionError):
            list(client.completions({"prompt": "x", "stream": True}))  # the stream reader too
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_idle_connection_closed_by_the_server_is_not_used(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(ok().data, close=True), ok(b'{"n": 2}'))  # closes without saying so
    client.health()
    assert wait_until(lambda: server.closed == 1, 2)
    assert client.tokenize("x") == {"n": 2}  # a POST: it must not have met the dead socket
    assert server.connections == 2


def test_a_connection_idle_near_the_servers_keep_alive_limit_is_not_reused(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_adapter, "IDLE_LIMIT", 1.0)
    server, client = serve(ok(), ok(b'{"n": 2}'), ok(b'{"n": 3}'))
    client.health()
    assert client.tokenize("x") == {"n": 2}  # at once: the same connection
    time.sleep(1.2)  # idle past the limit (the server would close it soon)
    assert client.tokenize("x") == {"n": 3}
    assert server.connections == 2


def test_get_is_resent_once_when_a_reused_connection_dies_unanswered(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(), Reply(close=True), ok(b'{"n": 3}'))
    client.health()
    assert client.health() == {"n": 3}
    assert server.connections == 2 and len(server.requests) == 3


def test_post_is_never_resent(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(), Reply(close=True), ok())
    client.health()
    with pytest.raises(APIConnectionError, match="RemoteDisconnected|aborted"):
        client.completions({"prompt": "once"})
    assert len(server.requests) == 2  # the generation was sent exactly once


def test_a_get_is_never_resent_after_a_read_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(ok().data, delay=1.0), ok())
    with within(0.9), pytest.raises(APITimeoutError):
        client.health(timeout=(1.0, 0.3))
    assert len(server.requests) == 1


def test_truncated_body_is_an_error_and_the_connection_is_dropped(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True), ok(b'{"n": 2}'))
    with pytest.raises(APIConnectionError):
        client.health()
    assert client.health() == {"n": 2}
    assert server.connections == 2


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        "HTTP/1.1 \uff12\uff10\uff10 OK\r\nContent-Length: 2\r\n\r\n{}".encode(),  # non-ASCII digits
        b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * 70_000 + b"\r\n\r\n",  # an endless header line
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
    ],
)
def test_malformed_answers_are_errors(serve, data: bytes) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(data, close=True))
    with within(3), pytest.raises(APIConnectionError):
        client.health()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\n{}",
        "HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n{}".encode("latin-1"),  # not a number: read to the end
    ],
)
def test_odd_but_readable_answers_end_in_an_answer_or_a_typed_error(serve, data: bytes) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(data, close=True))
    with within(3):
        try:
            assert client.health() == {}
        except LlamaProcError:
            pass


def test_read_timeout_without_an_answer(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(ok().data, delay=2.0))
    with within(1.5), pytest.raises(APITimeoutError):
        client.health(timeout=0.2)


def test_read_timeout_mid_stream(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    event = b'data: {"choices": []}\n\n'
    _server, client = serve(Reply(head + b"%x\r\n%s\r\n" % (len(event), event)))
    stream = client.completions({"prompt": "x", "stream": True}, timeout=(1.0, 0.3))
    assert next(stream) == {"choices": []}
    with within(1.5), pytest.raises(APITimeoutError):
        next(stream)
    assert stream.closed


def test_a_non_chunked_stream_yields_events_as_they_arrive(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    _server, client = serve(Reply(head + b'data: {"n": 1}\n\n', delay=0.0))
    stream = client.completions({"prompt": "x", "stream": True}, timeout=(1.0, 5.0))
    with within(2):
        assert next(stream) == {"n": 1}  # without waiting for the body's end
    stream.close()


def test_raw_reads_honour_their_size(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(b"0123456789"), ok(b"abcdef"))
    response = client.forward("GET", "/a", stream=True)
    assert response.raw.read(3) == b"012" and response.raw.read(4) == b"3456" and response.raw.read() == b"789"
    response.close()
    response = client.forward("GET", "/b", stream=True)
    assert list(response.iter_content(4)) == [b"abcd", b"ef"]
    assert server.connections == 1  # a body read to its end gives its connection back


def test_streamed_connection_closed_early_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(b"0123456789"), ok())
    response = client.forward("GET", "/a", stream=True)
    assert response.raw.read(2) == b"01"
    response.close()
    assert client.health() == {"ok": True}
    assert server.connections == 2


@pytest.mark.parametrize("headers", [{"X-Evil": "a\r\nInjected: 1"}, {"X-Bad\n": "v"}, {"X-Evil": "a\rb"}])
def test_header_injection_is_refused(serve, headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(), ok())
    with pytest.raises(InvalidRequest, match="nothing was sent"):
        client.forward("GET", "/health", headers=headers)
    assert client.health() == {"ok": True}  # the connection is fine for the next call
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("path", "sent"),
    [("/a b", b"/a%20b"), ("/\u00e9", b"/%C3%A9"), ("/a\r\nInjected: 1", b"/a%0D%0AInjected:%201")],
)
def test_a_path_is_percent_encoded_never_injected(serve, path: str, sent: bytes) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok())
    client.forward("GET", path)
    assert server.requests[0].split(b"\r\n")[0] == b"GET " + sent + b" HTTP/1.1"


def test_the_servers_early_answer_to_an_upload_is_kept() -> None:
    """A server may answer (413, say) and close before the whole body arrived: the answer counts."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_early() -> None:
        for _ in range(2):
            sock, _ = listener.accept()
            with sock:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                body = b'{"error": {"code": 413, "message": "too large"}}'
                sock.sendall(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))  # fmt: skip
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(OSError):
                    while sock.recv(1 << 20):  # read and drop what still comes, so no reset is sent
                        pass

    thread = threading.Thread(target=answer_early, daemon=True)
    thread.start()
    big = "x" * 32 * 1024 * 1024
    try:
        with LlamaClient(f"http://127.0.0.1:{port}") as client, within(10):
            assert client.forward("POST", "/v1/embeddings", data=big.encode()).status_code == 413
            with pytest.raises(APIStatusError) as info:
                client.embeddings({"input": big})
    finally:
        thread.join(5)
        listener.close()
    assert info.value.status == 413


def test_closed_client_refuses_calls(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(ok())
    client.close()
    with pytest.raises(APIConnectionError, match="closed"):
        client.health()


def test_refused_connection_is_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib3.util.connection

    attempts: list[object] = []
    connect = urllib3.util.connection.create_connection
    monkeypatch.setattr(
        urllib3.util.connection, "create_connection", lambda *a, **k: attempts.append(a) or connect(*a, **k)
    )
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    client = LlamaClient(f"http://127.0.0.1:{port}", connect_retries=2)
    with within(2), pytest.raises(ConnectionRefused, match="refused") as info:
        client.health()
    client.close()
    assert len(attempts) == 3  # the first try and two retries
    assert isinstance(info.value, APIConnectionError) and info.value.code == "api_error-connection_refused"


@pytest.mark.parametrize("code", [errno.EHOSTUNREACH, errno.ENETUNREACH])
def test_no_route_to_the_host_is_not_sent_either(code: int) -> None:
    import requests
    import urllib3.exceptions

    from llama_proc._transport import translate_error

    inner = urllib3.exceptions.NewConnectionError(None, "failed")  # type: ignore[arg-type]
    inner.__cause__ = OSError(code, os.strerror(code))
    error = translate_error(requests.exceptions.ConnectionError(inner), "http://10.0.0.9:8080/health", sending=True)
    assert isinstance(error, ConnectionRefused) and os.strerror(code) in str(error)


def test_the_pool_never_opens_more_connections_than_its_size(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(*[Reply(ok().data, delay=0.05) for _ in range(12)], pool_maxsize=3)
    threads = [threading.Thread(target=client.health) for _ in range(12)]
    with within(5):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
    assert len(server.requests) == 12 and server.connections == 3


class Recording(LlamaClient):
    """Records the paths that timed out the way a hung server does."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.hung: list[str] = []

    def _on_timeout(self, path: str) -> None:
        self.hung.append(path)


@pytest.mark.parametrize("call_timeout", [None, (1.0, 0.5)])
def test_a_caller_waits_for_a_free_connection_no_longer_than_its_read_timeout(call_timeout) -> None:  # type: ignore[no-untyped-def]
    server = ScriptedServer([Reply(ok().data, delay=2.0), ok()])
    client = Recording(
        f"http://127.0.0.1:{server.port}", pool_maxsize=1, timeout=(1.0, 0.5 if call_timeout is None else 30)
    )
    busy = threading.Thread(target=lambda: client.health(timeout=5))
    try:
        busy.start()
        assert wait_until(lambda: len(server.requests) == 1, 2)
        with within(1.5), pytest.raises(PoolTimeout, match="pool_maxsize"):
            client.tokenize("x", timeout=call_timeout or ...)
        assert client.hung == []  # the client was the bottleneck, not the server
        busy.join(5)
        assert len(server.requests) == 1  # nothing was sent
    finally:
        client.close()
        server.close()


def test_a_read_timeout_is_taken_for_a_hung_server_and_a_refused_connect_is_not(serve) -> None:  # type: ignore[no-untyped-def]
    server = ScriptedServer([Reply(ok().data, delay=2.0)])
    client = Recording(f"http://127.0.0.1:{server.port}", timeout=(1.0, 0.3))
    try:
        with within(1.5), pytest.raises(APITimeoutError):
            client.tokenize("x")
        assert client.hung == ["/tokenize"]
    finally:
        client.close()
        server.close()
    refused = Recording(f"http://127.0.0.1:{server.port}", connect_retries=0)
    with within(2), pytest.raises(APIConnectionError):
        refused.tokenize("x")
    assert refused.hung == []
    refused.close()


def test_a_body_json_cannot_encode_is_an_invalid_request(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok())
    circular: list[object] = []
    circular.append(circular)
    for body in ({"content": object()}, {"content": circular}, {"content": float("nan")}):
        with within(1), pytest.raises(InvalidRequest, match="JSON"):
            client.forward("POST", "/tokenize", json=body)
    assert server.requests == []


def test_a_broken_error_answer_to_a_stream_is_a_typed_error(serve) -> None:  # type: ignore[no-untyped-def]
    broken = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    _server, client = serve(Reply(broken, close=True))
    with within(3), pytest.raises(APIConnectionError):
        client.completions({"prompt": "x", "stream": True})


def sse_reply() -> Reply:
    event = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return Reply(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event), close=True)


def connected_idle(client: LlamaClient) -> int:
    return sum(1 for conn in list(client._adapter.pool.pool.queue) if conn is not None and conn.sock is not None)  # type: ignore[union-attr]


def test_a_spare_connection_is_ready_after_a_finished_stream(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(sse_reply(), sse_reply())
    assert list(client.completions({"prompt": "x", "stream": True})) == [{"choices": []}]
    assert connected_idle(client) == 1 and wait_until(lambda: server.connections == 2, 2)  # opened, not yet used
    assert list(client.completions({"prompt": "x", "stream": True})) == [{"choices": []}]
    assert wait_until(lambda: server.connections == 3, 2)  # the second stream went out on the spare
    assert [r.split(b" ", 2)[:2] for r in server.requests] == [[b"POST", b"/v1/completions"]] * 2


def test_a_spare_follows_done_even_before_the_body_ends(serve) -> None:  # type: ignore[no-untyped-def]
    unfinished = sse_reply().data.rsplit(b"0\r\n\r\n", 1)[0]  # [DONE] arrived, the closing chunk not yet
    _server, client = serve(Reply(unfinished))
    assert list(client.completions({"prompt": "x", "stream": True})) == [{"choices": []}]
    assert connected_idle(client) == 1


def test_no_spare_after_a_stream_closed_early(serve) -> None:  # type: ignore[no-untyped-def]
    unfinished = sse_reply().data.rsplit(b"0\r\n\r\n", 1)[0]
    _server, client = serve(Reply(unfinished))
    with client.completions({"prompt": "x", "stream": True}) as stream:
        next(stream)
    assert connected_idle(client) == 0


def test_a_stream_whose_server_went_away_ends_cleanly_and_keeps_the_pools_slot() -> None:
    server = ScriptedServer([sse_reply()])
    client = LlamaClient(f"http://127.0.0.1:{server.port}", pool_maxsize=1, timeout=(1.0, 2.0), connect_retries=0)
    try:
        stream = client.completions({"prompt": "x", "stream": True})
        server.close()  # gone before the stream's end is read: no spare can be connected
        with within(3):
            assert list(stream) == [{"choices": []}]
        assert stream.closed and connected_idle(client) == 0
        with within(3), pytest.raises(APIConnectionError, match="refused"):  # not a wait for a lost slot
            client.health()
    finally:
        client.close()


def test_a_broken_chunked_answer_leaves_no_spare(serve) -> None:  # type: ignore[no-untyped-def]
    broken = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly part"
    _server, client = serve(Reply(broken, close=True))
    with pytest.raises(APIConnectionError):
        client.health()
    assert connected_idle(client) == 0


def test_a_base_url_with_a_path_prefixes_every_request() -> None:
    server = ScriptedServer([ok(b'{"tokens": []}')])
    client = LlamaClient(f"http://127.0.0.1:{server.port}/llama/")
    try:
        assert client.tokenize("x") == {"tokens": []}
    finally:
        client.close()
        server.close()
    assert [r.split(b" ", 2)[:2] for r in server.requests] == [[b"POST", b"/llama/tokenize"]]


@pytest.mark.parametrize(
    "url", ["localhost", "ftp://h:1", "http://h:99999", "http://h:1?q=1", "http://:1", "http://u:secret@h:1/llama"]
)
def test_a_bad_base_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="base_url") as caught:
        LlamaClient(url)
    assert "secret" not in str(caught.value)


def test_a_stream_closed_from_another_thread_while_being_read(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    event = b'data: {"choices": []}\n\n'
    _server, client = serve(Reply(head + b"%x\r\n%s\r\n" % (len(event), event)))
    stream = client.completions({"prompt": "x", "stream": True}, timeout=(1.0, 5.0))
    assert next(stream) == {"choices": []}
    errors: list[BaseException] = []
    reading = threading.Event()

    def read_on() -> None:
        reading.set()
        try:
            next(stream)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_on)
    reader.start()
    reading.wait(2)
    time.sleep(0.2)  # the reader is now blocked waiting for the next chunk
    stream.close()  # must neither raise nor hang
    with within(1.0):  # woken at once, not at its 5 s read timeout
        reader.join(5)
    assert not reader.is_alive() and stream.closed
    assert len(errors) == 1 and isinstance(errors[0], (APIConnectionError, StopIteration))
    pool = client._adapter.pool  # the connection went back exactly once
    slots = list(pool.pool.queue)  # type: ignore[union-attr]
    assert len(slots) == client.pool_maxsize
    assert len({id(conn) for conn in slots if conn is not None}) == len([conn for conn in slots if conn is not None])


def test_no_descriptor_is_left_open(serve) -> None:  # type: ignore[no-untyped-def]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        server, client = serve(ok(), sse_reply(), Reply(b"garbage\r\n\r\n", close=True))
        client.health()
        list(client.completions({"prompt": "x", "stream": True}))
        with contextlib.suppress(APIConnectionError):
            client.health()
        client.close()
        server.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_forked_child_gets_a_pool_of_its_own_even_when_a_thread_held_the_lock(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(), ok(b'{"child": true}'), ok(b'{"parent": true}'))
    client.health()  # one idle pooled connection, inherited by the child
    pool = client._adapter.pool
    with pool.pool.mutex:  # type: ignore[union-attr]  # as if another thread were inside the pool at the fork
        result = in_forked_child(lambda: {"answer": client.health()}, 20)  # and exits without hanging
    assert result["ok"] and result["answer"] == {"child": True}, result
    assert client.health() == {"parent": True}  # the parent's pool is untouched
    assert server.connections == 2  # the child never used the parent's connection
