"""llama-server replicas on Ray Serve, on a local cluster of a head and 2 worker nodes (1 CPU each).

* throughput of chat completions (4 tokens) from 32 concurrent clients through Serve's proxy:
  2 replicas vs 1 (reported: on 2 cores, both replicas and the proxy share the same CPUs);
* the Serve hop: a 4-token chat through the proxy vs the same call straight to a replica's
  llama-server (reported, per call, median of sequential calls);
* skipping the hop: the same call through ``DirectClient`` (``direct=True``) vs straight to one
  llama-server (target: at most 1.2), and its throughput at 32 clients over the 2 replicas vs the
  proxy's (reported).
"""

from __future__ import annotations

import secrets
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import requests
from _common import record, report, setup

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

#: The replicas' key: a direct deployment's llama-servers listen on the node's address.
KEY = secrets.token_urlsafe(24)


def throughput(url: str, requests_total: int = 192, clients: int = 32) -> float:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=clients)
    session.mount("http://", adapter)

    def ask(_: int) -> int:
        return session.post(url + "/v1/chat/completions", json=CHAT, timeout=120).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = list(pool.map(ask, range(requests_total)))
    elapsed = time.perf_counter() - started
    assert codes.count(200) == requests_total, codes
    return requests_total / elapsed


def settle(url: str, timeout: float = 60.0) -> None:
    """Wait until the proxy routes to the application just deployed: 20 answers of 200 in a row."""
    deadline, good = time.monotonic() + timeout, 0
    while good < 20:
        assert time.monotonic() < deadline, "the Serve proxy did not route to the new application"
        good = good + 1 if requests.get(url + "/health", timeout=10).status_code == 200 else 0


def client_throughput(client: Any, requests_total: int = 192, clients: int = 32) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda _: client.chat_completions(CHAT), range(requests_total)))
    elapsed = time.perf_counter() - started
    assert all(answer["choices"] for answer in answers)
    return requests_total / elapsed


def latency(url: str, calls: int = 60) -> float:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    return _median(lambda: session.post(url + "/v1/chat/completions", json=CHAT, timeout=60).raise_for_status(), calls)


def _median(call: Callable[[], object], calls: int = 60) -> float:
    times = []
    for _ in range(calls + 5):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:])


def main() -> int:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from llama_proc.ray import DirectClient, deployment

    executable, args = setup()
    store = 80 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"LLAMA_SERVER_PATH": str(executable)}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        rates = {}
        for replicas in (1, 2):
            keyed = args.evolve(api_key=KEY)
            app = deployment(keyed, num_replicas=replicas, ray_actor_options={"num_cpus": 0.5}, direct=replicas == 2)
            serve.delete("default")
            handle = serve.run(app, route_prefix="/")
            settle(url)
            throughput(url, 32)  # warm up
            rates[replicas] = throughput(url)
        record("chat/s, 32 clients: 2 replicas vs 1", rates[2], rates[1], "req/s", "reported", True)
        with DirectClient(handle) as client:
            client_throughput(client, 32)  # warm up
            record("chat/s, 32 clients, 2 replicas: DirectClient vs proxy", client_throughput(client), rates[2],
                   "req/s", "reported", True)  # fmt: skip
            direct, _ = handle.server_address.remote().result()
            via_serve, straight = latency(url), latency(direct)
            record("4-token chat: via Serve vs direct", via_serve * 1000, straight * 1000, "ms", "reported", True)
            skipping = _median(lambda: client.chat_completions(CHAT))
            ok = skipping <= 1.2 * straight
            record("4-token chat: DirectClient vs direct", skipping * 1000, straight * 1000, "ms", "ratio <= 1.2", ok)
    finally:
        shutdown = serve.shutdown
        shutdown()
        ray.shutdown()
        cluster.shutdown()
    return report("Ray Serve (local cluster: head + 2 nodes, 1 CPU each)")


if __name__ == "__main__":
    sys.exit(main())
