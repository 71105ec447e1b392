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

A model larger than one node: ``deployment(args, rpc_workers=2)`` gives each replica its own
``rpc-server`` workers, Ray actors placed with the replica on distinct nodes (a STRICT_SPREAD
placement group), and the replica's llama-server spreads the model over them.

Callers inside the cluster can skip Serve's proxy: ``deployment(args, direct=True)`` lists each
replica's llama-server address in the application, and :class:`DirectClient` sends calls straight
to them, round robin, over the replicas whose latest Ray health check passed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from .binaries import find_executable
from .client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, Endpoints, LlamaClient, Timeout
from .config import LlamaServerArgs
from .errors import APIConnectionError, ConfigError, ConnectionRefused, ConnectTimeout, ModelNotFound, RpcWorkerError
from .readiness import url_host
from .remote import DEFAULT_ATTACHED_POOL_SIZE
from .rpc import RpcCluster, RpcWorker
from .server import LlamaServer

if TYPE_CHECKING:
    import requests
    from ray.serve.handle import DeploymentHandle

__all__ = ["ROUTES", "DirectClient", "LlamaReplica", "ReplicaDirectory", "RpcWorkerActor", "ServeClient", "deployment"]

_T = TypeVar("_T")

#: The name of a direct deployment's directory is the replicas' deployment name with this suffix.
DIRECTORY_SUFFIX = "-directory"

#: Hosts that only the replica's own node can reach: a direct deployment binds the node's address instead.
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

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

    def __init__(
        self,
        args: LlamaServerArgs,
        server_options: Mapping[str, Any],
        directory: DeploymentHandle[Any] | None = None,
        ttl: float = 0.0,
        rpc_workers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
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
        util: Any = ray.util
        node = util.get_node_ip_address()
        if isinstance(args.model, Path) and not args.model.is_file():
            raise ModelNotFound(f"{args.model} (on node {node}: the model must exist on every node)")
        if directory is not None and args.host in _LOOPBACK:
            args = args.evolve(host=node)  # reachable from the other nodes, for DirectClient
        self._api_key = args.api_key
        #: The replica's rpc-server workers (Ray actors), when it has any.
        self.workers: list[Any] = []
        self._addresses: list[str] = []
        self.server: LlamaServer | RpcCluster
        if rpc_workers:
            self.workers = _place_workers(rpc_workers)
            try:
                self._addresses = ray.get([worker.address.remote() for worker in self.workers], timeout=120)
                self.server = RpcCluster(args, self._addresses, **options)
                self.server.start()
            except BaseException:
                _stop_workers(self.workers)
                raise
        else:
            self.server = LlamaServer(args, **options)
            self.server.start()
        #: Which replica answered (its process id), on every relayed answer.
        self._tag = {"X-Llama-Proc-Replica": str(os.getpid())}
        _log.info("replica pid %s: llama-server pid %s at %s", os.getpid(), self.server.pid, self.server.base_url)
        self._directory = directory
        self._ttl = ttl
        host = node if args.host in ("0.0.0.0", "::") else args.host  # a wildcard: the node's address
        self._entry = {
            "replica": _replica_tag(),
            "node": node,
            "pid": os.getpid(),
            "url": f"http://{url_host(host)}:{urlsplit(self.server.base_url).port}",
            "api_key": self.server.api_key,
        }
        self._announce()

    def _announce(self) -> None:
        """List this replica in the directory for ``ttl`` seconds (not waited for: a directory that
        is slow or being replaced must not hold up requests or fail this replica's health check)."""
        if self._directory is not None:
            self._directory.register.remote(self._entry, self._ttl)

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

    async def check_health(self) -> None:
        """Ray's health check: llama-server answers ``/health`` (else Ray replaces the replica).
        A replica of a direct deployment renews its directory entry each time it passes."""
        await asyncio.to_thread(self.server.health, timeout=5)
        if self.workers:  # a lost worker fails the replica at once, before a call finds it
            running = await asyncio.wait_for(asyncio.gather(*(w.is_running.remote() for w in self.workers)), 5)
            for up, address in zip(running, self._addresses):
                if not up:
                    raise RpcWorkerError(address, "its rpc-server stopped")
        self._announce()

    def __del__(self) -> None:  # Serve's shutdown of a replica
        directory, entry = getattr(self, "_directory", None), getattr(self, "_entry", None)
        if directory is not None and entry is not None:
            try:
                directory.unregister.remote(entry["replica"])
            except Exception:  # the entry expires anyway
                _log.debug("could not unlist replica %s", entry["replica"], exc_info=True)
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
        _stop_workers(getattr(self, "workers", []))

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

    async def placement(self) -> dict[str, Any]:
        """Where this replica runs: its Ray ``node`` id, and its rpc-server ``workers`` (each one's
        ``address`` and ``node``)."""
        import ray

        nodes = await asyncio.gather(*(worker.node.remote() for worker in self.workers))
        workers = [{"address": address, "node": node} for address, node in zip(self._addresses, nodes)]
        return {"node": str(ray.get_runtime_context().get_node_id()), "workers": workers}

    def server_address(self) -> tuple[str, str | None]:
        """This replica's llama-server: its URL and API key."""
        return self._entry["url"], self.server.api_key


class RpcWorkerActor:
    """A Ray actor that runs one ``rpc-server`` on its node, listening on the node's address (the
    workers of a replica made by ``deployment(..., rpc_workers=N)``). It computes on as many
    threads as it has CPUs; with GPUs it serves them with the CUDA build. Its rpc-server stops
    with it, however it ends (the process guardian of :class:`~llama_proc.rpc.RpcWorker`)."""

    def __init__(self) -> None:
        import ray

        context: Any = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 0.0)
        util: Any = ray.util
        executable = find_executable("cuda", name="rpc-server") if ray.get_gpu_ids() else None
        self._node = str(context.get_node_id())
        self.worker = RpcWorker(executable, host=util.get_node_ip_address(), threads=max(1, int(cpus)))
        self.worker.start()

    def address(self) -> str:
        """``host:port`` for llama-server's ``--rpc``."""
        return self.worker.address

    def node(self) -> str:
        """The Ray node id this worker runs on."""
        return self._node

    def is_running(self) -> bool:
        """The rpc-server's process is alive."""
        return self.worker.is_running()

    def stop(self) -> int | None:
        """Stop the rpc-server; its exit status."""
        return self.worker.stop()


