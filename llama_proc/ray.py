"""llama-server replicas on a Ray cluster, behind one Ray Serve endpoint (``pip install 'llama-proc[ray]'``).

Ray Serve places the replicas on the cluster's nodes, routes requests to them, replaces one whose
health check fails, and scales them; llama_proc runs one :class:`~llama_proc.server.LlamaServer` in
each replica. ``import llama_proc`` does not import Ray: this module loads it when it is used.

.. code-block:: python

    from ray import serve
    from llama_proc import LlamaServerArgs
    from llama_proc.ray import ServeClient, deployment

    handle = serve.run(deployment(LlamaServerArgs(model="/models/m.gguf"), num_replicas=2))
    # OpenAI clients: http://<head>:8000/v1 ; Python callers in the cluster:
    reply = ServeClient(handle).chat_completions({"messages": [...], "max_tokens": 32})

The model path must exist on every node that may run a replica; a replica whose node lacks it
fails at start with :class:`~llama_proc.errors.ModelNotFound` naming the node.

One application serves one model: a second model is a second application (its own route prefix
and replicas, scaled on its own), which keeps each model's replicas, health and autoscaling apart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .config import LlamaServerArgs
from .errors import ModelNotFound
from .server import LlamaServer

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

__all__ = ["ROUTES", "LlamaReplica", "ServeClient", "deployment"]

_log = logging.getLogger("llama_proc.ray")

#: The paths a replica relays to its llama-server (anything else is answered 404).
ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize", "/health"}
)


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise ImportError("Ray Serve deployments need Ray: pip install 'llama-proc[ray]'") from None
    return serve


def _error(status: int, message: str, kind: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status_code=status)


class LlamaReplica:
    """One Serve replica: starts a llama-server for ``args`` on its node and relays requests to it.

    The variant follows the replica's resources: with GPUs (``ray_actor_options={"num_gpus": 1}``)
    it runs the CUDA build with every layer offloaded unless ``n_gpu_layers`` is set; without
    ``threads`` it computes on as many threads as the replica has CPUs (at least one).
    """

    def __init__(self, args: LlamaServerArgs, server_options: Mapping[str, Any]) -> None:
        import ray

        gpus = ray.get_gpu_ids()
        options = dict(server_options)
        if args.threads is None:
            # as many compute threads as the replica has CPUs: llama.cpp's threads spin while they
            # wait, and replicas that each take every core of a node slow each other down many times
            context: Any = ray.get_runtime_context()
            cpus = context.get_assigned_resources().get("CPU", 0.0)
            args = args.evolve(threads=max(1, int(cpus)))
        if gpus:
            options.setdefault("variant", "cuda")
            if args.n_gpu_layers is None:
                args = args.evolve(n_gpu_layers=-1)
        if isinstance(args.model, Path) and not args.model.is_file():
            util: Any = ray.util
            node = util.get_node_ip_address()
            raise ModelNotFound(f"{args.model} (on node {node}: the model must exist on every node)")
        self._api_key = args.api_key if args.api_key != "auto" else None
        self.server = LlamaServer(args, **options)
        self.server.start()
        if args.api_key == "auto":
            self._api_key = self.server.api_key
        #: Which replica answered (its process id), on every relayed answer.
        self._tag = {"X-Llama-Proc-Replica": str(os.getpid())}
        _log.info("replica pid %s: llama-server pid %s at %s", os.getpid(), self.server.pid, self.server.base_url)

    async def __call__(self, request: Any) -> Any:
        """Relay an HTTP request from the Serve proxy: the body as bytes, the answer's status and
        body as they are, a stream of server-sent events as its bytes arrive."""
        from starlette.responses import Response, StreamingResponse

        path = request.url.path
        if path not in ROUTES:
            return _error(404, f"no route {path} (routes: {', '.join(sorted(ROUTES))})", "not_found_error")
        if self._api_key is not None and request.headers.get("authorization") != f"Bearer {self._api_key}":
            return _error(401, "invalid API key", "authentication_error")
        body = await request.body()
        headers = {"Content-Type": request.headers.get("content-type", "application/json")}
        response = await asyncio.to_thread(
            self.server.forward, request.method, path, stream=True, data=body or None, headers=headers
        )
        media = response.headers.get("Content-Type", "application/json")
        if "text/event-stream" in media:
            chunks = response.iter_content(None)

            async def relay() -> Any:
                try:
                    while True:
                        chunk = await asyncio.to_thread(next, chunks, None)
                        if chunk is None:
                            return
                        yield chunk
                finally:
                    response.close()

            return StreamingResponse(relay(), status_code=response.status_code, media_type=media, headers=self._tag)
        try:
            content = await asyncio.to_thread(lambda: response.content)
        finally:
            response.close()
        return Response(content, status_code=response.status_code, media_type=media, headers=self._tag)

    def check_health(self) -> None:
        """Ray's health check: llama-server answers ``/health`` (else Ray replaces the replica)."""
        self.server.health(timeout=5)

    def __del__(self) -> None:  # Serve's shutdown of a replica
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()

    # -- for DeploymentHandle callers (see ServeClient) -----------------------------------------

    def chat_completions(self, request: Mapping[str, Any]) -> Any:
        """A chat completion, as :meth:`LlamaServer.chat_completions` returns it."""
        return self.server.chat_completions(request, stream=False)

    def chat_completions_stream(self, request: Mapping[str, Any]) -> Iterator[Any]:
        """The chunks of a streamed chat completion."""
        with self.server.chat_completions(request, stream=True) as stream:
            yield from stream

    def completions(self, request: Mapping[str, Any]) -> Any:
        """A completion, as :meth:`LlamaServer.completions` returns it."""
        return self.server.completions(request, stream=False)

    def embeddings(self, request: Mapping[str, Any]) -> Any:
        """Embeddings, as :meth:`LlamaServer.embeddings` returns them."""
        return self.server.embeddings(request)

    def tokenize(self, request: Mapping[str, Any] | str) -> Any:
        """Tokens, as :meth:`LlamaServer.tokenize` returns them."""
        return self.server.tokenize(request)

    def server_address(self) -> tuple[str, str | None]:
        """This replica's llama-server: its URL and API key, for callers that skip the proxy."""
        return self.server.base_url, self.server.api_key


