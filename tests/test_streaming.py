from __future__ import annotations

import json

import pytest
import requests
import responses
import urllib3

from llama_proc.errors import APIConnectionError, APIStreamError
from llama_proc.streaming import ServerSentEvent, SSEDecoder, Stream, iter_events


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    return list(iter_events(chunks))


def test_basic_events() -> None:
    assert decode(b"data: a\n\ndata: b\n\n") == [ServerSentEvent("a"), ServerSentEvent("b")]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_all_line_endings(eol: bytes) -> None:
    assert decode(b"data: x" + eol + eol + b"data: y" + eol + eol) == [ServerSentEvent("x"), ServerSentEvent("y")]


def test_crlf_split_across_chunks_counts_once() -> None:
    # "\r" ends one chunk, "\n" starts the next: one line end, not two (which would dispatch early)
    events = decode(b"data: a\r", b"\ndata: b\r\n\r\n")
    assert events == [ServerSentEvent("a\nb")]


def test_every_split_point_gives_the_same_events() -> None:
    stream = (
        b'event: message\r\ndata: {"a":1}\r\n\r\n: comment\r\ndata: line1\r\ndata: line2\r\n\r\ndata: [DONE]\r\n\r\n'
    )
    expected = decode(stream)
    assert [e.data for e in expected] == ['{"a":1}', "line1\nline2", "[DONE]"]
    for i in range(len(stream) + 1):
        assert decode(stream[:i], stream[i:]) == expected, i
    assert decode(*[stream[i : i + 1] for i in range(len(stream))]) == expected


def test_u2028_inside_json_does_not_split() -> None:
    payload = json.dumps({"text": "a\u2028b\u0085c\x0cd"}, ensure_ascii=False).encode("utf-8")
    events = decode(b"data: " + payload + b"\n\n")
    assert len(events) == 1 and json.loads(events[0].data)["text"] == "a\u2028b\u0085c\x0cd"


def test_multibyte_char_split_across_chunks() -> None:
    raw = "data: é😀\n\n".encode()
    assert decode(raw[:7], raw[7:9], raw[9:]) == [ServerSentEvent("é😀")]


def test_comments_fields_and_flush() -> None:
    events = decode(b": ping\n\nid: 7\nretry: 100\nevent: error\ndata:no-space\n\ndata: tail-without-blank-line")
    assert events == [
        ServerSentEvent("no-space", "error", "7", 100),
        ServerSentEvent("tail-without-blank-line", None, "7"),
    ]


def test_decoder_is_incremental() -> None:
    dec = SSEDecoder()
    assert list(dec.feed(b"data: 1")) == []
    assert list(dec.feed(b"\n")) == []
    assert list(dec.feed(b"\n")) == [ServerSentEvent("1")]


URL = "http://127.0.0.1:9/v1/chat/completions"


def _stream_response(body: bytes, status: int = 200) -> requests.Response:
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, body=body, status=status, content_type="text/event-stream")
        return requests.post(URL, stream=True, timeout=5)


def test_stream_stops_at_done_and_closes() -> None:
    resp = _stream_response(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\ndata: {"late":1}\n\n')
    closed = []
    with Stream(resp, url=URL, on_close=lambda: closed.append(1)) as stream:
        chunks = list(stream)
    assert chunks == [{"choices": [{"delta": {"content": "a"}}]}]
    assert stream.closed and closed == [1]


def test_stream_error_event_raises_typed_error() -> None:
    body = b'data: {"choices":[{"delta":{}}]}\n\nerror: ignored\ndata: {"error":{"code":400,"message":"context too long"}}\n\n'
    stream = Stream(_stream_response(body), url=URL)
    assert next(stream) == {"choices": [{"delta": {}}]}
    with pytest.raises(APIStreamError) as info:
        next(stream)
    assert info.value.status == 400 and "context too long" in str(info.value)
    assert stream.closed


def test_early_break_closes() -> None:
    stream = Stream(_stream_response(b"data: {}\n\n" * 5 + b"data: [DONE]\n\n"), url=URL)
    with stream:
        for _ in stream:
            break
    assert stream.closed


def test_broken_connection_is_api_connection_error() -> None:
    class BrokenBody:
        """An answer whose connection breaks after the first event."""

        def __init__(self) -> None:
            self.parts = [b"data: {}\n\n"]

        def read1(self, amt: int, decode_content: bool = True) -> bytes:
            if self.parts:
                return self.parts.pop()
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

        def close(self) -> None:
            pass

    resp = requests.Response()
    resp.status_code = 200
    resp.raw = BrokenBody()
    stream = Stream(resp, url=URL, error_hint=lambda: "llama-server exited with status -9")
    assert next(stream) == {}
    with pytest.raises(APIConnectionError, match="status -9"):
        next(stream)
    assert stream.closed
