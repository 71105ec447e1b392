"""Ports, and the wait until a started llama-server answers requests (through its own client)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
import threading
import time

from .client import LlamaClient
from .errors import APIConnectionError, HealthCheckError, StartupAborted, StartupError, StartupTimeout
from .process import ServerProcess
from .versions import looks_like_llama_server

__all__ = ["PortTaken", "check_port_free", "connect_host", "free_port", "is_loopback", "url_host", "wait_ready"]

#: How often readiness is probed at most (it is also probed at once whenever the server logs a line).
_POLL_MAX_INTERVAL = 0.005
#: Timeouts of one readiness probe: a loopback connect, then an answer from a server that is up.
_PROBE_TIMEOUT = (0.5, 2.0)
_BIND_FAILURE = ("couldn't bind", "address already in use", "failed to bind")


class PortTaken(Exception):
    """The server exited while starting because another process holds its port."""


# The sockets below only bind, to find or check a port for llama-server to listen on; no HTTP goes
# over them (urllib3 and requests have nothing that picks a free local port).
def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str) -> int:
    """A port on ``host`` that nobody listens on right now.

    :raises StartupError: when ``host`` cannot be bound at all.
    """
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
            return port
    except OSError as exc:
        raise StartupError(f"cannot bind {host}: {exc.strerror}; check the host setting") from None


def check_port_free(host: str, port: int) -> None:
    """Fail early, with a clear message, when ``port`` on ``host`` is taken.

    :raises StartupError: when another socket listens there, or the address cannot be bound.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        if sys.platform.startswith("linux"):
            # as llama-server binds: connections of an earlier server in TIME_WAIT do not block the
            # port, a listener still does. Elsewhere the option means more (BSD: binding beside a
            # wildcard listener; Windows: stealing a port), so the check binds plainly there.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use; choose another port or leave port=None"
                ) from None
            raise StartupError(f"cannot bind {host}:{port}: {exc.strerror}; check the host setting") from None


def connect_host(host: str) -> str:
    """The address a client connects to for a server bound to ``host`` (a wildcard means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def url_host(host: str) -> str:
    """``host`` as it appears in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (a server there is reachable from this machine only)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def wait_ready(proc: ServerProcess, client: LlamaClient, startup_timeout: float, abort: threading.Event) -> None:
    """Return once the server of ``proc`` answers ``GET /health`` with 200 and its main loop runs.

    The process is checked on every poll, so a crash fails at once with its exit code and last
    lines; the wait ends when the server stays silent (no log line) for ``startup_timeout`` seconds.

    :raises StartupError: when the process exits.
    :raises StartupAborted: when ``abort`` is set.
    :raises PortTaken: when it exited because its port was taken.
    :raises HealthCheckError: when ``/health`` answers something llama-server never does.
    :raises StartupTimeout: when the server stayed silent too long (it is killed first).
    """
    interval = 0.001
    while True:
        if abort.is_set():
            raise StartupAborted("stop() or stop_all() was called while the server was starting", None, proc.log_tail())
        code = proc.returncode
        if code is not None:
            deadline = time.monotonic() + 1.0
            for pump in proc.threads:  # they end at end-of-file, having logged the last lines
                pump.join(max(0.0, deadline - time.monotonic()))
            tail = proc.log_tail()
            if any(marker in line.lower() for line in tail for marker in _BIND_FAILURE):
                raise PortTaken()
            if not tail and not looks_like_llama_server(proc.argv[0]):
                raise StartupError(
                    f"{proc.argv[0]} exited with status {code} while starting and printed nothing; it does "
                    "not look like llama-server (its --help lists no --model): check the executable",
                    code,
                )
            raise StartupError(f"llama-server exited with status {code} while starting", code, tail)
        try:
            status, body = client._probe("/health", _PROBE_TIMEOUT)
        except APIConnectionError:
            pass  # not listening yet
        else:
            if status == 200:
                if proc.returncode is None:
                    _main_loop_started(client)
                    return
                continue
            if status != 503:
                raise HealthCheckError(f"GET /health answered {status} {body[:200]!r}; is this really llama-server?")
        if time.monotonic() - proc.last_activity > startup_timeout:
            tail = proc.log_tail()
            proc.stop(0)
            raise StartupTimeout(startup_timeout, tail)
        proc.wait_activity(interval)
        interval = min(interval * 1.5, _POLL_MAX_INTERVAL)


def _main_loop_started(client: LlamaClient) -> None:
    """Wait until the server's main loop runs, by asking for ``/slots`` (answered from that loop).

    ``/health`` turns 200 a moment before llama-server installs its signal handler and starts its
    main loop, and a SIGTERM in that moment is lost: a ``stop()`` right after ``start()`` would then
    wait for the second signal. Any answer will do (``--no-slots`` answers at once)."""
    try:
        client._probe("/slots", _PROBE_TIMEOUT)
    except APIConnectionError:
        pass
