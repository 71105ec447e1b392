"""``ServerProcess``: spawn a server, pump its output into logging, and stop it for sure.

* The child runs in its own process group (``start_new_session=True``) with stdin closed.
* Two named daemon threads read stdout and stderr line by line, so a chatty child never blocks on
  a full pipe; each line goes to :mod:`logging` with llama.cpp's level letter mapped to a level,
  and into a ring buffer (:meth:`ServerProcess.log_tail`).
* :meth:`ServerProcess.stop` sends SIGTERM to the group, waits, then SIGKILL; it joins the pumps.
* A forgotten process is stopped by a :func:`weakref.finalize` (which also runs at interpreter exit)
  and, if the interpreter dies without running it (SIGKILL, ``os._exit``), by a small guardian
  process that notices its pipe from us closing (Linux and macOS).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

from . import _registry
from ._kill import kill_group
from .errors import IoError, StartupError

__all__ = ["ServerProcess", "parse_log_line"]

_server_log = logging.getLogger("llama_proc.server")
_log = logging.getLogger("llama_proc.process")

_LEVELS = {"E": logging.ERROR, "W": logging.WARNING, "I": logging.INFO, "D": logging.DEBUG}
# "0.00.103.858 I srv  llama_server: model loaded"; the timestamp is optional.
_LINE_RE = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?([EWID]) (.*)$")

_POSIX = os.name == "posix"


def parse_log_line(line: str) -> tuple[int, str]:
    """Split a llama.cpp log line into (logging level, message); unknown lines are INFO."""
    # the common shape, "0.00.103.858 I srv ...", without the regex (a verbose server logs a lot)
    space = line.find(" ")
    if space > 0 and line[space + 2 : space + 3] == " " and line[:space].replace(".", "").isdigit():
        level = _LEVELS.get(line[space + 1])
        if level is not None:
            return level, line[space + 3 :]
    match = _LINE_RE.match(line)
    if match:
        return _LEVELS[match.group(1)], match.group(2)
    return logging.INFO, line


# ---------------------------------------------------------------------------------------------
# the guardian


class _Guardian:
    """One watchdog process per interpreter (and per forked child that starts servers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0

    def _ensure(self) -> subprocess.Popen[bytes] | None:
        if not _POSIX:
            return None
        if self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None:
            return self._proc
        script = Path(__file__).with_name("_guardian.py")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:  # pragma: no cover - the interpreter itself cannot be run
            _log.warning("cannot start the orphan guardian (%s); servers may outlive a killed process", exc)
            self._proc = None
            return None
        if self._owner == 0:
            atexit.register(self.close)
        self._owner = os.getpid()
        return self._proc

    def close(self) -> None:
        """Close our end of the pipe (the guardian then stops what is still registered) and reap it."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None or self._owner != os.getpid():
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10.0)
        except (OSError, subprocess.TimeoutExpired):  # pragma: no cover - best effort at exit
            pass

    def after_fork_in_child(self) -> None:
        """In a forked child: let go of the parent's guardian. The child's copy of the pipe's write
        end would keep the guardian from seeing end-of-file when the parent dies (SIGKILL
        included) for as long as the child lives. The descriptor is pointed at /dev/null rather
        than closed, so that the inherited file object never closes a number reused since; no
        lock is taken (a parent thread may have held it at the fork)."""
        self._lock = threading.Lock()
        proc, self._proc = self._proc, None  # a server the child starts gets a guardian of its own
        if proc is None:
            return
        # never freed in the child: freeing would close its pipe file (whose lock a parent thread
        # may have held at the fork) and warn that the guardian "is still running"
        _inherited.append(proc)
        stdin = proc.stdin
        if stdin is None:
            return
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(null, stdin.fileno(), inheritable=False)
            finally:
                os.close(null)
        except (OSError, ValueError):  # pragma: no cover - closed already
            pass

    def _send(self, line: bytes, create: bool) -> None:
        with self._lock:
            proc = self._ensure() if create else (self._proc if self._owner == os.getpid() else None)
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except (OSError, ValueError) as exc:
                _log.debug("guardian write failed: %s", exc)

    def register(self, pgid: int) -> None:
        # with the start time, so the guardian never signals a group whose pid was reused since
        self._send(b"+ %d %d\n" % (pgid, _registry.start_time(pgid) or 0), create=True)

    def unregister(self, pgid: int) -> None:
        self._send(b"- %d\n" % pgid, create=False)

    @property
    def pid(self) -> int | None:
        """The guardian's pid, when one runs for this process."""
        proc = self._proc
        return proc.pid if proc is not None and self._owner == os.getpid() and proc.poll() is None else None


_guardian = _Guardian()
_inherited: list[subprocess.Popen[bytes]] = []  # a forked child's copies of its parent's guardian
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_guardian.after_fork_in_child)


