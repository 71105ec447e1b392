"""Supervision: server events and their listeners, the restart policy, hang detection and the
restart loop. A server hands the :class:`Supervisor` callables; this module never imports it."""

from __future__ import annotations

import enum
import logging
import threading
import time
import weakref
from collections import deque
from typing import Callable, Iterable, Sequence, TypeVar

import attrs

from .errors import LlamaProcError, ServerNotReady, ServerNotRunning
from .process import ServerProcess

__all__ = ["EventKind", "Listener", "RestartPolicy", "ServerEvent", "Supervisor", "emit"]

_log = logging.getLogger("llama_proc.lifecycle")

T = TypeVar("T")


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
    :param restart_on_timeout: a call or stream that gets no answer within its read timeout means
        the server is hung: kill it, and the policy restarts it.
    """

    max_restarts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    window: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    backoff: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    wait_timeout: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    restart_on_timeout: bool = True


class Supervisor:
    """The supervision state of one server: its policy and listeners, whether a stop was asked,
    and the restarts counted in the policy's window.

    :param policy: None leaves a crashed server down (its listeners still hear of the crash).
    :param label: names the server in events and logs.
    """

    def __init__(self, policy: RestartPolicy | None, listeners: Iterable[Listener], label: Callable[[], str]) -> None:
        self.policy = policy
        self.listeners = list(listeners)
        self._label = label
        #: set by stop(): no restart may begin after it
        self.stop_requested = threading.Event()
        #: True from a crash until its restart succeeded or was given up
        self.restarting = False
        #: why the server was left down, once the policy gave up
        self.gave_up: str | None = None
        self._ready = threading.Condition()  # its own lock: waiters must not queue behind a restart
        self._restart_times: deque[float] = deque()  # restart attempts in the policy's window
        self._crash_times: deque[float] = deque()  # unexpected exits, for the give-up message
        self._failed_times: deque[float] = deque()  # restarts that failed, likewise
        self._last_cause = ""
        self._hung = False

    def emit(self, kind: EventKind, detail: str = "") -> None:
        """Tell the listeners."""
        emit(self.listeners, [ServerEvent(kind, self._label(), detail)])

    def begin(self) -> None:
        """A start on request: forget earlier stops, restarts and give-ups."""
        self.stop_requested.clear()
        self.gave_up = None
        for times in (self._restart_times, self._crash_times, self._failed_times):
            times.clear()
        self._last_cause = ""

    def request_stop(self) -> None:
        """No restart may begin from now on; callers waiting for one wake up."""
        self.stop_requested.set()
        with self._ready:
            self._ready.notify_all()

    def watch(
        self, proc: ServerProcess, on_exit: Callable[[ServerProcess, int | None], None]
    ) -> threading.Thread | None:
        """Call ``on_exit(proc, code)`` from a thread when ``proc`` exits; only when someone listens
        or a policy may restart it. ``on_exit`` is held weakly: it must not keep its server alive."""
        if self.policy is None and not self.listeners:
            return None
        ref = weakref.WeakMethod(on_exit)
        thread = threading.Thread(target=_watch, args=(ref, proc), name=f"llama-server-{proc.pid}-watch", daemon=True)
        thread.start()
        return thread

    def timed_out(self, proc: ServerProcess | None, path: str) -> None:
        """A call or stream to ``path`` got no answer within its read timeout: under a policy that
        says so, kill the server as hung (its exit is then seen as a crash, and it is restarted)."""
        policy = self.policy
        if policy is not None and policy.restart_on_timeout and proc is not None and proc.is_running():
            _log.warning("llama-server pid %s did not answer %s in time: killing it as hung", proc.pid, path)
            self._hung = True
            proc.stop(0)

    def crashed(self, proc: ServerProcess, code: int | None, restart: Callable[[], str] | None) -> None:
        """Report an unexpected exit; then, given ``restart``, start the server again under the
        policy. ``restart`` starts it (raising a LlamaProcError on failure) and describes it."""
        why = "hung (no answer within the read timeout)" if self._hung else f"exit status {code}"
        self._hung = False
        tail = " | ".join(proc.log_tail(3))
        _log.warning("llama-server pid %s exited unexpectedly: %s; last lines: %s", proc.pid, why, tail)
        self.emit(EventKind.CRASH, why)
        self._crash_times.append(time.monotonic())
        self._last_cause = "it was killed as hung" if why.startswith("hung") else f"the server exited: {why}"
        if restart is not None and self.policy is not None:
            self._restart_loop(self.policy, restart)

    def _restart_loop(self, policy: RestartPolicy, restart: Callable[[], str]) -> None:
        events: list[ServerEvent] = []
        try:
            while not self.stop_requested.is_set():
                now = time.monotonic()
                for times in (self._restart_times, self._crash_times, self._failed_times):
                    while times and now - times[0] > policy.window:
                        times.popleft()
                if len(self._restart_times) >= policy.max_restarts:
                    crashes, failed = len(self._crash_times), len(self._failed_times)
                    self.gave_up = (
                        f"within {policy.window:g} s it crashed {crashes} time{'s' * (crashes != 1)} and "
                        f"{failed} restart{'s' * (failed != 1)} failed (last: {self._last_cause}); it was left "
                        "down; call start() to run it again"
                    )
                    _log.error("llama-server %s: %s", self._label(), self.gave_up)
                    events.append(ServerEvent(EventKind.STOP, self._label(), "gave up restarting"))
                    return
                delay = min(policy.backoff * (2 ** len(self._restart_times)), policy.max_backoff)
                if self.stop_requested.wait(delay):
                    return
                self._restart_times.append(time.monotonic())
                try:
                    detail = restart()
                except LlamaProcError as exc:
                    _log.warning("restarting llama-server %s failed: %s", self._label(), exc)
                    self._failed_times.append(time.monotonic())
                    self._last_cause = f"the restart failed: {exc}"
                    continue
                events.append(ServerEvent(EventKind.RESTART, self._label(), detail))
                return
        finally:
            self.restarting = False
            with self._ready:
                self._ready.notify_all()
            emit(self.listeners, events)

    def wait_for_restart(self, timeout: float, current: Callable[[], T | None]) -> T:
        """Wait until a restart in progress gives ``current()`` a value, and return it.

        :raises ServerNotReady: when the restart takes longer than ``timeout`` seconds.
        :raises ServerNotRunning: when the server was stopped or left down instead.
        """
        deadline = time.monotonic() + timeout
        with self._ready:
            while current() is None and self.restarting and not self.stop_requested.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerNotReady(
                        f"Model server is restarting after a crash and was not ready within {timeout:g} seconds."
                    )
                self._ready.wait(remaining)
            value = current()
        if value is None:
            raise ServerNotRunning(self.gave_up or "it was stopped while restarting")
        return value


def _watch(on_exit: weakref.WeakMethod[Callable[[ServerProcess, int | None], None]], proc: ServerProcess) -> None:
    """Wait for ``proc`` to exit (its pumps end at end-of-file), then tell its owner, if it still lives."""
    for pump in proc.threads:
        pump.join()
    code = proc.wait()
    callback = on_exit()
    if callback is not None:
        callback(proc, code)
