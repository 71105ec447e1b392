"""A loopback stand-in for the Hugging Face hub, for ``HF_ENDPOINT=http://127.0.0.1:PORT``.

It answers what ``huggingface_hub`` asks for a model repository: the repository's info with its file
list (``/api/models/{repo}[/revision/{rev}]``) and each file's metadata and bytes
(``HEAD``/``GET /{repo}/resolve/{rev}/{path}``, with ``X-Repo-Commit``, ``ETag`` and ranges), and the
hub's error headers (``X-Error-Code: RepoNotFound``/``EntryNotFound``) for what it does not have.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class FakeHub:
    """Serve ``repos`` ({repo id: {file name: local file}}) on 127.0.0.1; ``requests`` records
    (method, path) of every request. Use as a context manager, or ``start()``/``stop()``.
    ``delay``: seconds to wait before sending a file's bytes (a slow download)."""

    def __init__(self, repos: dict[str, dict[str, Path]], delay: float = 0.0) -> None:
        self.repos = repos
        self.delay = delay
        self.requests: list[tuple[str, str]] = []
        self._commits = {repo: hashlib.sha1(repr(sorted(files)).encode()).hexdigest() for repo, files in repos.items()}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: from now on the hub cannot be reached."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def downloads(self) -> list[str]:
        """The file paths whose bytes were requested (GET of a resolve URL)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    # -- answers ----------------------------------------------------------------------------------

    def _answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path))
        info = _INFO.match(path)
        if info is not None and req.command == "GET":
            self._info(req, info["repo"])
            return
        resolve = _RESOLVE.match(path)
        if resolve is not None:
            self._file(req, resolve["repo"], resolve["path"], body)
            return
        self._error(req, 404, "Entry not found", "EntryNotFound")

    def _error(self, req: BaseHTTPRequestHandler, status: int, message: str, code: str, commit: str = "") -> None:
        data = json.dumps({"error": message}).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        if commit:
            req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)

    def _info(self, req: BaseHTTPRequestHandler, repo: str) -> None:
        if repo not in self.repos:
            self._error(req, 404, "Repository not found", "RepoNotFound")
            return
        data = json.dumps(
            {
                "id": repo,
                "sha": self._commits[repo],
                "siblings": [{"rfilename": name} for name in sorted(self.repos[repo])],
            }
        ).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _file(self, req: BaseHTTPRequestHandler, repo: str, name: str, body: bool) -> None:
        if repo not in self.repos:
            self._error(req, 404, "Repository not found", "RepoNotFound")
            return
        commit = self._commits[repo]
        source = self.repos[repo].get(name)
        if source is None:
            self._error(req, 404, "Entry not found", "EntryNotFound", commit)
            return
        content = source.read_bytes()
        start = 0
        match = re.match(r"bytes=(\d+)-$", req.headers.get("Range") or "")
        if match is not None and body:
            start = min(int(match[1]), len(content))
        req.send_response(206 if start else 200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("X-Repo-Commit", commit)
        req.send_header("ETag", '"' + hashlib.sha256(content).hexdigest() + '"')
        req.send_header("Content-Length", str(len(content) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        req.end_headers()
        if body:
            time.sleep(self.delay)
            req.wfile.write(content[start:])
