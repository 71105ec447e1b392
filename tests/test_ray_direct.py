"""The parts of llama_proc.ray that need no Ray cluster: DirectClient's choice of replica (with a
stand-in for the deployment's directory and small HTTP servers in its replicas' place), the
directory itself, and a replica's server fitted to its resources. The Ray tests run them for real."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

import llama_proc.ray
from llama_proc.errors import APIConnectionError, ConfigError, ConnectionRefused
from llama_proc.ray import DirectClient

from .conftest import within

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class Replica:
    """An HTTP server that answers a chat completion with its own name."""

    def __init__(self, name: str) -> None:
        self.name = name

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = json.dumps({"object": "chat.completion", "choices": [{"message": {"content": name}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def entry(self) -> dict[str, Any]:
        return {"replica": self.name, "node": "127.0.0.1", "pid": 1, "url": self.url, "api_key": None}

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


class Directory:
    """The deployment's directory as a DeploymentHandle reaches it: ``replicas.remote().result()``."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.failing = False
        self.fetches = 0
        self.replicas = self

    def remote(self) -> Directory:
        return self

    def result(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        self.fetches += 1
        if self.failing:
            raise RuntimeError("the Serve controller is not reachable")
        return list(self.entries)


class Handle:
    app_name = "app"
    deployment_name = "llama"


@pytest.fixture
def directory(monkeypatch: pytest.MonkeyPatch) -> Directory:
    found = Directory()

    class Serve:
        @staticmethod
        def get_deployment_handle(name: str, app_name: str) -> Directory:
            if (name, app_name) != ("llama-directory", "app"):
                raise KeyError(f"Deployment(name={name!r}, app={app_name!r}) does not exist.")
            return found

    monkeypatch.setattr(llama_proc.ray, "_serve", lambda: Serve)
    return found


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made = [Replica(name) for name in ("a", "b", "c")]
    yield made
    for replica in made:
        replica.stop()


def _answer(client: DirectClient) -> str:
    reply = client.chat_completions(CHAT)
    return str(reply["choices"][0]["message"]["content"])


def test_calls_go_round_robin_over_the_listed_replicas(directory: Directory, replicas: list[Replica]) -> None:
    directory.entries = [replicas[0].entry(), replicas[1].entry()]
    with DirectClient(Handle()) as client:
        names = [_answer(client) for _ in range(10)]
    assert names.count("a") == names.count("b") == 5
    assert directory.fetches == 1  # one fetch for the whole refresh period


def test_a_replica_that_is_gone_is_skipped_and_the_call_goes_to_the_next(
    directory: Directory, replicas: list[Replica]
) -> None:
    directory.entries = [replicas[0].entry(), replicas[1].entry()]
    with DirectClient(Handle()) as client:
        replicas[0].stop()
        with within(5):
            names = [_answer(client) for _ in range(10)]
    assert names == ["b"] * 10


def test_when_every_replica_refuses_the_call_fails_typed(directory: Directory, replicas: list[Replica]) -> None:
    directory.entries = [replicas[0].entry(), replicas[1].entry()]
    replicas[0].stop()
    replicas[1].stop()
    with DirectClient(Handle()) as client, within(5), pytest.raises(ConnectionRefused):
        client.chat_completions(CHAT)


def test_the_list_follows_the_directory(directory: Directory, replicas: list[Replica]) -> None:
    import time

    directory.entries = [replicas[0].entry()]
    with DirectClient(Handle(), refresh_s=0.05) as client:
        assert _answer(client) == "a"
        directory.entries = [replicas[2].entry()]
        time.sleep(0.1)
        assert {_answer(client) for _ in range(4)} == {"c"}


def test_a_failed_fetch_keeps_the_last_list(
    directory: Directory, replicas: list[Replica], caplog: pytest.LogCaptureFixture
) -> None:
    import time

    directory.entries = [replicas[0].entry()]
    with DirectClient(Handle(), refresh_s=0.05) as client:
        assert _answer(client) == "a"
        directory.failing = True
        time.sleep(0.1)
        with caplog.at_level(logging.WARNING, logger="llama_proc.ray"):
            assert _answer(client) == "a"
    assert "keeping the last list" in caplog.text


def test_with_no_replica_listed_a_call_fails_after_wait_s(directory: Directory) -> None:
    with DirectClient(Handle(), wait_s=0.3) as client, within(3), pytest.raises(APIConnectionError, match="listed"):
        client.chat_completions(CHAT)


def test_without_a_directory_the_fetch_failure_is_a_connection_error(directory: Directory) -> None:
    directory.failing = True
    with DirectClient(Handle()) as client, within(3), pytest.raises(APIConnectionError, match="not reachable"):
        client.chat_completions(CHAT)


def test_a_deployment_without_direct_is_a_config_error(directory: Directory) -> None:
    class Plain:
        app_name = "app"
        deployment_name = "plain"

    with pytest.raises(ConfigError, match="direct=True"):
        DirectClient(Plain())


def test_openai_clients_take_the_replicas_in_turn(directory: Directory, replicas: list[Replica]) -> None:
    directory.entries = [replicas[0].entry(), replicas[1].entry()]
    with DirectClient(Handle()) as client:
        _answer(client)
        urls = {client.openai_base_url for _ in range(4)}
    assert urls == {replicas[0].url + "/v1", replicas[1].url + "/v1"}


def test_a_closed_client_refuses_calls(directory: Directory, replicas: list[Replica]) -> None:
    directory.entries = [replicas[0].entry()]
    client = DirectClient(Handle())
    client.close()
    with pytest.raises(APIConnectionError, match="closed"):
        client.chat_completions(CHAT)


def test_one_unreachable_replica_does_not_stop_the_calls_to_the_others(
    directory: Directory, replicas: list[Replica]
) -> None:
    directory.entries = [replicas[0].entry()]
    with DirectClient(Handle(), refresh_s=30) as client:
        assert _answer(client) == "a"
        client._drop(client._live[0])  # as after one connect timeout on a busy replica
        assert [_answer(client) for _ in range(5)] == ["a"] * 5  # tried again, not refused for refresh_s
    assert directory.fetches == 1


def test_calls_waiting_for_a_first_list_give_up_together(directory: Directory) -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    client = DirectClient(Handle(), wait_s=0.5)

    def call(_: int) -> float:
        started = time.monotonic()
        with pytest.raises(APIConnectionError):
            client.chat_completions(CHAT)
        return time.monotonic() - started

    with ThreadPoolExecutor(4) as pool:
        waited = list(pool.map(call, range(4)))
    client.close()
    assert max(waited) < 1.5, waited  # one shared wait of 0.5 s, not 0.5 s each in turn


def test_the_directory_lists_renewals_until_a_replica_leaves() -> None:
    import asyncio

    from llama_proc.ray import ReplicaDirectory

    async def scenario() -> list[list[str]]:
        found = ReplicaDirectory()
        entry = {"replica": "r1", "node": "n", "pid": 1, "url": "http://10.0.0.1:1", "api_key": None}
        await found.register(entry, 60)
        listed = [[e["replica"] for e in await found.replicas()]]
        await found.unregister("r1")
        await found.register(entry, 60)  # a renewal sent before the replica left arrives late
        listed.append([e["replica"] for e in await found.replicas()])
        await found.register({**entry, "replica": "r2"}, 0.01)
        await asyncio.sleep(0.05)
        listed.append([e["replica"] for e in await found.replicas()])  # not renewed in time
        return listed

    assert asyncio.run(scenario()) == [["r1"], [], []]


@pytest.mark.parametrize(
    ("set_", "cpus", "gpus", "threads", "variant", "layers"),
    [
        ({}, 0.5, False, 1, None, None),  # a fraction of a CPU still computes on one thread
        ({}, 3.0, False, 3, None, None),
        ({"threads": 8}, 3.0, False, 8, None, None),  # the user's choice stands
        ({}, 4.0, True, 4, "cuda", -1),  # GPUs: the CUDA build, every layer offloaded
        ({"n_gpu_layers": 10}, 1.0, True, 1, "cuda", 10),
    ],
)
def test_a_replica_fits_its_server_to_its_resources(
    set_: dict[str, Any], cpus: float, gpus: bool, threads: int, variant: str | None, layers: int | None
) -> None:
    from llama_proc import LlamaServerArgs
    from llama_proc.ray import _fitted

    args, options = _fitted(LlamaServerArgs(model="m.gguf", **set_), {"startup_timeout": 9}, cpus, gpus)
    assert (args.threads, options.get("variant"), args.n_gpu_layers) == (threads, variant, layers)
    assert options["startup_timeout"] == 9
