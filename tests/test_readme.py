"""Every Python code block of README.rst runs as written, against the tiny model.

Each block runs in its own interpreter, in a folder where the model files it names (``model.gguf``,
``chat.gguf``, ...) are the tiny model, with a loopback stand-in for the Hugging Face hub that serves
the repository it names, and the real llama-server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import docutils.core
import docutils.nodes
import pytest

from .fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
HUB_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"


def _python_blocks() -> list[tuple[int, str]]:
    """(line, code) of each ``.. code-block:: python`` in README.rst."""
    tree = docutils.core.publish_doctree(
        (ROOT / "README.rst").read_text(encoding="utf-8"), settings_overrides={"report_level": 5}
    )
    return [
        (block.line or 0, block.astext())
        for block in tree.findall(docutils.nodes.literal_block)
        if "python" in block.get("classes", [])
    ]


BLOCKS = _python_blocks()


def test_readme_has_the_python_blocks_this_test_runs() -> None:
    assert len(BLOCKS) >= 6


@pytest.fixture(scope="module")
def hub(tiny_model: Path) -> Iterator[FakeHub]:
    files = {f"qwen2.5-0.5b-instruct-{q}.gguf": tiny_model for q in ("q4_k_m", "q8_0")}
    fake = FakeHub({HUB_REPO: files}).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.mark.integration
@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line-{line}" for line, _ in BLOCKS])
def test_readme_block_runs(
    line: int, code: str, tmp_path: Path, hub: FakeHub, tiny_model: Path, llama_exe: Path
) -> None:
    for name in ("model.gguf", "chat.gguf", "code.gguf"):
        (tmp_path / name).symlink_to(tiny_model)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LLAMA_PROC_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        LLAMA_SERVER_PATH=str(llama_exe),
        LLAMA_PROC_MODEL="model.gguf",
        PYTHONPATH=str(ROOT),
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"README.rst line {line}:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
    print(done.stdout)
    if "stream_options" in code:
        assert done.stdout.rstrip().endswith(" tokens")  # the usage chunk was reached, safely


def test_readme_blocks_type_check(tmp_path: Path) -> None:
    """``mypy --strict`` (the project's settings) finds no error in any block."""
    files = []
    for line, code in BLOCKS:
        path = tmp_path / f"readme_line_{line}.py"
        path.write_text(code, encoding="utf-8")
        files.append(str(path))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
