"""A loopback stand-in for the release API and its downloads, serving fake archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from llama_proc.releases import REPOSITORY

from .conftest import FAKE_SERVER

LAUNCHER = '#!/bin/sh\nexec {python} {fake} "$@"\n'


def tar_archive(members: dict[str, bytes | str], modes: dict[str, int] | None = None) -> bytes:
    """A .tar.gz; a str value makes a symlink to that target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                tar.addfile(info)
                continue
            info.size = len(content)
            info.mode = (modes or {}).get(name, 0o644)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def zip_archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def release_members(tag: str, python: str) -> dict[str, bytes | str]:
    launcher = LAUNCHER.format(python=python, fake=FAKE_SERVER).encode()
    return {
        f"llama-{tag}/llama-server": launcher,
        f"llama-{tag}/rpc-server": b"#!/bin/sh\nexit 0\n",
        f"llama-{tag}/libggml-base.so.0.0.1": b"\x7fELF fake library",
        f"llama-{tag}/libggml-base.so": "libggml-base.so.0.0.1",
        f"llama-{tag}/LICENSE": b"MIT",
    }


class FakeReleases:
    """Serve ``/repos/{REPOSITORY}/releases/tags/{tag}`` and ``/download/{name}`` on 127.0.0.1."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.files: dict[str, bytes] = {}
        self.digests: dict[str, str | None] = {}
        self.hits: dict[str, int] = {}
        self.headers: list[dict[str, str]] = []
        self.drop_after: dict[str, int] = {}  # name -> bytes sent before the connection is cut
        self.drops_left: dict[str, int] = {}  # name -> downloads still cut so (absent: all of them)
        self.api_status = 200
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with owner.lock:
                    owner.hits[self.path] = owner.hits.get(self.path, 0) + 1
                    owner.headers.append(dict(self.headers))
                if self.path == f"/repos/{REPOSITORY}/releases/tags/{owner.tag}":
                    self._send(owner.api_status, json.dumps(owner.release_json()).encode(), "application/json")
                elif self.path.startswith("/download/") and self.path[10:] in owner.files:
                    name = self.path[10:]
                    data = owner.files[name]
                    with owner.lock:
                        cut = owner.drop_after.get(name)
                        left = owner.drops_left.get(name)
                        if cut is not None and left is not None:
                            cut = cut if left > 0 else None
                            owner.drops_left[name] = left - 1
                    if cut is not None:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self._send(200, data, "application/octet-stream")
                else:
                    self._send(404, b'{"message": "Not Found"}', "application/json")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, name: str, data: bytes, digest: str | None = "auto") -> None:
        self.files[name] = data
        self.digests[name] = "sha256:" + hashlib.sha256(data).hexdigest() if digest == "auto" else digest

    def release_json(self) -> dict[str, Any]:
        return {
            "tag_name": self.tag,
            "assets": [
                {
                    "name": n,
                    "size": len(d),
                    "digest": self.digests[n],
                    "browser_download_url": f"{self.url}/download/{n}",
                }
                for n, d in self.files.items()
            ],
        }

    def downloads(self, name: str) -> int:
        return self.hits.get(f"/download/{name}", 0)

    def __enter__(self) -> FakeReleases:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
