"""llama.cpp's RPC backend: ``rpc-server`` workers, and a llama-server that spreads a model over them.

* :class:`RpcWorker` runs one ``rpc-server`` with the care :class:`~llama_proc.server.LlamaServer`
  takes of llama-server (its own process group, output pumped into the ``llama_proc.rpc`` logger,
  a finalizer and the orphan guardian, the stale-process registry, SIGTERM then SIGKILL), or
  stands for one started elsewhere (:meth:`RpcWorker.attach`).
* :class:`RpcCluster` checks (or starts) its workers, then starts a llama-server with ``--rpc``
  listing them, and is a :class:`~llama_proc.server.Server`: every call works as on a
  ``LlamaServer``. It stops the server before the workers (a llama-server whose workers vanish
  first aborts), names an unreachable worker at start within the connect timeout (llama-server
  itself would wait for the operating system's), and names a lost one when a call fails.

``rpc-server`` has no authentication: whoever reaches its port can use (and crash) it. Keep workers
on loopback or a private network; binding one elsewhere logs a warning.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .binaries import find_executable, library_env
from .client import Endpoints, LlamaClient
from .config import LlamaServerArgs
from .errors import (
    APIConnectionError,
    APITimeoutError,
    ConfigError,
    RpcWorkerError,
    RpcWorkerUnreachable,
    ServerNotReady,
    ServerNotRunning,
    StartupAborted,
    StartupError,
)
from .process import ServerProcess
from .readiness import check_port_free, connect_host, free_port, is_loopback
from .server import LlamaServer, _reap_once

if TYPE_CHECKING:
    import requests

    from .supervision import RestartPolicy

__all__ = ["DEFAULT_RPC_PORT", "RpcCluster", "RpcWorker", "rpc_flags", "stop_clusters", "stop_workers"]

_log = logging.getLogger("llama_proc.rpc")

#: rpc-server's own default port.
DEFAULT_RPC_PORT = 50052
#: Seconds to wait for a worker to accept a connection (at start, and when checking a cluster's workers).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds a worker whose port is open has to log that it accepted the check's connection.
_LOG_GRACE = 2.0


_owned_workers: weakref.WeakSet[RpcWorker] = weakref.WeakSet()
_running_clusters: weakref.WeakSet[RpcCluster] = weakref.WeakSet()


def stop_clusters() -> list[int | None]:
    """Stop every RPC cluster this process started, each server before its workers
    (:func:`~llama_proc.stop_all` calls it first); returns the servers' exit codes."""
    pid = os.getpid()
    return [c.stop() for c in list(_running_clusters) if c._start_pid == pid]


def stop_workers() -> list[int | None]:
    """Stop every rpc-server worker this process runs (:func:`~llama_proc.stop_all` calls it after
    stopping the servers); returns their exit codes."""
    pid = os.getpid()
    return [w.stop() for w in list(_owned_workers) if w._proc is not None and w._proc.owned and w._owner == pid]