def deployment(
    args: LlamaServerArgs,
    *,
    num_replicas: int | str | None = 1,
    autoscaling_config: Mapping[str, Any] | None = None,
    ray_actor_options: Mapping[str, Any] | None = None,
    name: str = "llama",
    health_check_period_s: float = 2.0,
    max_ongoing_requests: int = 32,
    **server_options: Any,
) -> Any:
    """A Ray Serve application of ``num_replicas`` replicas, each running a llama-server for ``args``.

    :param autoscaling_config: Serve's autoscaling (then ``num_replicas`` is not used).
    :param ray_actor_options: each replica's resources (``{"num_gpus": 1}`` runs the CUDA build;
        its ``num_cpus`` is the llama-server's thread count, at least one).
    :param max_ongoing_requests: requests Serve sends one replica at once (Serve's own default, 5,
        leaves a llama-server idle between short calls; the server queues what its slots cannot take).
    :param server_options: keyword options of :class:`~llama_proc.server.LlamaServer`.
    :returns: the application, for ``serve.run(app, route_prefix=...)``.
    :raises ImportError: without Ray (``pip install 'llama-proc[ray]'``).
    """
    serve = _serve()
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": dict(ray_actor_options or {"num_cpus": 1}),
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 15.0,
        "max_ongoing_requests": max_ongoing_requests,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(LlamaReplica, **options).bind(args, server_options)


class ServeClient:
    """The calls of a :class:`LlamaServer` through a Serve ``DeploymentHandle`` of :func:`deployment`,
    for callers inside the cluster: the same dict shapes, routed by Serve to a replica."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self._handle = handle

    def chat_completions(self, request: Mapping[str, Any], *, stream: bool = False) -> Any:
        """A chat completion dict, or with ``stream=True`` an iterator of chunk dicts."""
        if stream:
            chunks: Any = self._handle.options(stream=True).chat_completions_stream.remote(dict(request))
            return iter(chunks)
        return self._handle.chat_completions.remote(dict(request)).result()

    def completions(self, request: Mapping[str, Any]) -> Any:
        """A completion dict."""
        return self._handle.completions.remote(dict(request)).result()

    def embeddings(self, request: Mapping[str, Any]) -> Any:
        """An embeddings dict."""
        return self._handle.embeddings.remote(dict(request)).result()

    def tokenize(self, request: Mapping[str, Any] | str) -> Any:
        """A tokenize answer dict."""
        return self._handle.tokenize.remote(request).result()
