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

from .conftest import argv_of, listens_on, pids_named, wait_until
from .ray_cluster import local_cluster

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llama-proc[ray]')")

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


#: Processes of those names that were running before the cluster started (other tests' servers).
_BEFORE: set[int] = set()


def _processes(name: str) -> set[int]:
    """The pids of ``name`` processes started since the cluster was made."""
    return pids_named(name) - _BEFORE


@pytest.fixture(scope="module")
def rpc_app(llama_exe: Path, tiny_model: Path) -> Iterator[Any]:
    from ray import serve

    from llama_proc.ray import deployment

    _BEFORE.update(pids_named("llama-server") | pids_named("rpc-server"))
    with local_cluster(llama_exe):
        args = LlamaServerArgs(model=tiny_model, n_ctx=256)
        app = deployment(
            args, name="big", rpc_workers=2, ray_actor_options={"num_cpus": 0.5}, rpc_worker_options={"num_cpus": 0.5}
        )
        yield serve.run(app, name="big", route_prefix="/big")
    left = lambda: _processes("llama-server") | _processes("rpc-server")  # noqa: E731
    assert wait_until(lambda: not left(), 30), f"left after shutdown: {left()}"


def test_the_workers_are_on_other_nodes_and_the_server_uses_them(rpc_app: Any) -> None:
    from llama_proc.ray import ServeClient

    placement = rpc_app.placement.remote().result()
    nodes = [placement["node"], *(worker["node"] for worker in placement["workers"])]
    assert len(nodes) == 3 and len(set(nodes)) == 3, placement  # STRICT_SPREAD: one node each
    url, _ = rpc_app.server_address.remote().result()
    (server,) = [p for p in _processes("llama-server") if listens_on(p, url.rsplit(":", 1)[1])]
    argv = argv_of(server)
    assert argv[argv.index("--rpc") + 1] == ",".join(w["address"] for w in placement["workers"])
    assert ServeClient(rpc_app).chat_completions(CHAT)["choices"]
    assert len(_processes("rpc-server")) == 2


def test_a_lost_worker_gets_the_replica_replaced_with_its_workers(rpc_app: Any) -> None:
    from llama_proc.ray import ServeClient

    old = rpc_app.placement.remote().result()
    victim = old["workers"][0]["address"]
    (pid,) = [p for p in _processes("rpc-server") if listens_on(p, victim.rsplit(":", 1)[1])]
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


def test_more_workers_than_the_cluster_has_nodes_warns(rpc_app: Any, tiny_model: Path) -> None:
    from llama_proc.ray import deployment

    with pytest.warns(UserWarning, match="need 4 distinct nodes .* the cluster has 3"):
        deployment(LlamaServerArgs(model=tiny_model), rpc_workers=3, rpc_worker_options={"num_cpus": 0.1})