@functools.lru_cache(maxsize=16)
def _help_text(executable: str, mtime: float) -> str:
    try:
        done = subprocess.run(
            [executable, "--help"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartupError(f"cannot run {executable} --help: {exc}") from None
    return done.stdout + done.stderr


def rpc_flags(executable: str | os.PathLike[str]) -> frozenset[str]:
    """The long flags an ``rpc-server`` build accepts, read from its ``--help`` (it has no
    ``--version``); cached per executable and modification time.

    :raises StartupError: when the executable cannot be run.
    """
    path = os.fspath(executable)
    try:
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise StartupError(f"{path} does not exist ({exc.strerror})") from None
    text = _help_text(path, mtime)
    return frozenset(word.rstrip(",") for word in text.split() if word.startswith("--"))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError([f"rpc worker: expected host:port (10.0.0.5:50052), got {address!r}"])
    return host.strip("[]"), int(port)


# rpc-server speaks ggml's own binary protocol over plain TCP, not HTTP, so urllib3 and requests have
# nothing for it: the checks below only open a TCP connection (and see whether the worker takes it),
# which needs a socket of the standard library; no request of that protocol is ever sent.


def _connect(host: str, port: int, timeout: float, abort: threading.Event | None) -> socket.socket | str:
    """A connected socket to ``host:port``, or why there is none: one connection attempt, waited
    for in slices of at most half a second so that ``abort`` ends a wait for a silent host."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(connect_host(host), port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        return exc.strerror or str(exc)
    sock = socket.socket(family, kind, proto)  # a bare TCP connect to rpc-server (not HTTP: see above)
    connected = False
    try:
        sock.setblocking(False)
        error = sock.connect_ex(address)
        deadline = time.monotonic() + timeout
        while error in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            left = deadline - time.monotonic()
            if left <= 0:
                return f"no connection within {timeout:g} s"
            if abort is not None and abort.is_set():
                return "the wait was aborted"
            # a non-blocking connect polled in slices: socket.create_connection's one timeout
            # could not be interrupted by stop(), and retries of it would restart the handshake
            _, writable, _ = select.select([], [sock], [], min(0.5, left))
            if writable:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            return os.strerror(error)
        sock.setblocking(True)
        connected = True
        return sock
    finally:
        if not connected:
            sock.close()


def _probe(host: str, port: int, timeout: float, abort: threading.Event | None = None) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout``, else why not. (rpc-server
    takes one client at a time; a connection it has not accepted yet still completes in the kernel.)"""
    sock = _connect(host, port, timeout, abort)
    if isinstance(sock, str):
        return sock
    sock.close()
    return None


def _busy(host: str, port: int, timeout: float, abort: threading.Event | None = None) -> str | None:
    """None when the rpc-server at ``host:port`` takes a new client now (it accepts a connection
    that sends nothing and closes it at once), else why not. One that serves another client leaves
    the connection unaccepted (rpc-server serves one client at a time): nothing comes in ``timeout``."""
    deadline = time.monotonic() + timeout
    sock = _connect(host, port, timeout, abort)
    if isinstance(sock, str):
        return sock
    with sock:
        try:
            sock.shutdown(socket.SHUT_WR)  # no request: rpc-server reads the end and closes
            while True:
                sock.settimeout(min(0.5, max(deadline - time.monotonic(), 0.001)))
                try:
                    sock.recv(1)  # the worker's end of the connection (no HTTP: see above)
                    return None  # closed by the worker (or an answer): it took the client
                except socket.timeout:
                    if abort is not None and abort.is_set():
                        return "the wait was aborted"
                    if time.monotonic() >= deadline:
                        return (
                            f"accepts connections but took no new client within {timeout:g} s: it serves another "
                            "llama-server (an rpc-server serves one at a time); stop that one, or run another worker"
                        )
        except ConnectionResetError:
            return None  # it accepted, and closed with a reset
        except OSError as exc:
            return exc.strerror or str(exc)


class RpcWorker:
    """One ``rpc-server``: a ggml backend (the CPU, or ``device``) served over TCP to llama-servers
    started with ``--rpc``.

    :param executable: the ``rpc-server`` to run (default: found beside llama-server, as
        :func:`~llama_proc.binaries.find_executable` finds it).
    :param host: the address to listen on. Anything but loopback logs a warning: rpc-server has
        no authentication, so only ever bind it to a private network.
    :param port: the port (default: a free one).
    :param threads: threads for the CPU backend (rpc-server's default: 1).
    :param device: the device(s) to serve, comma-separated (``CUDA0``; default: all, else the CPU).
    :param cache: keep tensors received in a local file cache (``--cache``), so a model is sent once.
    :param mem: backend memory in MB to report, on builds that have ``--mem``.
    :param startup_timeout: seconds to wait for the port to accept connections.
    :param stop_timeout: seconds between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        executable: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        threads: int | None = None,
        device: str | None = None,
        cache: bool = False,
        mem: int | None = None,
        *,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        log_lines: int = 200,
        env: dict[str, str] | None = None,
    ) -> None:
        problems = []
        if not isinstance(host, str):
            raise ConfigError(
                [f"host: expected an IPv4 address as a string, got {host!r} (the first argument is the executable)"]
            )
        for name, value in (("port", port), ("threads", threads), ("mem", mem)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError([f"{name}: expected an integer, got {value!r}"])
        if port is not None and not 0 < port < 65536:
            problems.append(f"port: must be between 1 and 65535, got {port}")
        if threads is not None and threads < 1:
            problems.append(f"threads: must be at least 1, got {threads}")
        if mem is not None and mem < 1:
            problems.append(f"mem: must be at least 1 (MB), got {mem}")
        if not _is_ipv4(host):
            problems.append(
                f"host: rpc-server listens on IPv4 addresses only (127.0.0.1, 0.0.0.0, 10.0.0.5), got {host!r}"
            )
        if problems:
            raise ConfigError(problems)
        self._executable = Path(executable) if executable is not None else None
        self.host = host
        self._port = port
        self.threads = threads
        self.device = device
        self.cache = cache
        self.mem = mem
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._log_lines = log_lines
        self._env = env
        self._attached = False
        self._proc: ServerProcess | None = None
        self._last: ServerProcess | None = None  # the stopped one, for its last lines
        self._owner = 0
        self._abort = threading.Event()
        self._lock = threading.RLock()

    @classmethod
    def attach(cls, address: str) -> RpcWorker:
        """A worker started elsewhere (``llama-proc rpc-worker`` on another host): ``"10.0.0.5:50052"``.
        It has no process here; :meth:`start` only checks that it accepts connections."""
        host, port = _split(address)
        worker = cls(port=port)
        worker.host = host  # a name is fine here: llama-server resolves it
        worker._attached = True
        return worker

    # -- properties ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """True for a worker started elsewhere (see :meth:`attach`)."""
        return self._attached

    @property
    def port(self) -> int | None:
        """The port (chosen at start when none was given)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as llama-server's ``--rpc`` takes it (a wildcard host as loopback)."""
        host = connect_host(self.host)
        return f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The rpc-server's pid while this object runs it; None for an attached worker."""
        return self._proc.pid if self._proc is not None else None

    @property
    def executable(self) -> Path:
        """The rpc-server this worker runs (found on first use when not given)."""
        if self._executable is None:
            self._executable = find_executable(name="rpc-server")
        return self._executable

    def is_running(self) -> bool:
        """For a worker run here: its process is alive. For an attached one: it accepts a connection."""
        if self._attached:
            return self._port is not None and _probe(self.host, self._port, DEFAULT_CONNECT_TIMEOUT) is None
        proc = self._proc
        return proc is not None and proc.is_running()

    def log_tail(self, n: int = 20) -> list[str]:
        """The worker's last ``n`` output lines (rpc-server writes most of them when it exits: it
        buffers its standard output in a pipe)."""
        proc = self._proc or self._last
        return proc.log_tail(n) if proc is not None else []

    def check(self, timeout: float = DEFAULT_CONNECT_TIMEOUT, abort: threading.Event | None = None) -> None:
        """:raises RpcWorkerUnreachable: naming this worker, when it accepts no connection within
        ``timeout``. :raises StartupAborted: when ``abort`` is set meanwhile."""
        if self._port is None:
            raise RpcWorkerError(f"{self.host}:?", "not started")
        why = _probe(self.host, self._port, timeout, abort)
        if abort is not None and abort.is_set():
            raise StartupAborted(f"the check of RPC worker {self.address} was aborted", None, [])
        if why is not None:
            raise RpcWorkerUnreachable(self.address, why)

    def check_idle(self, timeout: float = DEFAULT_CONNECT_TIMEOUT, abort: threading.Event | None = None) -> None:
        """:raises RpcWorkerError: naming this worker, when it does not take a new client within
        ``timeout`` (an rpc-server serves one llama-server at a time), or cannot be reached.
        :raises StartupAborted: when ``abort`` is set meanwhile."""
        if self._port is None:
            raise RpcWorkerError(f"{self.host}:?", "not started")
        why = _busy(self.host, self._port, timeout, abort)
        if abort is not None and abort.is_set():
            raise StartupAborted(f"the check of RPC worker {self.address} was aborted", None, [])
        if why is not None:
            raise RpcWorkerError(self.address, why)

    # -- lifecycle ----------------------------------------------------------------------------

    def to_args(self) -> list[str]:
        """The argv (without the executable), for the flags this build accepts.

        :raises ConfigError: when a setting needs a flag this build lacks (``mem``).
        """
        flags = rpc_flags(self.executable)
        argv = ["--host", self.host, "--port", str(self._port if self._port is not None else DEFAULT_RPC_PORT)]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        if self.device is not None:
            argv += ["--device", self.device]
        if self.cache:
            argv.append("--cache")
        if self.mem is not None:
            if "--mem" not in flags:
                raise ConfigError([f"mem: this rpc-server ({self.executable}) has no --mem flag"])
            argv += ["--mem", str(self.mem)]
        return argv

    def start(self) -> None:
        """Start rpc-server and return once its port accepts connections (an attached worker is
        only checked).

        :raises StartupError: when it exits while starting, with its exit code and last lines.
        :raises StartupTimeout: when its port does not open within ``startup_timeout``.
        :raises RpcWorkerUnreachable: for an attached worker that accepts no connection.
        """
        if self._attached:
            self.check()
            return
        proc = self._launch()
        if proc is not None:
            self._await(proc)

    def _launch(self) -> ServerProcess | None:
        """Spawn rpc-server (None when it already runs); :meth:`_await` waits until it listens."""
        _reap_once()
        with self._lock:
            if self._proc is not None and self._proc.is_running():
                return None
            self._abort.clear()
            if self._port is None:
                self._port = free_port(self.host)
            else:
                check_port_free(self.host, self._port)
            if not is_loopback(self.host):
                _log.warning(
                    "rpc-server will listen on %s:%s without authentication: anyone who can reach it can use "
                    "it; bind it to a private network only",
                    self.host,
                    self._port,
                )
            executable = self.executable
            argv = [str(executable), *self.to_args()]
            env = {**os.environ, "GGML_NO_BACKTRACE": "1", **(self._env or {})}  # an abort: no debugger run
            env = library_env(executable, env) or env
            if signal.getsignal(signal.SIGPIPE) is not signal.SIG_IGN:
                _log.warning(
                    "SIGPIPE is not ignored in this process, so rpc-server inherits its default action and a "
                    "client that goes away mid-answer can kill it; keep Python's default (ignored)"
                )
            _log.info("starting %s", " ".join(argv))
            # SIGPIPE ignored: rpc-server writes to its client's socket unguarded, and a llama-server
            # that goes away mid-answer would otherwise kill the worker
            proc = ServerProcess(
                argv,
                env=env,
                log_lines=self._log_lines,
                stop_timeout=self.stop_timeout,
                logger=_log,
                ignore_sigpipe=True,
            )
            proc.start()
            self._proc = proc
            self._owner = os.getpid()
            _owned_workers.add(self)
            return proc

    def _await(self, proc: ServerProcess, abort: threading.Event | None = None) -> None:
        """Wait until ``proc`` listens; on any failure it is stopped. ``abort`` (or :meth:`stop`)
        ends the wait with :class:`~llama_proc.errors.StartupAborted`."""
        try:
            self._wait_listening(proc, abort)
        except BaseException:
            with self._lock:
                if self._proc is proc:
                    self._proc = None
            proc.stop(self.stop_timeout)
            raise
        _log.info("rpc-server pid %s listening on %s", proc.pid, self.address)

    def _wait_listening(self, proc: ServerProcess, abort: threading.Event | None) -> None:
        """Until the port accepts a connection and rpc-server's log says that it accepted it (so the
        listener is this rpc-server, not another process that took the port first). rpc-server
        buffers its output in the pipe; accepting a client makes it write the lines out."""
        assert self._port is not None
        deadline = time.monotonic() + self.startup_timeout
        connected_at: float | None = None
        while True:
            if self._abort.is_set() or (abort is not None and abort.is_set()):
                raise StartupAborted("stop() was called while the rpc-server was starting", None, proc.log_tail())
            if not proc.is_running():
                code = proc.wait(1.0)
                proc.stop(0)  # joins the pumps: the last lines are in the tail
                raise StartupError(f"rpc-server exited with status {code} while starting", code, proc.log_tail())
            if connected_at is None and _probe(self.host, self._port, 1.0) is None:
                connected_at = time.monotonic()
            if connected_at is not None:
                if any("Accepted client connection" in line for line in proc.log_tail(50)):
                    return
                if time.monotonic() - connected_at > _LOG_GRACE:
                    # a build that logs otherwise (or keeps it buffered): the port is open and this
                    # rpc-server still runs, which it would not if another process held the port
                    _log.debug("rpc-server pid %s: no log line about the connection; taking the open port", proc.pid)
                    return
                proc.wait_activity(0.05)
                continue
            if time.monotonic() > deadline:
                raise StartupError(
                    f"rpc-server's port {self._port} did not open within {self.startup_timeout:g} s",
                    None,
                    proc.log_tail(),
                )
            time.sleep(0.002)  # a refused connection on this machine costs microseconds

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop rpc-server: SIGTERM, then SIGKILL after ``timeout`` (default ``stop_timeout``); a
        start() still waiting for it raises ``StartupAborted``. Idempotent; nothing to do for an
        attached worker, or in a forked child. :returns: the exit code."""
        if self._owner not in (0, os.getpid()):
            return None  # a forked copy: the worker is its parent's
        self._abort.set()
        with self._lock:
            proc, self._proc = self._proc, None
            self._last = proc or self._last
            _owned_workers.discard(self)
        if proc is None:
            return None
        return proc.stop(self.stop_timeout if timeout is None else timeout)

    def __enter__(self) -> RpcWorker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        if self._attached:
            return f"<RpcWorker attached {self.address}>"
        state = "running" if self._proc is not None and self._proc.is_running() else "stopped"
        return f"<RpcWorker {state} {self.host}:{self._port} pid={self.pid}>"


class RpcCluster(Endpoints):
    """A llama-server that spreads its model over ``rpc-server`` workers (``--rpc``).

    :param server_args: the server's settings; ``rpc`` is filled in from ``workers``, and
        ``n_gpu_layers`` defaults to all layers (-1), since the workers' devices count as GPUs.
    :param workers: :class:`RpcWorker` objects (started here when they are not running; attached
        ones are checked), or ``"host:port"`` strings for workers started elsewhere.
    :param local_worker: also run a worker on this machine's loopback (its CPU, or its devices).
    :param connect_timeout: seconds each worker has to accept a connection at start.
    :param worker_wait: with ``restart``, seconds a restart waits for lost workers to accept
        connections again (workers run here are started again at once).
    :param executable: the llama-server to run (default: found).
    :param autostart: start on the first call instead of raising ``ServerNotRunning``.
    :param server_options: passed to :class:`~llama_proc.server.LlamaServer` (``startup_timeout``,
        ``request_timeout``, ``restart``, ...). With a ``restart`` policy, a server that crashed
        because a worker was lost is restarted once every worker accepts connections again.
    """

    def __init__(
        self,
        server_args: LlamaServerArgs,
        workers: Iterable[RpcWorker | str] = (),
        local_worker: bool = False,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        worker_wait: float = 60.0,
        executable: str | os.PathLike[str] | None = None,
        restart: RestartPolicy | bool | None = None,
        autostart: bool = False,
        **server_options: Any,
    ) -> None:
        self._workers = [w if isinstance(w, RpcWorker) else RpcWorker.attach(w) for w in workers]
        if local_worker:  # the rpc-server beside the llama-server given, so both are of one build
            beside = Path(executable).parent / "rpc-server" if executable is not None else None
            self._workers.append(RpcWorker(beside if beside is not None and beside.is_file() else None))
        if not self._workers:
            raise ConfigError(["workers: an RPC cluster needs at least one worker (or local_worker=True)"])
        self._started_here: list[RpcWorker] = []
        self._args = server_args
        self._connect_timeout = connect_timeout
        self._worker_wait = worker_wait
        self._executable = executable
        self._restart = restart
        self._options = server_options
        self._server: _ClusterServer | None = None
        self._pending: _ClusterServer | None = None  # the server of a start() in progress
        self._lock = threading.RLock()
        self._workers_lock = threading.Lock()  # restarts of lost workers vs stopping them
        self._stopping = False
        self._abort = threading.Event()  # set by stop(): a start() in progress gives up
        self._stops = 0  # stop() calls so far: a start() that waited for the lock checks it
        self._start_pid = 0
        #: Start on the first call (as :func:`~llama_proc.shared_server` sets it).
        self.autostart = autostart

    # -- properties ---------------------------------------------------------------------------

    @property
    def workers(self) -> list[RpcWorker]:
        """The workers, in ``--rpc`` order."""
        return list(self._workers)

    @property
    def server(self) -> LlamaServer:
        """The llama-server that uses the workers.

        :raises ServerNotRunning: before :meth:`start`.
        """
        if self._server is None:
            raise ServerNotRunning("the RPC cluster has not been started")
        return self._server

    @property
    def pid(self) -> int | None:
        """The llama-server's pid."""
        return self._server.pid if self._server is not None else None

    @property
    def base_url(self) -> str:
        """The llama-server's URL."""
        return self.server.base_url

    @property
    def api_key(self) -> str | None:
        """The llama-server's API key, if any."""
        return self._server.api_key if self._server is not None else self._args.api_key

    def get_server_args(self) -> LlamaServerArgs:
        """The server's arguments (with ``--rpc`` filled in once started)."""
        return self._server.args if self._server is not None else self._args

    def log_tail(self, n: int = 20) -> list[str]:
        """The llama-server's last ``n`` output lines."""
        return self._server.log_tail(n) if self._server is not None else []

    def is_running(self) -> bool:
        """Whether the llama-server runs."""
        return self._server is not None and self._server.is_running()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or check) every worker, then the llama-server that uses them.

        :raises RpcWorkerUnreachable: naming the first worker that accepts no connection within
            ``connect_timeout`` (nothing is left running).
        :raises StartupError: when a worker or the server cannot be started.
        """
        stops = self._stops
        self._start_pid = os.getpid()
        _running_clusters.add(self)  # stop_all() sees it from now on, and aborts the start
        with self._lock:
            if self._server is not None and self._server.is_running():
                return
            if self._server is not None:  # crashed, or given up on: stopped for good before the new one
                self._server.stop()
                self._server = None
            if self._stops != stops:  # stop() came before the lock was ours
                if self._server is None:
                    _running_clusters.discard(self)
                raise StartupAborted("stop() was called while the RPC cluster was starting", None, [])
            self._stopping = False
            self._abort.clear()
            try:
                launched = []
                for worker in self._workers:  # all spawned at once, then waited for
                    if not worker.attached:
                        proc = worker._launch()
                        if proc is not None:
                            self._started_here.append(worker)
                            launched.append((worker, proc))
                for worker in self._workers:
                    if worker.attached:
                        self._check_abort()
                        worker.check(self._connect_timeout, self._abort)
                        worker.check_idle(self._connect_timeout, self._abort)
                for worker, proc in launched:
                    worker._await(proc, self._abort)
                self._check_abort()
                args = self._args.evolve(
                    rpc=tuple(w.address for w in self._workers),
                    n_gpu_layers=-1 if self._args.n_gpu_layers is None else self._args.n_gpu_layers,
                )
                options = dict(self._options)
                # a llama-server that loses a worker aborts; without this it first runs gdb, if
                # installed, to print a backtrace, which delays the error by seconds
                options["env"] = {"GGML_NO_BACKTRACE": "1", **(options.get("env") or {})}
                server = _ClusterServer(self, self._executable, args, restart=self._restart, **options)
                self._pending = server
                self._check_abort()
                server.start()
                self._server = server  # at once: an interrupt from here on finds it to stop
                self._pending = None
            except BaseException:
                self._pending = None
                self._stop_workers()
                _running_clusters.discard(self)
                raise

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server, then the workers this cluster started. :returns: the server's exit code."""
        self._stops += 1
        self._stopping = True  # a restart waiting for workers gives up, and starts none again
        self._abort.set()  # a start() in progress gives up
        pending = self._pending
        if pending is not None:
            pending.stop(timeout)  # its start() raises StartupAborted
        with self._lock:
            server, self._server = self._server, None
            _running_clusters.discard(self)
            code = server.stop(timeout) if server is not None else None
            self._stop_workers()
        return code

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise StartupAborted("stop() was called while the RPC cluster was starting", None, [])

    def _await_workers(self, stop: threading.Event) -> None:
        """Before a restart: start again the workers run here that died, and wait until every worker
        accepts connections (at most ``worker_wait`` seconds).

        :raises RpcWorkerUnreachable: naming a worker still unreachable then (the restart counts as failed).
        """
        deadline = time.monotonic() + self._worker_wait
        while True:
            lost: RpcWorkerError | None = None
            for worker in self._workers:
                try:
                    with self._workers_lock:
                        if self._stopping or stop.is_set():
                            raise RpcWorkerError(worker.address, "the cluster is being stopped")
                        if not worker.attached and worker in self._started_here and not worker.is_running():
                            _log.warning("rpc-server %s is gone; starting it again", worker.address)
                            worker.stop(0)
                            proc = worker._launch()
                            if proc is not None:
                                worker._await(proc, self._abort)  # stop() sets it: no waiting for the start
                    worker.check(min(self._connect_timeout, 1.0))
                except (RpcWorkerError, StartupError) as exc:
                    lost = exc if isinstance(exc, RpcWorkerError) else RpcWorkerError(worker.address, exc.reason)
                    break
            if lost is None:
                return
            if self._stopping or stop.is_set() or time.monotonic() > deadline:
                raise RpcWorkerUnreachable(lost.address, f"{lost.reason} (waited {self._worker_wait:g} s to restart)")
            stop.wait(0.5)

    def _stop_workers(self) -> None:
        with self._workers_lock:
            while self._started_here:
                self._started_here.pop().stop()

    def __enter__(self) -> RpcCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        workers = ", ".join(w.address for w in self._workers)
        return f"<RpcCluster server={self._server!r} workers=[{workers}]>"

    # -- calls --------------------------------------------------------------------------------

    def _http(self) -> LlamaClient:
        server = self._server
        if self.autostart and (server is None or not (server.is_running() or server._supervisor.restarting)):
            self.start()
        return self.server._http()

    def _on_timeout(self, path: str) -> None:
        server = self._server
        if server is not None:
            server._on_timeout(path)  # a hung server is restarted under restart_on_timeout

    def _lost_worker(self) -> RpcWorkerError | None:
        """When the llama-server has exited on its own (it aborts when it loses a worker): the
        worker that is gone, as the error that names it (the one found as the process exited, if
        a restart has begun since)."""
        server = self._server
        proc = server.process if server is not None else None
        if server is None or proc is None or not proc.owned:
            return None
        if proc.is_running():
            proc.wait(1.0)  # the call broke as the process died: give it a moment to be reaped
        if proc.is_running() and not server._supervisor.restarting:
            return None
        return server.lost_by.get(proc) or self._find_lost()

    def _find_lost(self) -> RpcWorkerError | None:
        """The first worker that is gone: workers run here are asked for their process (for up to
        a second: a killed one's sockets close before it is reaped); remote ones get one short
        connection attempt each."""
        local = [w for w in self._workers if not w.attached and w.pid is not None]
        deadline = time.monotonic() + 1.0
        while True:
            for worker in local:
                if not worker.is_running():
                    return RpcWorkerError(worker.address, f"its rpc-server (pid {worker.pid}) is gone")
            if time.monotonic() > deadline or not local:
                break
            time.sleep(0.02)
        for worker in self._workers:
            if worker.attached:
                why = _probe(worker.host, worker.port or 0, min(self._connect_timeout, 1.0))
                if why is not None:
                    return RpcWorkerError(worker.address, f"lost ({why})")
        return None

    def _call(
        self, method: str, path: str, body: Any = None, *, stream: bool = False, timeout: Any = ...
    ) -> requests.Response:
        started = time.monotonic()
        try:
            return super()._call(method, path, body, stream=stream, timeout=timeout)
        except (APIConnectionError, ServerNotRunning, ServerNotReady) as exc:
            if isinstance(exc, APITimeoutError):
                raise  # the server is there and slow: not a lost worker
            lost = self._lost_worker() or self._lost_since(started)
            if lost is not None:
                raise lost from exc
            raise

    def _lost_since(self, since: float) -> RpcWorkerError | None:
        """A worker loss recorded after ``since`` (the server may already be back)."""
        server = self._server
        recent = [lost for when, lost in (server.losses if server is not None else ()) if when >= since]
        return recent[-1] if recent else None


class _ClusterServer(LlamaServer):
    """The cluster's llama-server: before a restart after a crash, it waits for the workers."""

    def __init__(self, cluster: RpcCluster, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cluster = weakref.ref(cluster)
        #: The worker whose loss ended a process, found as the process exited.
        self.lost_by: weakref.WeakKeyDictionary[ServerProcess, RpcWorkerError] = weakref.WeakKeyDictionary()
        #: (when, which) of the recent losses, for calls that broke before a restart was done.
        self.losses: deque[tuple[float, RpcWorkerError]] = deque(maxlen=8)

    def _on_exit(self, proc: ServerProcess, code: int | None) -> None:
        # found now, before a restart starts the worker again, so that a caller whose call broke on
        # this process (on another thread, maybe later) can still be told which worker was lost
        cluster = self._cluster()
        if cluster is not None and proc is self._proc and proc.exited_on_its_own:
            lost = cluster._find_lost()
            if lost is not None:
                self.lost_by[proc] = lost
                self.losses.append((time.monotonic(), lost))
        super()._on_exit(proc, code)

    def _restart(self) -> str:
        cluster = self._cluster()
        if cluster is not None:
            cluster._await_workers(self._supervisor.stop_requested)
        return super()._restart()

    def _error_hint_of(self, proc: ServerProcess | None) -> str:
        # a broken call or stream: name the lost worker when that is why its llama-server ended
        hint = super()._error_hint_of(proc)
        lost = self.lost_by.get(proc) if proc is not None else None
        if lost is None and hint and proc is self._proc:
            cluster = self._cluster()
            lost = cluster._find_lost() if cluster is not None else None
        if lost is None:
            return hint
        return f"{lost} {hint}" if hint else str(lost)
