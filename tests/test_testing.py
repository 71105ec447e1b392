"""The user-facing test kit: FakeServer and the pytest plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_proc import Server
from llama_proc.errors import BadRequestError, ServerAlreadyRunning, ServerNotRunning
from llama_proc.testing import FakeServer, FakeStream


def app_code(server: Server, question: str) -> str:
    """The kind of code users test with a FakeServer."""
    reply = server.chat_completions({"messages": [{"role": "user", "content": question}]})
    return str(reply["choices"][0]["message"]["content"])


def test_fake_is_a_server_and_records_calls() -> None:
    fake = FakeServer(reply="forty-two")
    assert isinstance(fake, Server)
    with pytest.raises(ServerNotRunning):
        app_code(fake, "too early")
    with fake:
        assert app_code(fake, "meaning?") == "forty-two"
        with pytest.raises(ServerAlreadyRunning):
            fake.start()
    assert fake.calls_to("chat_completions")[-1]["messages"][0]["content"] == "meaning?"
    assert [c.method for c in fake.calls] == ["chat_completions", "chat_completions"]
    assert (fake.starts, fake.stops) == (1, 1)


def test_scripted_answers_errors_and_streams() -> None:
    fake = FakeServer()
    fake.start()
    error = BadRequestError(400, {"error": {"message": "context too long"}})
    fake.script("chat_completions", {"choices": [{"message": {"content": "scripted"}}]}, error)
    assert app_code(fake, "a") == "scripted"
    with pytest.raises(BadRequestError, match="context too long"):
        app_code(fake, "b")
    assert app_code(fake, "c") == fake.reply  # back to the default
    fake.script("chat_completions", [{"choices": [{"delta": {"content": "x"}}]}, RuntimeError("cut")])
    stream = fake.chat_completions({"messages": [], "stream": True})
    assert isinstance(stream, FakeStream)
    with pytest.raises(RuntimeError, match="cut"), stream:
        for _ in stream:
            pass
    assert stream.closed


def test_default_stream_embeddings_tokens() -> None:
    with FakeServer(reply="one two three") as fake:
        with fake.chat_completions({"messages": [], "stream": True}) as stream:
            chunks = list(stream)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "one two three"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        text = "".join(c["choices"][0]["text"] for c in fake.completions({"prompt": "x", "stream": True}))
        assert text == "one two three"
        with fake.chat_completions({"messages": []}, stream=True) as stream:  # the keyword, as on a server
            assert isinstance(stream, FakeStream) and list(stream)[-1]["choices"][0]["finish_reason"] == "stop"
        assert fake.calls_to("chat_completions")[-1] == {"messages": [], "stream": True}
        assert fake.completions({"prompt": "x", "stream": True}, stream=False)["choices"][0]["text"] == fake.reply
        a = fake.embeddings({"input": ["same", "other"]})["data"]
        b = fake.embeddings({"input": "same"})["data"]
        assert a[0]["embedding"] == b[0]["embedding"] != a[1]["embedding"]
        assert fake.detokenize(fake.tokenize("héllo")["tokens"])["content"] == "héllo"
        assert fake.health() == {"status": "ok"} and fake.models()["data"][0]["id"] == "fake"


PLUGIN_TESTS = """
from llama_proc.testing import FakeServer

def test_fake(fake_llama_server):
    assert isinstance(fake_llama_server, FakeServer) and fake_llama_server.is_running()
    assert fake_llama_server.tokenize("ab")["tokens"] == [97, 98]

def test_real(llama_server):
    assert llama_server.is_running()
    assert llama_server.tokenize("hello world")["tokens"] == [22172, 3186]
"""


@pytest.mark.integration
def test_plugin_fixtures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, llama_exe: Path, tiny_model: Path
) -> None:
    # pytester points HOME elsewhere: name the cache (where the tiny model is) and the binary
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tiny_model.parent.parent))
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(llama_exe))
    pytester.makepyfile(PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_plugin_skips_without_a_binary(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    pytester.makeconftest(
        "import pytest\nfrom llama_proc import LlamaServerArgs\n"
        "@pytest.fixture(scope='session')\ndef llama_server_args():\n    return LlamaServerArgs(model='m.gguf')\n"
    )
    pytester.makepyfile(PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*no llama-server available*"])
