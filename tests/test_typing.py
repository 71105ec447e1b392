"""The types users see: a script that uses them right passes ``mypy --strict``, and one with the
usual mistakes fails on exactly the lines that have them (see tests/typing_cases/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_proc import LlamaServer

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "typing_cases"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")
MARK = re.compile(r"# error: (?P<code>[a-z-]+)$")


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[int, str]]]:
    """``{file name: {(line, error code)}}`` from one mypy run over both scripts.

    It runs from the repository root, so that mypy finds the package under test (the current
    directory comes first in its search path). Errors inside llama_proc are not reported, as for
    an installed package; ``mypy --strict llama_proc`` checks those."""
    cache = tmp_path_factory.mktemp("mypy-cache")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(cache),
         str(CASES / "good.py"), str(CASES / "bad.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode in (0, 1), output  # 2: mypy itself failed
    assert "(checked 2 source files)" in output, output
    errors: dict[str, set[tuple[int, str]]] = {"good.py": set(), "bad.py": set()}
    for line in done.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            errors[Path(match["path"]).name].add((int(match["line"]), match["code"]))
        else:
            assert not re.match(r"^\S+:\d+: error:", line), output  # an error without a code
    return errors


def test_correct_use_type_checks(mypy_errors: dict[str, set[tuple[int, str]]]) -> None:
    assert mypy_errors["good.py"] == set()


def test_mistakes_are_caught_where_they_are(mypy_errors: dict[str, set[tuple[int, str]]]) -> None:
    lines = (CASES / "bad.py").read_text(encoding="utf-8").splitlines()
    expected = {(number, match["code"]) for number, text in enumerate(lines, 1) if (match := MARK.search(text))}
    assert len(expected) == 6
    assert mypy_errors["bad.py"] == expected


def test_types_evaluate_at_run_time() -> None:
    """The annotations of llama_proc.types evaluate (typing.get_type_hints) on every supported
    Python, and what is required is what llama-server needs."""
    import typing

    from llama_proc import types

    for name in types.__all__:
        typing.get_type_hints(getattr(types, name))
    assert types.ChatCompletionRequest.__required_keys__ == {"messages"}
    assert types.ChatCompletionStreamRequest.__required_keys__ == {"messages", "stream"}
    assert types.InfillRequest.__required_keys__ == {"input_prefix", "input_suffix"}
    assert "stream_options" in types.ChatCompletionStreamRequest.__optional_keys__


@pytest.mark.integration
def test_the_real_server_sends_every_required_key(shared_server: LlamaServer) -> None:
    """The types follow what llama-server sends: no key they require is missing from its answers."""
    from llama_proc import types as t

    server = shared_server
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = server.chat_completions(chat, stream=False)
    answers: list[tuple[Any, Any]] = [(t.ChatCompletion, reply), (t.ChatCompletionChoice, reply["choices"][0]),
                                      (t.ChatCompletionMessage, reply["choices"][0]["message"]), (t.Usage, reply["usage"])]  # fmt: skip
    for chunk in server.chat_completions({**chat, "stream_options": {"include_usage": True}}, stream=True):
        answers += [(t.ChatCompletionChunk, chunk), *((t.ChatCompletionChunkChoice, c) for c in chunk["choices"])]
    text = server.completions({"prompt": "hi", "max_tokens": 3}, stream=False)
    answers += [(t.Completion, text), (t.CompletionChoice, text["choices"][0])]
    for piece in server.completions({"prompt": "hi", "max_tokens": 3}, stream=True):
        answers += [(t.CompletionChunk, piece), *((t.CompletionChunkChoice, c) for c in piece["choices"])]
    models = server.models()
    answers += [(t.TokenizeResponse, server.tokenize("hi")), (t.DetokenizeResponse, server.detokenize([1])),
                (t.HealthResponse, server.health()), (t.PropsResponse, server.props()), (t.ModelsResponse, models),
                (t.Model, models["data"][0]), *((t.Slot, slot) for slot in server.slots())]  # fmt: skip
    missing = [(kind.__name__, sorted(kind.__required_keys__ - set(value))) for kind, value in answers]
    assert [entry for entry in missing if entry[1]] == []
