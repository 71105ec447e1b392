"""``https`` to an attached server: certificate checks on by default, ``verify=`` and ``cert=`` as in
requests, a base URL's path kept. Against a local TLS server whose certificates a test CA signs."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import trustme
from urllib3.exceptions import InsecureRequestWarning

from llama_proc import LlamaServer
from llama_proc.errors import APIConnectionError, ConfigError, ConnectTimeout

from .conftest import within

SSE_EVENTS = 50


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.record(self)
        self._answer({"status": "ok"})

    def do_POST(self) -> None:
        self.server.record(self)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not request.get("stream"):
            self._answer({"tokens": [1, 2]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(SSE_EVENTS):
            self.wfile.write(b'data: {"choices": [{"index": %d}]}\n\n' % i)
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.paths: list[str] = []
        self.peers: set[tuple[str, int]] = set()
        self.client_certs: list[Any] = []

    def record(self, handler: _Handler) -> None:
        self.paths.append(handler.path)
        self.peers.add(handler.client_address)
        self.client_certs.append(handler.connection.getpeercert())

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that refuses the certificate breaks the handshake: expected here


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[Any]:
    started: list[tuple[_TLSServer, threading.Thread]] = []

    def start(*hosts: str, client_ca: trustme.CA | None = None) -> _TLSServer:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(hosts or ("127.0.0.1",))).configure_cert(context)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            client_ca.configure_trust(context)
        server = _TLSServer(context)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


def url(server: _TLSServer, path: str = "") -> str:
    return f"https://127.0.0.1:{server.server_address[1]}{path}"


def test_attach_over_https_with_a_ca_bundle(tls_server: Any, ca_bundle: str) -> None:
    server = tls_server()
    with within(10), LlamaServer.attach(url(server, "/llama/"), verify=ca_bundle) as remote:
        assert remote.is_running()
        for _ in range(3):
            assert remote.tokenize("x") == {"tokens": [1, 2]}
        with remote.chat_completions({"messages": [], "stream": True}) as stream:
            assert [chunk["choices"][0]["index"] for chunk in stream] == list(range(SSE_EVENTS))
        assert remote.tokenize("x") == {"tokens": [1, 2]}  # after the stream, on a TLS spare
    assert server.paths[:2] == ["/llama/health", "/llama/health"]
    assert set(server.paths[2:]) == {"/llama/tokenize", "/llama/v1/chat/completions"}
    assert len(server.peers) == 2  # one kept-alive connection until the stream ended it, then its spare


def test_a_stream_over_https_closed_early_frees_its_connection(tls_server: Any, ca_bundle: str) -> None:
    server = tls_server()
    remote = LlamaServer.attach(url(server), verify=ca_bundle)
    try:
        with within(10):
            for _ in range(3):
                with remote.chat_completions({"messages": [], "stream": True}) as stream:
                    assert next(stream)["choices"][0]["index"] == 0
                assert stream.closed
            assert remote.tokenize("x") == {"tokens": [1, 2]}
    finally:
        remote.stop()


def test_an_untrusted_certificate_is_refused_and_the_error_says_what_to_pass(tls_server: Any) -> None:
    server = tls_server()
    remote = LlamaServer.attach(url(server))  # verify=True: the system's CAs, which never signed it
    try:
        with within(10), pytest.raises(APIConnectionError, match="certificate verify failed") as caught:
            remote.start()
        assert "verify=" in str(caught.value)
        assert server.paths == []
    finally:
        remote.stop()


def test_a_certificate_for_another_host_is_refused(tls_server: Any, ca_bundle: str) -> None:
    server = tls_server("llama.example")
    remote = LlamaServer.attach(url(server), verify=ca_bundle)
    try:
        with within(10), pytest.raises(APIConnectionError, match="(?i)mismatch|match") as caught:
            remote.tokenize("x")
        assert "host name" in str(caught.value)
        assert server.paths == []
    finally:
        remote.stop()


def test_verify_false_turns_the_checks_off(tls_server: Any) -> None:
    server = tls_server("llama.example")
    with pytest.warns(InsecureRequestWarning), LlamaServer.attach(url(server), verify=False) as remote:
        assert remote.tokenize("x") == {"tokens": [1, 2]}  # warned, as requests warns


def test_a_client_certificate_is_presented_with_cert(tls_server: Any, ca_bundle: str, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    server = tls_server(client_ca=client_ca)
    identity = client_ca.issue_cert("client@llama.example")
    combined, cert_file, key_file = tmp_path / "client.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    identity.private_key_and_cert_chain_pem.write_to_path(str(combined))
    identity.cert_chain_pems[0].write_to_path(str(cert_file))
    identity.private_key_pem.write_to_path(str(key_file))

    remote = LlamaServer.attach(url(server), verify=ca_bundle)
    try:
        with within(10), pytest.raises(APIConnectionError):
            remote.tokenize("x")  # the server asks for a certificate and gets none
    finally:
        remote.stop()
    for cert in (str(combined), (str(cert_file), str(key_file))):
        with LlamaServer.attach(url(server), verify=ca_bundle, cert=cert) as remote:
            assert remote.tokenize("x") == {"tokens": [1, 2]}
    assert server.client_certs[-1]["subject"]  # the server saw who called


@pytest.mark.parametrize("option", ["verify", "cert"])
def test_a_missing_certificate_file_is_a_config_error(option: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.pem")
    descriptors = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match="nowhere.pem"):
        LlamaServer.attach("https://127.0.0.1:1", **{option: missing})  # type: ignore[arg-type]
    assert len(os.listdir("/proc/self/fd")) <= descriptors


def test_https_to_a_plain_http_server_says_so(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers a TLS hello
        remote = LlamaServer.attach(f"https://127.0.0.1:{silent.getsockname()[1]}", request_timeout=(0.5, 30))
        try:
            with within(5), pytest.raises(ConnectTimeout, match="speak https"):
                remote.tokenize("x")
        finally:
            remote.stop()
