"""One server per process, safely shared: :func:`shared_server` and :func:`stop_all`.

For web apps (Django, Flask, gunicorn workers) and notebooks: every caller that asks for the same
configuration gets the same :class:`~llama_proc.LlamaServer`, started on first use. It is fork-aware:
a forked child never uses or stops the parent's entry; it starts its own server on first use, or
talks to the parent's through :meth:`LlamaServer.attach`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Union, overload

import attrs

from .client import Timeout
from .config import LlamaServerArgs
from .errors import ConfigError, ModelNotRegistered, ServerBusy, ServerNotRunning, SharedServerConflict
from .rpc import RpcCluster, stop_clusters, stop_workers
from .server import EventKind, Listener, LlamaServer, ServerEvent, emit, owned_servers
from .streaming import Stream

if TYPE_CHECKING:
    import requests

    from .types import (
        ChatCompletion,
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionStreamRequest,
        Completion,
        CompletionChunk,
        CompletionRequest,
        CompletionStreamRequest,
        EmbeddingsRequest,
        EmbeddingsResponse,
    )

__all__ = ["ServerManager", "shared_server", "stop_all"]

_log = logging.getLogger("llama_proc.manager")

#: What a manager or the shared slot runs: a llama-server, or one spread over RPC workers.
Managed = Union[LlamaServer, RpcCluster]

_lock = threading.Lock()
_shared: tuple[tuple[Any, ...], Managed] | None = None
_owner_pid = os.getpid()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _differences(running: tuple[Any, ...], requested: tuple[Any, ...]) -> tuple[str, str]:
    """What differs between two shared-server keys ``(args, executable, options)``, each side as
    ``name=value, ...`` (API keys shown as ``***``)."""
    sides: tuple[list[str], list[str]] = ([], [])
    if not all(isinstance(key[0], LlamaServerArgs) for key in (running, requested)):
        return f"{running[0]!r}", f"{requested[0]!r}"  # an RpcCluster: the object itself is shared
    for field in attrs.fields(LlamaServerArgs):
        values = [getattr(key[0], field.name) for key in (running, requested)]
        if values[0] != values[1]:
            for side, value in zip(sides, values):
                side.append(f"{field.name}={'***' if field.name == 'api_key' and value else repr(value)}")
    for index, name in ((1, "executable"), (2, "options")):
        if running[index] != requested[index]:
            for side, key in zip(sides, (running, requested)):
                side.append(f"{name}={key[index]!r}")
    return ", ".join(sides[0]), ", ".join(sides[1])


@overload
def shared_server(
    args: LlamaServerArgs,
    executable_path: str | os.PathLike[str] | None = None,
    *,
    replace: bool = False,
    **options: Any,
) -> LlamaServer: ...
@overload
def shared_server(
    args: RpcCluster,
    executable_path: str | os.PathLike[str] | None = None,
    *,
    replace: bool = False,
    **options: Any,
) -> RpcCluster: ...


def shared_server(
    args: LlamaServerArgs | RpcCluster,
    executable_path: str | os.PathLike[str] | None = None,
    *,
    replace: bool = False,
    **options: Any,
) -> Managed:
    """The process-wide server for ``args``, created on the first call and started on first use.

    Any number of threads may call it at once: exactly one server is created and started. Later
    calls with the same configuration return the same server, so a notebook cell run twice reuses
    it. It is stopped at interpreter exit like any server, or by :func:`stop_all`.

    :param args: what to run; or an :class:`~llama_proc.rpc.RpcCluster`, which is shared as it is
        (started on first use; ``executable_path`` and ``options`` are then not used).
    :param executable_path: the ``llama-server`` to run (default: found).
    :param replace: when a server with another configuration is shared, stop it and share this one.
    :param options: keyword options of :class:`~llama_proc.LlamaServer` (``startup_timeout``, ...).
    :raises SharedServerConflict: when another configuration is shared and ``replace`` is false.
    """
    global _shared, _owner_pid
    key = (args, None if executable_path is None else str(Path(executable_path)), _freeze(options))
    old: Managed | None = None
    with _lock:
        if _owner_pid != os.getpid():  # a forked child: the parent's entry is not ours
            _shared, _owner_pid = None, os.getpid()
        if _shared is not None:
            current_key, current = _shared
            if current_key == key:
                return current
            if not replace:
                raise SharedServerConflict(*_differences(current_key, key))
            old = current
        if isinstance(args, RpcCluster):
            args.autostart = True
            server: Managed = args
        else:
            server = LlamaServer(executable_path, args, autostart=True, **options)
        _shared = (key, server)
    if old is not None:
        _log.info("replacing the shared server %r", old)
        old.stop()
    return server


def stop_all() -> list[int | None]:
    """Stop every server this process started (servers of a parent process are left alone),
    whatever its state: running, restarting, or still starting, in which case the ``start()``
    (or the first call that started it) raises :class:`~llama_proc.errors.StartupAborted`. A
    ``start()`` called after this began is not stopped, and a server made with ``autostart``
    (:func:`shared_server`'s) starts again on its next call. A start() still downloading its
    ``hf://`` model finishes the download (into the cache) and then raises ``StartupAborted``.

    RPC workers (:class:`~llama_proc.rpc.RpcWorker`) this process runs are stopped after the servers.

    :returns: the servers' exit codes (None for one stopped before its process existed).
    """
    codes = stop_clusters()  # each server before its workers
    codes += [server.stop() for server in owned_servers()]
    stop_workers()
    return codes


# ---------------------------------------------------------------------------------------------
# many models: ServerManager


class _Entry:
    def __init__(self, alias: str, args: LlamaServerArgs, cluster: RpcCluster | None = None) -> None:
        self.alias = alias
        self.args = args
        self.cluster = cluster  # started and stopped as it is, instead of a LlamaServer made from args
        self.server: Managed | None = None
        self.starting: Managed | None = None  # the server being loaded, until it is ready
        self.loading = False
        self.in_flight = 0
        self.last_used = time.monotonic()


class _Lease:
    """One request's hold on a loaded server; released exactly once."""

    def __init__(self, manager: ServerManager, entry: _Entry, server: Managed) -> None:
        self._manager = manager
        self._entry = entry
        self.server = server
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self._entry)


