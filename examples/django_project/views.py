"""``/v1/chat/completions`` forwarded to the process's shared llama-server, streams passed through."""

from __future__ import annotations

import json
import logging
from typing import Iterator

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from llama_proc import LlamaProcError, LlamaServerArgs, shared_server

_log = logging.getLogger(__name__)

#: Read once at import; the server itself starts on the first request (one per worker process).
SERVER_ARGS = LlamaServerArgs.from_env("LLAMA_PROC_")


@csrf_exempt
@require_POST
def chat_completions(request: HttpRequest) -> HttpResponse:
    try:
        body = json.loads(request.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return JsonResponse({"error": {"message": "the body must be a JSON object"}}, status=400)
    stream = bool(body.get("stream"))
    try:
        upstream = shared_server(SERVER_ARGS).forward("POST", "/v1/chat/completions", json=body, stream=stream)
    except LlamaProcError as exc:
        # the details (which may quote the server's log) go to this app's log, not to the client
        _log.warning("chat completion failed: %s", exc)
        return JsonResponse(
            {"error": {"code": exc.code, "message": "the model server could not answer"}}, status=exc.http_status
        )
    content_type = upstream.headers.get("Content-Type", "application/json")
    if not stream:
        return HttpResponse(upstream.content, status=upstream.status_code, content_type=content_type)

    def relay() -> Iterator[bytes]:
        with upstream:  # closing it frees the server's slot even if the client goes away
            yield from upstream.iter_content(chunk_size=None)

    response = StreamingHttpResponse(relay(), status=upstream.status_code, content_type=content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
