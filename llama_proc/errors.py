"""Every exception llama_proc raises, with stable codes and translatable messages.

Each error has:

* ``code``: a stable identifier in the form ``{group}-{variant}`` (``server_error-model_not_found``),
  safe to match on and to use as a translation or documentation key;
* ``http_status``: the status an application proxying llama-server should answer with
  (503 while a server is not ready, the upstream status for API errors, 500 otherwise);
* a message in English, looked up through :mod:`gettext` (domain ``llama_proc``, catalogs under
  ``llama_proc/locale``) so applications can ship translations. Call :func:`set_language` or set
  ``LANGUAGE``/``LANG`` before the error is raised.

All errors pickle and unpickle to an equal error (they cross process boundaries in worker pools).
"""

from __future__ import annotations

import gettext
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BuildError",
    "ChecksumMismatch",
    "ConfigError",
    "ConnectTimeout",
    "DownloadError",
    "ExecutableNotFound",
    "HealthCheckError",
    "InternalServerError",
    "InvalidRequest",
    "IoError",
    "LlamaProcError",
    "LockTimeout",
    "ModelNotFound",
    "ModelNotRegistered",
    "NotAGGUFFile",
    "NotFoundError",
    "PermissionDeniedError",
    "PoolTimeout",
    "ServerAlreadyRunning",
    "ServerBusy",
    "ServerNotReady",
    "ServerNotRunning",
    "ServiceUnavailableError",
    "SharedServerConflict",
    "StartupAborted",
    "StartupError",
    "StartupTimeout",
    "UnprocessableEntityError",
    "make_status_error",
    "set_language",
]

_LOCALE_DIR = Path(__file__).resolve().parent / "locale"
_translation: gettext.NullTranslations = gettext.translation("llama_proc", localedir=_LOCALE_DIR, fallback=True)


def set_language(languages: Sequence[str] | None) -> None:
    """Choose the catalog used for messages of errors raised from now on.

    :param languages: language codes in order of preference (``["de", "fr"]``);
        ``None`` follows the environment (``LANGUAGE``, ``LC_ALL``, ``LC_MESSAGES``, ``LANG``).
    """
    global _translation
    _translation = gettext.translation(
        "llama_proc", localedir=_LOCALE_DIR, languages=list(languages) if languages else None, fallback=True
    )


def _(message: str) -> str:
    return _translation.gettext(message)


def _rebuild(cls: type[LlamaProcError], kwargs: dict[str, Any]) -> LlamaProcError:
    return cls(**kwargs)


def _tail_text(log_tail: Sequence[str]) -> str:
    if not log_tail:
        return ""
    return "\n" + _("last lines of the server log:") + "\n  " + "\n  ".join(log_tail)


class LlamaProcError(Exception):
    """The root of every error llama_proc raises."""

    code: ClassVar[str] = "server_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _kwargs(self) -> dict[str, Any]:
        return {"message": self.message}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._kwargs()), self.__dict__.copy())

    def __str__(self) -> str:
        return self.message

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = Exception.__hash__


# ---------------------------------------------------------------------------------------------
# configuration and installation


class ConfigError(LlamaProcError, ValueError):
    """Invalid configuration: every bad field is listed in ``problems``."""

    code = "server_error-config_error"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(_("Invalid configuration: {0}.").format("; ".join(self.problems)))

    def _kwargs(self) -> dict[str, Any]:
        return {"problems": self.problems}


class ExecutableNotFound(LlamaProcError, FileNotFoundError):
    """No ``llama-server`` executable was found; ``searched`` lists every place looked at."""

    code = "server_error-executable_not_found"

    def __init__(self, name: str, searched: Sequence[str], hint: str) -> None:
        self.name = name
        self.searched = list(searched)
        self.hint = hint
        super().__init__(
            _("Executable {0} not found. Looked in:\n  {1}\nTo fix: {2}").format(
                name, "\n  ".join(self.searched) or "-", hint
            )
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"name": self.name, "searched": self.searched, "hint": self.hint}


