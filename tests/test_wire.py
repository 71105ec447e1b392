"""The lean HTTP/1.1 transport against a scripted socket server: framing, reuse, staleness, errors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import attrs
import pytest

from llama_proc import LlamaClient
from llama_proc._wire import WirePool
from llama_proc.errors import APIConnectionError, APITimeoutError, InvalidRequest

from .conftest import wait_until


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
        self.connections = 0
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
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
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
        client_kwargs.setdefault("probe_path", None)
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
    first = server.requests[0]
    assert first.startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)


def test_body_and_headers_go_out_in_one_request(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(b'{"tokens": [1]}'), api_key="secret")
    assert client.tokenize("héllo") == {"tokens": [1]}
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert body == '{"content": "héllo"}'.encode()
    assert b"Content-Length: %d" % len(body) in head and b"Authorization: Bearer secret" in head


def test_chunked_body_is_decoded_and_its_connection_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b'4;ext=1\r\n{"a"\r\n6\r\n: [1]}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    server, client = serve(Reply(chunked), ok())
    assert client.health() == {"a": [1]}
    assert client.health() == {"ok": True}
    assert server.connections == 2


def test_close_delimited_http10_body(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it", close=True), ok())
    assert client.metrics() == "all of it"
    assert client.health() == {"ok": True}
    assert server.connections == 2


def test_connection_close_header_is_honoured(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(extra=b"Connection: close\r\n"), ok())
    client.health()
    client.health()
    assert server.connections == 2


def test_interim_answers_are_skipped(serve) -> None:  # type: ignore[no-untyped-def]
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    _server, client = serve(Reply(early + ok().data))
    assert client.health() == {"ok": True}


def test_repeated_and_folded_headers(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(ok(extra=b"X-A: 1\r\nX-A: 2\r\nX-B: a\r\n  b\r\n"))
    response = client.forward("GET", "/health")
    assert response.headers["x-a"] == "1, 2" and response.headers["X-B"] == "a b"


def test_large_body_arrives_whole(serve) -> None:  # type: ignore[no-untyped-def]
    body = b'"' + b"x" * (3 << 20) + b'"'
    _server, client = serve(ok(body))
    assert client.forward("GET", "/big").content == body


def test_idle_connection_closed_by_the_server_is_not_used(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(ok().data, close=True), ok(b'{"n": 2}'))  # closes without saying so
    client.health()
    time.sleep(0.05)  # the FIN arrives while the connection is idle
    assert client.tokenize("x") == {"n": 2}  # a POST: it must not have met the dead socket
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


def test_truncated_body_is_an_error_and_the_connection_is_dropped(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True), ok(b'{"n": 2}'))
    with pytest.raises(APIConnectionError):
        client.health()
    assert client.health() == {"n": 2}
    assert server.connections == 2


@pytest.mark.parametrize(
    "data",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 2xx OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"],
)
def test_malformed_answers_are_errors(serve, data: bytes) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(data, close=True))
    with pytest.raises(APIConnectionError, match="status line|header line"):
        client.health()


def test_endless_header_block_is_refused(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * 70_000 + b"\r\n\r\n", close=True))
    with pytest.raises(APIConnectionError, match="too long"):
        client.health()


def test_read_timeout_without_an_answer(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(Reply(ok().data, delay=2.0))
    t = time.monotonic()
    with pytest.raises(APITimeoutError):
        client.health(timeout=0.2)
    assert time.monotonic() - t < 1.5


def test_read_timeout_mid_stream(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    event = b'data: {"choices": []}\n\n'
    _server, client = serve(Reply(head + b"%x\r\n%s\r\n" % (len(event), event)))
    stream = client.completions({"prompt": "x", "stream": True}, timeout=(1.0, 0.3))
    assert next(stream) == {"choices": []}
    t = time.monotonic()
    with pytest.raises(APITimeoutError):
        next(stream)
    assert time.monotonic() - t < 1.5 and stream.closed


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


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/health", {"X-Evil": "a\r\nInjected: 1"}), ("/health", {"X-Bad\n": "v"}), ("/a b", None), ("/é", None)],
)
def test_header_and_path_injection_refused(serve, path: str, headers: dict[str, str] | None) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok())
    with pytest.raises(InvalidRequest, match="control characters|percent-encode"):
        client.forward("GET", path, headers=headers)
    assert server.requests == []


def test_closed_client_refuses_calls(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(ok())
    client.close()
    with pytest.raises(APIConnectionError, match="closed"):
        client.health()


def test_refused_connection_is_retried_then_reported() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    client = LlamaClient(f"http://127.0.0.1:{port}", connect_retries=2)
    t = time.monotonic()
    with pytest.raises(APIConnectionError, match="refused"):
        client.health()
    assert time.monotonic() - t < 2
    client.close()


def test_pool_keeps_at_most_maxsize_idle_connections(serve) -> None:  # type: ignore[no-untyped-def]
    server, _ = serve()
    pool = WirePool("127.0.0.1", server.port, maxsize=1, connect_retries=0)
    conns = [pool.get(1.0)[0] for _ in range(3)]
    for conn in conns:
        pool.put(conn)
    assert [c.sock.fileno() == -1 for c in conns] == [False, True, True]
    assert pool.get(1.0) == (conns[0], True)
    pool.close()
    conns[0].close()


def test_a_new_connection_left_unserved_is_replaced_before_the_request(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(ok(b'{"status": "ok"}'), ok(b'{"n": 1}'), ok(b'{"n": 2}'), stuck=1, probe_path="/health")
    t = time.monotonic()
    assert client.completions({"prompt": "x"}) == {"n": 1}
    assert 0.4 < time.monotonic() - t < 2.0
    assert client.completions({"prompt": "x"}) == {"n": 2}  # the probed connection is reused unprobed
    assert server.connections == 2
    assert [r.split(b" ", 2)[:2] for r in server.requests] == [
        [b"GET", b"/health"],
        [b"POST", b"/v1/completions"],
        [b"POST", b"/v1/completions"],
    ]


def sse_reply() -> Reply:
    event = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return Reply(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event), close=True)


def test_a_spare_connection_is_ready_after_a_finished_stream(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(sse_reply(), sse_reply(), probe_path="/health")
    pool = client._adapter._wire
    assert list(client.completions({"prompt": "x", "stream": True})) == [{"choices": []}]
    assert len(pool._idle) == 1 and not pool._idle[0].served  # opened, not yet used
    assert list(client.completions({"prompt": "x", "stream": True})) == [{"choices": []}]
    assert wait_until(lambda: server.connections == 3, 2)  # the second stream went out on the spare
    assert [r.split(b" ", 2)[:2] for r in server.requests] == [[b"POST", b"/v1/completions"]] * 2


def test_a_spare_is_probed_before_a_plain_call_uses_it(serve) -> None:  # type: ignore[no-untyped-def]
    server, client = serve(sse_reply(), ok(b'{"status": "ok"}'), ok(b'{"n": 1}'), probe_path="/health")
    list(client.completions({"prompt": "x", "stream": True}))
    assert client.tokenize("x") == {"n": 1}
    assert [r.split(b" ", 2)[1] for r in server.requests] == [b"/v1/completions", b"/health", b"/tokenize"]
    assert server.connections == 2


def test_no_spare_after_a_stream_closed_early(serve) -> None:  # type: ignore[no-untyped-def]
    unfinished = sse_reply().data.rsplit(b"0\r\n\r\n", 1)[0]  # the body's end has not arrived
    _server, client = serve(Reply(unfinished))
    with client.completions({"prompt": "x", "stream": True}) as stream:
        next(stream)
    assert len(client._adapter._wire._idle) == 0


def test_probes_never_outlast_the_read_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    _server, client = serve(stuck=10, probe_path="/health")
    t = time.monotonic()
    with pytest.raises(APITimeoutError, match="read timeout"):
        client.tokenize("x", timeout=(1.0, 0.7))
    assert time.monotonic() - t < 1.2


def test_a_spare_follows_done_even_before_the_body_ends(serve) -> None:  # type: ignore[no-untyped-def]
    unfinished = sse_reply().data.rsplit(b"0\r\n\r\n", 1)[0]  # [DONE] arrived, the closing chunk not yet
    _server, client = serve(Reply(unfinished))
    assert list(client.completions({"prompt": "x", "stream": True})) == [{"choices": []}]
    assert len(client._adapter._wire._idle) == 1


def test_a_broken_chunked_answer_leaves_no_spare(serve) -> None:  # type: ignore[no-untyped-def]
    broken = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly part"
    _server, client = serve(Reply(broken, close=True))
    with pytest.raises(APIConnectionError):
        client.health()
    assert len(client._adapter._wire._idle) == 0


def test_a_base_url_with_a_path_prefixes_every_request() -> None:
    server = ScriptedServer([ok(b'{"status": "ok"}'), ok(b'{"tokens": []}')])
    client = LlamaClient(f"http://127.0.0.1:{server.port}/llama/", probe_path="/health")
    try:
        assert client.tokenize("x") == {"tokens": []}
    finally:
        client.close()
        server.close()
    assert [r.split(b" ", 2)[:2] for r in server.requests] == [
        [b"GET", b"/llama/health"],
        [b"POST", b"/llama/tokenize"],
    ]


def test_a_stream_closed_from_another_thread_while_being_read(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    event = b'data: {"choices": []}\n\n'
    _server, client = serve(Reply(head + b"%x\r\n%s\r\n" % (len(event), event)))
    stream = client.completions({"prompt": "x", "stream": True}, timeout=(1.0, 5.0))
    assert next(stream) == {"choices": []}
    errors: list[BaseException] = []

    def read_on() -> None:
        try:
            next(stream)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_on)
    reader.start()
    time.sleep(0.2)  # the reader is now waiting for the next chunk
    stream.close()  # must neither raise nor hang
    t = time.monotonic()
    reader.join(5)
    assert not reader.is_alive() and stream.closed
    assert time.monotonic() - t < 1.0  # woken at once, not at its 5 s read timeout
    assert len(errors) == 1 and isinstance(errors[0], (APIConnectionError, StopIteration))


def test_a_probe_answer_without_content_length_does_not_leak_into_the_call(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    server, client = serve(Reply(chunked), ok(b'{"n": 1}'), probe_path="/health")
    assert client.tokenize("x") == {"n": 1}
    assert [r.split(b" ", 2)[1] for r in server.requests] == [b"/health", b"/tokenize"]
