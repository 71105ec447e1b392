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
fails at start with :class:`~llama_proc.errors.ModelNotFound` naming the node (``serve.run``
raises Serve's ``RuntimeError``; ``serve.status()`` ends with the replica's error).

One application serves one model: a second model is a second application (its own route prefix
and replicas, scaled on its own), which keeps each model's replicas, health and autoscaling apart.

A model larger than one node: ``deployment(args, rpc_workers=2)`` gives each replica its own
``rpc-server`` workers, Ray actors placed with the replica on distinct nodes (a STRICT_SPREAD
placement group), and the replica's llama-server spreads the model over them.

Callers inside the cluster can skip Serve's proxy: ``deployment(args, direct=True)`` lists each
replica's llama-server address in the application, and :class:`DirectClient` sends calls straight
to them, round robin, over the replicas that pass Ray's health checks.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import itertools
import logging
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from .binaries import find_executable
from .client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, Endpoints, LlamaClient, Timeout
from .config import LlamaServerArgs
from .errors import (
    APIConnectionError,
    APITimeoutError,
    ConfigError,
    ConnectionRefused,
    ConnectTimeout,
    ModelNotFound,
    PoolTimeout,
    RpcWorkerError,
)
from .readiness import is_loopback, url_host
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

#: Seconds a shutting-down replica of a direct deployment keeps its llama-server after leaving the
#: directory, so that DirectClients (which fetch the list every 5 s by default) stop sending to it.
DRAIN_S = 5.0

