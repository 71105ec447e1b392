"""The ``Server`` protocol and ``LlamaServer``, which runs one llama-server process.

Readiness lives in :mod:`llama_proc.readiness`, supervision and restarts in
:mod:`llama_proc.supervision`, and the process-less server of :meth:`LlamaServer.attach` in
:mod:`llama_proc.remote`; this module composes them.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import secrets
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Protocol, overload, runtime_checkable

from ._registry import reap_stale
from .binaries import find_executable, library_env
from .client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE, DEFAULT_READ_TIMEOUT, Endpoints, LlamaClient, Timeout
from .config import LlamaServerArgs
from .errors import (
    ConfigError,
    ModelNotFound,
    NotAGGUFFile,
    ServerAlreadyRunning,
    ServerNotReady,
    ServerNotRunning,
    StartupAborted,
    StartupError,
)
from .models import HubModel
from .models import resolve as resolve_model
from .process import ServerProcess
from .readiness import PortTaken, check_port_free, connect_host, free_port, is_loopback, url_host, wait_ready
from .remote import RemoteServer
from .supervision import EventKind, Listener, RestartPolicy, ServerEvent, Supervisor, emit
from .versions import flag_dialect

if TYPE_CHECKING:
    from .types import (
        ChatCompletion,
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionStreamRequest,
        ChunkStream,
        Completion,
        CompletionChunk,
        CompletionRequest,
        CompletionStreamRequest,
        DetokenizeRequest,
        DetokenizeResponse,
        EmbeddingsRequest,
        EmbeddingsResponse,
        TokenizeRequest,
        TokenizeResponse,
    )

__all__ = ["EventKind", "Listener", "LlamaServer", "RestartPolicy", "Server", "ServerEvent", "emit"]

_log = logging.getLogger("llama_proc.lifecycle")  # llama_proc.server carries the process's own output

_PORT_ATTEMPTS = 3
#: HTTP threads a started server gets beyond the client's pool: room for other clients (a browser
#: on the web UI, a metrics scraper, a second process attached to it).
HTTP_THREAD_MARGIN = 4


@runtime_checkable
class Server(Protocol):
    """What code that needs an LLM server depends on; :class:`LlamaServer` implements it.

    Every method blocks. Implementations for tests: :class:`llama_proc.testing.FakeServer`.
    A streamed answer is typed as a :class:`~llama_proc.types.ChunkStream` (an iterator of chunks
    and a context manager), which both :class:`~llama_proc.Stream` and the fake's stream are.
    """

    def start(self) -> None:
        """Start the server and return once it answers requests."""

    def stop(self) -> int | None:
        """Stop the server; idempotent; returns the exit code."""

    def get_server_args(self) -> LlamaServerArgs | None:
        """The arguments the server runs (or will run) with; None for a server that this process
        did not start (:meth:`LlamaServer.attach`)."""

    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> ChunkStream[ChatCompletionChunk]: ...
    @overload
    def chat_completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> ChatCompletion: ...
    @overload
    def chat_completions(
        self, request: ChatCompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> ChunkStream[ChatCompletionChunk]: ...
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
    ) -> ChatCompletion | ChunkStream[ChatCompletionChunk]:
        """OpenAI chat completion; a stream of chunks when ``stream=True`` or ``"stream": True``
        (see :mod:`llama_proc.types` for the return types)."""

    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[True], timeout: Timeout | object = ...
    ) -> ChunkStream[CompletionChunk]: ...
    @overload
    def completions(
        self, request: Mapping[str, Any], *, stream: Literal[False], timeout: Timeout | object = ...
    ) -> Completion: ...
    @overload
    def completions(
        self, request: CompletionStreamRequest, *, stream: None = None, timeout: Timeout | object = ...
    ) -> ChunkStream[CompletionChunk]: ...
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
    ) -> Completion | ChunkStream[CompletionChunk]:
        """OpenAI text completion; a stream of chunks when ``stream=True`` or ``"stream": True``."""

    def embeddings(
        self, request: EmbeddingsRequest | Mapping[str, Any], *, timeout: Timeout | object = ...
    ) -> EmbeddingsResponse:
        """OpenAI embeddings."""

    def tokenize(
        self, request: TokenizeRequest | Mapping[str, Any] | str, *, timeout: Timeout | object = ...
    ) -> TokenizeResponse:
        """Text -> tokens."""

    def detokenize(
        self, request: DetokenizeRequest | Mapping[str, Any] | list[int], *, timeout: Timeout | object = ...
    ) -> DetokenizeResponse:
        """Tokens -> text."""


_reaped = False


def _reap_once() -> None:
    # servers left behind by processes that died without cleaning up: stopped at the first start
    global _reaped
    if not _reaped:
        _reaped = True
        try:
            reap_stale()
        except Exception:  # never let housekeeping break a start
            _log.debug("reaping stale servers failed", exc_info=True)


class LlamaServer(Endpoints):
    """One ``llama-server`` process and a pooled client to it.

    :param executable_path: the ``llama-server`` to run; None finds one with
        :func:`~llama_proc.find_executable` when the server starts. ``LlamaServer(args)`` is
        ``LlamaServer(None, args)``.
    :param args: what to run.
    :param startup_timeout: seconds the server may stay silent while starting. Any line it logs
        restarts the count; on expiry it is killed and :class:`~llama_proc.errors.StartupTimeout` raised.
    :param stop_timeout: seconds to wait after SIGTERM before SIGKILL. Default: 10.
    :param request_timeout: default ``(connect, read)`` timeout of calls, in seconds; a single number
        sets both; None waits forever. Default: 5 s to connect, 600 s between bytes.
    :param env: extra environment variables for the process.
    :param log_lines: how many of the server's recent output lines :meth:`log_tail` keeps.
    :param variant: the variant to find when ``executable_path`` is None.
    :param autostart: start on the first call instead of raising
        :class:`~llama_proc.errors.ServerNotRunning` (threads arriving during the start wait for it).
    :param restart: a :class:`RestartPolicy` (or True for the default one) to start the server again
        when it exits unexpectedly or hangs; None (the default) leaves a crashed server down.
    :param listeners: callables that get a :class:`ServerEvent` on start, stop, crash and restart.

    The client keeps up to ``max(32, 2 * n_parallel)`` connections open, and the server is started
    with that many HTTP threads plus :data:`HTTP_THREAD_MARGIN` (``--threads-http``), so that no
    connection ever waits for a thread. When ``args.threads_http`` is set, it is kept and the pool is
    sized below it instead.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. A server that is never
    stopped is stopped when it is garbage-collected or the interpreter exits, and on Linux and macOS
    even when this process is killed.
    """

    def __init__(
        self,
        executable_path: str | os.PathLike[str] | LlamaServerArgs | None,
        args: LlamaServerArgs | None = None,
        *,
        startup_timeout: float = 300.0,
        stop_timeout: float = 10.0,
        request_timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        env: Mapping[str, str] | None = None,
        log_lines: int = 200,
        variant: str | None = None,
        autostart: bool = False,
        restart: RestartPolicy | bool | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        if args is None and isinstance(executable_path, LlamaServerArgs):
            executable_path, args = None, executable_path  # LlamaServer(args): the executable is found
        if not isinstance(args, LlamaServerArgs):
            raise ConfigError([f"args: expected LlamaServerArgs, got {type(args).__name__}"])
        if isinstance(executable_path, LlamaServerArgs):
            raise ConfigError(["executable_path: expected a path or None, got LlamaServerArgs"])
        problems = []
        if not startup_timeout > 0:
            problems.append(f"startup_timeout: must be > 0, got {startup_timeout!r}")
        if not stop_timeout >= 0:
            problems.append(f"stop_timeout: must be >= 0, got {stop_timeout!r}")
        if problems:
            raise ConfigError(problems)
        self._executable = Path(executable_path) if executable_path is not None else None
        self._variant = variant
        self._args = args
        self._startup_timeout = float(startup_timeout)
        self._stop_timeout = float(stop_timeout)
        self._request_timeout = request_timeout
        self._env = dict(env) if env else None
        self._log_lines = log_lines
        self._autostart = autostart
        self._lock = threading.RLock()
        self._proc: ServerProcess | None = None
        self._client: LlamaClient | None = None
        self._running_args: LlamaServerArgs | None = None
        self._stopped = False
        self._starting = False
        self._pending: ServerProcess | None = None  # the process of a start() in progress
        self._start_pid = 0  # the process that runs that start()
        self._abort = threading.Event()
        self._stops = 0  # stop() calls so far: a start() that downloads its model checks it after
        self._prefetching = 0  # start()s downloading their model now, before the lock
        self._prefetch_pid = 0  # the process they run in
        self._prefetch_lock = threading.Lock()
        self._model_path: tuple[HubModel, Path] | None = None  # an hf:// model's resolved file
        self._last_exit: int | None = None
        self._supervisor = Supervisor(RestartPolicy() if restart is True else (restart or None), listeners, self._label)
        self._watcher: threading.Thread | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def args(self) -> LlamaServerArgs:
        """The arguments in effect: once started, with the port actually used."""
        return self._running_args or self._args

    def get_server_args(self) -> LlamaServerArgs:
        """The arguments in effect (as :attr:`args`)."""
        return self.args

    @property
    def executable(self) -> Path:
        """The ``llama-server`` this server runs (found on first use when not given)."""
        if self._executable is None:
            self._executable = find_executable(self._variant)
        return self._executable

    @property
    def api_key(self) -> str | None:
        """The API key in effect (the generated one when ``api_key="auto"``), to hand to other clients."""
        return self.args.api_key

    @property
    def port(self) -> int | None:
        """The port the server listens on, once started (or the configured one)."""
        return self.args.port

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server.

        :raises ServerNotRunning: before the port is known.
        """
        return _base_url(self.args)

    @property
    def pid(self) -> int | None:
        """The process id while running (or starting)."""
        proc = self._proc or self._pending
        return proc.pid if proc is not None and proc.is_running() else None

    @property
    def process(self) -> ServerProcess | None:
        """The underlying :class:`~llama_proc.process.ServerProcess` (None before start)."""
        return self._proc

    @property
    def attached(self) -> bool:
        """False: this server runs its own process (see :meth:`attach`)."""
        return False

    def is_running(self) -> bool:
        """True while the process is alive."""
        proc = self._proc
        return proc is not None and proc.is_running()

    #: ``LlamaServer.attach(base_url, api_key=None, *, request_timeout=..., pool_maxsize=8,
    #: verify=True, cert=None)``: a :class:`~llama_proc.remote.RemoteServer` for a llama-server that
    #: is already running (started by another process, for example the parent of forked web
    #: workers). It owns no process: ``start()`` only checks that the server answers, and ``stop()``
    #: only closes the connection pool. The parameters are those of
    #: :class:`~llama_proc.remote.RemoteServer`.
    attach = RemoteServer

    def ensure_started(self) -> LlamaServer:
        """Start the server unless it runs already (safe to call from many threads at once)."""
        if self._client is not None and self.is_running():
            return self
        if isinstance(self._args.model, HubModel):
            self._prefetch(self._args.model)  # a download: before the lock, which stop() needs
        with self._lock:
            if self._client is None or not self.is_running():
                self.start()
        return self

    def log_tail(self, n: int = 20) -> list[str]:
        """The server's last ``n`` output lines (also while it starts)."""
        proc = self._proc or self._pending
        return proc.log_tail(n) if proc is not None else []

    @property
    def client(self) -> LlamaClient:
        """The pooled HTTP client of the running server.

        :raises ServerNotRunning: before start() or after stop().
        """
        return self._require_client()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start llama-server and return as soon as it answers ``/health`` with 200.

        :raises ModelNotFound: when the model file does not exist; for an ``hf://`` model,
            :class:`HubModelNotFound` says what is missing on the hub or in its cache (and
            :class:`AmbiguousModel` lists the files when the spec matches several).
        :raises ExecutableNotFound: when no executable was given and none is found.
        :raises ServerAlreadyRunning: when it is already running.
        :raises StartupError: when the process exits while starting (with its exit code and last lines).
        :raises StartupTimeout: when it stays silent for ``startup_timeout`` seconds without becoming ready.
        """
        _reap_once()
        stops = self._stops
        if isinstance(self._args.model, HubModel) and not (self._proc is not None and self._proc.is_running()):
            self._prefetch(self._args.model)
        before = self._proc
        try:
            with self._lock:
                if self._proc is not None and self._proc.is_running():
                    raise ServerAlreadyRunning(self._proc.pid or 0, self.base_url)
                if self._stops != stops:  # stop() came between the download and the lock
                    raise StartupAborted("stop() or stop_all() was called while the server was starting", None, [])
                self._discard()
                self._supervisor.begin()
                self._start_marked()
            self._supervisor.emit(EventKind.START, f"pid {self.pid} at {self.base_url}")
        except BaseException:
            # an exception that comes out of start() (Ctrl-C just as it finished) leaves no server
            if self._proc is not None and self._proc is not before:
                self.stop()
            raise

    def _prefetch(self, model: HubModel) -> None:
        """Download ``model`` into the cache, before the lock: a download can take long, and stop()
        and calls must not wait for it. stop_all() sees the server meanwhile; a stop() during the
        download lets it finish (into the cache) but then no server starts."""
        known = self._model_path
        if known is not None and known[0] == model and known[1].is_file():
            return  # found by ensure_started() just before, or by an earlier start
        stops = self._stops
        with self._prefetch_lock:
            self._prefetching += 1
            self._prefetch_pid = os.getpid()
            _owned_servers.add(self)
        try:
            self._model_path = (model, resolve_model(model))
        finally:
            with self._prefetch_lock:
                self._prefetching -= 1
                self._forget_if_idle()
        if self._stops != stops:
            raise StartupAborted(f"stop() or stop_all() was called while {model} was downloading", None, [])

    def _start_marked(self, keep: LlamaServerArgs | None = None) -> None:
        # with the lock held: start, while calls from other threads see "starting" and stop() can abort
        self._abort.clear()  # before _starting: a stop() that sees the start must find its abort set
        self._last_exit = None  # a stop() that aborts this start reports no exit status
        self._starting = True
        self._start_pid = os.getpid()
        _owned_servers.add(self)  # stop_all() sees it from now on, and aborts the start
        try:
            self._start_locked(keep)
        finally:
            self._starting = False
            self._pending = None
            with self._prefetch_lock:
                self._forget_if_idle()

    def _forget_if_idle(self) -> None:
        # with _prefetch_lock held: stop_all() need not see a server with no process, start or download
        if self._proc is None and not self._starting and self._prefetching == 0:
            _owned_servers.discard(self)

    def _start_locked(self, keep: LlamaServerArgs | None = None) -> None:
        """Start the process and wait until it is ready. ``keep``: the arguments of the process this
        one replaces (a restart), whose chosen port and generated key it keeps, so that clients
        given ``base_url`` and ``api_key`` (attached workers) reach it again."""
        source = self._args
        if isinstance(source.model, HubModel):
            # the file found before the lock (a restart reuses it; never a download under the lock),
            # named as the spec unless an alias is set, as llama-server's -hf does
            known = self._model_path
            path = known[1] if known is not None and known[0] == source.model else None
            path = path or resolve_model(source.model, local_files_only=True)
            source = source.evolve(model=path, alias=source.alias or source.model.ref)
        model = source.model
        assert isinstance(model, Path)
        if not model.is_file():
            raise ModelNotFound(str(model))
        if not os.access(model, os.R_OK):
            raise StartupError(f"the model file {model} is not readable; check its permissions")
        _check_gguf(model)
        executable = self.executable
        dialect = flag_dialect(executable)
        fixed_port = self._args.port
        if fixed_port is not None:
            check_port_free(self._args.host, fixed_port)
        preferred = keep.port if keep is not None and fixed_port is None else None
        if preferred is not None:
            try:
                check_port_free(self._args.host, preferred)
            except StartupError:
                preferred = None  # taken meanwhile: a new one (the restart's event says so)
        env = {**os.environ, **self._env} if self._env else None
        env = library_env(executable, env) or env
        threads_http, pool_size = _sized(source)
        base_args = source
        if base_args.api_key == "auto":
            # a strong key for this run (a restart keeps it); the client sends it, `server.api_key`
            # tells it to others
            kept = keep.api_key if keep is not None else None
            base_args = base_args.evolve(api_key=kept or secrets.token_urlsafe(32))
        if base_args.api_key is None and not is_loopback(base_args.host):
            _log.warning(
                "llama-server will listen on %s without an API key: anyone who can reach it can use it; "
                'set api_key (api_key="auto" generates one)',
                base_args.host,
            )
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if fixed_port is not None:
                port = fixed_port
            elif attempt == 1 and preferred is not None:
                port = preferred
            else:
                port = free_port(self._args.host)
            args = base_args if fixed_port is not None else base_args.evolve(port=port)
            run_args = args if threads_http is None else args.evolve(threads_http=threads_http)
            self._check_abort()
            client: LlamaClient | None = None
            proc: ServerProcess | None = None
            try:
                # the key goes through a pipe, not on the command line where every local user sees
                # it: llama-server reads it from /dev/fd/N while starting
                key_fd = _key_pipe(args.api_key) if args.api_key and _KEY_PIPES and dialect.api_key_file else None
                try:
                    key_path = None if key_fd is None else f"/dev/fd/{key_fd}"
                    argv = [str(executable), *run_args.to_args(dialect, api_key_file=key_path)]
                    _log.info("starting %s", " ".join(_redact(argv)))
                    proc = ServerProcess(
                        argv,
                        env=env,
                        log_lines=self._log_lines,
                        stop_timeout=self._stop_timeout,
                        pass_fds=() if key_fd is None else (key_fd,),
                        # on loopback, running without a key is the normal case, not a warning
                        expected_warnings=_NO_KEY_WARNING if is_loopback(args.host) else (),
                    )
                    self._pending = proc
                    proc.start()
                finally:
                    if key_fd is not None:
                        os.close(key_fd)  # the child has its own copy
                client = LlamaClient(
                    _base_url(args),
                    api_key=args.api_key,
                    timeout=self._request_timeout,
                    pool_maxsize=pool_size,
                    # bound to this process: a call that broke on it is told how it ended, even once a
                    # restart has replaced it
                    error_hint=functools.partial(self._error_hint_of, proc),
                )
                wait_ready(proc, client, self._startup_timeout, self._abort)
            except PortTaken:
                assert proc is not None and client is not None  # wait_ready raised it
                client.close()
                proc.stop(self._stop_timeout)
                if fixed_port is not None or attempt == _PORT_ATTEMPTS:
                    raise StartupError(
                        f"port {port} was taken by another process ({attempt} attempt(s))",
                        proc.returncode,
                        proc.log_tail(),
                    ) from None
                _log.info("port %d was taken; retrying on another port", port)
                continue
            except BaseException:  # a failed start, an abort by stop(), or Ctrl-C: no server is left
                if client is not None:
                    client.close()
                if proc is not None:
                    proc.stop(self._stop_timeout)
                raise
            try:
                self._check_abort()  # stop() came as it became ready: it was stopped, not started
                proc.batch_output()  # up: from now on the server's speed matters more than a log line's latency
                self._proc = proc
                _ready_processes.add(proc)
                _owned_servers.add(self)
                self._running_args = args
                self._stopped = False
                self._client = client
                _log.info("llama-server pid %s ready at %s", proc.pid, self.base_url)
                self._watcher = self._supervisor.watch(proc, self._on_exit)
            except BaseException:
                self._proc = self._client = None
                _owned_servers.discard(self)
                client.close()
                proc.stop(self._stop_timeout)
                raise
            return

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise StartupAborted("stop() or stop_all() was called while the server was starting", None, self.log_tail())

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server: SIGTERM (again after a second if it still runs), then SIGKILL once
        ``timeout`` seconds (default ``stop_timeout``) have passed.

        Joins the log threads and closes the connection pool. Idempotent.

        :returns: the exit code, or None if it was never started.
        """
        self._stops += 1
        self._supervisor.request_stop()
        if self._starting:
            # a start() is in progress in another thread (which holds the lock): make it give up
            self._abort.set()
        pending = self._pending
        if pending is not None:
            pending.stop(self._stop_timeout if timeout is None else timeout)
        with self._lock:
            proc = self._proc
            if self._client is not None:
                self._client.close()
                self._client = None
            if proc is None:
                return self._last_exit
            code = proc.stop(self._stop_timeout if timeout is None else timeout)
            _owned_servers.discard(self)
            self._proc = None
            self._stopped = True
            self._last_exit = code
            _log.info("llama-server pid %s stopped with status %s", proc.pid, code)
            watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(self._stop_timeout + 5)
        self._supervisor.emit(EventKind.STOP, f"exit status {code}")
        return code

    def _discard(self) -> None:
        # A previous process that died by itself: reap it and its pool before starting anew.
        if self._proc is not None:
            self.stop(0)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- calls --------------------------------------------------------------------------------

    def _require_client(self) -> LlamaClient:
        client = self._client
        if client is None and self._autostart:
            self.ensure_started()
            client = self._client
        supervisor = self._supervisor
        if client is None and supervisor.restarting and supervisor.policy is not None:
            client = supervisor.wait_for_restart(supervisor.policy.wait_timeout, lambda: self._client)
        if client is None:
            if supervisor.gave_up is not None:
                raise ServerNotRunning(supervisor.gave_up)
            if self._starting:
                raise ServerNotReady()
            if self._stopped:
                raise ServerNotRunning("it was stopped; call start() to run it again")
            raise ServerNotRunning("start() has not been called")
        return client

    def _http(self) -> LlamaClient:
        return self._require_client()

    # -- supervision --------------------------------------------------------------------------

    def _label(self) -> str:
        model = self.args.model
        return self.args.alias or (model.ref if isinstance(model, HubModel) else model.name)

    def _on_timeout(self, path: str) -> None:
        self._supervisor.timed_out(self._proc, path)

    def _on_exit(self, proc: ServerProcess, code: int | None) -> None:
        """Called by the watcher thread when the process exits."""
        with self._lock:
            current = self._proc is proc and not self._supervisor.stop_requested.is_set()
            if not current and not proc.exited_on_its_own:
                return  # stopped on request: expected
            client = None
            if current:
                client, self._client = self._client, None
                self._supervisor.restarting = self._supervisor.policy is not None
        if client is not None:
            client.close()
        # a crash noticed only after the server was stopped or replaced is reported, not restarted
        self._supervisor.crashed(proc, code, self._restart if current else None)

    def _restart(self) -> str:
        """Start again after a crash (the policy's loop calls this); describes the new process."""
        with self._lock:
            if self._supervisor.stop_requested.is_set():
                raise ServerNotRunning("it was stopped while restarting")
            old = self._proc
            if old is not None:
                old.stop(0)  # reap it and join its pumps
                _owned_servers.discard(self)
            kept = self._running_args
            self._start_marked(keep=kept)
        note = ""
        if kept is not None and kept.port is not None and self._args.port is None and self.port != kept.port:
            note = f"; its port {kept.port} was taken, so it listens on a new one"
        return f"pid {self.pid} at {self.base_url}{note}"

    def _error_hint(self) -> str:
        return self._error_hint_of(self._proc)

    def _error_hint_of(self, proc: ServerProcess | None) -> str:
        # only on the error path: a connection that broke often means the process is dying; give it a
        # moment to be reaped (a killed multi-threaded process is) so the error can say how it ended.
        # Not while it starts: readiness polls are refused until it listens, and must not wait.
        if proc is None or not proc.owned or proc not in _ready_processes:
            return ""
        code = proc.returncode
        if code is None:
            code = proc.wait(0.5)
        if code is None:
            return ""
        last = proc.log_tail(3)
        return f"llama-server exited with status {code}" + (": " + " | ".join(last) if last else "")

    # -- presentation -------------------------------------------------------------------------

    def _state(self) -> str:
        if self._starting:
            return "starting"
        if self.is_running():
            return "running"
        return "stopped" if self._stopped else "not started"

    def uptime(self) -> float | None:
        """Seconds since the server became ready, while it runs."""
        proc = self._proc
        if proc is None or proc.started_at is None or not proc.is_running():
            return None
        return time.monotonic() - proc.started_at

    def __repr__(self) -> str:
        state = self._state()
        where = f" {self.base_url}" if state == "running" else ""
        alias = f" alias={self.args.alias!r}" if self.args.alias else ""
        return f"<LlamaServer {state}{alias} model={str(self.args.model)!r}{where} pid={self.pid}>"

    def _repr_html_(self) -> str:
        """A table for notebooks: state, alias, model, URL, pid, uptime and the last log lines."""
        state = self._state()
        uptime = self.uptime()
        rows = [
            ("state", state),
            ("alias", self.args.alias or ""),
            ("model", str(self.args.model)),
            ("url", self.base_url if state == "running" else ""),
            ("pid", "" if self.pid is None else str(self.pid)),
            ("uptime", "" if uptime is None else f"{uptime:.1f} s"),
        ]
        cells = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        tail = html.escape("\n".join(self.log_tail(8)))
        log = f"<details><summary>last log lines</summary><pre>{tail}</pre></details>" if tail else ""
        return f"<div><strong>LlamaServer</strong><table>{cells}</table>{log}</div>"


