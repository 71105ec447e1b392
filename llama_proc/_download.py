"""Streaming downloads with a SHA-256 check, retries, progress, and no partial file left behind."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import ChecksumMismatch, DownloadError

if TYPE_CHECKING:
    import requests

_log = logging.getLogger("llama_proc.binaries")

#: A progress callback for downloads and builds: called with (the fraction done in 0..1, or None
#: when unknown; a line to show). Public as :data:`llama_proc.binaries.ProgressCallback`.
ProgressCallback = Callable[[Optional[float], str], None]

CHUNK = 1 << 20


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    session: requests.Session,
    progress: ProgressCallback | None = None,
    retry_delays: Sequence[float] = (1.0, 3.0),
    timeout: tuple[float, float] = (5.0, 60.0),
) -> Path:
    """Download ``url`` to ``dest`` through a temporary file beside it, checking ``sha256``.

    Connection errors are retried after each delay in ``retry_delays``; an HTTP error status or a
    checksum mismatch is not. Whatever happens, no partial file remains.

    :raises DownloadError: when the download fails.
    :raises ChecksumMismatch: when the content's digest differs from ``sha256``.
    """
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    attempts = len(retry_delays) + 1
    for attempt in range(1, attempts + 1):
        try:
            return _download_once(url, dest, sha256, session, progress, timeout)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == attempts:
                raise DownloadError(f"{url}: {type(exc).__name__} after {attempts} attempt(s)") from None
            delay = retry_delays[attempt - 1]
            _log.warning("download of %s failed (%s); retrying in %.3g s", url, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _download_once(
    url: str,
    dest: Path,
    sha256: str | None,
    session: requests.Session,
    progress: ProgressCallback | None,
    timeout: tuple[float, float],
) -> Path:
    import requests

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, session.get(url, stream=True, timeout=timeout) as response:
            if response.status_code >= 400:
                raise DownloadError(f"{url} answered HTTP {response.status_code}")
            total = int(response.headers.get("Content-Length") or 0) or None
            done = 0
            last_report = -1.0
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    fraction = done / total if total else None
                    if fraction is None or fraction - last_report >= 0.01 or done == total:
                        last_report = fraction if fraction is not None else last_report
                        progress(
                            fraction,
                            f"{dest.name}: {done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total else ""),
                        )
            if total is not None and done != total:
                raise requests.exceptions.ChunkedEncodingError(f"got {done} of {total} bytes")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumMismatch(dest.name, sha256.lower(), actual)
        os.replace(tmp_name, dest)
        return dest
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
