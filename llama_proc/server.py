"""The ``Server`` protocol and ``LlamaServer``, which runs one llama-server process."""

from __future__ import annotations

import enum
import errno
import html
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import urllib.parse
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import attrs

from ._registry import reap_stale
from .binaries import find_executable, library_env
from .client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE, DEFAULT_READ_TIMEOUT, Endpoints, LlamaClient, Timeout
from .config import LlamaServerArgs
from .errors import (
    APITimeoutError,
    ConfigError,
    HealthCheckError,
    LlamaProcError,
    ModelNotFound,
    ServerAlreadyRunning,
    ServerNotReady,
    ServerNotRunning,
    StartupError,
    StartupTimeout,
)
from .process import ServerProcess
from .versions import flag_dialect

if TYPE_CHECKING:
    import http.client

    import requests

__all__ = ["EventKind", "Listener", "LlamaServer", "RestartPolicy", "Server", "ServerEvent"]

_log = logging.getLogger("llama_proc.lifecycle")  # llama_proc.server carries the process's own output

#: How often readiness is probed at most (it is also probed at once whenever the server logs a line).
_POLL_MAX_INTERVAL = 0.005
_PORT_ATTEMPTS = 3
_BIND_FAILURE = ("couldn't bind", "address already in use", "failed to bind")


