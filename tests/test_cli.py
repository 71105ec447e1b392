from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llama_proc import __version__
from llama_proc.cli import main

from .conftest import pid_alive, wait_until


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_proc", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def test_version_and_help() -> None:
    done = run_cli("--version")
    assert done.returncode == 0 and __version__ in done.stdout
    assert "serve" in run_cli("--help").stdout


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    out = io.StringIO()
    code = main(["serve", "--model", str(tmp_path / "missing.gguf"), "--executable", sys.executable], out=out)
    assert code == 2
    bad = run_cli("serve", "--model", "m.gguf", "--n-ctx", "lots")
    assert bad.returncode == 2
    assert "server_error-config_error" in bad.stderr and "n_ctx" in bad.stderr


@pytest.mark.integration
def test_which(llama_exe: Path) -> None:
    done = run_cli("which", "--variant", "cpu")
    assert done.returncode == 0 and Path(done.stdout.strip()).name == "llama-server"


@pytest.mark.integration
def test_serve_until_ctrl_c(llama_exe: Path, tiny_model: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_proc", "serve", "--executable", str(llama_exe), "--model", str(tiny_model),
         "--alias", "tiny", "--n-ctx", "256", "--no-webui", "--", "--log-prefix"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"pid (\d+) ready at (http://\S+)", line)
        assert match, line
        server_pid = int(match.group(1))
        import requests

        assert requests.get(match.group(2) + "/v1/models", timeout=5).json()["data"][0]["id"] == "tiny"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped (status 0)" in out
        assert wait_until(lambda: not pid_alive(server_pid), 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.integration
def test_serve_prints_a_generated_key_and_takes_one_from_the_environment(llama_exe: Path, tiny_model: Path) -> None:
    import requests

    for extra, env in ((["--api-key", "auto"], {}), ([], {"LLAMA_PROC_API_KEY": "from-env"})):
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_proc", "serve", "--executable", str(llama_exe), "--model", str(tiny_model),
             "--n-ctx", "256", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            match = re.search(r"ready at (http://\S+)", proc.stdout.readline())
            assert match
            key = proc.stdout.readline().removeprefix("API key: ").strip() if extra else "from-env"
            assert len(key) >= 8
            assert requests.get(match[1] + "/v1/models", timeout=5).status_code == 401
            headers = {"Authorization": f"Bearer {key}"}
            assert requests.get(match[1] + "/v1/models", headers=headers, timeout=5).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.integration
def test_demo(llama_exe: Path, tiny_model: Path) -> None:
    done = run_cli("demo", timeout=300)
    assert done.returncode == 0, done.stderr
    for label in ("llama-server:", "model:", "started:", "chat:", "stream:", "stopped:"):
        assert label in done.stdout
    assert re.search(r"(\d+) chunks, first after", done.stdout)
    assert "status 0" in done.stdout


def test_serve_accepts_every_config_field() -> None:
    from llama_proc.cli import _parser, _server_args_from

    ns = _parser().parse_args(
        ["serve", "--model", "m.gguf", "--n-ctx", "128", "--jinja", "--no-cont-batching", "--embeddings",
         "--rpc", "h:1", "--rpc", "h:2", "--flash-attn", "auto", "--", "--system-prompt", "two words"]
    )  # fmt: skip
    args = _server_args_from(ns)
    assert args.n_ctx == 128 and args.jinja is True and args.cont_batching is False and args.embeddings is True
    assert args.rpc == ("h:1", "h:2") and args.flash_attn == "auto"
    assert args.extra_args == ("--system-prompt", "two words")
    assert os.environ.get("LLAMA_PROC_MODEL") is None


@pytest.mark.integration
def test_list_and_doctor_with_the_source_build(llama_exe: Path) -> None:
    listed = run_cli("list")
    assert listed.returncode == 0, listed.stderr
    assert str(llama_exe) in listed.stdout and "built from" in listed.stdout
    doctor = run_cli("doctor")
    assert doctor.returncode == 0, doctor.stderr
    for text in ("GPU and runtime detection", "NVIDIA driver:", "variant that would run: cpu", "places searched",
                 "LLAMA_SERVER_PATH", f"would run: {llama_exe}", "user cache:", "release tag: b11434"):  # fmt: skip
        assert text in doctor.stdout, text


def test_install_list_doctor_from_a_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_proc import releases
    from llama_proc.platforms import current_target

    from .fake_releases import FakeReleases, release_members, tar_archive

    env = dict(os.environ, LLAMA_PROC_CACHE_DIR=str(tmp_path / "cache"), PATH=os.path.dirname(sys.executable))
    env.pop("LLAMA_SERVER_PATH", None)
    with FakeReleases("b11434") as fake:
        fake.add(
            releases.asset_names(current_target(), "cpu", "b11434")[0],
            tar_archive(release_members("b11434", sys.executable)),
        )
        env["LLAMA_PROC_RELEASES_URL"] = fake.url
        done = subprocess.run([sys.executable, "-m", "llama_proc", "install", "--variant", "cpu"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "installed:" in done.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "llama_proc", "list"], env=env, capture_output=True, text=True, check=False
    )
    assert "release b11434" in listed.stdout
    doctor = subprocess.run(
        [sys.executable, "-m", "llama_proc", "doctor"], env=env, capture_output=True, text=True, check=False
    )
    assert f"would run: {tmp_path / 'cache'}" in doctor.stdout
    empty = dict(env, LLAMA_PROC_CACHE_DIR=str(tmp_path / "empty"), LLAMA_PROC_RELEASES_URL="http://127.0.0.1:9")
    nothing = subprocess.run(
        [sys.executable, "-m", "llama_proc", "doctor"], env=empty, capture_output=True, text=True, check=False
    )
    assert nothing.returncode == 1 and "would run: nothing" in nothing.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "llama_proc", "install"], env=empty, capture_output=True, text=True, check=False
    )
    assert failed.returncode == 2 and "server_error-download_error" in failed.stderr