# ---------------------------------------------------------------------------------------------
# log pumps


class _Activity:
    """What the pumps share with the process object: the ring buffer and a progress signal."""

    def __init__(self, lines: int) -> None:
        self.lines: deque[bytes] = deque(maxlen=lines)
        self.last = time.monotonic()
        self.event = threading.Event()
        self.eof_at: float | None = None  # when the first output pipe closed: the process ended
        self.batched = False  # set once the server is up: see ServerProcess.batch_output
        self.hurry = threading.Event()  # set when the process is being stopped: no more batching
        self.expected: tuple[str, ...] = ()  # warnings that are normal here: logged at INFO
        self.logger = _server_log  # where the lines go


#: Bytes read from a pipe at once; a read that fills it means more is waiting.
_READ_SIZE = 64 * 1024
#: Once batched, a pump waits this long after each read so that output gathers in the pipe.
_BATCH_INTERVAL = 0.02


def _severe_lines(batch: bytes) -> list[bytes]:
    """The lines of ``batch`` that may be warnings or errors (a ``W`` or ``E`` standing alone after
    a space or at a line's start), in order. A verbose server's batches hold hundreds of lines and
    hardly ever one of these, so the letters are found with ``find`` (memchr) instead of splitting
    every line; each line found is checked again by :func:`parse_log_line`."""
    starts: set[int] = set()
    last = len(batch) - 1
    for letter in (b"W", b"E"):
        at = batch.find(letter)
        while at >= 0:
            if at < last and batch[at + 1] == 32 and (at == 0 or batch[at - 1] in (10, 32)):
                starts.add(batch.rfind(b"\n", 0, at) + 1)
            at = batch.find(letter, at + 1)
    found = []
    for line_start in sorted(starts):
        line_end = batch.find(b"\n", line_start)
        found.append(batch[line_start : line_end if line_end >= 0 else len(batch)])
    return found


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8", errors="replace")


def _pump(stream: IO[bytes], activity: _Activity, pid: int, source: str) -> None:
    extra = {"llama_pid": pid, "llama_stream": source}
    logger = activity.logger
    event = activity.event
    lines = activity.lines
    keep = lines.maxlen or 0
    read = stream.read1  # type: ignore[attr-defined]
    pending = b""

    def log(raw: bytes) -> None:
        level, message = parse_log_line(_decode(raw))
        if level == logging.WARNING and activity.expected and any(text in message for text in activity.expected):
            level = logging.INFO
        if logger.isEnabledFor(level):
            logger.log(level, "%s", message, extra=extra)

    try:
        while True:
            data = read(_READ_SIZE)
            if not data:
                break
            end = data.rfind(b"\n")
            if end < 0:
                pending += data
                if len(pending) > _READ_SIZE:  # no line end in sight: take what there is as one line
                    log(pending)
                    lines.append(pending)
                    pending = b""
                continue
            batch, pending = pending + data[:end], data[end + 1 :]
            if logger.isEnabledFor(logging.INFO):
                for raw in batch.split(b"\n"):
                    log(raw)
            else:  # the usual case: only warnings and errors are logged
                for raw in _severe_lines(batch):
                    log(raw)
            # the tail keeps the last lines only, as bytes: decoded when someone asks for them
            lines.extend(batch.rsplit(b"\n", keep)[-keep:] if keep else ())
            activity.last = time.monotonic()
            if not event.is_set():  # nobody clears it once the server is up: skip the lock
                event.set()
            if activity.batched and len(data) < _READ_SIZE:
                # a busy server logs thousands of lines a second: waking for each one would take
                # CPU from the server itself, so let them gather in the (1 MiB) pipe a moment
                activity.hurry.wait(_BATCH_INTERVAL)
        if pending:
            log(pending)
            lines.append(pending)
    except (OSError, ValueError):  # the stream was closed under us during shutdown
        pass
    finally:
        if activity.eof_at is None:
            activity.eof_at = time.monotonic()
        activity.event.set()


_F_SETPIPE_SZ = 1031  # Linux


def _widen_pipe(stream: IO[bytes] | None) -> None:
    """Give a log pipe 1 MiB of buffer (Linux): a burst of output never makes the server wait for us."""
    if stream is None or not sys.platform.startswith("linux"):
        return
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), _F_SETPIPE_SZ, 1 << 20)
    except OSError:  # above /proc/sys/fs/pipe-max-size for unprivileged users: keep the default
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# stopping