#: Seconds it then waits at most for the calls they sent to end (within Serve's 30 s for a shutdown).
IDLE_WAIT_S = 15.0

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

    Calls to the llama-server run on the replica's own threads, ``concurrency`` of them (Serve's
    ``max_ongoing_requests``), and its health check on one more, so that neither waits on the other.
    """

    def __init__(
        self,
        args: LlamaServerArgs,
        server_options: Mapping[str, Any],
        directory: DeploymentHandle[Any] | None = None,
        ttl: float = 0.0,
        rpc_workers: Sequence[Mapping[str, Any]] = (),
        concurrency: int = 32,
    ) -> None:
        import ray

        context: Any = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 0.0)
        args, options = _fitted(args, server_options, cpus, bool(ray.get_gpu_ids()))
        util: Any = ray.util
        node = util.get_node_ip_address()
        if isinstance(args.model, Path) and not args.model.is_file():
            raise ModelNotFound(f"{args.model} (on node {node}: the model must exist on every node)")
        if directory is not None and is_loopback(args.host):
            args = args.evolve(host=node)  # reachable from the other nodes, for DirectClient
        self._api_key = args.api_key
        self._directory = directory
        self._ttl = ttl
        self._entry: dict[str, Any] | None = None
        self._calls = ThreadPoolExecutor(concurrency + 2, thread_name_prefix="llama-replica")
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="llama-replica-health")
        self._closed = False
        #: The replica's rpc-server workers (Ray actors), when it has any.
        self.workers: list[Any] = []
        self._addresses: list[str] = []
        self.server: LlamaServer | RpcCluster
        if rpc_workers:
            self.workers, self._addresses = _place_workers(rpc_workers)
            try:
                self.server = RpcCluster(args, self._addresses, **options)
                self.server.start()
            except BaseException:
                _stop_workers(self.workers)
                self.workers = []
                raise
        else:
            self.server = LlamaServer(args, **options)
            self.server.start()
        #: Which replica answered (its process id), on every relayed answer.
        self._tag = {"X-Llama-Proc-Replica": str(os.getpid())}
        _log.info("replica pid %s: llama-server pid %s at %s", os.getpid(), self.server.pid, self.server.base_url)
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
        if self._directory is not None and self._entry is not None:
            self._directory.register.remote(self._entry, self._ttl)

    async def _run(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``call`` on the replica's call threads (the event loop must not block on the server)."""
        return await asyncio.get_running_loop().run_in_executor(self._calls, functools.partial(call, *args, **kwargs))

    async def __call__(self, request: Any) -> Any:
        """Relay an HTTP request from the Serve proxy: the body as bytes, the answer's status and
        body as they are, a stream of server-sent events as its bytes arrive."""
        from starlette.responses import Response, StreamingResponse

        path = request.url.path
        prefix = request.scope.get("root_path", "").rstrip("/")  # the application's route prefix
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix) :]
        if path not in ROUTES:
            return _error(404, f"no route {path} (routes: {', '.join(sorted(ROUTES))})", "not_found_error")
        if (
            self._api_key is not None
            and path != "/health"
            and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {self._api_key}".encode()
            )
        ):
            return _error(401, "invalid API key", "authentication_error")
        body = await request.body()
        headers = {"Content-Type": request.headers.get("content-type", "application/json")}
        target = f"{path}?{request.url.query}" if request.url.query else path
        try:
            response = await self._run(
                self.server.forward, request.method, target, stream=True, data=body or None, headers=headers
            )
        except (ConnectTimeout, PoolTimeout) as exc:  # not sent
            return _error(503, f"the replica's llama-server cannot take it now: {exc.reason}", "unavailable_error")
        except APITimeoutError as exc:  # sent, and no answer in time
            return _error(504, f"the replica's llama-server did not answer: {exc.reason}", "timeout_error")
        except APIConnectionError as exc:  # the llama-server is gone: Ray's health check will see it
            return _error(503, f"the replica's llama-server cannot be reached: {exc.reason}", "unavailable_error")
        media = response.headers.get("Content-Type", "application/json")
        if "text/event-stream" in media:
            chunks = response.iter_content(None)

            async def relay() -> Any:
                try:
                    while (chunk := await self._run(next, chunks, None)) is not None:
                        yield chunk
                finally:
                    response.close()

            return StreamingResponse(relay(), status_code=response.status_code, media_type=media, headers=self._tag)
        try:
            content = await self._run(lambda: response.content)
        finally:
            response.close()
        return Response(content, status_code=response.status_code, media_type=media, headers=self._tag)

    async def check_health(self) -> None:
        """Ray's health check: llama-server answers ``/health`` and every rpc-server worker runs
        (else Ray replaces the replica). A replica of a direct deployment then renews its
        directory entry."""
        await asyncio.get_running_loop().run_in_executor(self._checks, functools.partial(self.server.health, timeout=5))
        if self.workers:  # a lost worker fails the replica at once, before a call finds it
            running = await asyncio.wait_for(asyncio.gather(*(w.is_running.remote() for w in self.workers)), 5)
            for up, address in zip(running, self._addresses):
                if not up:
                    raise RpcWorkerError(address, "its rpc-server stopped")
        self._announce()

    def __del__(self) -> None:  # Serve's shutdown of a replica (and, later, the garbage collector)
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            if self._directory is not None and self._entry is not None:
                try:
                    self._directory.unregister.remote(self._entry["replica"])
                except Exception:  # the entry expires anyway
                    _log.debug("could not unlist replica %s", self._entry["replica"], exc_info=True)
                time.sleep(DRAIN_S)  # DirectClients see the list without it before the server goes
                _wait_idle(self.server, IDLE_WAIT_S)  # and the calls they sent before that end
            server = getattr(self, "server", None)
            if server is not None:
                server.stop()
        finally:
            _stop_workers(self.workers)
            self._calls.shutdown(wait=False)
            self._checks.shutdown(wait=False)

    # -- for DeploymentHandle callers (see ServeClient) -----------------------------------------

    async def chat_completions(self, request: Mapping[str, Any]) -> Any:
        """A chat completion, as :meth:`LlamaServer.chat_completions` returns it."""
        return await self._run(self.server.chat_completions, request, stream=False)

    async def chat_completions_stream(self, request: Mapping[str, Any]) -> AsyncIterator[Any]:
        """The chunks of a streamed chat completion."""
        stream = await self._run(self.server.chat_completions, request, stream=True)
        try:
            while (chunk := await self._run(next, stream, None)) is not None:
                yield chunk
        finally:
            stream.close()

    async def completions(self, request: Mapping[str, Any]) -> Any:
        """A completion, as :meth:`LlamaServer.completions` returns it."""
        return await self._run(self.server.completions, request, stream=False)

    async def embeddings(self, request: Mapping[str, Any]) -> Any:
        """Embeddings, as :meth:`LlamaServer.embeddings` returns them."""
        return await self._run(self.server.embeddings, request)

    async def tokenize(self, request: Mapping[str, Any] | str) -> Any:
        """Tokens, as :meth:`LlamaServer.tokenize` returns them."""
        return await self._run(self.server.tokenize, request)

    async def placement(self) -> dict[str, Any]:
        """Where this replica runs: its Ray ``node`` id, and its rpc-server ``workers`` (each one's
        ``address`` and ``node``)."""
        import ray

        nodes = await asyncio.gather(*(worker.node.remote() for worker in self.workers))
        workers = [{"address": address, "node": node} for address, node in zip(self._addresses, nodes)]
        return {"node": str(ray.get_runtime_context().get_node_id()), "workers": workers}

    async def server_address(self) -> tuple[str, str | None]:
        """This replica's llama-server: its URL and API key."""
        url = self._entry["url"] if self._entry is not None else self.server.base_url
        return url, self.server.api_key