@runtime_checkable
class Server(Protocol):
    """What code that needs an LLM server depends on; :class:`LlamaServer` implements it.

    Every method blocks. Implementations for tests: :class:`llama_proc.testing.FakeServer`.
    """

    def start(self) -> None:
        """Start the server and return once it answers requests."""

    def stop(self) -> int | None:
        """Stop the server; idempotent; returns the exit code."""

    def get_server_args(self) -> LlamaServerArgs:
        """The arguments the server runs (or will run) with."""

    def chat_completions(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> Any:
        """OpenAI chat completion; a :class:`Stream` when ``"stream": True``."""

    def completions(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> Any:
        """OpenAI text completion; a :class:`Stream` when ``"stream": True``."""

    def embeddings(self, request: Mapping[str, Any], *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """OpenAI embeddings."""

    def tokenize(self, request: Mapping[str, Any] | str, *, timeout: Timeout | object = ...) -> dict[str, Any]:
        """Text -> tokens."""

    def detokenize(self, request: Mapping[str, Any] | list[int], *, timeout: Timeout | object = ...) -> dict[str, Any]:
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


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use; choose another port or leave port=None"
                ) from None
            raise StartupError(f"cannot bind {host}:{port}: {exc.strerror}; check the host setting") from None


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def _main_loop_started(conn: http.client.HTTPConnection, api_key: str | None) -> None:
    """Wait until the server's main loop runs, by asking for ``/slots`` (answered from that loop).

    ``/health`` turns 200 a moment before llama-server installs its signal handler and starts
    its main loop, and a SIGTERM in that moment is lost: a ``stop()`` right after ``start()``
    would then wait for the second signal. Any answer will do (``--no-slots`` answers at once)."""
    import http.client  # loaded with the readiness check already

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        conn.request("GET", "/slots", headers=headers)
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _PortTaken(Exception):
    pass


class EventKind(enum.Enum):
    """What happened to a server."""

    START = "start"  #: a server process became ready
    STOP = "stop"  #: a server was stopped (by stop(), idle keep-alive, close(), or after giving up)
    LOAD = "load"  #: a model was loaded on demand for a request (ServerManager)
    EVICT = "evict"  #: a model was unloaded to make room for another (ServerManager)
    CRASH = "crash"  #: a server exited without being asked to, or was killed as hung
    RESTART = "restart"  #: a crashed server was started again


@attrs.frozen
class ServerEvent:
    """One state change, passed to listeners (called outside any lock of llama_proc)."""

    kind: EventKind
    alias: str
    detail: str = ""


Listener = Callable[[ServerEvent], None]


def emit(listeners: Sequence[Listener], events: Sequence[ServerEvent]) -> None:
    """Call every listener with every event; a failing listener is logged and skipped."""
    for event in events:
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                _log.exception("listener %r failed on %s", listener, event)


@attrs.frozen(kw_only=True)
class RestartPolicy:
    """When and how a server that exits unexpectedly is started again.

    :param max_restarts: restarts allowed within ``window`` seconds; past that it stays down.
    :param window: seconds over which restarts are counted.
    :param backoff: seconds before the first restart, doubled for each further one in the window.
    :param max_backoff: the longest wait between restarts.
    :param wait_timeout: how long calls made during a restart wait for it before raising
        :class:`~llama_proc.errors.ServerNotReady`.
    :param restart_on_timeout: a call that gets no answer within its read timeout means the server
        is hung: kill it, and the policy restarts it.
    """

    max_restarts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    window: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    backoff: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    wait_timeout: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    restart_on_timeout: bool = True


def _watch(ref: weakref.ReferenceType[LlamaServer], proc: ServerProcess) -> None:
    """Wait for ``proc`` to exit (its pumps end at end-of-file), then tell its server."""
    for pump in proc.threads:
        pump.join()
    code = proc.wait()
    server = ref()
    if server is not None:
        server._on_exit(proc, code)


class LlamaServer(Endpoints):
    """One ``llama-server`` process and a pooled client to it.

    :param executable_path: the ``llama-server`` to run; None finds one with
        :func:`~llama_proc.find_executable` when the server starts.
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

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. A server that is never
    stopped is stopped when it is garbage-collected or the interpreter exits, and on Linux and macOS
    even when this process is killed.
    """

    def __init__(
        self,
        executable_path: str | os.PathLike[str] | None,
        args: LlamaServerArgs,
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
        if not isinstance(args, LlamaServerArgs):
            raise ConfigError([f"args: expected LlamaServerArgs, got {type(args).__name__}"])
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
        self._attached_url: str | None = None
        self._lock = threading.RLock()
        self._proc: ServerProcess | None = None
        self._client: LlamaClient | None = None
        self._running_args: LlamaServerArgs | None = None
        self._stopped = False
        self._starting = False
        self._pending: ServerProcess | None = None  # the process of a start() in progress
        self._abort = threading.Event()
        self._last_exit: int | None = None
        self._restart = RestartPolicy() if restart is True else (restart or None)
        self._listeners = list(listeners)
        self._stop_requested = threading.Event()
        self._ready = threading.Condition()  # its own lock: waiters must not queue behind a restart
        self._restarting = False
        self._restart_times: deque[float] = deque()
        self._gave_up: str | None = None
        self._hung = False
        self._watcher: threading.Thread | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def args(self) -> LlamaServerArgs:
        """The arguments in effect: once started, with the port actually used."""
        return self._running_args or self._args

    def get_server_args(self) -> LlamaServerArgs:
        """The arguments in effect (as the seed's ``get_server_args``)."""
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
        if self._attached_url is not None:
            return self._attached_url
        port = self.port
        if port is None:
            raise ServerNotRunning("start() has not been called, so its port is not known yet")
        return f"http://{_url_host(_connect_host(self.args.host))}:{port}"

    @property
    def pid(self) -> int | None:
        """The process id while running (or starting)."""
        proc = self._proc or self._pending
        return proc.pid if proc is not None and proc.is_running() else None

    @property
    def process(self) -> ServerProcess | None:
        """The underlying :class:`~llama_proc.process.ServerProcess` (None before start)."""
        return self._proc

    def is_running(self) -> bool:
        """True while the process is alive (for an attached server: while it answers ``/health``)."""
        if self._attached_url is not None:
            try:
                return self._client is not None and self._client.health(timeout=2.0).get("status") == "ok"
            except LlamaProcError:
                return False
        proc = self._proc
        return proc is not None and proc.is_running()

    @property
    def attached(self) -> bool:
        """True for a server made with :meth:`attach`: a client that owns no process."""
        return self._attached_url is not None

    @classmethod
    def attach(
        cls,
        base_url: str,
        api_key: str | None = None,
        *,
        request_timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
    ) -> LlamaServer:
        """A :class:`LlamaServer` for a server that is already running (started by another process,
        for example the parent of forked web workers). It owns no process: :meth:`start` only checks
        that the server answers, and :meth:`stop` only closes the connection pool.

        :param base_url: ``http://host:port`` of the running server.
        :param api_key: the server's API key, sent on every call.
        """
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or parts.hostname is None or parts.port is None:
            raise ConfigError([f"base_url: {base_url!r} is not like http://host:port"])
        args = LlamaServerArgs(model=Path("(attached)"), host=parts.hostname, port=parts.port, api_key=api_key)
        server = cls(None, args, request_timeout=request_timeout)
        server._attached_url = f"{parts.scheme}://{parts.netloc}"
        server._client = LlamaClient(server._attached_url, api_key=api_key, timeout=request_timeout)
        return server

    def ensure_started(self) -> LlamaServer:
        """Start the server unless it runs already (safe to call from many threads at once)."""
        if self._client is not None and self.is_running():
            return self
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

        :raises ModelNotFound: when the model file does not exist.
        :raises ExecutableNotFound: when no executable was given and none is found.
        :raises ServerAlreadyRunning: when it is already running.
        :raises StartupError: when the process exits while starting (with its exit code and last lines).
        :raises StartupTimeout: when it stays silent for ``startup_timeout`` seconds without becoming ready.
        """
        if self._attached_url is not None:
            health = self._require_client().health()
            if health.get("status") != "ok":
                raise HealthCheckError(f"{self._attached_url}/health answered {health!r}")
            return
        _reap_once()
        with self._lock:
            if self._proc is not None and self._proc.is_running():
                raise ServerAlreadyRunning(self._proc.pid or 0, self.base_url)
            self._discard()
            self._stop_requested.clear()
            self._gave_up = None
            self._restart_times.clear()
            self._start_marked()
        emit(self._listeners, [ServerEvent(EventKind.START, self._label(), f"pid {self.pid} at {self.base_url}")])

    def _start_marked(self) -> None:
        # with the lock held: start, while calls from other threads see "starting" and stop() can abort
        self._starting = True
        self._abort.clear()
        try:
            self._start_locked()
        finally:
            self._starting = False
            self._pending = None

    def _start_locked(self) -> None:
        model = self._args.model
        if not model.is_file():
            raise ModelNotFound(str(model))
        if not os.access(model, os.R_OK):
            raise StartupError(f"the model file {model} is not readable; check its permissions")
        executable = self.executable
        dialect = flag_dialect(executable)
        fixed_port = self._args.port
        if fixed_port is not None:
            _check_port_free(self._args.host, fixed_port)
        env = {**os.environ, **self._env} if self._env else None
        env = library_env(executable, env) or env
        base_args = self._args
        if base_args.api_key == "auto":
            # a strong key for this run; the client sends it, `server.api_key` tells it to others
            base_args = base_args.evolve(api_key=secrets.token_urlsafe(32))
        if base_args.api_key is None and not _is_loopback(base_args.host):
            _log.warning(
                "llama-server will listen on %s without an API key: anyone who can reach it can use it; "
                'set api_key (api_key="auto" generates one)',
                base_args.host,
            )
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = fixed_port if fixed_port is not None else self._pick_port()
            args = base_args if fixed_port is not None else base_args.evolve(port=port)
            argv = [str(executable), *args.to_args(dialect)]
            _log.info("starting %s", " ".join(_redact(argv)))
            proc = ServerProcess(argv, env=env, log_lines=self._log_lines, stop_timeout=self._stop_timeout)
            proc.start()
            self._pending = proc
            try:
                self._wait_ready(proc, args)
            except _PortTaken:
                proc.stop(self._stop_timeout)
                if fixed_port is not None or attempt == _PORT_ATTEMPTS:
                    raise StartupError(
                        f"port {port} was taken by another process ({attempt} attempt(s))",
                        proc.returncode,
                        proc.log_tail(),
                    ) from None
                _log.info("port %d was taken; retrying on another port", port)
                continue
            except BaseException:
                proc.stop(self._stop_timeout)
                raise
            proc.batch_output()  # up: from now on the server's speed matters more than a log line's latency
            self._proc = proc
            _owned_servers.add(self)
            self._running_args = args
            self._stopped = False
            self._client = LlamaClient(
                self.base_url,
                api_key=args.api_key,
                timeout=self._request_timeout,
                pool_maxsize=max(DEFAULT_POOL_SIZE, 2 * (args.n_parallel or 1)),
                error_hint=self._error_hint,
            )
            _log.info("llama-server pid %s ready at %s", proc.pid, self.base_url)
            if self._restart is not None or self._listeners:
                self._watcher = threading.Thread(
                    target=_watch, args=(weakref.ref(self), proc), name=f"llama-server-{proc.pid}-watch", daemon=True
                )
                self._watcher.start()
            return

    def _pick_port(self) -> int:
        try:
            return _free_port(self._args.host)
        except OSError as exc:
            raise StartupError(f"cannot bind {self._args.host}: {exc.strerror}; check the host setting") from None

    def _wait_ready(self, proc: ServerProcess, args: LlamaServerArgs) -> None:
        import http.client  # here, not at import: it pulls in the email package

        host = _connect_host(args.host)
        assert args.port is not None
        conn: http.client.HTTPConnection | None = None
        interval = 0.001
        try:
            while True:
                if self._abort.is_set():
                    raise StartupError("stop() was called while the server was starting", None, proc.log_tail())
                code = proc.poll()
                if code is not None:
                    proc.wait(1.0)  # let the pumps collect the last lines
                    tail = proc.log_tail()
                    if any(marker in line.lower() for line in tail for marker in _BIND_FAILURE):
                        raise _PortTaken()
                    raise StartupError(f"llama-server exited with status {code} while starting", code, tail)
                if conn is None:
                    conn = http.client.HTTPConnection(host, args.port, timeout=2.0)
                try:
                    conn.request("GET", "/health")
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = None
                else:
                    if response.status == 200:
                        if proc.poll() is None:
                            _main_loop_started(conn, args.api_key)
                            return
                        continue
                    if response.status != 503:
                        raise HealthCheckError(
                            f"GET /health answered {response.status} {body[:200]!r}; is this really llama-server?"
                        )
                silent = time.monotonic() - proc.last_activity
                if silent > self._startup_timeout:
                    tail = proc.log_tail()
                    proc.stop(0)
                    raise StartupTimeout(self._startup_timeout, tail)
                proc.wait_activity(interval)
                interval = min(interval * 1.5, _POLL_MAX_INTERVAL)
        finally:
            if conn is not None:
                conn.close()

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server: SIGTERM (again after a second if it still runs), then SIGKILL once
        ``timeout`` seconds (default ``stop_timeout``) have passed.

        Joins the log threads and closes the connection pool. Idempotent.

        :returns: the exit code, or None if it was never started.
        """
        self._stop_requested.set()
        with self._ready:
            self._ready.notify_all()
        pending = self._pending
        if pending is not None:
            # a start() is in progress in another thread (which holds the lock): make it give up
            self._abort.set()
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
        emit(self._listeners, [ServerEvent(EventKind.STOP, self._label(), f"exit status {code}")])
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
        if client is None and self._restarting and self._restart is not None:
            client = self._wait_for_restart(self._restart.wait_timeout)
        if client is None:
            if self._gave_up is not None:
                raise ServerNotRunning(self._gave_up)
            if self._starting:
                raise ServerNotReady()
            if self._stopped:
                raise ServerNotRunning("it was stopped; call start() to run it again")
            raise ServerNotRunning("start() has not been called")
        return client

    # -- supervision --------------------------------------------------------------------------

    def _label(self) -> str:
        return self.args.alias or self.args.model.name

    def _wait_for_restart(self, timeout: float) -> LlamaClient:
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._client is None and self._restarting and not self._stop_requested.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerNotReady(
                        f"Model server is restarting after a crash and was not ready within {timeout:g} seconds."
                    )
                self._ready.wait(remaining)
            client = self._client
        if client is None:
            raise ServerNotRunning(self._gave_up or "it was stopped while restarting")
        return client

    def _call(
        self, method: str, path: str, body: Any = None, *, stream: bool = False, timeout: Timeout | object = ...
    ) -> requests.Response:
        try:
            return super()._call(method, path, body, stream=stream, timeout=timeout)
        except APITimeoutError:
            policy = self._restart
            proc = self._proc
            if policy is not None and policy.restart_on_timeout and proc is not None and proc.is_running():
                _log.warning("llama-server pid %s did not answer %s in time: killing it as hung", proc.pid, path)
                self._hung = True
                proc.stop(0)  # the watcher sees the exit and the policy restarts it
            raise

    def _on_exit(self, proc: ServerProcess, code: int | None) -> None:
        """Called by the watcher thread when the process exits."""
        with self._lock:
            current = self._proc is proc and not self._stop_requested.is_set()
            if not current and not proc.exited_on_its_own:
                return  # stopped on request: expected
            client = None
            if current:
                client, self._client = self._client, None
                self._restarting = self._restart is not None
        if client is not None:
            client.close()
        why = "hung (no answer within the read timeout)" if self._hung else f"exit status {code}"
        self._hung = False
        tail = " | ".join(proc.log_tail(3))
        _log.warning("llama-server pid %s exited unexpectedly: %s; last lines: %s", proc.pid, why, tail)
        emit(self._listeners, [ServerEvent(EventKind.CRASH, self._label(), why)])
        # a crash noticed only after the server was stopped or replaced is reported, not restarted
        if current and self._restart is not None:
            self._restart_loop(self._restart)

    def _restart_loop(self, policy: RestartPolicy) -> None:
        events: list[ServerEvent] = []
        try:
            while not self._stop_requested.is_set():
                now = time.monotonic()
                while self._restart_times and now - self._restart_times[0] > policy.window:
                    self._restart_times.popleft()
                if len(self._restart_times) >= policy.max_restarts:
                    self._gave_up = (
                        f"it crashed {len(self._restart_times) + 1} times within {policy.window:g} s and was left "
                        "down; call start() to run it again"
                    )
                    _log.error("llama-server %s: %s", self._label(), self._gave_up)
                    events.append(ServerEvent(EventKind.STOP, self._label(), "gave up restarting"))
                    return
                delay = min(policy.backoff * (2 ** len(self._restart_times)), policy.max_backoff)
                if self._stop_requested.wait(delay):
                    return
                self._restart_times.append(time.monotonic())
                try:
                    with self._lock:
                        if self._stop_requested.is_set():
                            return
                        old = self._proc
                        if old is not None:
                            old.stop(0)  # reap it and join its pumps
                            _owned_servers.discard(self)
                        self._start_marked()
                except LlamaProcError as exc:
                    _log.warning("restarting llama-server %s failed: %s", self._label(), exc)
                    continue
                events.append(ServerEvent(EventKind.RESTART, self._label(), f"pid {self.pid} at {self.base_url}"))
                return
        finally:
            self._restarting = False
            with self._ready:
                self._ready.notify_all()
            emit(self._listeners, events)

    def _error_hint(self) -> str:
        # only on the error path: a connection that broke often means the process is dying; give it a
        # moment to be reaped (a killed multi-threaded process is) so the error can say how it ended
        proc = self._proc
        if proc is None or not proc.owned:
            return ""
        code = proc.poll()
        if code is None:
            code = proc.wait(0.5)
        if code is None:
            return ""
        last = proc.log_tail(3)
        return f"llama-server exited with status {code}" + (": " + " | ".join(last) if last else "")

    def _http(self) -> LlamaClient:
        return self._require_client()

    def _state(self) -> str:
        if self._attached_url is not None:
            return "attached"
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
        where = f" {self.base_url}" if state in ("running", "attached") else ""
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
            ("url", self.base_url if state in ("running", "attached") else ""),
            ("pid", "" if self.pid is None else str(self.pid)),
            ("uptime", "" if uptime is None else f"{uptime:.1f} s"),
        ]
        cells = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        tail = html.escape("\n".join(self.log_tail(8)))
        log = f"<details><summary>last log lines</summary><pre>{tail}</pre></details>" if tail else ""
        return f"<div><strong>LlamaServer</strong><table>{cells}</table>{log}</div>"


_owned_servers: weakref.WeakSet[LlamaServer] = weakref.WeakSet()


def owned_servers() -> list[LlamaServer]:
    """The servers whose process this Python process started and that still run."""
    return [s for s in list(_owned_servers) if s._proc is not None and s._proc.owned]


def _redact(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, item in enumerate(out[:-1]):
        if item == "--api-key":
            out[i + 1] = "***"
    return out