def test_every_option_has_help_text() -> None:
    import argparse

    from llama_proc.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in [("llama-proc", parser), *commands.choices.items()]
        for action in sub._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--n-ctx", "abc"], "n_ctx: expected an integer, got 'abc'"),
        (["--flash-attn", "maybe"], "flash_attn: 'maybe' is not one of on, off, auto"),
    ],
)
def test_a_bad_option_value_says_what_to_fix(option: list[str], message: str, tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        code = main(["serve", "--model", str(tmp_path / "m.gguf"), *option], out=out)
    assert code != 0 and message in out.getvalue()


def test_an_executable_that_is_not_llama_server_is_named(tiny_model: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        code = main(["serve", "--model", str(tiny_model), "--executable", "/bin/false"], out=out)
    assert code != 0 and "/bin/false exited with status 1" in out.getvalue()
    assert "does not look like llama-server" in out.getvalue()


@pytest.mark.integration
def test_ps_lists_the_running_servers(llama_exe: Path, tiny_model: Path) -> None:
    import json

    from llama_proc import LlamaServer, LlamaServerArgs

    with LlamaServer(llama_exe, LlamaServerArgs(model=tiny_model, n_ctx=256, alias="listed")) as server:
        out = io.StringIO()
        assert main(["ps", "--json"], out=out) == 0
        mine = [s for s in json.loads(out.getvalue()) if s["pid"] == server.pid]
        assert mine == [
            {
                "pid": server.pid, "port": server.port, "model": str(tiny_model), "alias": "listed",
                "owner": os.getpid(), "owner_alive": True, "started_at": mine[0]["started_at"],
            }
        ]  # fmt: skip
        table = io.StringIO()
        assert main(["ps"], out=table) == 0
        line = next(row for row in table.getvalue().splitlines() if row.split()[0] == str(server.pid))
        assert f" {server.port} " in line and "listed" in line and str(tiny_model) in line
        pid = server.pid
    out = io.StringIO()
    main(["ps", "--json"], out=out)
    assert pid not in [s["pid"] for s in json.loads(out.getvalue())]  # stopped: no longer listed