#: Seconds after SIGTERM before a second one. llama-server stops in milliseconds when idle, and
#: exits at once on a second signal; that ends its rare shutdowns that never finish (a SIGTERM
#: that lands just before its main loop starts is forgotten, and its signal handler takes a lock
#: the interrupted thread may hold).
_SECOND_SIGNAL_AFTER = 1.0


def _terminate(
    popen: subprocess.Popen[bytes], pumps: Sequence[threading.Thread], timeout: float, hurry: threading.Event
) -> int:
    """Stop the process group (SIGTERM, a second SIGTERM if it still runs after a moment, SIGKILL after
    ``timeout``: :func:`kill_group`), join the pumps, forget the process; return the exit code."""
    kill_group(popen, timeout, second_term_after=_SECOND_SIGNAL_AFTER)
    hurry.set()  # batching pumps read the last output and the end of the pipes at once
    for pump in pumps:
        if pump is not threading.current_thread():
            pump.join(5.0)
    for stream in (popen.stdout, popen.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    _guardian.unregister(popen.pid)
    _registry.forget(popen.pid)
    return popen.returncode


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """In the main thread: a SIGINT that arrives inside the block raises its KeyboardInterrupt
    (or runs whatever handler was set) when the block ends, not in the middle of it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled in the main thread only
        return
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler set outside Python: it could not be put back
        yield
        return
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _finalize(
    popen: subprocess.Popen[bytes],
    pumps: Sequence[threading.Thread],
    owner: int,
    timeout: float,
    hurry: threading.Event,
) -> None:
    # Runs at garbage collection or interpreter exit; must never raise, and a forked child that
    # inherited this object must not touch its parent's process.
    if os.getpid() != owner:
        return
    try:
        _terminate(popen, pumps, timeout, hurry)
    except Exception:  # pragma: no cover - best effort
        pass


# ---------------------------------------------------------------------------------------------


class ServerProcess:
    """A child process with pumped output and guaranteed cleanup.

    :param argv: the full command line, executable first; never a shell string.
    :param env: the environment (default: inherit).
    :param log_lines: how many recent output lines :meth:`log_tail` keeps.
    :param stop_timeout: seconds between SIGTERM and SIGKILL when the finalizer stops it.
    :param logger: where the output lines go (default: ``llama_proc.server``).
    :param ignore_sigpipe: leave the child this process's SIGPIPE action instead of the default:
        ignored, as Python sets it unless the application changed it (for a server that writes to
        sockets without guarding against a client that went away).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_lines: int = 200,
        stop_timeout: float = 10.0,
        pass_fds: Sequence[int] = (),
        expected_warnings: Sequence[str] = (),
        logger: logging.Logger | None = None,
        ignore_sigpipe: bool = False,
    ) -> None:
        self.argv = list(argv)
        self._pass_fds = tuple(pass_fds)
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._activity = _Activity(log_lines)
        self._activity.expected = tuple(expected_warnings)
        if logger is not None:
            self._activity.logger = logger
        self._ignore_sigpipe = ignore_sigpipe
        self._stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None
        self._pumps: list[threading.Thread] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.Lock()
        self._exit_code: int | None = None
        self._stopped = False
        self._stop_asked_at: float | None = None
        self._dead_before_stop = False
        self._owner = 0
        self.started_at: float | None = None

    def start(self) -> None:
        """Spawn the process and its log pumps.

        :raises StartupError: when the executable cannot be run at all.
        """
        if self._popen is not None:
            raise RuntimeError("a ServerProcess is started once")
        kwargs: dict[str, object] = {}
        if _POSIX:
            kwargs["start_new_session"] = True
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        # Ctrl-C waits until the child is owned (finalizer, guardian, record, pumps): an interrupt
        # between fork and ownership would leave a server nobody stops. The interrupt held back
        # comes out at the end of the block: the child is then stopped before it propagates.
        try:
            with _interrupts_deferred():
                self._spawn(kwargs)
        except BaseException:
            if self._popen is not None:
                self.stop(0)
            raise

    def _spawn(self, kwargs: dict[str, object]) -> None:
        try:
            popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=self._cwd,
                close_fds=True,
                pass_fds=self._pass_fds,
                restore_signals=not self._ignore_sigpipe,
                **kwargs,  # type: ignore[call-overload]
            )
        except PermissionError as exc:
            raise StartupError(f"{self.argv[0]} is not executable ({exc.strerror}); check its permissions") from exc
        except FileNotFoundError as exc:
            raise StartupError(f"{self.argv[0]} does not exist") from exc
        except OSError as exc:
            raise StartupError(f"cannot run {self.argv[0]}: {exc}") from exc
        self._own(popen)

    def _own(self, popen: subprocess.Popen[bytes]) -> None:
        """Take ownership of a just-spawned child; on any failure (an asynchronous exception
        included) the child is stopped before the exception propagates."""
        self._popen = popen
        self._owner = os.getpid()
        # the finalizer first: from here on, collection or interpreter exit stops the child
        self._finalizer = weakref.finalize(
            self, _finalize, popen, self._pumps, os.getpid(), self._stop_timeout, self._activity.hurry
        )
        try:
            self.started_at = time.monotonic()
            self._activity.last = self.started_at
            for stream in (popen.stdout, popen.stderr):
                _widen_pipe(stream)
            _guardian.register(popen.pid)
            _registry.record(popen.pid, self.argv[0], self.argv)
            name = Path(self.argv[0]).name
            for source, stream in (("stdout", popen.stdout), ("stderr", popen.stderr)):
                assert stream is not None
                thread = threading.Thread(
                    target=_pump,
                    args=(stream, self._activity, popen.pid, source),
                    name=f"{name}-{popen.pid}-{source}",
                    daemon=True,
                )
                thread.start()
                self._pumps.append(thread)
        except BaseException:
            self._finalizer()  # stops the child and joins what pumps there are
            raise

    # -- state --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id), once started."""
        return self._popen.pid if self._popen is not None else None

    @property
    def owned(self) -> bool:
        """True in the process that started the child; False in a forked copy of it, which may
        use the server but never waits for, signals or stops it."""
        return self._owner == os.getpid()

    @property
    def returncode(self) -> int | None:
        """The exit code, once the child has exited (None in a forked process, which cannot know it)."""
        if self._popen is None or not self.owned:
            return None
        return self._popen.poll()

    def is_running(self) -> bool:
        """True while the child is alive."""
        if self._popen is None:
            return False
        if not self.owned:
            return _pid_alive(self._popen.pid)
        return self._popen.poll() is None

    @property
    def exited_on_its_own(self) -> bool:
        """True when the process ended before anyone asked it to stop (a crash, or a kill from outside)."""
        if self._stop_asked_at is not None:
            return self._dead_before_stop
        return self._activity.eof_at is not None

    def _already_exited(self) -> bool:
        # asked without reaping and without Popen's lock (a watcher thread may hold it in wait())
        popen = self._popen
        if popen is None or popen.returncode is not None:
            return popen is not None
        if not hasattr(os, "waitid"):  # pragma: no cover - platforms without waitid
            return popen.poll() is not None
        try:
            return os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` of the last output line (or of the start)."""
        return self._activity.last

    def wait_activity(self, timeout: float) -> bool:
        """Block until the child prints a line or ``timeout`` passes; True if it printed."""
        fired = self._activity.event.wait(timeout)
        self._activity.event.clear()
        return fired

    def batch_output(self) -> None:
        """Let the log pumps read output in batches from now on: after each read they wait up to
        20 ms for more to gather in the pipe, so a server that logs thousands of lines a second
        does not wake them (and lose CPU to them) for each line. Meant for once the server is up,
        where a line's latency matters less than the server's speed; :meth:`stop` ends the wait."""
        self._activity.batched = True

    def log_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines the child printed (stdout and stderr interleaved)."""
        lines = [_decode(raw) for raw in list(self._activity.lines)]
        return lines[-n:] if n > 0 else []

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """The log pump threads."""
        return tuple(self._pumps)

    # -- stopping -----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit by itself; its exit code, or None on timeout."""
        if self._popen is None or not self.owned:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the child: SIGTERM to its group, ``timeout`` seconds, then SIGKILL.

        Idempotent; returns the exit code (None if never started).
        """
        with self._lock:
            if self._popen is None:
                return None
            if not self.owned:
                return None  # a forked copy: the process belongs to the parent
            if self._stopped:
                return self._exit_code
            if self._stop_asked_at is None:
                self._stop_asked_at = time.monotonic()
                self._dead_before_stop = self._already_exited()
            try:
                self._exit_code = _terminate(
                    self._popen, self._pumps, self._stop_timeout if timeout is None else timeout, self._activity.hurry
                )
            except OSError as exc:  # pragma: no cover - unexpected kernel errors
                raise IoError(f"cannot stop pid {self._popen.pid}: {exc}") from exc
            # only now: a stop cut short (a second Ctrl-C) leaves the finalizer to finish the job
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self._stopped = True
            return self._exit_code

    def __repr__(self) -> str:
        state = (
            "not started" if self._popen is None else ("running" if self.is_running() else f"exited {self.returncode}")
        )
        return f"<ServerProcess {Path(self.argv[0]).name} pid={self.pid} {state}>"