def _base_url(args: LlamaServerArgs) -> str:
    if args.port is None:
        raise ServerNotRunning("start() has not been called, so its port is not known yet")
    return f"http://{url_host(connect_host(args.host))}:{args.port}"


def _sized(args: LlamaServerArgs) -> tuple[int | None, int]:
    """The ``--threads-http`` to add (None: the user chose it) and the client's pool size: the
    server gets more HTTP threads than the client keeps connections (see :class:`LlamaServer`), or,
    when the user set ``threads_http`` (or passed ``--threads-http`` in ``extra_args``), the pool
    stays below it."""
    chosen = args.threads_http
    extra = list(args.extra_args)
    if chosen is None and "--threads-http" in extra[:-1]:
        value = extra[extra.index("--threads-http") + 1]
        chosen = int(value) if value.isdigit() else None
    if chosen is not None:
        return None, max(1, chosen - HTTP_THREAD_MARGIN)
    pool = max(DEFAULT_POOL_SIZE, 2 * (args.n_parallel or 1))
    return pool + HTTP_THREAD_MARGIN, pool


_owned_servers: weakref.WeakSet[LlamaServer] = weakref.WeakSet()
#: Server processes that became ready (an error hint waits for one to end, never for one starting).
_ready_processes: weakref.WeakSet[ServerProcess] = weakref.WeakSet()