class ServerManager:
    """Several models behind one object: servers loaded on demand, by the request's ``model`` field.

    * A model loads on its first request; concurrent requests for a model that is loading wait for
      that one load.
    * With ``max_loaded`` servers running, the least recently used one with no request in flight is
      stopped to make room; a busy server is never evicted. Requests that find every server busy wait
      (at most ``max_waiting`` of them, for at most ``wait_timeout`` seconds) and then raise
      :class:`~llama_proc.errors.ServerBusy`.
    * A server with no request for ``keep_alive`` seconds is stopped; idle time counts from the end of
      the last request or stream. ``-1`` keeps servers forever, ``0`` stops them after each request.
    * Listeners get a :class:`ServerEvent` for every start, stop, load, eviction, crash and restart;
      they are called outside the manager's locks.

    :param executable_path: the ``llama-server`` to run (default: found).
    :param server_options: keyword options for every :class:`~llama_proc.LlamaServer`.
    """

    def __init__(
        self,
        executable_path: str | os.PathLike[str] | None = None,
        max_loaded: int = 1,
        keep_alive: float = 300.0,
        *,
        max_waiting: int = 64,
        wait_timeout: float = 600.0,
        listeners: Iterable[Listener] = (),
        **server_options: Any,
    ) -> None:
        problems = []
        if max_loaded < 1:
            problems.append(f"max_loaded: must be >= 1, got {max_loaded}")
        if keep_alive < 0 and keep_alive != -1:
            problems.append(f"keep_alive: must be >= 0 or -1 (forever), got {keep_alive}")
        if max_waiting < 0:
            problems.append(f"max_waiting: must be >= 0, got {max_waiting}")
        if problems:
            raise ConfigError(problems)
        self._executable = executable_path
        self.max_loaded = max_loaded
        self.keep_alive = keep_alive
        self.max_waiting = max_waiting
        self.wait_timeout = wait_timeout
        self._options = server_options
        self._listeners = list(listeners)
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        self._waiting = 0
        self._closed = False
        self._reaper: threading.Thread | None = None

    # -- registration -------------------------------------------------------------------------

    def register(self, alias: str, args: LlamaServerArgs | Mapping[str, Any] | RpcCluster) -> None:
        """Make ``alias`` loadable with ``args`` (a :class:`LlamaServerArgs` or a plain mapping), or
        as an :class:`~llama_proc.rpc.RpcCluster` (started on the first request for ``alias`` and
        stopped, workers included, when evicted, as any server).

        The server runs with ``alias`` as its ``--alias`` unless ``args`` names another.
        """
        cluster = None
        if isinstance(args, RpcCluster):
            cluster, parsed = args, args._args  # as given, not a running server's fixed port and key
        elif isinstance(args, LlamaServerArgs):
            parsed = args
        else:
            parsed = LlamaServerArgs.from_dict(args)
        if parsed.alias is None:
            parsed = parsed.evolve(alias=alias)
        with self._cond:
            if alias in self._entries and self._entries[alias].server is not None:
                raise ConfigError([f"{alias}: already registered and loaded; unload it first"])
            if cluster is not None:
                other = [e.alias for e in self._entries.values() if e.cluster is cluster and e.alias != alias]
                if other:
                    raise ConfigError([f"{alias}: this RPC cluster is already registered as {other[0]!r}"])
                cluster._args = parsed  # it runs under the alias too
            self._entries[alias] = _Entry(alias, parsed, cluster)

    def register_all(self, models: Mapping[str, LlamaServerArgs | Mapping[str, Any]]) -> None:
        """Register several aliases (for example a parsed JSON or TOML table of ``alias -> settings``).

        :raises ConfigError: naming every bad entry.
        """
        problems: list[str] = []
        parsed: dict[str, LlamaServerArgs] = {}
        for alias, args in models.items():
            try:
                parsed[alias] = args if isinstance(args, LlamaServerArgs) else LlamaServerArgs.from_dict(args)
            except ConfigError as exc:
                problems.extend(f"{alias}.{p}" for p in exc.problems)
        if problems:
            raise ConfigError(problems)
        for alias, args in parsed.items():
            self.register(alias, args)

    def register_file(self, path: str | os.PathLike[str]) -> list[str]:
        """Register the aliases of a TOML file (one table per alias, optionally under ``[models]``) or an
        INI file (one section per alias). Values are checked like :meth:`LlamaServerArgs.from_dict`.

        :returns: the aliases registered.
        :raises ConfigError: naming every bad entry (with its alias), or for an unreadable file.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{file}: cannot be read ({exc.strerror})"]) from None
        if file.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python < 3.11
                import tomli as tomllib
            try:
                data = tomllib.loads(text)
            except ValueError as exc:
                raise ConfigError([f"{file}: not valid TOML ({exc})"]) from None
            tables = data.get("models", data)
            self.register_all(tables)
            return list(tables)
        import configparser

        from ._convert import args_from_strings

        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=str(file))
        except configparser.Error as exc:
            raise ConfigError([f"{file}: not a valid INI file ({exc})"]) from None
        problems: list[str] = []
        parsed: dict[str, LlamaServerArgs] = {}
        for section in parser.sections():
            try:
                parsed[section] = args_from_strings(dict(parser[section]), f"{section}.")
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        self.register_all(parsed)
        return list(parsed)

    @property
    def aliases(self) -> list[str]:
        """The registered aliases."""
        return list(self._entries)

    def loaded(self) -> list[str]:
        """The aliases whose server is running now."""
        with self._cond:
            return [a for a, e in self._entries.items() if e.server is not None]

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every :class:`ServerEvent` from now on."""
        self._listeners.append(listener)

    # -- acquiring and releasing --------------------------------------------------------------

    def _emit(self, events: list[ServerEvent]) -> None:
        emit(self._listeners, events)

    def _relay(self, alias: str, event: ServerEvent) -> None:
        # crashes and restarts are seen by the server's own watcher; loads, evictions and stops here
        if event.kind in (EventKind.CRASH, EventKind.RESTART):
            self._emit([ServerEvent(event.kind, alias, event.detail)])

    def _acquire(self, alias: str | None) -> _Lease:
        deadline = time.monotonic() + self.wait_timeout
        events: list[ServerEvent] = []
        to_stop: list[tuple[_Entry, Managed]] = []
        try:
            with self._cond:
                if self._closed:
                    raise ServerNotRunning("the manager was closed")
                if alias is None or alias not in self._entries:
                    if alias is None and len(self._entries) == 1:
                        alias = next(iter(self._entries))
                    else:
                        raise ModelNotRegistered(str(alias), list(self._entries))
                entry = self._entries[alias]
                waited = False
                while True:
                    server = entry.server
                    if server is not None and not entry.loading:
                        if server.is_running():
                            entry.in_flight += 1
                            return _Lease(self, entry, server)
                        entry.server = None  # it died (its CRASH event came from the server): load it again
                        to_stop.append((entry, server))
                    if entry.loading:
                        self._wait(deadline, waited)
                        waited = True
                        continue
                    active = [e for e in self._entries.values() if e.server is not None or e.loading]
                    if len(active) < self.max_loaded:
                        entry.loading = True
                        break
                    idle = [e for e in active if e.in_flight == 0 and not e.loading and e.server is not None]
                    if idle:
                        victim = min(idle, key=lambda e: e.last_used)
                        assert victim.server is not None
                        to_stop.append((victim, victim.server))
                        victim.server = None
                        events.append(ServerEvent(EventKind.EVICT, victim.alias, f"to load {alias}"))
                        entry.loading = True
                        break
                    self._wait(deadline, waited)
                    waited = True
        finally:
            for _, old in to_stop:
                old.stop()
            self._emit(events)
        # load outside the lock: other models keep serving meanwhile
        return self._load(entry)

    def _wait(self, deadline: float, counted: bool) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerBusy(f"no server became free within {self.wait_timeout:g} s")
        if self._waiting >= self.max_waiting:
            raise ServerBusy(f"{self._waiting} requests already wait (max_waiting={self.max_waiting})")
        self._waiting += 1
        try:
            self._cond.wait(remaining)
        finally:
            self._waiting -= 1

    def _load(self, entry: _Entry) -> _Lease:
        options = dict(self._options)
        options["listeners"] = [*options.get("listeners", ()), functools.partial(self._relay, entry.alias)]
        server: Managed = (
            entry.cluster if entry.cluster is not None else LlamaServer(self._executable, entry.args, **options)
        )
        with self._cond:
            entry.starting = server  # close() stops it too (its start() then raises StartupAborted)
            closed = self._closed
        try:
            if closed:
                raise ServerNotRunning("the manager was closed")
            server.start()
        except BaseException:
            with self._cond:
                entry.loading = False
                entry.starting = None
                self._cond.notify_all()
            raise
        with self._cond:
            entry.starting = None
            entry.loading = False
            closed = self._closed
            if not closed:
                entry.server = server
                entry.in_flight += 1
                entry.last_used = time.monotonic()
                self._ensure_reaper()
            self._cond.notify_all()
        if closed:  # close() came as it became ready
            server.stop()
            raise ServerNotRunning("the manager was closed while the model was loading")
        self._emit(
            [
                ServerEvent(EventKind.LOAD, entry.alias, server.base_url),
                ServerEvent(EventKind.START, entry.alias, f"pid {server.pid}"),
            ]
        )
        return _Lease(self, entry, server)

    def _release(self, entry: _Entry) -> None:
        stop: Managed | None = None
        with self._cond:
            entry.in_flight -= 1
            entry.last_used = time.monotonic()
            if entry.in_flight == 0 and self.keep_alive == 0 and entry.server is not None:
                stop, entry.server = entry.server, None
            self._cond.notify_all()
        if stop is not None:
            stop.stop()
            self._emit([ServerEvent(EventKind.STOP, entry.alias, "keep_alive=0")])

    def _ensure_reaper(self) -> None:
        if self.keep_alive <= 0 or (self._reaper is not None and self._reaper.is_alive()):
            return
        self._reaper = threading.Thread(target=self._reap, name="llama-proc-manager-reaper", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        while True:
            expired: list[tuple[_Entry, Managed]] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                next_due = now + self.keep_alive
                for entry in self._entries.values():
                    if entry.server is None or entry.in_flight or entry.loading:
                        continue
                    due = entry.last_used + self.keep_alive
                    if due <= now:
                        expired.append((entry, entry.server))
                        entry.server = None
                    else:
                        next_due = min(next_due, due)
                if not expired:
                    if not any(e.server is not None for e in self._entries.values()):
                        self._reaper = None
                        return
                    self._cond.wait(max(0.01, next_due - now))
                    continue
                self._cond.notify_all()
            for _entry, server in expired:
                server.stop()
            self._emit([ServerEvent(EventKind.STOP, e.alias, f"idle for {self.keep_alive:g} s") for e, _ in expired])

    def close(self) -> None:
        """Stop every server and refuse further requests."""
        with self._cond:
            self._closed = True
            servers = [(e, e.server) for e in self._entries.values() if e.server is not None]
            for entry, _ in servers:
                entry.server = None
            starting = [e.starting for e in self._entries.values() if e.starting is not None]
            self._cond.notify_all()
        for loading in starting:
            loading.stop()
        for _, server in servers:
            if server is not None:
                server.stop()
        self._emit([ServerEvent(EventKind.STOP, e.alias, "closed") for e, _ in servers])
        reaper = self._reaper
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(5)

    def __enter__(self) -> ServerManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------------

    def server(self, alias: str) -> Managed:
        """Load ``alias`` if needed and return its server (it may be evicted or stopped later)."""
        lease = self._acquire(alias)
        lease.release()
        return lease.server

    def _route(self, method: str, request: Mapping[str, Any], **kwargs: Any) -> Any:
        lease = self._acquire(request.get("model"))
        try:
            result = getattr(lease.server, method)(request, **kwargs)
        except BaseException:
            lease.release()
            raise
        if isinstance(result, Stream):
            result.add_close_callback(lease.release)  # idle time starts when the stream ends
        else:
            lease.release()
        return result

    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> Stream[ChatCompletionChunk]: ...
    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> ChatCompletion: ...
    @overload
    def chat_completions(
        self, request: ChatCompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Stream[ChatCompletionChunk]: ...
    @overload
    def chat_completions(
        self, request: ChatCompletionRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> ChatCompletion: ...
    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Any: ...

    def chat_completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """Route to the server of ``request["model"]`` (see :meth:`LlamaServer.chat_completions`)."""
        result: ChatCompletion | Stream[ChatCompletionChunk] = self._route(
            "chat_completions", request, stream=stream, timeout=timeout
        )
        return result

    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> Stream[CompletionChunk]: ...
    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> Completion: ...
    @overload
    def completions(
        self, request: CompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Stream[CompletionChunk]: ...
    @overload
    def completions(
        self, request: CompletionRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> Completion: ...
    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Any: ...

    def completions(
        self, request: Mapping[str, Any], *, stream: bool | None = None, timeout: Timeout | object = ...
    ) -> Completion | Stream[CompletionChunk]:
        """Route to the server of ``request["model"]`` (see :meth:`LlamaServer.completions`)."""
        result: Completion | Stream[CompletionChunk] = self._route(
            "completions", request, stream=stream, timeout=timeout
        )
        return result

    def embeddings(
        self, request: EmbeddingsRequest | Mapping[str, Any], *, timeout: Timeout | object = ...
    ) -> EmbeddingsResponse:
        """Route to the server of ``request["model"]`` (see :meth:`LlamaServer.embeddings`)."""
        result: EmbeddingsResponse = self._route("embeddings", request, timeout=timeout)
        return result

    def forward(
        self, method: str, path: str, json: Any = None, stream: bool = False, **kwargs: Any
    ) -> requests.Response:
        """Route a raw request by its body's ``model`` (see :meth:`LlamaServer.forward`); with
        ``stream=True`` the server counts as busy until the response is closed."""
        model = json.get("model") if isinstance(json, Mapping) else None
        lease = self._acquire(model)
        try:
            response = lease.server.forward(method, path, json, stream, **kwargs)
        except BaseException:
            lease.release()
            raise
        if not stream:
            lease.release()
            return response
        close = response.close

        def close_and_release() -> None:
            try:
                close()
            finally:
                lease.release()

        response.close = close_and_release  # type: ignore[method-assign]
        return response

    def __repr__(self) -> str:
        return f"<ServerManager models={self.aliases} loaded={self.loaded()} max_loaded={self.max_loaded}>"