def _fitted(
    args: LlamaServerArgs, server_options: Mapping[str, Any], cpus: float, gpus: bool
) -> tuple[LlamaServerArgs, dict[str, Any]]:
    """``args`` and the server's options fitted to a replica with ``cpus`` CPUs and maybe GPUs:
    as many compute threads as CPUs (at least one) unless ``threads`` is set, and with GPUs the
    CUDA build with every layer offloaded unless ``variant`` or ``n_gpu_layers`` says otherwise.

    (llama.cpp's threads spin while they wait: replicas that each took every core of a node
    would slow each other down many times.)
    """
    options = dict(server_options)
    if args.threads is None:
        args = args.evolve(threads=max(1, int(cpus)))
    if gpus:
        options.setdefault("variant", "cuda")
        if args.n_gpu_layers is None:
            args = args.evolve(n_gpu_layers=-1)
    return args, options


def _wait_idle(server: LlamaServer | RpcCluster, timeout: float) -> None:
    """Wait until no slot of ``server`` is processing a request, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not any(slot.get("is_processing") for slot in server.slots(timeout=2)):
                return
        except Exception:  # no /slots on this build, or the server is gone: nothing to wait for
            return
        time.sleep(0.2)


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


def _place_workers(options: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[str]]:
    """One :class:`RpcWorkerActor` in each bundle of the replica's placement group but its own,
    ready (their rpc-servers listening) when this returns: the actors and their addresses.

    :raises RpcWorkerError: when they cannot all be placed within :data:`_PLACE_TIMEOUT_S`.
    """
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    util: Any = ray.util
    group = util.get_current_placement_group()
    if group is None:
        raise ConfigError(["rpc_workers: the replica has no placement group; make it with deployment(rpc_workers=N)"])
    actor: Any = ray.remote(RpcWorkerActor)
    # no bundle index: each bundle is exactly one actor's resources, so each worker takes a bundle
    # the replica does not hold (Serve before 2.5x places a replica in any bundle that fits it)
    strategy = PlacementGroupSchedulingStrategy(group)
    workers = [actor.options(**dict(each), max_restarts=0, scheduling_strategy=strategy).remote() for each in options]
    try:
        addresses: list[str] = ray.get([worker.address.remote() for worker in workers], timeout=_PLACE_TIMEOUT_S)
    except GetTimeoutError:
        _stop_workers(workers)
        raise RpcWorkerError(
            "(not placed)", f"the replica's placement group had no room for its workers within {_PLACE_TIMEOUT_S:g} s"
        ) from None
    except BaseException:
        _stop_workers(workers)
        raise
    return workers, addresses


#: Seconds a replica waits for its RPC workers' rpc-servers to listen.
_PLACE_TIMEOUT_S = 120.0


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
    after each health check it passes, and unlisted when it shuts down; an entry not renewed
    within its time to live (two health-check periods and 5 s) is dropped, so the list follows
    Ray's view of which replicas are healthy within that delay."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._gone: dict[str, float] = {}  # unlisted replicas: a renewal sent before is ignored

    # async: Serve runs them on the replica's event loop, one at a time (no lock needed)

    async def register(self, entry: dict[str, Any], ttl: float) -> None:
        """List (or renew) ``entry`` for ``ttl`` seconds."""
        now = time.monotonic()
        self._gone = {tag: until for tag, until in self._gone.items() if until > now}
        if entry["replica"] not in self._gone:
            self._entries[entry["replica"]] = (now + ttl, entry)

    async def unregister(self, replica: str) -> None:
        """Drop a replica that is shutting down."""
        expiry, _ = self._entries.pop(replica, (time.monotonic() + 60.0, None))
        self._gone[replica] = expiry

    async def replicas(self) -> list[dict[str, Any]]:
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
        where anyone on the cluster's network can reach it: set ``args.api_key`` (without one, a
        warning says so). Serve's autoscaling counts only the requests that pass through Serve,
        not DirectClient's.
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
    :raises ConfigError: listing what is wrong: ``args`` not :class:`LlamaServerArgs`, an unknown
        server option, ``rpc_workers`` not a whole number, RPC workers without resources, or
        ``api_key="auto"`` (which would give each replica a key of its own). A relative model path
        is made absolute here, where the driver runs.
    """
    serve = _serve()
    args = _checked(args, direct, rpc_workers, rpc_worker_options, server_options)
    if args.api_key == "auto":
        raise ConfigError(
            ["api_key: 'auto' would give each replica its own key; pass one key, e.g. secrets.token_urlsafe()"]
        )
    if direct and args.api_key is None:
        warnings.warn(
            "deployment(direct=True) without args.api_key: every llama-server of the deployment answers "
            "anyone on the cluster's network",
            UserWarning,
            stacklevel=2,
        )
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": dict(ray_actor_options or {"num_cpus": 1}),
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 30.0,
        "max_ongoing_requests": max_ongoing_requests,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    workers: list[dict[str, Any]] = []
    if rpc_workers:
        _warn_if_too_few_nodes(rpc_workers + 1)
        worker = dict(rpc_worker_options or {"num_cpus": 1})
        workers = [worker] * rpc_workers
        options["placement_group_bundles"] = [_bundle(options["ray_actor_options"]), *[_bundle(worker)] * rpc_workers]
        options["placement_group_strategy"] = "STRICT_SPREAD"
    replicas = serve.deployment(LlamaReplica, **options)
    directory = None
    if direct:
        directory = serve.deployment(
            ReplicaDirectory,
            name=name + DIRECTORY_SUFFIX,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            logging_config={"enable_access_log": False},  # a renewal per replica every health check
        ).bind()
    # a directory entry outlives two missed health checks and a slow one
    ttl = 2 * health_check_period_s + 5.0
    return replicas.bind(args, server_options, directory, ttl, workers, max_ongoing_requests)


