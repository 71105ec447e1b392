"""README.rst renders, and CI runs exactly the test command it gives."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_valid_restructuredtext() -> None:
    docutils_core = pytest.importorskip("docutils.core")
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    docutils_core.publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 2})


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    python3 -m venv .venv")]
    assert len(commands) == 2, commands  # the demo and the test suite
    demo, tests = commands
    assert demo.endswith("llama-proc demo") and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_mypy_finds_the_installed_package(tmp_path: Path) -> None:
    """After README's editable install, a user's script outside the project type-checks against it."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(
        "from llama_proc import LlamaServer, LlamaServerArgs\n"
        "server = LlamaServer(LlamaServerArgs(model='m.gguf'))\n"
        "reveal_type(server)\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Revealed type is "llama_proc.server.LlamaServer"' in done.stdout