def _place_workers(options: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One :class:`RpcWorkerActor` in each bundle after the replica's own in its placement group,
    ready (their rpc-servers listening) when this returns."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    util: Any = ray.util
    group = util.get_current_placement_group()
    if group is None:
        raise ConfigError(["rpc_workers: the replica has no placement group; make it with deployment(rpc_workers=N)"])
    actor: Any = ray.remote(RpcWorkerActor)
    workers = [
        actor.options(
            **dict(each),
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index + 1),
        ).remote()
        for index, each in enumerate(options)
    ]
    try:
        ray.get([worker.node.remote() for worker in workers], timeout=120)
    except BaseException:
        _stop_workers(workers)
        raise
    return workers


def _stop_workers(workers: Sequence[Any]) -> None:
    """Stop each worker's rpc-server, then its actor."""
    import ray

    if not workers:
        return
    try:
        ray.get([worker.stop.remote() for worker in workers], timeout=15)
    except Exception:  # a worker already gone: killing its actor is all there is to do
        _log.debug("could not stop every rpc-server", exc_info=True)
    for worker in workers:
        ray.kill(worker)


def _replica_tag() -> str:
    try:
        context: Any = _serve().get_replica_context()
        return str(context.replica_tag)
    except Exception:  # outside Serve (a replica made by hand)
        return f"{os.uname().nodename}:{os.getpid()}"