def _checked(
    args: LlamaServerArgs,
    direct: bool,
    rpc_workers: int,
    rpc_worker_options: Mapping[str, Any] | None,
    server_options: Mapping[str, Any],
) -> LlamaServerArgs:
    """``args`` with the model path made absolute (the replicas run elsewhere).

    :raises ConfigError: listing every argument of :func:`deployment` that is wrong.
    """
    if not isinstance(args, LlamaServerArgs):
        raise ConfigError([f"args: expected LlamaServerArgs, got {type(args).__name__}"])
    problems = []
    if not isinstance(direct, bool):
        problems.append(f"direct: expected True or False, got {direct!r}")
    if not isinstance(rpc_workers, int) or isinstance(rpc_workers, bool) or rpc_workers < 0:
        problems.append(f"rpc_workers: expected a whole number >= 0, got {rpc_workers!r}")
    elif rpc_worker_options is not None and not rpc_workers:
        problems.append("rpc_worker_options: given without rpc_workers (how many workers each replica gets)")
    known = set(inspect.signature(LlamaServer).parameters) - {"executable_path", "args"}
    if rpc_workers:  # RpcCluster runs the server: its own options, and LlamaServer's but the executable
        known |= set(inspect.signature(RpcCluster).parameters) - {"server_args", "workers", "server_options"}
    else:
        known.add("executable_path")
    unknown = sorted(set(server_options) - known)
    if unknown:
        problems.append(f"server options: {', '.join(unknown)} unknown (known: {', '.join(sorted(known))})")
    if problems:
        raise ConfigError(problems)
    if isinstance(args.model, Path) and not args.model.is_absolute():
        args = args.evolve(model=args.model.absolute())
    return args


