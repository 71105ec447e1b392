"""``llama-proc ray-serve``: a local Ray, one replica of the tiny model, the API key asked for at
the Serve endpoint (one generated key for all replicas), and SIGTERM shutting it all down."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .conftest import argv_of, free_port, pids_named

pytestmark = pytest.mark.integration

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llama-proc[ray]')")


def test_ray_serve_command_deploys_asks_for_the_key_and_stops(
    llama_exe: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    import requests

    port = free_port()
    before = pids_named("llama-server")
    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_proc", "ray-serve", "--model", str(tiny_model), "--port", str(port),
         "--num-cpus", "0.5", "--n-ctx", "256", "--api-key", "auto", "--direct",
         "--name", "tiny", "--route-prefix", "/tiny", "--alias", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "LLAMA_SERVER_PATH": str(llama_exe), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_dir},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        import select

        ready, _, _ = select.select([proc.stdout], [], [], 120)
        key = proc.stdout.readline().removeprefix("API key: ").strip() if ready else ""
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert f"at http://127.0.0.1:{port}/tiny/v1" in line, (line, proc.poll())
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        url = f"http://127.0.0.1:{port}/tiny/v1/chat/completions"
        assert requests.post(url, json=chat, timeout=60).status_code == 401
        answer = requests.post(url, json=chat, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == "tiny"  # --alias reached the replicas
        assert "DirectClient(serve.get_app_handle('tiny'))" in proc.stdout.readline()
        # --direct: the llama-server listens on the node's address, with the key
        (argv,) = [argv_of(pid) for pid in pids_named("llama-server") - before]
        assert argv[argv.index("--host") + 1] not in ("127.0.0.1", "localhost") and "--api-key-file" in argv
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip().endswith("stopped"), err[-2000:]
        assert len(key) > 20 and key not in out + err  # printed once, at the top
        files = [path for path in Path(ray_dir).rglob("*") if path.is_file()]
        assert any(_holds(path, b"name='llama'") for path in files)  # Serve's logs are among them
        logged = [path for path in files if _holds(path, key.encode())]
        assert not logged, f"the API key is in {logged}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        shutil.rmtree(ray_dir, ignore_errors=True)


def _holds(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except OSError:  # a socket, or a file that went away
        return False


def test_ray_serve_names_a_missing_model_before_starting_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import within

    with within(60):
        done = subprocess.run(
            [sys.executable, "-m", "llama_proc", "ray-serve", "--model", str(tmp_path / "nowhere.gguf")],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 2 and "model_not_found" in done.stderr and "nowhere.gguf" in done.stderr, done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout


def test_ray_serve_names_why_the_replicas_did_not_start(llama_exe: Path, tiny_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llama_proc", "ray-serve", "--model", str(tiny_model), "--num-cpus", "0.5",
             "--port", str(free_port()), "--", "--no-such-flag"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
            env={**os.environ, "LLAMA_SERVER_PATH": str(llama_exe), "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_TMPDIR": ray_dir},
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    lines = done.stderr.splitlines()
    ours = [index for index, line in enumerate(lines) if line.startswith("llama-proc: error: ")]
    assert done.returncode == 1 and len(ours) == 1, done.stderr[-3000:]
    first, *why = lines[ours[0] : ours[0] + 3]
    assert first.startswith("llama-proc: error: the application did not start: ") and "StartupError" in first
    assert any("--no-such-flag" in line for line in why), why  # the server's own words
