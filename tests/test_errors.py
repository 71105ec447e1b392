from __future__ import annotations

import pickle

import pytest

from llama_proc import errors
from llama_proc.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ExecutableNotFound,
    HealthCheckError,
    InternalServerError,
    IoError,
    LlamaProcError,
    ModelNotFound,
    NotFoundError,
    ServerNotReady,
    ServiceUnavailableError,
    StartupError,
    StartupTimeout,
    make_status_error,
)

SAMPLES: list[LlamaProcError] = [
    ModelNotFound("/models/x.gguf"),
    StartupError("boom", 3, ["line 1", "line 2"]),
    StartupTimeout(30.0, ["loading"]),
    HealthCheckError("GET /health answered 404"),
    ServerNotReady(),
    IoError("disk full"),
    ExecutableNotFound("llama-server", ["/a", "/b"], "build it"),
    ConfigError(["port: bad", "n_ctx: bad"]),
    errors.BuildError("cmake failed", ["error: x"]),
    APIConnectionError("refused", "http://127.0.0.1:1/health"),
    APITimeoutError("slow", "http://x"),
    make_status_error(401, {"error": {"message": "Invalid API Key"}}, "http://x/v1/models"),
    errors.ServerNotRunning("it was stopped"),
    errors.ServerAlreadyRunning(123, "http://127.0.0.1:8080"),
    errors.APIStreamError(500, {"error": {"message": "oops"}}),
    errors.InvalidRequest("header 'X': no CR, LF or other control characters in header names or values"),
    errors.ModelNotRegistered("zzz", ["a", "b"]),
]


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip(exc: LlamaProcError) -> None:
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc)
    assert str(again) == str(exc)
    assert again == exc
    assert again.code == exc.code


def test_codes_and_messages() -> None:
    assert ServerNotReady().code == "server_error-server_not_ready"
    assert str(ServerNotReady()) == "Model server is starting up. Please wait and try again."
    assert ServerNotReady().http_status == 503
    assert StartupError("x").code == "server_error-startup_error"
    assert str(StartupError("bad flag")) == "Failed to start model server: bad flag."
    assert HealthCheckError("x").code == "server_error-health_check_error"
    assert str(HealthCheckError("nope")) == "Model server health check failed: nope."
    assert StartupTimeout(300).code == "server_error-timeout_error"
    assert str(StartupTimeout(300)).startswith("Model server did not respond within 300 seconds.")
    assert ModelNotFound("/x").code == "server_error-model_not_found"
    assert str(ModelNotFound("/x.gguf")) == "Model file does not exist: /x.gguf."
    assert ModelNotFound("/x").http_status == 500
    assert IoError("x").code == "server_error-io_error"


def test_model_not_registered_reads_as_its_message() -> None:
    exc = errors.ModelNotRegistered("zzz", ["a", "b"])
    assert isinstance(exc, KeyError) and exc.http_status == 404
    # the message itself, not KeyError's quoted repr of it
    assert str(exc) == "No model is registered as 'zzz'; known: a, b."
    assert str(errors.ModelNotRegistered("x", [])) == "No model is registered as 'x'; known: none."


def test_builtin_bases() -> None:
    assert isinstance(StartupTimeout(1), TimeoutError)
    assert isinstance(APITimeoutError("x"), TimeoutError)
    assert isinstance(APITimeoutError("x"), APIConnectionError)
    assert isinstance(ConfigError([]), ValueError)
    assert isinstance(ModelNotFound("x"), FileNotFoundError)
    assert isinstance(ExecutableNotFound("x", [], ""), FileNotFoundError)


def test_hf_cache_path_shown_from_hf_home(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    path = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc" / "m.gguf"
    assert (
        str(ModelNotFound(str(path)))
        == "Model file does not exist: $HF_HOME/hub/models--org--name/snapshots/abc/m.gguf."
    )
    assert str(ModelNotFound("/elsewhere/m.gguf")) == "Model file does not exist: /elsewhere/m.gguf."
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert str(ModelNotFound(str(tmp_path / "cache" / "models--o--n" / "m.gguf"))) == (
        "Model file does not exist: $HF_HUB_CACHE/models--o--n/m.gguf."
    )


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (418, APIStatusError),
     (500, InternalServerError), (503, ServiceUnavailableError), (502, InternalServerError)],
)  # fmt: skip
def test_status_mapping(status: int, cls: type) -> None:
    err = make_status_error(status, {"error": {"code": status, "message": "msg here"}}, "http://h/p")
    assert type(err) is cls
    assert err.http_status == status
    assert err.body == {"error": {"code": status, "message": "msg here"}}
    assert "msg here" in str(err) and str(status) in str(err)


def test_startup_error_shows_log_tail() -> None:
    text = str(StartupError("llama-server exited with status 1", 1, ["E error loading model"]))
    assert "last lines of the server log" in text and "E error loading model" in text


def test_messages_go_through_gettext(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import gettext

    class Shout(gettext.NullTranslations):
        def gettext(self, message: str) -> str:
            return message.upper()

    monkeypatch.setattr(errors, "_translation", Shout())
    assert str(ModelNotFound("/m")) == "MODEL FILE DOES NOT EXIST: /m."
    errors.set_language(None)
    assert str(ModelNotFound("/m")) == "Model file does not exist: /m."


def test_catalog_template_lists_every_message() -> None:
    """locale/llama_proc.pot is regenerated with xgettext whenever a message changes."""
    import re
    from pathlib import Path

    package = Path(errors.__file__).parent
    pot = (package / "locale" / "llama_proc.pot").read_text(encoding="utf-8")
    msgids = re.findall(r'_\(\s*"((?:[^"\\]|\\.)*)"\s*\)', (package / "errors.py").read_text(encoding="utf-8"))
    catalog = {
        "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block))
        for block in re.findall(r'^msgid ((?:"(?:[^"\\]|\\.)*"\s*)+)', pot, re.MULTILINE)
    }
    assert len(msgids) >= 15
    for msgid in msgids:
        assert msgid in catalog, msgid
