"""A real Ray cluster of a head and two worker nodes (1 CPU each, a small object store) on this
machine, for the Ray tests; they are skipped, with Ray's reason, when Ray cannot start here."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest


@contextlib.contextmanager
def local_cluster(llama_exe: Path) -> Iterator[Any]:
    """The cluster, with Ray initialised on it and Serve's HTTP proxy on a free loopback port
    (``yield``s that port's base URL); Serve, Ray and the nodes are shut down after."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from .conftest import free_port

    store = 80 * 1024 * 1024
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=store)
    except Exception as exc:
        pytest.skip(f"Ray cannot start a local cluster here: {exc}")
    port = free_port()
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"LLAMA_SERVER_PATH": str(llama_exe)}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