class ReplicaDirectory:
    """The llama-servers of a direct deployment's replicas (one small Serve deployment beside
    them, named with :data:`DIRECTORY_SUFFIX`). A replica is listed after it starts and again
    after each health check it passes; an entry not renewed within its time to live is dropped,
    so the list follows Ray's view of which replicas are healthy."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def register(self, entry: dict[str, Any], ttl: float) -> None:
        """List (or renew) ``entry`` for ``ttl`` seconds."""
        self._entries[entry["replica"]] = (time.monotonic() + ttl, entry)

    def unregister(self, replica: str) -> None:
        """Drop a replica that is shutting down."""
        self._entries.pop(replica, None)

    def replicas(self) -> list[dict[str, Any]]:
        """The entries still in date: ``replica``, ``node``, ``pid``, ``url``, ``api_key``."""
        now = time.monotonic()
        self._entries = {tag: item for tag, item in self._entries.items() if item[0] > now}
        return [entry for _, entry in self._entries.values()]


def deployment(
    args: LlamaServerArgs,
    *,
    num_replicas: int | str | None = 1,
    autoscaling_config: Mapping[str, Any] | None = None,
    ray_actor_options: Mapping[str, Any] | None = None,
    name: str = "llama",
    health_check_period_s: float = 2.0,
    max_ongoing_requests: int = 32,
    direct: bool = False,
    rpc_workers: int = 0,
    rpc_worker_options: Mapping[str, Any] | None = None,
    **server_options: Any,
) -> Any:
    """A Ray Serve application of ``num_replicas`` replicas, each running a llama-server for ``args``.

    :param autoscaling_config: Serve's autoscaling (then ``num_replicas`` is not used).
    :param ray_actor_options: each replica's resources (``{"num_gpus": 1}`` runs the CUDA build;
        its ``num_cpus`` is the llama-server's thread count, at least one).
    :param max_ongoing_requests: requests Serve sends one replica at once (Serve's own default, 5,
        leaves a llama-server idle between short calls; the server queues what its slots cannot take).
    :param direct: list the replicas' llama-servers for :class:`DirectClient`. Each llama-server
        then listens on its node's address (unless ``args.host`` names another one than loopback),
        where anyone on the cluster's network can reach it: set ``args.api_key``.
    :param rpc_workers: ``rpc-server`` workers per replica, for a model larger than one node: each
        replica and its workers are placed on distinct nodes (a STRICT_SPREAD placement group, so the
        cluster needs ``rpc_workers + 1`` nodes with room for them), and the replica's llama-server
        spreads the model over them (all layers offloaded unless ``n_gpu_layers`` is set). The
        workers listen on their nodes' addresses without authentication: keep the cluster's
        network private.
    :param rpc_worker_options: each worker's resources, ``{"num_cpus": 1}`` by default (its thread
        count; ``num_gpus`` runs the CUDA build).
    :param server_options: keyword options of :class:`~llama_proc.server.LlamaServer`.
    :returns: the application, for ``serve.run(app, route_prefix=...)``.
    :raises ImportError: without Ray (``pip install 'llama-proc[ray]'``).
    :raises ConfigError: for ``api_key="auto"``, which would give each replica a key of its own.
    """
    serve = _serve()
    if args.api_key == "auto":
        raise ConfigError(
            ["api_key: 'auto' would give each replica its own key; pass one key, e.g. secrets.token_urlsafe()"]
        )
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
    workers: list[dict[str, Any]] = []
    if rpc_workers:
        worker = dict(rpc_worker_options or {"num_cpus": 1})
        workers = [worker] * rpc_workers
        options["placement_group_bundles"] = [_bundle(options["ray_actor_options"]), *[_bundle(worker)] * rpc_workers]
        options["placement_group_strategy"] = "STRICT_SPREAD"
    replicas = serve.deployment(LlamaReplica, **options)
    directory = None
    if direct:
        directory = serve.deployment(
            ReplicaDirectory, name=name + DIRECTORY_SUFFIX, num_replicas=1, ray_actor_options={"num_cpus": 0}
        ).bind()
    # a directory entry outlives two missed health checks and a slow one
    return replicas.bind(args, server_options, directory, 2 * health_check_period_s + 5.0, workers)


def _bundle(actor_options: Mapping[str, Any]) -> dict[str, float]:
    """The placement-group bundle of an actor with ``actor_options``."""
    bundle = {"CPU": float(actor_options.get("num_cpus", 1))}
    if actor_options.get("num_gpus"):
        bundle["GPU"] = float(actor_options["num_gpus"])
    bundle.update(actor_options.get("resources", {}))
    return bundle


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


class DirectClient(Endpoints):
    """The calls of a :class:`LlamaServer`, sent straight to the llama-servers of a deployment made
    with ``direct=True``: no Serve proxy or handle hop, for callers inside the cluster.

    Calls go round robin over the replicas that the deployment's :class:`ReplicaDirectory` lists
    (those whose latest Ray health check passed), fetched again every ``refresh_s`` seconds. A
    call that a replica cannot take because nothing listens there any more (it stopped, or Ray
    replaced it) goes to the next replica: it was never sent. ``openai_client()`` talks to one
    replica, the next in turn when it is made.

    :param handle: the application's handle (what ``serve.run`` returns, or ``serve.get_app_handle``).
    :param refresh_s: how old the replica list may get.
    :param wait_s: how long a call waits for a first replica to be listed.
    :param request_timeout: ``(connect, read)`` seconds of each call.
    :param pool_maxsize: connections kept open to each llama-server at most.
    :raises ImportError: without Ray.
    """

    def __init__(
        self,
        handle: DeploymentHandle[Any],
        *,
        refresh_s: float = 5.0,
        wait_s: float = 60.0,
        request_timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        pool_maxsize: int = DEFAULT_ATTACHED_POOL_SIZE,
    ) -> None:
        serve = _serve()
        self._name = f"{handle.app_name}/{handle.deployment_name}"
        try:
            self._directory = serve.get_deployment_handle(handle.deployment_name + DIRECTORY_SUFFIX, handle.app_name)
        except KeyError:  # Serve's answer for a deployment that does not exist
            raise self._not_direct() from None
        self._refresh_s = refresh_s
        self._wait_s = wait_s
        self._client_options: dict[str, Any] = {"timeout": request_timeout, "pool_maxsize": pool_maxsize}
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str | None], LlamaClient] = {}
        self._live: list[LlamaClient] = []
        self._turn = itertools.count()
        self._stale_at = 0.0
        self._closed = False
        self._local = threading.local()  # the client of this thread's current call

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas listed now: their ``replica`` tag, ``node``, ``pid`` and llama-server ``url``.

        :raises ConfigError: when the deployment was not made with ``direct=True``.
        """
        return [{k: v for k, v in entry.items() if k != "api_key"} for entry in self._fetch()]

    def _fetch(self) -> list[dict[str, Any]]:
        try:
            entries: list[dict[str, Any]] = self._directory.replicas.remote().result(timeout_s=30)
        except KeyError:  # the application was deployed again, without direct=True
            raise self._not_direct() from None
        return entries

    def _not_direct(self) -> ConfigError:
        return ConfigError([f"{self._name}: its replicas are not listed; deploy it with deployment(args, direct=True)"])

    def _refresh(self) -> None:
        """Fetch the replica list (the lock held): keep the clients of replicas still listed,
        close the others, and wait up to ``wait_s`` for a first replica."""
        deadline = time.monotonic() + self._wait_s
        entries = self._fetch()
        while not entries and time.monotonic() < deadline:
            time.sleep(0.5)
            entries = self._fetch()
        if not entries:
            raise APIConnectionError(f"no replica of {self._name} was listed within {self._wait_s:g} s")
        clients: dict[tuple[str, str | None], LlamaClient] = {}
        for entry in entries:
            key = (entry["url"], entry.get("api_key"))
            kept = self._clients.pop(key, None)
            clients[key] = kept or LlamaClient(entry["url"], api_key=entry.get("api_key"), **self._client_options)
        for gone in self._clients.values():
            gone.close()
        self._clients = clients
        self._live = list(clients.values())
        self._stale_at = time.monotonic() + self._refresh_s

    def _pick(self) -> LlamaClient:
        with self._lock:
            if self._closed:
                raise APIConnectionError(f"the DirectClient of {self._name} is closed")
            if not self._live or time.monotonic() >= self._stale_at:
                self._refresh()
            return self._live[next(self._turn) % len(self._live)]

    def _drop(self, client: LlamaClient) -> None:
        """Stop sending to a replica that refused a connection, until the next refresh lists it."""
        with self._lock:
            if client in self._live:
                self._live.remove(client)

    def _http(self) -> LlamaClient:
        client: LlamaClient | None = getattr(self._local, "client", None)
        return client if client is not None else self._pick()

    def _failover(self, send: Callable[[], _T]) -> _T:
        """``send()`` on one replica after another while they refuse the connection."""
        tries = max(len(self._live), 1) + 1
        for attempt in range(tries):
            self._local.client = client = self._pick()
            try:
                return send()
            except (ConnectionRefused, ConnectTimeout):  # not sent: the next replica can take it
                self._drop(client)
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def _call(
        self, method: str, path: str, body: Any = None, *, stream: bool = False, timeout: Timeout | object = ...
    ) -> requests.Response:
        send = super()._call
        return self._failover(lambda: send(method, path, body, stream=stream, timeout=timeout))

    def forward(
        self,
        method: str,
        path: str,
        json: Any = None,
        stream: bool = False,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout | object = ...,
    ) -> requests.Response:
        """Send a request as it is to the next replica (see :meth:`LlamaServer.forward`)."""
        send = super().forward
        return self._failover(lambda: send(method, path, json, stream, data=data, headers=headers, timeout=timeout))

    def close(self) -> None:
        """Close the connections to every replica."""
        with self._lock:
            self._closed = True
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            self._live = []

    def __enter__(self) -> DirectClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