class BuildError(LlamaProcError):
    """Building llama-server from source failed; ``log_tail`` holds the last build output."""

    code = "server_error-build_error"

    def __init__(self, reason: str, log_tail: Sequence[str] = ()) -> None:
        self.reason = reason
        self.log_tail = list(log_tail)
        text = _("Failed to build llama-server: {0}.").format(reason)
        if self.log_tail:
            text += "\n" + _("last lines of the build output:") + "\n  " + "\n  ".join(self.log_tail)
        super().__init__(text)

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason, "log_tail": self.log_tail}


class IoError(LlamaProcError, OSError):
    """An operating-system error while handling files or processes."""

    code = "server_error-io_error"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(_("I/O error: {0}.").format(reason))

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason}


class ChecksumMismatch(LlamaProcError):
    """A downloaded file's SHA-256 differs from the published one; the file was deleted."""

    code = "server_error-checksum_mismatch"

    def __init__(self, name: str, expected: str, actual: str) -> None:
        self.name = name
        self.expected = expected
        self.actual = actual
        super().__init__(
            _("Checksum mismatch for {0}: expected sha256 {1}, got {2}; the file was deleted.").format(
                name, expected, actual
            )
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"name": self.name, "expected": self.expected, "actual": self.actual}


class DownloadError(LlamaProcError):
    """A prebuilt binary could not be downloaded; ``hint`` names the ways out."""

    code = "server_error-download_error"

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        text = _("Failed to download llama-server: {0}.").format(reason)
        if hint:
            text += " " + _("To fix: {0}").format(hint)
        super().__init__(text)

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason, "hint": self.hint}


class LockTimeout(LlamaProcError, TimeoutError):
    """Another process held an install or build lock for too long."""

    code = "server_error-lock_timeout"

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        super().__init__(
            _(
                "Waited {0} seconds for the lock {1}; another install may be stuck. Remove the file if no "
                "other llama-proc process is running."
            ).format(f"{timeout:g}", path)
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"path": self.path, "timeout": self.timeout}


# ---------------------------------------------------------------------------------------------
# the server's lifecycle


def display_model_path(path: str | os.PathLike[str]) -> str:
    """A model path for messages: one inside the Hugging Face hub cache is shown relative to
    ``$HF_HOME`` (``$HF_HOME/hub/models--org--name/...``), or to ``$HF_HUB_CACHE`` when that is set,
    any other as it is."""
    text = os.fspath(path)
    hub_cache = os.environ.get("HF_HUB_CACHE")
    if hub_cache and text.startswith(os.path.join(hub_cache, "")):
        return "$HF_HUB_CACHE/" + text[len(os.path.join(hub_cache, "")) :]
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    hub = os.path.join(hf_home, "hub") + os.sep
    if text.startswith(hub):
        return "$HF_HOME/hub/" + text[len(hub) :]
    return text


class ModelNotFound(LlamaProcError, FileNotFoundError):
    """The model file does not exist (or is not a file)."""

    code = "server_error-model_not_found"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(_("Model file does not exist: {0}.").format(display_model_path(path)))

    def _kwargs(self) -> dict[str, Any]:
        return {"path": self.path}


class NotAGGUFFile(ModelNotFound):
    """The model file exists but is not a GGUF file (its first bytes are not GGUF's magic)."""

    code = "server_error-not_a_gguf_file"

    def __init__(self, path: str) -> None:
        self.path = path
        LlamaProcError.__init__(
            self, _("Not a GGUF file: {0}; llama-server loads .gguf models only.").format(display_model_path(path))
        )


class HubModelNotFound(ModelNotFound):
    """A model on the Hugging Face hub (an ``hf://`` spec) is neither there nor in the local cache;
    ``reason`` says which part is missing and ``hint`` what to do."""

    code = "server_error-hub_model_not_found"

    def __init__(self, spec: str, reason: str, hint: str = "") -> None:
        self.path = spec
        self.reason = reason
        self.hint = hint
        text = _("Model {0} not found: {1}.").format(spec, reason)
        if hint:
            text += " " + _("To fix: {0}").format(hint)
        LlamaProcError.__init__(self, text)

    def _kwargs(self) -> dict[str, Any]:
        return {"spec": self.path, "reason": self.reason, "hint": self.hint}