#: llama-server's start-up warning about running without an API key (logged at INFO on loopback).
_NO_KEY_WARNING = ("no API key is set",)

#: Pass API keys to llama-server through a pipe (``--api-key-file /dev/fd/N``) where there is /dev/fd.
_KEY_PIPES = sys.platform.startswith("linux") or sys.platform == "darwin"


def _check_gguf(model: Path) -> None:
    """Fail in one line, before llama-server prints its many, when ``model`` is not a GGUF file.

    :raises NotAGGUFFile: when its first bytes are not GGUF's magic.
    """
    try:
        with open(model, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise StartupError(f"cannot read the model file {model}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise NotAGGUFFile(str(model))


def _key_pipe(key: str) -> int:
    """The read end of a pipe that holds ``key`` and its end (the key is far smaller than a pipe's
    buffer, so the write never blocks).

    :raises StartupError: when no pipe can be made (out of descriptors).
    """
    try:
        read_fd, write_fd = os.pipe()
    except OSError as exc:
        raise StartupError(f"cannot make a pipe for the API key: {exc}") from None
    try:
        os.write(write_fd, key.encode("utf-8") + b"\n")
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def owned_servers() -> list[LlamaServer]:
    """The servers whose process this Python process started and that still run or are starting."""
    pid = os.getpid()
    return [
        s
        for s in list(_owned_servers)
        if (s._proc is not None and s._proc.owned)
        or (s._starting and s._start_pid == pid)
        or (s._prefetching > 0 and s._prefetch_pid == pid)
    ]


def _redact(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, item in enumerate(out[:-1]):
        if item == "--api-key":
            out[i + 1] = "***"
    return out
