"""A Flask app that serves ``/v1/chat/completions`` from a shared llama-server.

Run it (the model path from ``LLAMA_PROC_MODEL``, any other setting from ``LLAMA_PROC_*``)::

    LLAMA_PROC_MODEL=model.gguf flask --app examples/flask_app.py run --with-threads

Each worker process gets one server, started by the first request and shared by every thread;
streamed answers are passed through as server-sent events as the bytes arrive, without buffering.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator

from flask import Flask, Response, request, stream_with_context

from llama_proc import LlamaProcError, LlamaServer, LlamaServerArgs, RemoteServer, shared_server

_log = logging.getLogger(__name__)


def relay_response(get_server: Callable[[], LlamaServer | RemoteServer]) -> Flask:
    """A Flask app whose ``/v1/chat/completions`` forwards to the server ``get_server()`` returns."""
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            return Response(
                '{"error": {"message": "the body must be a JSON object"}}', 400, content_type="application/json"
            )
        stream = bool(body.get("stream"))
        try:
            upstream = get_server().forward("POST", "/v1/chat/completions", json=body, stream=stream)
        except LlamaProcError as exc:
            # the details (which may quote the server's log) go to this app's log, not to the client
            _log.warning("chat completion failed: %s", exc)
            error = json.dumps({"error": {"code": exc.code, "message": "the model server could not answer"}})
            return Response(error, exc.http_status, content_type="application/json")
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not stream:
            return Response(upstream.content, upstream.status_code, content_type=content_type)

        def relay() -> Iterator[bytes]:
            with upstream:  # closing it frees the server's slot even if the client goes away
                yield from upstream.iter_content(chunk_size=None)

        response = Response(stream_with_context(relay()), upstream.status_code, content_type=content_type)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # tell nginx-style proxies not to buffer
        return response

    return app


def create_app(args: LlamaServerArgs | None = None, executable: str | os.PathLike[str] | None = None) -> Flask:
    """The app with one server per worker process, started by its first request; ``args`` default to
    ``LlamaServerArgs.from_env("LLAMA_PROC_")``."""
    server_args = args or LlamaServerArgs.from_env("LLAMA_PROC_")
    return relay_response(lambda: shared_server(server_args, executable))


if __name__ == "__main__":
    create_app().run(threaded=True)
