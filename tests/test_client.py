from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from llama_proc import LlamaClient
from llama_proc.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from llama_proc.streaming import Stream

BASE = "http://127.0.0.1:18999"


@pytest.fixture
def client() -> LlamaClient:
    with LlamaClient(BASE, api_key="k1") as c:
        yield c  # type: ignore[misc]


@responses.activate
def test_json_call_sends_bearer_and_body(client: LlamaClient) -> None:
    responses.post(
        BASE + "/tokenize",
        json={"tokens": [1, 2]},
        match=[
            matchers.json_params_matcher({"content": "hi é"}),
            matchers.header_matcher({"Authorization": "Bearer k1"}),
        ],
    )
    assert client.tokenize("hi é") == {"tokens": [1, 2]}
    sent = responses.calls[0].request
    assert sent.headers["Content-Type"] == "application/json"
    assert json.loads(sent.body) == {"content": "hi é"}


@responses.activate
@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (503, ServiceUnavailableError)],
)
def test_status_raises_typed_error_with_body(client: LlamaClient, status: int, cls: type) -> None:
    body = {"error": {"code": status, "message": "nope", "type": "x"}}
    responses.post(BASE + "/v1/chat/completions", json=body, status=status)
    with pytest.raises(cls) as info:
        client.chat_completions({"messages": []})
    assert info.value.status == status and info.value.body == body
    assert info.value.url == BASE + "/v1/chat/completions"


@responses.activate
def test_non_json_error_body_kept_as_text(client: LlamaClient) -> None:
    responses.get(BASE + "/metrics", body="metrics disabled", status=501)
    with pytest.raises(APIStatusError, match="metrics disabled"):
        client.metrics()


@responses.activate
def test_every_endpoint_path(client: LlamaClient) -> None:
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/detokenize"),
                         ("GET", "/health"), ("GET", "/props"), ("GET", "/v1/models"), ("GET", "/slots"),
                         ("POST", "/v1/rerank"), ("POST", "/infill")]:  # fmt: skip
        responses.add(method, BASE + path, json=[] if path == "/slots" else {"ok": path})
    assert client.completions({"prompt": "x"}) == {"ok": "/v1/completions"}
    assert client.embeddings({"input": "x"}) == {"ok": "/v1/embeddings"}
    assert client.detokenize([1, 2]) == {"ok": "/detokenize"}
    assert json.loads(responses.calls[-1].request.body) == {"tokens": [1, 2]}
    assert client.health() == {"ok": "/health"}
    assert client.props() == {"ok": "/props"}
    assert client.models() == {"ok": "/v1/models"}
    assert client.slots() == []
    assert client.rerank({"query": "q", "documents": ["a"]}) == {"ok": "/v1/rerank"}
    assert client.infill({"input_prefix": "a"}) == {"ok": "/infill"}


@responses.activate
def test_stream_true_returns_stream(client: LlamaClient) -> None:
    responses.post(
        BASE + "/v1/chat/completions", body=b'data: {"n":1}\n\ndata: [DONE]\n\n', content_type="text/event-stream"
    )
    with client.chat_completions({"messages": [], "stream": True}) as stream:
        assert isinstance(stream, Stream)
        assert list(stream) == [{"n": 1}]


@responses.activate
@pytest.mark.parametrize("method, path", [("chat_completions", "/v1/chat/completions"), ("completions", "/v1/completions"),
                                          ("infill", "/infill")])  # fmt: skip
def test_stream_keyword_sets_the_request_stream_key(client: LlamaClient, method: str, path: str) -> None:
    sse = b'data: {"n":1}\n\ndata: [DONE]\n\n'
    responses.post(BASE + path, body=sse, content_type="text/event-stream")
    responses.post(BASE + path, json={"answer": 1})
    call = getattr(client, method)
    request = {"max_tokens": 2}
    with call(request, stream=True) as stream:  # a request without "stream" streams
        assert isinstance(stream, Stream) and list(stream) == [{"n": 1}]
    assert call({**request, "stream": True}, stream=False) == {"answer": 1}  # the keyword wins
    sent = [json.loads(c.request.body) for c in responses.calls]
    assert sent == [{"max_tokens": 2, "stream": True}, {"max_tokens": 2, "stream": False}]
    assert request == {"max_tokens": 2}  # the caller's request is left as it was


@responses.activate
def test_forward_passes_status_through(client: LlamaClient) -> None:
    responses.post(BASE + "/v1/chat/completions", json={"error": {"message": "bad"}}, status=400)
    resp = client.forward("post", "v1/chat/completions", json={"x": 1})
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "bad"


@responses.activate
def test_connection_errors_translated(client: LlamaClient) -> None:
    responses.post(BASE + "/tokenize", body=requests.exceptions.ConnectionError("refused"))
    with pytest.raises(APIConnectionError, match="refused"):
        client.tokenize("x")
    responses.post(BASE + "/detokenize", body=requests.exceptions.ReadTimeout("Read timed out."))
    with pytest.raises(APITimeoutError):
        client.detokenize([1])


@responses.activate
def test_invalid_json_answer(client: LlamaClient) -> None:
    responses.get(BASE + "/props", body="<html>", status=200)
    with pytest.raises(APIStatusError, match="invalid JSON"):
        client.props()


def test_session_ignores_environment_proxies(monkeypatch: pytest.MonkeyPatch, client: LlamaClient) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:1")
    assert client._session.trust_env is False
    adapter = client._session.get_adapter(BASE + "/x")
    assert adapter is client._adapter
    assert client.pool_maxsize == 32 and adapter.pool.block  # type: ignore[attr-defined]
    retry = adapter.max_retries
    assert retry.status == 0 and retry.connect >= 1
    assert retry.read == 1 and retry.allowed_methods == {"GET", "HEAD"}  # one resend of an unanswered GET


def test_no_server_is_connection_error_fast() -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LlamaClient(f"http://127.0.0.1:{port}") as c:
        t = time.monotonic()
        with pytest.raises(APIConnectionError):
            c.health()
        assert time.monotonic() - t < 2.0
