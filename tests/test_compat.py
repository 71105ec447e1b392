"""The package on the oldest Python it supports (3.9): imports, config conversion (cattrs reads
the annotations at run time), the typed answers, and the optional modules' specs.

Runs where a ``python3.9`` is found, on PATH or installed by pyenv (skipped with the reason elsewhere); its runtime
dependencies are installed into a fresh virtual environment from the package's metadata.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = """
import typing
import llama_proc, llama_proc.types, llama_proc.models, llama_proc.rpc
from llama_proc import LlamaServerArgs
from llama_proc.config import HubModel
args = LlamaServerArgs.from_dict({"model": "m.gguf", "n_ctx": "512", "rpc": ["10.0.0.5:50052"]})
assert args.to_dict() == {"model": "m.gguf", "n_ctx": 512, "rpc": ["10.0.0.5:50052"]}, args.to_dict()
hub = LlamaServerArgs.from_dict({"model": "hf://org/repo:Q4_K_M"})
assert hub.model == HubModel("org/repo", quant="Q4_K_M") and hub.to_dict() == {"model": "hf://org/repo:Q4_K_M"}
assert LlamaServerArgs.from_env(environ={"LLAMA_PROC_MODEL": "m.gguf", "LLAMA_PROC_N_CTX": "64"}).n_ctx == 64
for name in dir(llama_proc.types):
    value = getattr(llama_proc.types, name)
    if isinstance(value, type) and hasattr(value, "__annotations__") and value.__module__ == "llama_proc.types":
        typing.get_type_hints(value)
print("ok")
"""


def test_the_oldest_supported_python_imports_and_converts(tmp_path: Path) -> None:
    candidates = [shutil.which("python3.9"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")))]
    runnable = [c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0]
    if not runnable:
        pytest.skip("no python3.9 here (on PATH or installed by pyenv)")
    python39 = runnable[0]
    venv = tmp_path / "venv"
    subprocess.run([python39, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    requires = [
        line.strip()
        for line in (ROOT / "setup.cfg").read_text().split("install_requires =", 1)[1].split("\n\n", 1)[0].splitlines()
        if line.strip()
    ]
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requires],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", SMOKE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert sys.version_info >= (3, 9)
