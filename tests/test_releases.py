"""Prebuilt downloads: the release API (with ``responses``) and real downloads from a loopback fake."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest
import responses

from llama_proc import _download, binaries, releases
from llama_proc.errors import ChecksumMismatch, ConfigError, DownloadError
from llama_proc.platforms import current_target

from .conftest import in_threads
from .fake_releases import FakeReleases, release_members, tar_archive, zip_archive

TAG = "b11434"
TARGET = current_target()
API = "https://api.example.test"
RELEASE_URL = f"{API}/repos/ggml-org/llama.cpp/releases/tags/{TAG}"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(cache))
    for var in ("LLAMA_SERVER_PATH", "LLAMA_PROC_VARIANT", "LLAMA_PROC_LLAMA_CPP_TAG", "GH_TOKEN", "GITHUB_TOKEN",
                "LLAMA_PROC_RELEASES_URL"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return cache


# -- the table and the API (responses) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "variant", "expected"),
    [
        ("x86_64-unknown-linux-gnu", "cpu", ["llama-b11434-bin-ubuntu-x64.tar.gz"]),
        ("x86_64-unknown-linux-gnu", "vulkan", ["llama-b11434-bin-ubuntu-vulkan-x64.tar.gz"]),
        ("x86_64-unknown-linux-gnu", "cuda", ["llama-b11434-bin-ubuntu-cuda-12.8-x64.tar.gz",
                                              "cudart-llama-b11434-bin-ubuntu-cuda-12.8-x64.tar.gz"]),
        ("aarch64-unknown-linux-gnu", "cpu", ["llama-b11434-bin-ubuntu-arm64.tar.gz"]),
        ("aarch64-apple-darwin", "metal", ["llama-b11434-bin-macos-arm64.tar.gz"]),
        ("x86_64-apple-darwin", "cpu", ["llama-b11434-bin-macos-x64.tar.gz"]),
        ("x86_64-pc-windows-msvc", "cpu", ["llama-b11434-bin-win-cpu-x64.zip"]),
        ("x86_64-pc-windows-msvc", "cuda", ["llama-b11434-bin-win-cuda-12.4-x64.zip", "cudart-llama-bin-win-cuda-12.4-x64.zip"]),
        ("x86_64-pc-windows-msvc", "vulkan", ["llama-b11434-bin-win-vulkan-x64.zip"]),
        ("aarch64-apple-darwin", "cuda", []),
    ],
)  # fmt: skip
def test_asset_choice(target: str, variant: str, expected: list[str]) -> None:
    assert releases.asset_names(target, variant, TAG) == expected


def test_tag_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_PROC_LLAMA_CPP_TAG", raising=False)
    assert releases.release_tag() == releases.PINNED_TAG == "b11434"
    monkeypatch.setenv("LLAMA_PROC_LLAMA_CPP_TAG", "b9000")
    assert releases.release_tag() == "b9000"
    with pytest.raises(ConfigError, match="not a llama.cpp release tag"):
        releases.release_tag("v1.0")


def _asset(name: str, digest: str | None = "sha256:" + "ab" * 32) -> dict[str, object]:
    return {"name": name, "size": 10, "digest": digest, "browser_download_url": f"https://dl.example.test/{name}"}


@responses.activate
def test_fetch_release_reads_digests_and_sends_token(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_PROC_RELEASES_URL", API + "/")
    monkeypatch.setenv("GH_TOKEN", "tok123")
    responses.get(RELEASE_URL, json={"assets": [_asset("a.tar.gz"), _asset("b.zip", None), {"name": 3}]})
    assets = releases.fetch_release(TAG)
    assert assets["a.tar.gz"].sha256 == "ab" * 32
    assert assets["a.tar.gz"].url == "https://dl.example.test/a.tar.gz"
    assert assets["b.zip"].sha256 is None
    assert len(assets) == 2
    assert responses.calls[0].request.headers["Authorization"] == "Bearer tok123"


def test_one_github_session(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with releases.github_session() as session:
        assert session.headers["User-Agent"] == "llama-proc" and "Authorization" not in session.headers
    monkeypatch.setenv("GITHUB_TOKEN", "from-env")
    with releases.github_session() as session:
        assert session.headers["Authorization"] == "Bearer from-env"
    with releases.github_session("given") as session:
        assert session.headers["Authorization"] == "Bearer given"
    with releases.github_session("") as session:  # an empty token sends none
        assert "Authorization" not in session.headers
    assert binaries.ProgressCallback is _download.ProgressCallback  # one progress type, public in binaries


@responses.activate
def test_the_release_api_is_asked_for_json_through_any_session(env: Path) -> None:
    responses.get(RELEASE_URL, json={"assets": [_asset("a.tar.gz")]})
    releases.fetch_release(TAG, base_url=API)
    with releases.github_session("tok") as session:
        releases.fetch_release(TAG, base_url=API, session=session)
    for call in responses.calls:
        assert call.request.headers["Accept"] == "application/vnd.github+json"
    assert responses.calls[1].request.headers["Authorization"] == "Bearer tok"


@responses.activate
def test_pinned_digest_wins(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(releases.PINNED_DIGESTS, TAG, {"a.tar.gz": "cd" * 32})
    responses.get(RELEASE_URL, json={"assets": [_asset("a.tar.gz")]})
    assert releases.fetch_release(TAG, base_url=API)["a.tar.gz"].sha256 == "cd" * 32


@responses.activate
@pytest.mark.parametrize(
    ("status", "headers", "message"),
    [(404, {}, "release b11434 not found"), (403, {"X-RateLimit-Remaining": "0"}, "rate limit reached; set GH_TOKEN"),
     (401, {}, "access denied"), (500, {}, "answered 500")],
)  # fmt: skip
def test_api_errors(env: Path, status: int, headers: dict[str, str], message: str) -> None:
    responses.get(RELEASE_URL, json={"message": "x"}, status=status, headers=headers)
    with pytest.raises(DownloadError, match=message):
        releases.fetch_release(TAG, base_url=API)


@responses.activate
def test_api_unreachable_and_bad_body(env: Path) -> None:
    import requests

    responses.get(RELEASE_URL, body=requests.ConnectionError("no route"))
    with pytest.raises(DownloadError, match="cannot reach the release API"):
        releases.fetch_release(TAG, base_url=API)
    responses.replace(responses.GET, RELEASE_URL, body="<html>")
    with pytest.raises(DownloadError, match="unexpected body"):
        releases.fetch_release(TAG, base_url=API)


def test_no_prebuilt_names_both_ways_out(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(releases, "ASSETS", {})
    monkeypatch.setattr(binaries, "asset_names", releases.asset_names)
    with pytest.raises(DownloadError, match="publishes no prebuilt") as info:
        binaries.install_prebuilt("cpu")
    assert "--from-source" in str(info.value)


# -- real downloads from a loopback fake ----------------------------------------------------------


def _serve_release(fake: FakeReleases, archive: bytes | None = None) -> str:
    name = releases.asset_names(TARGET, "cpu", TAG)[0]
    fake.add(name, archive if archive is not None else tar_archive(release_members(TAG, sys.executable), {}))
    return name


def test_install_download_verify_extract_and_run(env: Path, tmp_path: Path) -> None:
    lines: list[tuple[float | None, str]] = []
    with FakeReleases(TAG) as fake:
        name = _serve_release(fake)
        result = binaries.install_prebuilt("cpu", base_url=fake.url, progress=lambda f, line: lines.append((f, line)))
        again = binaries.install_prebuilt("cpu", base_url=fake.url)
        assert fake.downloads(name) == 1
    assert result.built and not again.built
    bin_dir = env / "bin" / TARGET / "cpu"
    assert result.directory == bin_dir
    server = bin_dir / "llama-server"
    assert server.stat().st_mode & stat.S_IXUSR
    assert (bin_dir / "rpc-server").stat().st_mode & stat.S_IXUSR
    assert os.readlink(bin_dir / "libggml-base.so") == "libggml-base.so.0.0.1"
    assert result.info["tag"] == TAG and result.info["source"] == "release"
    assert lines and lines[-1][0] == 1.0
    assert not list((env / "downloads").glob("*"))  # archives removed after extraction
    # the runtime finds it, puts its libraries on the search path, and it runs
    assert binaries.find_executable() == server
    lib_env = binaries.library_env(server)
    assert (
        lib_env is not None
        and str(bin_dir) in lib_env["LD_LIBRARY_PATH" if sys.platform != "darwin" else "DYLD_LIBRARY_PATH"]
    )
    from llama_proc import LlamaServer, LlamaServerArgs

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with LlamaServer(None, LlamaServerArgs(model=model)) as srv:
        assert srv.health() == {"status": "ok"}


def test_checksum_mismatch_deletes_the_file(env: Path) -> None:
    with FakeReleases(TAG) as fake:
        name = releases.asset_names(TARGET, "cpu", TAG)[0]
        fake.add(name, tar_archive(release_members(TAG, sys.executable)), digest="sha256:" + "0" * 64)
        with pytest.raises(ChecksumMismatch) as info:
            binaries.install_prebuilt("cpu", base_url=fake.url)
    assert info.value.expected == "0" * 64 and len(info.value.actual) == 64
    assert not (env / "bin" / TARGET / "cpu").exists()
    assert not list((env / "downloads").glob("*"))


def test_unverifiable_asset_is_refused(env: Path) -> None:
    with FakeReleases(TAG) as fake:
        name = releases.asset_names(TARGET, "cpu", TAG)[0]
        fake.add(name, tar_archive(release_members(TAG, sys.executable)), digest=None)
        with pytest.raises(DownloadError, match="no published SHA-256"):
            binaries.install_prebuilt("cpu", base_url=fake.url)


def test_connection_dropped_half_way_leaves_nothing(env: Path) -> None:
    with FakeReleases(TAG) as fake:
        name = _serve_release(fake)
        fake.drop_after[name] = len(fake.files[name]) // 2
        with pytest.raises(DownloadError, match="after 3 attempt"):
            binaries.install_prebuilt("cpu", base_url=fake.url, retry_delays=(0.01, 0.01))
        assert fake.downloads(name) == 3
    assert not (env / "bin" / TARGET / "cpu").exists()
    assert not [p for p in (env / "downloads").rglob("*") if p.is_file()]


def test_retry_recovers(env: Path) -> None:
    with FakeReleases(TAG) as fake:
        name = _serve_release(fake)
        fake.drop_after[name] = 10
        fake.drops_left[name] = 1  # the first download is cut, the retry gets it whole
        result = binaries.install_prebuilt("cpu", base_url=fake.url, retry_delays=(0.05, 0.05))
        assert fake.downloads(name) == 2
    assert result.built


def test_zip_slip_archive_rejected(env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(releases.ASSETS, (TARGET, "cpu"), ("llama-{tag}-bin-test.zip",))
    with FakeReleases(TAG) as fake:
        fake.add(f"llama-{TAG}-bin-test.zip", zip_archive({"../../evil.sh": b"boom", "llama-server": b"x"}))
        with pytest.raises(Exception, match="outside"):
            binaries.install_prebuilt("cpu", base_url=fake.url)
    assert not (env / "bin" / TARGET / "cpu").exists()
    assert not list(tmp_path.rglob("evil.sh"))


def test_symlink_escaping_archive_rejected(env: Path) -> None:
    members = release_members(TAG, sys.executable)
    members[f"llama-{TAG}/escape"] = "../../../../etc/passwd"
    with FakeReleases(TAG) as fake:
        _serve_release(fake, tar_archive(members))
        with pytest.raises(Exception, match="outside"):
            binaries.install_prebuilt("cpu", base_url=fake.url)
    assert not (env / "bin" / TARGET / "cpu").exists()


def test_zip_release(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(releases.ASSETS, (TARGET, "cpu"), ("llama-{tag}-bin-test.zip", "cudart-{tag}.zip"))
    launcher = b"#!/bin/sh\nexit 0\n"
    with FakeReleases(TAG) as fake:
        fake.add(
            f"llama-{TAG}-bin-test.zip",
            zip_archive({"build/bin/llama-server": launcher, "build/bin/ggml-rpc-server": launcher}),
        )
        fake.add(f"cudart-{TAG}.zip", zip_archive({"cudart/libcudart.so.12": b"lib"}))
        result = binaries.install_prebuilt("cpu", base_url=fake.url)
    names = sorted(p.name for p in result.directory.iterdir())
    assert names == ["BUILD_INFO.json", "ggml-rpc-server", "libcudart.so.12", "llama-server", "rpc-server"]
    assert result.llama_server.stat().st_mode & stat.S_IXUSR


def test_twenty_concurrent_installers_one_download(env: Path) -> None:
    with FakeReleases(TAG) as fake:
        name = _serve_release(fake)
        results = in_threads(lambda i: binaries.install_prebuilt("cpu", base_url=fake.url).built, 20, timeout=60)
        assert fake.downloads(name) == 1
    assert sorted(results) == [False] * 19 + [True]


def test_lock_held_too_long_is_typed(env: Path) -> None:
    import filelock

    from llama_proc.errors import LockTimeout

    (env / "locks").mkdir(parents=True)
    holder = filelock.FileLock(str(env / "locks" / f"{TARGET}-cpu.lock"))
    with holder:
        done: list[BaseException] = []
        t = threading.Thread(target=lambda: _capture(done, lambda: binaries.install_prebuilt("cpu", lock_timeout=0.2)))
        t.start()
        t.join(10)
    assert len(done) == 1 and isinstance(done[0], LockTimeout) and isinstance(done[0], TimeoutError)


def _capture(out: list[BaseException], fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except BaseException as exc:
        out.append(exc)


def test_ensure_falls_back_to_source_build(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_binaries import fake_source

    monkeypatch.setenv("LLAMA_PROC_RELEASES_URL", "http://127.0.0.1:9")  # nothing listens there
    src = fake_source(tmp_path / "src")
    exe = binaries.ensure_executable("cpu", source=src)
    assert exe == env / "bin" / TARGET / "cpu" / "llama-server"
    assert binaries._read_info(exe.parent)["source_digest"] == binaries.source_digest(src)  # type: ignore[index]


def test_ensure_names_both_ways_out(env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMA_PROC_RELEASES_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DownloadError) as info:
        binaries.ensure_executable("cpu", source=tmp_path / "no-source")
    text = str(info.value)
    assert "LLAMA_PROC_RELEASES_URL" in text and "--from-source" in text


def test_concurrent_installer_processes_one_download(env: Path) -> None:
    import subprocess

    code = "import sys; from llama_proc import binaries; print(binaries.install_prebuilt('cpu', base_url=sys.argv[1]).built)"
    with FakeReleases(TAG) as fake:
        name = _serve_release(fake)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, fake.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert fake.downloads(name) == 1
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["False", "False", "False", "True"]
