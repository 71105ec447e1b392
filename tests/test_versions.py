from __future__ import annotations

from pathlib import Path

import pytest

from llama_proc import FlagDialect, LlamaServerArgs, server_version
from llama_proc.errors import StartupError
from llama_proc.versions import FLAG_CHANGES, dialect_from_help, flag_dialect, parse_version

NEW_HELP = """
-m,    --model FNAME                    model path
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
-lm,   --load-mode MODE                 model loading mode (default: auto)
--ui-mcp-proxy, --webui-mcp-proxy, --no-ui-mcp-proxy, --no-webui-mcp-proxy
--ui,  --webui, --no-ui, --no-webui     whether to enable the Web UI (default: enabled)
--api-key KEY                           API key to use for authentication
--api-key-file FNAME                    path to file containing API keys
"""
OLD_HELP = """
-m,    --model FNAME                    model path
-fa,   --flash-attn                     enable Flash Attention (default: disabled)
--mlock                                 force system to keep model in RAM
--no-mmap                               do not memory-map model
--no-webui                              Disable the Web UI (default: enabled)
"""
UI_ONLY_HELP = """
-m,    --model FNAME                    model path
-fa,   --flash-attn [on|off|auto]       set Flash Attention use
--ui,  --no-ui                          whether to enable the Web UI
"""


def test_dialects_from_help() -> None:
    assert dialect_from_help(NEW_HELP) == FlagDialect(
        load_mode=True, flash_attn_value=True, no_webui="--no-webui", webui="--webui", api_key_file=True
    )
    assert dialect_from_help(OLD_HELP) == FlagDialect(
        load_mode=False, flash_attn_value=False, no_webui="--no-webui", webui=None, api_key_file=False
    )
    assert dialect_from_help(UI_ONLY_HELP) == FlagDialect(
        load_mode=False, flash_attn_value=True, no_webui="--no-ui", webui="--ui", api_key_file=False
    )
    assert dialect_from_help("garbage") == FlagDialect()  # unreadable: newest spelling
    assert {c.setting for c in FLAG_CHANGES} == {"load_mode", "flash_attn_value", "no_webui", "webui", "api_key_file"}


def test_the_key_goes_in_a_file_where_the_build_reads_one() -> None:
    args = LlamaServerArgs(model="m", api_key="k3y")
    assert args.to_args(dialect_from_help(NEW_HELP), api_key_file="/run/k")[:4] == [
        "--model",
        "m",
        "--api-key-file",
        "/run/k",
    ]
    older = args.to_args(dialect_from_help(OLD_HELP), api_key_file="/run/k")  # no such flag: the key itself
    assert older[2:4] == ["--api-key", "k3y"] and "/run/k" not in older
    assert args.to_args(dialect_from_help(NEW_HELP))[2:4] == ["--api-key", "k3y"]  # no file given


def test_argv_follows_the_dialect() -> None:
    args = LlamaServerArgs(model="m", flash_attn=True, mmap=False, webui=False)
    assert args.to_args(dialect_from_help(NEW_HELP))[-5:] == ["--flash-attn", "on", "--load-mode", "none", "--no-webui"]
    assert args.to_args(dialect_from_help(OLD_HELP))[-3:] == ["--flash-attn", "--no-mmap", "--no-webui"]
    assert args.to_args(dialect_from_help(UI_ONLY_HELP))[-1] == "--no-ui"


@pytest.mark.parametrize(
    ("text", "build", "commit", "version", "compiler", "platform"),
    [
        ("version: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU 12.2.0 for Linux x86_64",
         None, None, "0.6.0-dev", "GNU 12.2.0", "Linux x86_64"),
        ("version: 0.6.0 (build 11434, commit 1a2b3c4)\nbuilt with AppleClang 17.0.0 for Darwin arm64",
         11434, "1a2b3c4", "0.6.0", "AppleClang 17.0.0", "Darwin arm64"),
        ("register_backend: registered backend CPU\nversion: 5123 (d3bd7193)\nbuilt with cc (Ubuntu 11.4.0) 11.4.0 for x86_64-linux-gnu",
         5123, "d3bd7193", "5123", "cc (Ubuntu 11.4.0) 11.4.0", "x86_64-linux-gnu"),
        ("something else", None, None, None, None, None),
    ],
)  # fmt: skip
def test_parse_version(
    text: str, build: int | None, commit: str | None, version: str | None, compiler: str | None, platform: str | None
) -> None:
    v = parse_version(text)
    assert (v.build, v.commit, v.version, v.compiler, v.platform) == (build, commit, version, compiler, platform)
    assert v.tag == (f"b{build}" if build else None)


@pytest.mark.integration
def test_real_binary(llama_exe: Path) -> None:
    v = server_version(llama_exe)
    assert v.version and v.compiler and v.platform
    assert server_version(llama_exe) is v  # cached
    d = flag_dialect(llama_exe)
    assert d.load_mode and d.flash_attn_value  # this tree has --load-mode and --flash-attn on|off|auto


def test_unrunnable(tmp_path: Path) -> None:
    with pytest.raises(StartupError):
        server_version(tmp_path / "missing")
    assert flag_dialect(tmp_path / "missing") == FlagDialect()