class AmbiguousModel(ModelNotFound):
    """A model spec (``hf://org/repo`` or a quantization) matches several GGUF models; ``candidates``
    lists them."""

    code = "server_error-ambiguous_model"

    def __init__(self, spec: str, candidates: Sequence[str], example: str = "") -> None:
        self.path = spec
        self.candidates = list(candidates)
        self.example = example
        text = _("Model {0} matches several GGUF files: {1}.").format(spec, ", ".join(self.candidates))
        if example:
            text += " " + _("Name one, as {0}.").format(example)
        LlamaProcError.__init__(self, text)

    def _kwargs(self) -> dict[str, Any]:
        return {"spec": self.path, "candidates": self.candidates, "example": self.example}


class StartupError(LlamaProcError):
    """The server could not be started, or exited while starting."""

    code = "server_error-startup_error"

    def __init__(self, reason: str, exit_code: int | None = None, log_tail: Sequence[str] = ()) -> None:
        self.reason = reason
        self.exit_code = exit_code
        self.log_tail = list(log_tail)
        super().__init__(_("Failed to start model server: {0}.").format(reason) + _tail_text(self.log_tail))

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason, "exit_code": self.exit_code, "log_tail": self.log_tail}


class StartupAborted(StartupError):
    """:meth:`~llama_proc.LlamaServer.stop` (or :func:`~llama_proc.stop_all`) was called while the
    server was starting: the start gave up and left no process."""

    code = "server_error-startup_aborted"


class StartupTimeout(StartupError, TimeoutError):
    """The server logged nothing and did not become ready within the startup timeout."""

    code = "server_error-timeout_error"

    def __init__(self, timeout: float, log_tail: Sequence[str] = ()) -> None:
        self.timeout = timeout
        self.reason = "timeout"
        self.exit_code = None
        self.log_tail = list(log_tail)
        LlamaProcError.__init__(
            self,
            _("Model server did not respond within {0} seconds.").format(f"{timeout:g}")
            + " "
            + _("It was stopped. Check that the model fits in memory, or raise startup_timeout.")
            + _tail_text(self.log_tail),
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "log_tail": self.log_tail}


class HealthCheckError(LlamaProcError):
    """The server's ``/health`` endpoint answered with an unexpected status or body."""

    code = "server_error-health_check_error"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(_("Model server health check failed: {0}.").format(reason))

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason}


class ServerNotReady(LlamaProcError):
    """The server is still starting (503)."""

    code = "server_error-server_not_ready"
    http_status = 503

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or _("Model server is starting up. Please wait and try again."))


class ServerNotRunning(LlamaProcError):
    """A call was made to a server that was never started or has been stopped (503)."""

    code = "server_error-server_not_running"
    http_status = 503

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(_("Model server is not running: {0}.").format(reason))

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason}


class RpcWorkerError(LlamaProcError):
    """An ``rpc-server`` worker cannot be used; ``address`` names it (``host:port``) and
    ``reason`` says why (503)."""

    code = "server_error-rpc_worker_error"
    http_status = 503

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(_("RPC worker {0}: {1}.").format(address, reason))

    def _kwargs(self) -> dict[str, Any]:
        return {"address": self.address, "reason": self.reason}


class RpcWorkerUnreachable(RpcWorkerError):
    """A worker did not accept a connection within the connect timeout (at start, or when a call
    failed and the cluster checked its workers)."""

    code = "server_error-rpc_worker_unreachable"


class ServerAlreadyRunning(LlamaProcError):
    """``start()`` was called on a server that is already running."""

    code = "server_error-already_running"

    def __init__(self, pid: int, base_url: str) -> None:
        self.pid = pid
        self.base_url = base_url
        super().__init__(
            _("Model server is already running (pid {0}, {1}); call stop() before starting it again.").format(
                pid, base_url
            )
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"pid": self.pid, "base_url": self.base_url}


class SharedServerConflict(LlamaProcError):
    """:func:`~llama_proc.shared_server` was asked for a configuration other than the running one."""

    code = "server_error-shared_server_conflict"

    def __init__(self, running: str, requested: str) -> None:
        self.running = running
        self.requested = requested
        super().__init__(
            _(
                "The shared server runs {0}, but {1} was asked for; pass replace=True to stop it and start the new one."
            ).format(running, requested)
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"running": self.running, "requested": self.requested}


