"""The setup.py build hook: wheels built offline, skipped, and against a loopback release mirror."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llama_proc import releases
from llama_proc.platforms import current_target

from .fake_releases import FakeReleases, release_members, tar_archive

ROOT = Path(__file__).resolve().parent.parent
TARGET = current_target()
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bin"
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    dest = tmp_path / "project"
    shutil.copytree(ROOT, dest, ignore=IGNORE)
    return dest


def build_wheel(project: Path, out: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_PROC_", "LLAMA_SERVER"))}
    full_env.update(env)
    full_env.setdefault("LLAMA_PROC_CACHE_DIR", str(out / "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-v", "-w", str(out), str(project)],
        capture_output=True, text=True, timeout=300, env=full_env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    wheels = list(out.glob("*.whl"))
    return done, wheels[0] if wheels else None


def names_in(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_skip_flag_builds_a_pure_wheel_and_warns(project: Path, tmp_path: Path) -> None:
    done, wheel = build_wheel(project, tmp_path / "out", LLAMA_PROC_SKIP_DOWNLOAD="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert wheel is not None and wheel.name.endswith("-py3-none-any.whl")
    assert "LLAMA_PROC_SKIP_DOWNLOAD is set" in done.stdout + done.stderr
    assert not [n for n in names_in(wheel) if "/bin/" in n]


def test_offline_build_succeeds_fast_with_one_warning(project: Path, tmp_path: Path) -> None:
    done, wheel = build_wheel(project, tmp_path / "out", LLAMA_PROC_RELEASES_URL="http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr[-3000:]
    assert wheel is not None and wheel.name.endswith("-py3-none-any.whl")
    output = done.stdout + done.stderr
    assert output.count("llama-proc: warning: could not place llama-server") == 1
    assert "cannot reach the release API" in output


def test_wheel_carries_the_binary_from_a_mirror(project: Path, tmp_path: Path) -> None:
    with FakeReleases("b11434") as fake:
        name = releases.asset_names(TARGET, "cpu", "b11434")[0]
        fake.add(name, tar_archive(release_members("b11434", sys.executable)))
        done, wheel = build_wheel(project, tmp_path / "out", LLAMA_PROC_RELEASES_URL=fake.url)
        assert fake.downloads(name) == 1
    assert done.returncode == 0, done.stderr[-3000:]
    assert wheel is not None and "-py3-none-" in wheel.name and not wheel.name.endswith("-any.whl")
    names = names_in(wheel)
    assert f"llama_proc/bin/{TARGET}/cpu/llama-server" in names
    assert f"llama_proc/bin/{TARGET}/cpu/libggml-base.so.0.0.1" in names
    with zipfile.ZipFile(wheel) as zf:
        mode = zf.getinfo(f"llama_proc/bin/{TARGET}/cpu/llama-server").external_attr >> 16
    assert mode & 0o111


def test_llama_server_path_means_no_network(project: Path, tmp_path: Path) -> None:
    exe = tmp_path / "prebuilt" / "llama-server"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    (exe.parent / "libllama.so").write_bytes(b"lib")
    done, wheel = build_wheel(
        project, tmp_path / "out", LLAMA_SERVER_PATH=str(exe), LLAMA_PROC_RELEASES_URL="http://127.0.0.1:9"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert wheel is not None
    names = names_in(wheel)
    assert f"llama_proc/bin/{TARGET}/cpu/llama-server" in names and f"llama_proc/bin/{TARGET}/cpu/libllama.so" in names
    assert "could not place" not in done.stdout + done.stderr


def test_sdist_builds_offline(project: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sd")], cwd=project, capture_output=True,
        text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "sd").glob("llama_proc-0.1.0.tar.gz")) or list(
        (tmp_path / "sd").glob("llama-proc-0.1.0.tar.gz")
    )
