"""One server per process, safely shared: :func:`shared_server` and :func:`stop_all`.

For web apps (Django, Flask, gunicorn workers) and notebooks: every caller that asks for the same
configuration gets the same :class:`~llama_proc.LlamaServer`, started on first use. It is fork-aware:
a forked child never uses or stops the parent's entry; it starts its own server on first use, or
talks to the parent's through :meth:`LlamaServer.attach`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from .config import LlamaServerArgs
from .errors import SharedServerConflict
from .server import LlamaServer, owned_servers

__all__ = ["shared_server", "stop_all"]

_log = logging.getLogger("llama_proc.manager")

_lock = threading.Lock()
_shared: tuple[object, LlamaServer] | None = None
_owner_pid = os.getpid()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _describe(args: LlamaServerArgs) -> str:
    return f"model {args.model}" + (f" (alias {args.alias})" if args.alias else "")


def shared_server(
    args: LlamaServerArgs,
    executable_path: str | os.PathLike[str] | None = None,
    *,
    replace: bool = False,
    **options: Any,
) -> LlamaServer:
    """The process-wide server for ``args``, created on the first call and started on first use.

    Any number of threads may call it at once: exactly one server is created and started. Later
    calls with the same configuration return the same server, so a notebook cell run twice reuses
    it. It is stopped at interpreter exit like any server, or by :func:`stop_all`.

    :param args: what to run.
    :param executable_path: the ``llama-server`` to run (default: found).
    :param replace: when a server with another configuration is shared, stop it and share this one.
    :param options: keyword options of :class:`~llama_proc.LlamaServer` (``startup_timeout``, ...).
    :raises SharedServerConflict: when another configuration is shared and ``replace`` is false.
    """
    global _shared, _owner_pid
    key = (args, None if executable_path is None else str(Path(executable_path)), _freeze(options))
    old: LlamaServer | None = None
    with _lock:
        if _owner_pid != os.getpid():  # a forked child: the parent's entry is not ours
            _shared, _owner_pid = None, os.getpid()
        if _shared is not None:
            current_key, current = _shared
            if current_key == key:
                return current
            if not replace:
                raise SharedServerConflict(_describe(current.get_server_args()), _describe(args))
            old = current
        server = LlamaServer(executable_path, args, autostart=True, **options)
        _shared = (key, server)
    if old is not None:
        _log.info("replacing the shared server %r", old)
        old.stop()
    return server


def stop_all() -> list[int | None]:
    """Stop every server this process started (servers of a parent process are left alone).

    :returns: their exit codes.
    """
    codes = [server.stop() for server in owned_servers()]
    return codes
