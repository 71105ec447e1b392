"""A model larger than one node, on Ray: each replica's rpc-server workers are Ray actors placed
with it on distinct nodes (STRICT_SPREAD), on a real cluster of a head and two worker nodes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from llama_proc import LlamaServerArgs

from .conftest import process_name, wait_until

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llama-proc[ray]')")

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


#: Processes of those names that were running before the cluster started (other tests' servers).
_BEFORE: set[int] = set()


def _processes(name: str) -> set[int]:
    """The pids of ``name`` processes started since the cluster was made."""
    return {int(e) for e in os.listdir("/proc") if e.isdigit() and process_name(int(e)) == name} - _BEFORE


@pytest.fixture(scope="module")
def rpc_app(llama_exe: Path, tiny_model: Path) -> Iterator[Any]:
    from ray import serve
    from ray.cluster_utils import Cluster

    from llama_proc.ray import deployment

    _BEFORE.update(_processes("llama-server") | _processes("rpc-server"))
    store = 80 * 1024 * 1024
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=store)
    except Exception as exc:
        pytest.skip(f"Ray cannot start a local cluster here: {exc}")
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"LLAMA_SERVER_PATH": str(llama_exe)}})
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        args = LlamaServerArgs(model=tiny_model, n_ctx=256)
        app = deployment(
            args, name="big", rpc_workers=2, ray_actor_options={"num_cpus": 0.5}, rpc_worker_options={"num_cpus": 0.5}
        )
        yield serve.run(app, name="big", route_prefix="/big")
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        left = lambda: _processes("llama-server") | _processes("rpc-server")  # noqa: E731
        assert wait_until(lambda: not left(), 30), f"left after shutdown: {left()}"


def test_the_workers_are_on_other_nodes_and_the_server_uses_them(rpc_app: Any) -> None:
    from llama_proc.ray import ServeClient

    placement = rpc_app.placement.remote().result()
    nodes = [placement["node"], *(worker["node"] for worker in placement["workers"])]
    assert len(nodes) == 3 and len(set(nodes)) == 3, placement  # STRICT_SPREAD: one node each
    url, _ = rpc_app.server_address.remote().result()
    (server,) = [p for p in _processes("llama-server") if _argv_has(p, url.rsplit(":", 1)[1])]
    argv = _argv(server)
    assert argv[argv.index("--rpc") + 1] == ",".join(w["address"] for w in placement["workers"])
    assert ServeClient(rpc_app).chat_completions(CHAT)["choices"]
    assert len(_processes("rpc-server")) == 2


def test_a_lost_worker_gets_the_replica_replaced_with_its_workers(rpc_app: Any) -> None:
    from llama_proc.ray import ServeClient

    old = rpc_app.placement.remote().result()
    victim = old["workers"][0]["address"]
    (pid,) = [p for p in _processes("rpc-server") if _argv_has(p, victim.rsplit(":", 1)[1])]
    os.kill(pid, signal.SIGKILL)
    # the replica's health check sees its worker gone; Ray replaces the replica and its workers
    assert wait_until(lambda: _placement_or_none(rpc_app) not in (None, old), 120)
    client = ServeClient(rpc_app)
    assert all(client.chat_completions(CHAT)["choices"] for _ in range(20))
    # the old replica's server and other worker are gone with it: one server, two workers
    assert wait_until(lambda: len(_processes("rpc-server")) == 2 and len(_processes("llama-server")) == 1, 30)


def _placement_or_none(handle: Any) -> dict[str, Any] | None:
    try:
        placement: dict[str, Any] = handle.placement.remote().result(timeout_s=10)
        return placement
    except Exception:
        time.sleep(0.5)
        return None


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode().split("\0")
    except OSError:
        return []


def _argv_has(pid: int, port: str) -> bool:
    argv = _argv(pid)
    return "--port" in argv and argv[argv.index("--port") + 1] == port
