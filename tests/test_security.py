"""The security promises of README.rst's SECURITY section, one test each."""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

import pytest

from llama_proc import LlamaClient, LlamaServer, LlamaServerArgs
from llama_proc.errors import AuthenticationError

PACKAGE = Path(__file__).resolve().parent.parent / "llama_proc"


def test_default_bind_is_loopback() -> None:
    args = LlamaServerArgs(model="m.gguf")
    assert args.host == "127.0.0.1"
    assert args.to_args()[args.to_args().index("--host") + 1] == "127.0.0.1"


def test_public_bind_without_key_warns(fake_exe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    caplog.set_level(logging.WARNING, logger="llama_proc")
    with LlamaServer(fake_exe, LlamaServerArgs(model=model, host="0.0.0.0")) as server:
        assert server.health()["status"] == "ok"
    assert any("without an API key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with LlamaServer(fake_exe, LlamaServerArgs(model=model)):
        pass
    assert not any("without an API key" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_auto_api_key_is_generated_used_and_never_shown(
    llama_exe: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llama_proc")
    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, api_key="auto", n_ctx=256)) as server:
        key = server.api_key
        assert key is not None and key != "auto" and len(key) >= 32
        assert server.models()["data"]  # our client sends it
        with LlamaClient(server.base_url) as anonymous, pytest.raises(AuthenticationError) as info:
            anonymous.models()
        shown = [repr(server), server._repr_html_(), repr(server.args), str(server.args.to_dict()), str(info.value)]
        shown += [r.getMessage() for r in caplog.records]
        assert not any(key in text for text in shown)
        assert server.args.to_dict(include_secrets=True)["api_key"] == key  # only when asked for
    other = LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, api_key="auto", n_ctx=256))
    with other:
        assert other.api_key != key  # a new key per run


def test_logged_command_line_is_redacted(fake_exe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    caplog.set_level(logging.DEBUG, logger="llama_proc")
    with LlamaServer(fake_exe, LlamaServerArgs(model=model, api_key="s3cret-value")):
        pass
    starting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting ")]
    assert starting and "--api-key-file " in starting[0]  # the key is in a file, not on the command line
    assert not any("s3cret-value" in r.getMessage() for r in caplog.records)


def test_a_build_without_api_key_file_gets_the_key_redacted_in_the_log(
    fake_exe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HELP", "-m, --model FNAME   model path\n--api-key KEY   API key\n")  # an older build
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    caplog.set_level(logging.DEBUG, logger="llama_proc")
    with LlamaServer(fake_exe, LlamaServerArgs(model=model, api_key="s3cret-value")) as server:
        assert server.chat_completions({"messages": []})["choices"]  # the key reached the server
        with LlamaClient(server.base_url, api_key="wrong") as other, pytest.raises(AuthenticationError):
            other.chat_completions({"messages": []})
    starting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting ")]
    assert starting and "--api-key ***" in starting[0] and "--api-key-file" not in starting[0]
    assert not any("s3cret-value" in r.getMessage() for r in caplog.records)


def test_a_key_on_the_command_line_is_redacted_in_the_log() -> None:
    from llama_proc.server import _redact

    assert _redact(["llama-server", "--api-key", "s3cret-value", "--port", "1"]) == [
        "llama-server", "--api-key", "***", "--port", "1",
    ]  # fmt: skip


def test_no_shell_anywhere() -> None:
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "shell=True" not in text, source
        assert not re.search(r"\bos\.(system|popen)\(", text), source
        assert "preexec_fn" not in text.replace("no ``preexec_fn``", ""), source


def test_cache_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_proc._paths import private_cache_dir

    cache = tmp_path / "fresh" / "cache"
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(cache))
    private_cache_dir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