def _warn_if_too_few_nodes(needed: int) -> None:
    """Warn when the cluster this driver is connected to has fewer live nodes than one replica
    and its workers need (Serve would wait for more, with no word of why)."""
    import ray

    if not ray.is_initialized():
        return
    nodes: Any = ray.nodes
    alive = len([node for node in nodes() if node.get("Alive")])
    if alive < needed:
        warnings.warn(
            f"each replica and its RPC workers need {needed} distinct nodes (STRICT_SPREAD), and the cluster "
            f"has {alive}: Serve will wait until enough nodes join",
            UserWarning,
            stacklevel=3,
        )


def _bundle(actor_options: Mapping[str, Any]) -> dict[str, float]:
    """The placement-group bundle of an actor with ``actor_options``.

    :raises ConfigError: when it asks for no resource at all (Ray refuses an empty bundle).
    """
    bundle = {"CPU": float(actor_options.get("num_cpus", 1))}
    if actor_options.get("num_gpus"):
        bundle["GPU"] = float(actor_options["num_gpus"])
    if actor_options.get("memory"):
        bundle["memory"] = float(actor_options["memory"])
    bundle.update(actor_options.get("resources", {}))
    bundle = {name: amount for name, amount in bundle.items() if amount}
    if not bundle:
        raise ConfigError([f"rpc_workers: {dict(actor_options)!r} asks for no resource; give num_cpus > 0"])
    return bundle


def _handle(handle: Any) -> Any:
    """:raises TypeError: for anything but a Serve handle (``serve.run``'s, ``serve.get_app_handle``)."""
    if not (hasattr(handle, "app_name") and hasattr(handle, "deployment_name")):
        raise TypeError(
            f"handle: expected the DeploymentHandle that serve.run() or serve.get_app_handle() returns, "
            f"got {type(handle).__name__}"
        )
    return handle


