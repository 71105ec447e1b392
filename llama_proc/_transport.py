"""The one place that maps requests/urllib3 transport errors to llama_proc errors."""

from __future__ import annotations

from .errors import APIConnectionError, APITimeoutError


def translate_error(exc: BaseException, url: str, hint: str = "") -> APIConnectionError:
    """A transport failure as :class:`APIConnectionError` (or :class:`APITimeoutError`)."""
    import requests

    suffix = f" ({hint})" if hint else ""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return APITimeoutError(f"could not connect in time{suffix}", url)
    if isinstance(exc, requests.exceptions.ReadTimeout) or "Read timed out" in str(exc):
        return APITimeoutError(f"no answer within the read timeout{suffix}", url)
    if isinstance(exc, requests.exceptions.ConnectionError):
        inner = exc.args[0] if exc.args else exc
        reason = getattr(inner, "reason", inner)
        return APIConnectionError(f"{type(reason).__name__}: {reason}{suffix}", url)
    return APIConnectionError(f"{exc}{suffix}", url)
