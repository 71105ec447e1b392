"""llama_proc: start, supervise and talk to llama.cpp's ``llama-server`` from Python.

.. code-block:: python

    from llama_proc import LlamaServer, LlamaServerArgs

    with LlamaServer(None, LlamaServerArgs(model="model.gguf")) as server:
        reply = server.chat_completions({"messages": [{"role": "user", "content": "Hi"}]})
"""

from __future__ import annotations

import logging

from ._version import __version__
from .binaries import (
    BuildResult,
    build_from_source,
    cache_dir,
    choose_variant,
    ensure_executable,
    fetch_source,
    find_executable,
    install_prebuilt,
    installed,
)
from .client import LlamaClient
from .config import FlagDialect, LlamaServerArgs
from .errors import (
    AmbiguousModel,
    APIConnectionError,
    APIError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BuildError,
    ChecksumMismatch,
    ConfigError,
    ConnectionRefused,
    ConnectTimeout,
    DownloadError,
    ExecutableNotFound,
    HealthCheckError,
    HubModelNotFound,
    InternalServerError,
    InvalidRequest,
    IoError,
    LlamaProcError,
    LockTimeout,
    ModelNotFound,
    ModelNotRegistered,
    NotAGGUFFile,
    NotFoundError,
    PermissionDeniedError,
    PoolTimeout,
    RpcWorkerError,
    RpcWorkerUnreachable,
    ServerAlreadyRunning,
    ServerBusy,
    ServerNotReady,
    ServerNotRunning,
    ServiceUnavailableError,
    SharedServerConflict,
    StartupAborted,
    StartupError,
    StartupTimeout,
    UnprocessableEntityError,
)
from .manager import ServerManager, shared_server, stop_all
from .platforms import current_target, default_variant
from .remote import RemoteServer
from .server import LlamaServer, Server
from .streaming import Stream
from .supervision import EventKind, RestartPolicy, ServerEvent
from .versions import ServerVersion, flag_dialect, server_version

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BuildError",
    "BuildResult",
    "ChecksumMismatch",
    "ConfigError",
    "ConnectionRefused",
    "ConnectTimeout",
    "DownloadError",
    "EventKind",
    "ExecutableNotFound",
    "FlagDialect",
    "HealthCheckError",
    "InternalServerError",
    "InvalidRequest",
    "IoError",
    "LlamaClient",
    "LlamaProcError",
    "LlamaServer",
    "LlamaServerArgs",
    "LockTimeout",
    "ModelNotFound",
    "ModelNotRegistered",
    "NotAGGUFFile",
    "HubModelNotFound",
    "AmbiguousModel",
    "NotFoundError",
    "PermissionDeniedError",
    "PoolTimeout",
    "Server",
    "ServerAlreadyRunning",
    "RpcWorkerError",
    "RpcWorkerUnreachable",
    "RemoteServer",
    "RestartPolicy",
    "ServerBusy",
    "ServerEvent",
    "ServerManager",
    "ServerNotReady",
    "ServerNotRunning",
    "ServiceUnavailableError",
    "SharedServerConflict",
    "StartupAborted",
    "StartupError",
    "StartupTimeout",
    "ServerVersion",
    "Stream",
    "UnprocessableEntityError",
    "__version__",
    "build_from_source",
    "cache_dir",
    "choose_variant",
    "current_target",
    "default_variant",
    "ensure_executable",
    "fetch_source",
    "find_executable",
    "flag_dialect",
    "install_prebuilt",
    "installed",
    "server_version",
    "shared_server",
    "stop_all",
]

logging.getLogger("llama_proc").addHandler(logging.NullHandler())