class ModelNotRegistered(LlamaProcError, KeyError):
    """A request named a model alias that the :class:`~llama_proc.ServerManager` does not know (404)."""

    code = "server_error-model_not_registered"
    http_status = 404

    def __init__(self, alias: str, known: Sequence[str]) -> None:
        self.alias = alias
        self.known = list(known)
        super().__init__(
            _("No model is registered as {0!r}; known: {1}.").format(alias, ", ".join(self.known) or "none")
        )

    def _kwargs(self) -> dict[str, Any]:
        return {"alias": self.alias, "known": self.known}


class ServerBusy(LlamaProcError):
    """Every loaded server is busy and too many requests already wait for one (503)."""

    code = "server_error-server_busy"
    http_status = 503

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(_("All model servers are busy: {0}. Retry later.").format(reason))

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason}


# ---------------------------------------------------------------------------------------------
# calls


class APIError(LlamaProcError):
    """A call to the server failed."""

    code = "api_error"


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke during the call."""

    code = "api_error-connection_error"

    def __init__(self, reason: str, url: str = "") -> None:
        self.reason = reason
        self.url = url
        where = f" ({url})" if url else ""
        super().__init__(_("Connection to the model server failed{0}: {1}.").format(where, reason))

    def _kwargs(self) -> dict[str, Any]:
        return {"reason": self.reason, "url": self.url}


class APITimeoutError(APIConnectionError, TimeoutError):
    """The server did not answer within the request timeout."""

    code = "api_error-timeout_error"


class ConnectTimeout(APITimeoutError):
    """No connection to the server could be made within the connect timeout (the request was not
    sent)."""

    code = "api_error-connect_timeout"


class ConnectionRefused(APIConnectionError):
    """The connection was refused (nothing listens on the port: the server has stopped, or not
    started yet) or the host cannot be reached (no route to it), so the request was not sent and
    can go to another server."""

    code = "api_error-connection_refused"


class PoolTimeout(APITimeoutError):
    """Every pooled connection stayed busy for the call's whole read timeout, so the request was
    never sent: more threads call at once than the client keeps connections (``pool_maxsize``)."""

    code = "api_error-pool_timeout"


class InvalidRequest(APIError, ValueError):
    """A request that cannot be sent as given (a control character in a path or header); nothing
    was sent."""

    code = "api_error-invalid_request"
    http_status = 400

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(_("Invalid request: {0}.").format(problem))

    def _kwargs(self) -> dict[str, Any]:
        return {"problem": self.problem}


class APIStatusError(APIError):
    """The server answered with an HTTP status >= 400; ``body`` holds its answer."""

    code = "api_error-status_error"

    def __init__(self, status: int, body: Any, url: str = "") -> None:
        self.status = status
        self.body = body
        self.url = url
        super().__init__(
            _("Model server answered {0}{1}: {2}.").format(status, f" for {url}" if url else "", _error_message(body))
        )

    @property
    def http_status(self) -> int:  # type: ignore[override]
        """The upstream HTTP status."""
        return self.status

    def _kwargs(self) -> dict[str, Any]:
        return {"status": self.status, "body": self.body, "url": self.url}


def _error_message(body: Any) -> str:
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and "message" in err:
            return str(err["message"])
        return str(err)
    text = str(body).strip()
    return text[:500] if text else _("(empty body)")


class BadRequestError(APIStatusError):
    """400: the request was malformed or invalid."""

    code = "api_error-bad_request"


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""

    code = "api_error-authentication_error"


class PermissionDeniedError(APIStatusError):
    """403."""

    code = "api_error-permission_denied"


class NotFoundError(APIStatusError):
    """404: no such endpoint or resource."""

    code = "api_error-not_found"


class UnprocessableEntityError(APIStatusError):
    """422."""

    code = "api_error-unprocessable_entity"


class InternalServerError(APIStatusError):
    """5xx other than 503."""

    code = "api_error-internal_server_error"


class ServiceUnavailableError(InternalServerError):
    """503: the server is loading or has no free slot."""

    code = "api_error-service_unavailable"


class APIStreamError(APIStatusError):
    """An error event arrived in the middle of a stream."""

    code = "api_error-stream_error"


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    503: ServiceUnavailableError,
}


def make_status_error(status: int, body: Any, url: str = "") -> APIStatusError:
    """Map an HTTP status to the matching :class:`APIStatusError` subclass."""
    cls = _STATUS_CLASSES.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(status, body, url)