def _body(request: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(request, Mapping):
        raise TypeError(f"request: expected a dict such as {{'messages': [...]}}, got {type(request).__name__}")
    return dict(request)


class ServeClient:
    """The calls of a :class:`LlamaServer` through a Serve ``DeploymentHandle`` of :func:`deployment`,
    for callers inside the cluster: the same dict shapes, routed by Serve to a replica."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self._handle = _handle(handle)

    def chat_completions(self, request: Mapping[str, Any], *, stream: bool = False) -> Any:
        """A chat completion dict, or with ``stream=True`` an iterator of chunk dicts."""
        if stream:
            chunks: Any = self._handle.options(stream=True).chat_completions_stream.remote(_body(request))
            return iter(chunks)
        return self._handle.chat_completions.remote(_body(request)).result()

    def completions(self, request: Mapping[str, Any]) -> Any:
        """A completion dict."""
        return self._handle.completions.remote(_body(request)).result()

    def embeddings(self, request: Mapping[str, Any]) -> Any:
        """An embeddings dict."""
        return self._handle.embeddings.remote(_body(request)).result()

    def tokenize(self, request: Mapping[str, Any] | str) -> Any:
        """A tokenize answer dict."""
        return self._handle.tokenize.remote(request).result()


class DirectClient(Endpoints):
    """The calls of a :class:`LlamaServer`, sent straight to the llama-servers of a deployment made
    with ``direct=True``: no Serve proxy or handle hop, for callers inside the cluster.

    Calls go round robin over the replicas that the deployment's :class:`ReplicaDirectory` lists,
    fetched again every ``refresh_s`` seconds by one calling thread while the others go on with the
    list they have (when a fetch fails, the last list is kept). A call that a replica cannot take
    because nothing listens there any more, or its host cannot be reached, goes to the next replica:
    it was never sent. That replica is skipped until a fetch after ``refresh_s``. Each
    ``openai_client()`` talks to one replica, the next in turn.

    :param handle: the application's handle (what ``serve.run`` returns, or ``serve.get_app_handle``).
    :param refresh_s: how old the replica list may get.
    :param wait_s: how long a call waits for a first replica to be listed.
    :param request_timeout: ``(connect, read)`` seconds of each call.
    :param pool_maxsize: connections kept open to each llama-server at most.
    :raises ImportError: without Ray.
    :raises TypeError: when ``handle`` is not a Serve handle.
    :raises ConfigError: when the deployment was not made with ``direct=True``.
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
        handle = _handle(handle)
        self._name = f"{handle.app_name}/{handle.deployment_name}"
        try:
            self._directory = serve.get_deployment_handle(handle.deployment_name + DIRECTORY_SUFFIX, handle.app_name)
        except KeyError:  # Serve's answer for a deployment that does not exist
            raise self._not_direct() from None
        self._refresh_s = refresh_s
        self._wait_s = wait_s
        # no connect retries: a replica that refuses is failed over at once
        self._client_options: dict[str, Any] = {
            "timeout": request_timeout,
            "pool_maxsize": pool_maxsize,
            "connect_retries": 0,
        }
        self._lock = threading.Lock()  # the lists below
        self._fetching = threading.Lock()  # one fetch of the directory at a time
        self._clients: dict[tuple[str, str | None], LlamaClient] = {}
        self._live: list[LlamaClient] = []
        self._down: dict[str, float] = {}  # url -> until when it is skipped
        self._retired: list[LlamaClient] = []  # unlisted: closed one fetch later, when no call holds them
        self._turn = itertools.count()
        self._stale_at = 0.0
        self._wait_until = 0.0  # when the calls waiting for a first list give up
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
        """Fetch the replica list: one thread fetches; the others go on with the list they have,
        or, with none, wait for that fetch. Calls that find no list wait together: up to
        ``wait_s`` after the first of them came."""
        arrived = time.monotonic()
        with self._lock:
            have = bool(self._clients)
            if not have and self._wait_until < arrived:  # no wait going on: this call starts one
                self._wait_until = arrived + self._wait_s
            deadline = self._wait_until
        # a fetch takes up to 30 s: a thread waiting for the lock gives that much beyond the deadline
        if not self._fetching.acquire(blocking=not have, timeout=-1 if have else deadline - arrived + 35):
            if have:
                return
            raise APIConnectionError(f"no replica list of {self._name} within {self._wait_s:g} s")
        try:
            if time.monotonic() < self._stale_at and self._clients:
                return  # another thread fetched it meanwhile
            self._install(self._fetch_listed(have, deadline))
        finally:
            self._fetching.release()

    def _fetch_listed(self, have: bool, deadline: float) -> list[dict[str, Any]]:
        """The entries, waiting until ``deadline`` for a first one when there is no list yet."""
        try:
            entries = self._fetch()
            while not entries and not have and time.monotonic() < deadline:
                time.sleep(0.5)
                entries = self._fetch()
        except ConfigError:
            raise
        except Exception as exc:  # Ray cannot be asked: keep the list there is
            if have:
                _log.warning("could not fetch the replicas of %s (%s); keeping the last list", self._name, exc)
                return []
            raise APIConnectionError(f"the replicas of {self._name} could not be listed: {exc}") from None
        if not entries and not have:
            raise APIConnectionError(f"no replica of {self._name} was listed within {self._wait_s:g} s")
        return entries

    def _install(self, entries: list[dict[str, Any]]) -> None:
        with self._lock:
            now = time.monotonic()
            self._stale_at = now + self._refresh_s
            if self._closed or (not entries and self._clients):
                return  # the fetch failed, or listed none: keep sending where calls went
            clients: dict[tuple[str, str | None], LlamaClient] = {}
            for entry in entries:
                key = (entry["url"], entry.get("api_key"))
                kept = self._clients.pop(key, None)
                clients[key] = kept or LlamaClient(entry["url"], api_key=entry.get("api_key"), **self._client_options)
            for old in self._retired:
                old.close()
            self._retired = list(self._clients.values())
            self._clients = clients
            self._down = {url: until for url, until in self._down.items() if until > now}
            self._live = [client for (url, _), client in clients.items() if url not in self._down]

    def _pick(self) -> LlamaClient:
        if self._closed:
            raise APIConnectionError(f"the DirectClient of {self._name} is closed")
        if not self._clients or time.monotonic() >= self._stale_at:
            self._refresh()
        with self._lock:
            # when every replica was skipped, try them all again rather than fail every call
            pool = self._live or list(self._clients.values())
            if not pool:
                raise APIConnectionError(f"the DirectClient of {self._name} is closed")
            return pool[next(self._turn) % len(pool)]

    def _drop(self, client: LlamaClient) -> None:
        """Skip a replica that could not be reached, until a fetch after ``refresh_s``."""
        with self._lock:
            self._down[client.base_url] = time.monotonic() + self._refresh_s
            if client in self._live:
                self._live.remove(client)

    def _http(self) -> LlamaClient:
        client: LlamaClient | None = getattr(self._local, "client", None)
        return client if client is not None else self._pick()

    @property
    def openai_base_url(self) -> str:
        """The ``/v1`` base URL of the next replica in turn."""
        return self._pick().base_url + "/v1"

    def _openai_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        self._local.client = None  # the next replica in turn, not this thread's last one
        return super()._openai_options(kwargs)

    def _failover(self, send: Callable[[], _T]) -> _T:
        """``send()`` on one replica after another while they cannot be reached (not sent)."""
        for _ in range(_MAX_FAILOVERS):
            self._local.client = client = self._pick()
            try:
                return send()
            except (ConnectionRefused, ConnectTimeout):
                self._drop(client)
                with self._lock:
                    if not self._live:
                        raise
        raise APIConnectionError(f"{_MAX_FAILOVERS} replicas of {self._name} in a row could not be reached")

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: Timeout | object = ...,
    ) -> tuple[LlamaClient, requests.Response]:
        send = super()._send
        return self._failover(lambda: send(method, path, body, headers=headers, stream=stream, timeout=timeout))

    def close(self) -> None:
        """Close the connections to every replica."""
        with self._lock:
            self._closed = True
            for client in [*self._clients.values(), *self._retired]:
                client.close()
            self._clients.clear()
            self._retired = []
            self._live = []

    def __enter__(self) -> DirectClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: Replicas a call tries at most before giving up.
_MAX_FAILOVERS = 16
