"""The one place that turns requests/urllib3 transport failures into llama_proc errors."""

from __future__ import annotations

import errno
from typing import Iterator

from .errors import APIConnectionError, APITimeoutError, ConnectionRefused, ConnectTimeout, InvalidRequest, PoolTimeout

__all__ = ["translate_error"]

#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate is
#: valid but names another host.
_X509_NAME_MISMATCH = (62, 64)

#: A connect that fails with these never reached a server: no route to the host or its network.
_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH)


def translate_error(exc: BaseException, url: str, hint: str = "", *, sending: bool = False) -> Exception:
    """A transport failure as a :class:`~llama_proc.errors.LlamaProcError`.

    :param sending: True when ``exc`` was raised before any answer was read: a ``ValueError`` then
        means the request itself could not be encoded (a control character in its path or a
        header), which is the caller's mistake, not the server's.
    :returns: :class:`APITimeoutError` for a timeout, :class:`InvalidRequest` for a request that
        could not be sent, :class:`ConnectionRefused` when nothing listens on the port or the
        host cannot be reached,
        :class:`APIConnectionError` for everything else (a refused or broken
        connection, an answer that breaks HTTP); ``exc`` itself when it is none of these.
    """
    import ssl

    import requests
    import urllib3.exceptions as u3

    advice = ""
    handshake_timeout = False
    for link in _chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError):
            advice = (
                "the certificate is not for this host name; use the name it was issued for in the URL"
                if link.verify_code in _X509_NAME_MISMATCH
                else "pass verify= the path of the CA bundle that signed the server's certificate"
            )
        elif isinstance(link, TimeoutError) and "handshake" in str(link):
            handshake_timeout = True
            advice = "the TLS handshake got no answer: does the server speak https? (plain http does not answer it)"
    notes = "; ".join(note for note in (advice, hint) if note)
    suffix = f" ({notes})" if notes else ""
    connect_timeout = _caused_by(exc, u3.ConnectTimeoutError) and not _caused_by(exc, u3.NewConnectionError)
    if isinstance(exc, requests.exceptions.ConnectTimeout) or connect_timeout or handshake_timeout:
        return ConnectTimeout(f"could not connect in time{suffix}", url)
    if isinstance(exc, (requests.exceptions.ReadTimeout, TimeoutError)) or _caused_by(exc, u3.ReadTimeoutError):
        return APITimeoutError(f"no answer within the read timeout{suffix}", url)
    if isinstance(exc, u3.EmptyPoolError):
        return PoolTimeout(
            f"every pooled connection stayed busy for the read timeout, so nothing was sent; raise pool_maxsize "
            f"or call from fewer threads at once{suffix}",
            url,
        )
    if any(
        isinstance(link, ConnectionRefusedError) or (isinstance(link, OSError) and link.errno in _UNREACHABLE)
        for link in _chain(exc)
    ):
        return ConnectionRefused(f"{_describe(exc)}{suffix}", url)
    if sending and isinstance(exc, ValueError) and not isinstance(exc, requests.RequestException):
        return InvalidRequest(f"{exc}; nothing was sent")
    if isinstance(exc, (requests.RequestException, u3.HTTPError, OSError, ValueError, OverflowError)):
        return APIConnectionError(f"{_describe(exc)}{suffix}", url)
    return exc if isinstance(exc, Exception) else APIConnectionError(repr(exc), url)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps, outermost first (requests wraps urllib3, urllib3 wraps sockets)."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return
        yield current
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException) and current.args and isinstance(current.args[0], BaseException):
            inner = current.args[0]
        if not isinstance(inner, BaseException):
            inner = current.__cause__ or current.__context__  # raised while handling the inner one
        current = inner if isinstance(inner, BaseException) else None


def _caused_by(exc: BaseException, cls: type[BaseException]) -> bool:
    return any(isinstance(link, cls) for link in _chain(exc))


def _describe(exc: BaseException) -> str:
    """The innermost reason, named by its type: ``ConnectionRefusedError: [Errno 111] ...``."""
    *_, innermost = _chain(exc)
    return f"{type(innermost).__name__}: {innermost}"
