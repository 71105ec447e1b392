"""llama-server replicas on Ray Serve: a real Ray cluster of a head and two worker nodes on this
machine, real llama-servers on the tiny model, reached through Serve's HTTP proxy and a handle."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from llama_proc import LlamaServerArgs

from .conftest import argv_of, listens_on, pids_named, wait_until, within
from .ray_cluster import local_cluster

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llama-proc[ray]')")


@pytest.fixture(scope="module")
def serve_url(llama_exe: Path, tiny_model: Path) -> Iterator[tuple[str, Any]]:
    from ray import serve

    from llama_proc.ray import deployment

    before = pids_named("llama-server")
    with local_cluster(llama_exe) as url:
        args = LlamaServerArgs(model=tiny_model, n_ctx=256, embeddings=True, pooling="mean")
        handle = serve.run(deployment(args, num_replicas=2, ray_actor_options={"num_cpus": 0.5}), route_prefix="/")
        assert wait_until(lambda: _answers(url + "/health"), 60)
        yield url, handle
    assert wait_until(lambda: pids_named("llama-server") <= before, 30), "llama-servers left after shutdown"


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_openai_sdk_through_the_serve_proxy(serve_url: tuple[str, Any]) -> None:
    import openai

    url, _ = serve_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None and reply.usage and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    assert len(chunks) >= 2 and any(c.choices and c.choices[0].delta.content for c in chunks)
    vectors = client.embeddings.create(model="tiny", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 64


def test_errors_keep_their_status_and_unknown_paths_are_404(serve_url: tuple[str, Any]) -> None:
    import requests

    url, _ = serve_url
    bad = requests.post(url + "/v1/chat/completions", data=b"{not json", timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    assert requests.get(url + "/props", timeout=10).status_code == 404


def test_a_handle_gives_the_same_dicts(serve_url: tuple[str, Any]) -> None:
    from llama_proc.ray import ServeClient

    _, handle = serve_url
    client = ServeClient(handle)
    reply = client.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply["object"] == "chat.completion" and reply["choices"]
    chunks = list(
        client.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, stream=True)
    )
    assert chunks and chunks[0]["object"] == "chat.completion.chunk"
    assert client.tokenize("hello")["tokens"]


def test_both_replicas_serve(serve_url: tuple[str, Any]) -> None:
    _, handle = serve_url
    seen = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(handle.server_address.remote().result()[0])
    assert len(seen) == 2  # two replicas, two llama-servers
    for address in seen:  # each computes on as many threads as its replica has CPUs (0.5: one)
        (pid,) = [p for p in pids_named("llama-server") if listens_on(p, address.rsplit(":", 1)[1])]
        argv = argv_of(pid)
        assert argv[argv.index("--threads") + 1] == "1"


def test_a_killed_llama_server_is_replaced_by_ray(serve_url: tuple[str, Any]) -> None:
    import requests

    url, handle = serve_url
    victim = handle.server_address.remote().result()[0]
    before = pids_named("llama-server")
    (pid,) = [p for p in before if listens_on(p, victim.rsplit(":", 1)[1])]
    os.kill(pid, signal.SIGKILL)
    # Ray's health check fails on that replica, Serve stops routing to it, and a new replica (with
    # a new llama-server) takes its place
    assert wait_until(lambda: pids_named("llama-server") - before, 90), "no new llama-server"
    assert wait_until(lambda: victim not in {handle.server_address.remote().result()[0] for _ in range(20)}, 60)
    ok = 0
    for _ in range(100):
        answer = requests.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        ok += answer.status_code == 200
    assert ok == 100


def test_concurrent_requests_spread_over_both_replicas(serve_url: tuple[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import requests

    url, _ = serve_url
    session = requests.Session()

    def ask(_: int) -> tuple[int, str]:
        answer = session.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=120,
        )
        return answer.status_code, answer.headers.get("X-Llama-Proc-Replica", "")

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(ask, range(200)))
    assert [status for status, _ in results].count(200) == 200
    per_replica = {pid: [r for _, r in results].count(pid) for _, pid in results}
    assert len(per_replica) == 2 and all(n > 0 for n in per_replica.values()), per_replica


def test_a_model_missing_on_a_node_fails_the_deployment_naming_it(serve_url: tuple[str, Any], tmp_path: Path) -> None:
    from ray import serve

    from llama_proc.ray import deployment

    missing = tmp_path / "nowhere.gguf"
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        serve.run(deployment(LlamaServerArgs(model=missing), name="missing"), name="missing", route_prefix="/missing")
    assert time.monotonic() - started < 120 and "missing" in str(info.value)
    status = serve.status().applications["missing"]
    text = str(status.message) + "".join(str(d.message) for d in status.deployments.values())
    assert "ModelNotFound" in text and str(missing) in text and "on node" in text, text[-2000:]
    serve.delete("missing")


def test_a_generated_key_per_replica_is_refused() -> None:
    from llama_proc.errors import ConfigError
    from llama_proc.ray import deployment

    with pytest.raises(ConfigError, match="its own key"):
        deployment(LlamaServerArgs(model="m.gguf", api_key="auto"))


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda d, a: d("m.gguf"), "args: expected LlamaServerArgs, got str"),
        (lambda d, a: d(a, rpc_workers="2"), "rpc_workers: expected a whole number"),
        (lambda d, a: d(a, rpc_workers=-1), "rpc_workers: expected a whole number"),
        (lambda d, a: d(a, rpc_worker_options={"num_cpus": 2}), "given without rpc_workers"),
        (lambda d, a: d(a, direct="yes"), "direct: expected True or False"),
        (lambda d, a: d(a, startup_timout=5), "startup_timout"),
        (lambda d, a: d(a, rpc_workers=1, rpc_worker_options={"num_cpus": 0}), "asks for no resource"),
    ],
)
def test_deployment_names_what_is_wrong_before_anything_runs(call: Any, problem: str) -> None:
    from llama_proc.errors import ConfigError
    from llama_proc.ray import deployment

    with pytest.raises(ConfigError, match=problem):
        call(deployment, LlamaServerArgs(model="m.gguf"))


def test_a_direct_deployment_without_a_key_warns() -> None:
    from llama_proc.ray import deployment

    with pytest.warns(UserWarning, match="without args.api_key"):
        deployment(LlamaServerArgs(model="m.gguf"), direct=True)


def test_clients_want_a_serve_handle_and_dict_requests() -> None:
    from llama_proc.ray import DirectClient, ServeClient

    with pytest.raises(TypeError, match="DeploymentHandle"):
        ServeClient("llama")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DeploymentHandle"):
        DirectClient("llama")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def direct_app(serve_url: tuple[str, Any], tiny_model: Path) -> Iterator[Any]:
    """A second application, made with direct=True: its llama-servers are listed for DirectClient."""
    from ray import serve

    from llama_proc.ray import deployment

    args = LlamaServerArgs(model=tiny_model, n_ctx=256, metrics=True, api_key="direct-secret")
    app = deployment(args, name="direct", num_replicas=2, ray_actor_options={"num_cpus": 0.5}, direct=True)
    yield serve.run(app, name="direct", route_prefix="/direct")
    serve.delete("direct")


def _chat(client: Any) -> Any:
    return client.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def test_an_application_under_a_route_prefix_relays_and_asks_for_its_key(
    serve_url: tuple[str, Any], direct_app: Any
) -> None:
    import requests

    url, _ = serve_url
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    key = {"Authorization": "Bearer direct-secret"}
    assert requests.post(url + "/direct/v1/chat/completions", json=chat, timeout=60).status_code == 401
    answer = requests.post(url + "/direct/v1/chat/completions?trace=1", json=chat, headers=key, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"], answer.text
    assert requests.get(url + "/direct/health", timeout=30).json() == {"status": "ok"}  # open, as llama-server's
    assert requests.get(url + "/direct/props", headers=key, timeout=30).status_code == 404


def test_direct_client_calls_the_replicas_llama_servers_without_the_proxy(direct_app: Any) -> None:
    from llama_proc import RemoteServer
    from llama_proc.ray import DirectClient

    with DirectClient(direct_app) as client:
        replicas = client.replicas()
        assert len(replicas) == 2 and all("api_key" not in r for r in replicas)
        for replica in replicas:  # on the node's address, so that other nodes reach it
            assert replica["url"].startswith(f"http://{replica['node']}:"), replica
        assert _chat(client)["object"] == "chat.completion"
        with client.chat_completions(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, stream=True
        ) as stream:
            assert next(chunk["object"] for chunk in stream) == "chat.completion.chunk"
        for _ in range(6):
            _chat(client)
    for replica in replicas:  # round robin: each llama-server decoded some of the calls
        with RemoteServer(replica["url"], api_key="direct-secret") as server:
            assert "llamacpp:tokens_predicted_total" in server.metrics()
            predicted = [line for line in server.metrics().splitlines() if line.startswith("llamacpp:tokens_pred")]
            assert float(predicted[0].split()[-1]) > 0, predicted


def test_direct_client_sends_on_to_the_next_replica_when_one_is_gone(direct_app: Any) -> None:
    from llama_proc.ray import DirectClient

    with DirectClient(direct_app, refresh_s=1.0) as client:
        victim = client.replicas()[0]["url"]
        (pid,) = [p for p in pids_named("llama-server") if listens_on(p, victim.rsplit(":", 1)[1])]
        os.kill(pid, signal.SIGKILL)
        for _ in range(40):  # refused by the dead one, so sent to the other: no call fails
            assert _chat(client)["choices"]
            time.sleep(0.05)
        # Ray's health check fails, the replica is replaced, and the list follows
        replaced = lambda: len(urls := [r["url"] for r in client.replicas()]) == 2 and victim not in urls  # noqa: E731
        assert wait_until(replaced, 90), client.replicas()


def test_direct_client_needs_a_direct_deployment(serve_url: tuple[str, Any]) -> None:
    from llama_proc.errors import ConfigError
    from llama_proc.ray import DirectClient

    _, handle = serve_url
    with within(30), pytest.raises(ConfigError, match="direct=True"):
        DirectClient(handle)


def test_ray_serve_on_a_shared_cluster_refuses_a_taken_name_and_deletes_only_its_own(
    serve_url: tuple[str, Any], tiny_model: Path, llama_exe: Path
) -> None:
    import select
    import subprocess
    import sys

    import requests
    from ray import serve

    url, _ = serve_url
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "llama_proc", "ray-serve", "--address", address, "--model", str(tiny_model),
               "--num-cpus", "0.25", "--n-ctx", "256"]  # fmt: skip
    env = {**os.environ, "LLAMA_SERVER_PATH": str(llama_exe), "RAY_USAGE_STATS_ENABLED": "0"}
    taken = subprocess.run([*command, "--name", "default"], capture_output=True, text=True, timeout=120, env=env)
    assert taken.returncode == 2 and "an application named 'default' runs on this cluster" in taken.stderr
    proc = subprocess.Popen([*command, "--name", "cli", "--route-prefix", "/cli"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert "at /cli/v1 on the cluster's Serve proxy" in line, (line, proc.poll())
        answer = requests.post(url + "/cli/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 2}, timeout=60)  # fmt: skip
        assert answer.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    applications = serve.status().applications
    assert "cli" not in applications and "default" in applications  # only its own application went
    assert _answers(url + "/health")
