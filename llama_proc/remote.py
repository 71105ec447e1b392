"""A :class:`~llama_proc.server.Server` for a llama-server that this process did not start."""

from __future__ import annotations

import html
from typing import Any

from .client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, Endpoints, LlamaClient, Timeout
from .errors import HealthCheckError, LlamaProcError, ServerNotRunning

__all__ = ["DEFAULT_ATTACHED_POOL_SIZE", "RemoteServer"]

#: Connections a :class:`RemoteServer` keeps open at most. Each holds one of the server's HTTP
#: threads while open; llama-server has about ``max(n_parallel + 4, cores - 1)`` of them unless
#: started with ``--threads-http``, and a connection beyond them waits unserved for up to 5 s. Pass
#: ``pool_maxsize`` to :meth:`~llama_proc.LlamaServer.attach` to match the server's setting.
DEFAULT_ATTACHED_POOL_SIZE = 8


class RemoteServer(Endpoints):
    """A running llama-server reached at ``base_url``, started by someone else (another process,
    the master of forked web workers, another machine). It owns no process: :meth:`start` checks
    that the server answers, and :meth:`stop` closes the connection pool.

    Also reached as :attr:`LlamaServer.attach <llama_proc.LlamaServer.attach>`.

    :param base_url: ``http://host:port`` (or ``https://``, or with a path such as
        ``http://proxy/llama``) of the running server.
    :param api_key: the server's API key, sent on every call.
    :param request_timeout: ``(connect, read)`` seconds of each call, unless the call says otherwise.
    :param pool_maxsize: connections kept open at most; keep it below the server's HTTP threads
        (see :data:`DEFAULT_ATTACHED_POOL_SIZE`).
    :param verify: for ``https``: certificate checks, as in requests (True, a CA bundle path, or False).
    :param cert: for ``https``: a client certificate, or a ``(cert, key)`` pair.
    :raises ConfigError: when ``base_url`` is not an http(s) URL.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        request_timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        pool_maxsize: int = DEFAULT_ATTACHED_POOL_SIZE,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        self._options: dict[str, Any] = dict(
            api_key=api_key, timeout=request_timeout, pool_maxsize=pool_maxsize, verify=verify, cert=cert
        )
        self._client: LlamaClient | None = LlamaClient(base_url, **self._options)
        self._base_url = self._client.base_url
        self._api_key = api_key

    @property
    def base_url(self) -> str:
        """The server's URL, with its path if it has one."""
        return self._base_url

    @property
    def api_key(self) -> str | None:
        """The key sent with every call."""
        return self._api_key

    @property
    def attached(self) -> bool:
        """Always True: this server is reached, not run."""
        return True

    @property
    def pid(self) -> None:
        """Always None: the process is not this one's child."""
        return None

    @property
    def client(self) -> LlamaClient:
        """The pooled HTTP client.

        :raises ServerNotRunning: after :meth:`stop`.
        """
        return self._http()

    def _http(self) -> LlamaClient:
        if self._client is None:
            raise ServerNotRunning(
                "it was stopped (an attached server's stop() closes its connections; start() opens them again)"
            )
        return self._client

    def start(self) -> None:
        """Check that the server answers ``GET /health`` with ``{"status": "ok"}`` (after
        :meth:`stop`, with a new connection pool).

        :raises HealthCheckError: when it answers anything else.
        :raises APIConnectionError: when it cannot be reached.
        """
        if self._client is None:
            self._client = LlamaClient(self._base_url, **self._options)
        health = self.health()
        if health.get("status") != "ok":
            raise HealthCheckError(f"{self._base_url}/health answered {health!r}")

    def stop(self) -> None:
        """Close the connection pool; the server itself runs on. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def get_server_args(self) -> None:
        """None: the arguments of a server this process did not start are not known."""
        return None

    def is_running(self) -> bool:
        """True while the server answers ``/health`` with ``ok``."""
        try:
            return self.health(timeout=2.0).get("status") == "ok"
        except LlamaProcError:
            return False

    def __enter__(self) -> RemoteServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "attached" if self._client is not None else "closed"
        return f"<RemoteServer {state} {self._base_url}>"

    def _repr_html_(self) -> str:
        state = "attached" if self._client is not None else "closed"
        return (
            f"<div><strong>RemoteServer</strong> {html.escape(state)} <code>{html.escape(self._base_url)}</code></div>"
        )
