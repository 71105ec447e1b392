"""The example apps, run for real: the Flask app on a threaded server with 32 concurrent clients."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from llama_proc import LlamaServerArgs, stop_all
from llama_proc import manager as manager_mod

from .conftest import in_threads

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
flask = pytest.importorskip("flask")


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flask_url(llama_exe: Path, tiny_model: Path) -> Iterator[str]:
    from werkzeug.serving import make_server

    app = load_example("flask_app").create_app(
        LlamaServerArgs(model=tiny_model, alias="tiny", n_ctx=2048, n_parallel=4), llama_exe
    )
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    thread.join(5)
    http.server_close()
    stop_all()
    manager_mod._shared = None


def sse_events(response: requests.Response) -> Iterator[tuple[float, str]]:
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield time.monotonic(), event.decode()


def test_flask_32_concurrent_clients(flask_url: str) -> None:
    def client(i: int) -> str:
        with requests.Session() as http:
            http.trust_env = False
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 8}
            url = flask_url + "/v1/chat/completions"
            if i % 2:
                with http.post(url, json={**body, "stream": True}, stream=True, timeout=120) as r:
                    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                    events = [e for _, e in sse_events(r)]
                assert events[-1] == "data: [DONE]"
                chunks = [json.loads(e[6:]) for e in events[:-1]]
                return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            r = http.post(url, json=body, timeout=120)
            assert r.status_code == 200
            reply = r.json()
            assert reply["usage"]["completion_tokens"] == 8
            return str(reply["choices"][0]["message"]["content"])

    texts = in_threads(client, 32, timeout=180)
    assert all(isinstance(text, str) and text for text in texts)


def test_flask_streams_without_buffering(flask_url: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "stream": True}
    requests.post(
        flask_url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1}, timeout=60
    )  # warm up
    started = time.monotonic()
    with requests.post(flask_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        times = [t for t, _ in sse_events(r)]
    first, last = times[0] - started, times[-1] - started
    assert len(times) > 100
    # the first bytes arrive while the generation is still running, not in one block at the end
    assert first < last / 3, (first, last)


def test_flask_bad_body(flask_url: str) -> None:
    r = requests.post(flask_url + "/v1/chat/completions", data=b"not json", timeout=30)
    assert r.status_code == 400
    r = requests.post(flask_url + "/v1/chat/completions", json={"messages": "nope"}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()


def test_notebook_runs_top_to_bottom(tiny_model: Path, llama_exe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the notebook's code cells in order in one namespace, like a kernel; run the cell that
    creates the server twice, as a person re-running it would."""
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(llama_exe))
    notebook = json.loads((EXAMPLES / "notebook.ipynb").read_text(encoding="utf-8"))
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    namespace: dict[str, Any] = {}
    try:
        for index, source in enumerate(cells):
            exec(compile(source, f"notebook cell {index}", "exec"), namespace)
            if "shared_server(args)" in source:
                first = namespace["server"]
                pid = first.pid
                exec(compile(source, f"notebook cell {index} (again)", "exec"), namespace)
                assert namespace["server"] is first and first.pid == pid
                assert "running" in first._repr_html_()
        assert namespace["reply"]["choices"][0]["message"]["content"]
        assert namespace["pieces"]
        assert not namespace["server"].is_running()
    finally:
        stop_all()
        manager_mod._shared = None


def test_django_project(tiny_model: Path, llama_exe: Path, tmp_path: Path) -> None:
    """Run the Django project in its own process on a threaded WSGI server, like a deployment."""
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("django")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from werkzeug.serving import run_simple; from django_project.wsgi import application;"
        "run_simple('127.0.0.1', int(sys.argv[2]), application, threaded=True)"
    )
    env = dict(os.environ, LLAMA_PROC_MODEL=str(tiny_model), LLAMA_PROC_ALIAS="tiny", LLAMA_PROC_N_CTX="1024",
               LLAMA_SERVER_PATH=str(llama_exe), DJANGO_SETTINGS_MODULE="django_project.settings")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(EXAMPLES), str(port)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "the Django server did not come up"
                time.sleep(0.05)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        reply = requests.post(url, json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 6
        with requests.post(url, json={**body, "stream": True}, stream=True, timeout=60) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = [e for _, e in sse_events(r)]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        assert requests.post(url, data=b"[]", timeout=30).status_code == 400
        assert requests.get(url, timeout=30).status_code == 405
    finally:
        proc.terminate()  # the process exits; its shared server is stopped with it
        proc.communicate(timeout=30)


def _gunicorn(args: list[str], env: dict[str, str], port: int) -> Any:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "--chdir", str(EXAMPLES), *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except requests.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("gunicorn did not come up") from None
            time.sleep(0.1)


def _llama_servers_under(root: int) -> list[int]:
    from .conftest import children_of

    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        for child in children_of(pid):
            queue.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    if b"llama-server" in fh.read().split(b"\0")[0]:
                        found.append(child)
            except OSError:
                pass
    return found


@pytest.mark.parametrize("pattern", ["server-per-worker", "master-server-attached"])
def test_gunicorn_patterns(pattern: str, tiny_model: Path, llama_exe: Path) -> None:
    import os
    import signal
    import socket

    pytest.importorskip("gunicorn")
    from .conftest import pid_alive, wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LLAMA_PROC_MODEL=str(tiny_model), LLAMA_PROC_ALIAS="tiny", LLAMA_PROC_N_CTX="512",
               LLAMA_SERVER_PATH=str(llama_exe))  # fmt: skip
    if pattern == "server-per-worker":
        proc = _gunicorn(["-w", "2", "--threads", "4", "flask_app:create_app()"], env, port)
    else:
        proc = _gunicorn(["--preload", "-w", "2", "--threads", "4", "gunicorn_shared:app"], env, port)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert in_threads(lambda i: requests.post(url, json=body, timeout=60).status_code, 16, timeout=90) == [200] * 16
        servers = _llama_servers_under(proc.pid)
        if pattern == "server-per-worker":
            assert 1 <= len(servers) <= 2  # at most one per worker
        else:
            assert len(servers) == 1 and servers[0] in _llama_servers_under(proc.pid)
            from .conftest import children_of

            assert servers[0] in children_of(proc.pid)  # the master's own child
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful shutdown: workers and master exit
        proc.wait(60)
    assert wait_until(lambda: not any(pid_alive(p) for p in servers), 15), "a llama-server outlived gunicorn"


class _Failing:
    """A server whose every call fails with an error that quotes the server's log."""

    def forward(self, *args: object, **kwargs: object) -> object:
        from llama_proc.errors import StartupError

        raise StartupError("llama-server exited", 1, ["E secret-path /home/alice/models/private.gguf"])


def test_errors_reach_http_clients_without_their_details(caplog: pytest.LogCaptureFixture) -> None:
    app = load_example("flask_app").relay_response(lambda: _Failing())
    with caplog.at_level("WARNING"):
        reply = app.test_client().post("/v1/chat/completions", json={"messages": []})
    assert reply.status_code == 500
    assert reply.get_json() == {
        "error": {"code": "server_error-startup_error", "message": "the model server could not answer"}
    }
    assert "private.gguf" not in reply.get_data(as_text=True)
    assert any("private.gguf" in record.getMessage() for record in caplog.records)  # the details are logged


def test_the_django_project_has_a_manage_py(tmp_path: Path) -> None:
    import subprocess
    import sys

    pytest.importorskip("django")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "django_project" / "manage.py"), "check"],
        capture_output=True, text=True, timeout=60, env={**__import__("os").environ, "LLAMA_PROC_MODEL": str(tmp_path / "m.gguf")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no issues" in done.stdout
