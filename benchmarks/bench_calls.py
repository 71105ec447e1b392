"""Calls: per-call cost, streaming latency and concurrency against raw http.client on the same server.

Targets: tokenize ratio <= 2.0; stream first chunk and per-chunk delay ratio <= 1.10;
32 threads x 50 calls throughput ratio >= 0.9 with no "Connection pool is full" warning.
"""

from __future__ import annotations

import http.client
import json
import logging
import statistics
import sys
import threading
import time

from _common import compare, record, report, setup

from llama_proc import LlamaServer


def raw_conn(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    import socket

    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def raw_post(conn: http.client.HTTPConnection, path: str, body: bytes) -> bytes:
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    return conn.getresponse().read()


def stream_timing_raw(port: int, body: bytes) -> tuple[float, float]:
    conn = raw_conn(port)
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    times = []
    buffer = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            times.append(time.perf_counter() - t)
            if event == b"data: [DONE]":
                conn.close()
                return times[0], statistics.median(b - a for a, b in zip(times, times[1:]))
    conn.close()
    return times[0], statistics.median(b - a for a, b in zip(times, times[1:]))


def stream_timing_ours(server: LlamaServer, request: dict) -> tuple[float, float]:  # type: ignore[type-arg]
    t = time.perf_counter()
    times = []
    with server.chat_completions(request) as stream:
        for _ in stream:
            times.append(time.perf_counter() - t)
    times.append(time.perf_counter() - t)  # [DONE]
    return times[0], statistics.median(b - a for a, b in zip(times, times[1:]))


def concurrency(worker, threads: int = 32, calls: int = 50) -> float:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            state = worker()
            barrier.wait()
            for _ in range(calls):
                state()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for p in pool:
        p.start()
    barrier.wait()
    t = time.perf_counter()
    for p in pool:
        p.join()
    if errors:
        raise errors[0]
    return threads * calls / (time.perf_counter() - t)


def main() -> int:
    executable, args = setup()
    with LlamaServer(executable, args) as server:
        port = server.port
        assert port is not None
        conn = raw_conn(port)
        body = json.dumps({"content": "hello world"}).encode()
        ours_s, raw_s = compare(lambda: server.tokenize("hello world"), lambda: raw_post(conn, "/tokenize", body), 200)
        ours_us, raw_us = ours_s * 1e6, raw_s * 1e6
        record("tokenize, per call", ours_us, raw_us, "us", "ratio <= 2.0", ours_us / raw_us <= 2.0)

        request = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 64, "stream": True, "seed": 1}
        raw_body = json.dumps(request).encode()
        ours_first, ours_gap, raw_first, raw_gap = [], [], [], []
        for _ in range(41):
            f, g = stream_timing_ours(server, request)
            ours_first.append(f)
            ours_gap.append(g)
            f, g = stream_timing_raw(port, raw_body)
            raw_first.append(f)
            raw_gap.append(g)
        of, rf = statistics.median(ours_first) * 1000, statistics.median(raw_first) * 1000
        og, rg = statistics.median(ours_gap) * 1000, statistics.median(raw_gap) * 1000
        record("stream: first chunk", of, rf, "ms", "ratio <= 1.10", of / rf <= 1.10)
        record("stream: delay per chunk", og, rg, "ms", "ratio <= 1.10", og / rg <= 1.10)

        warnings: list[str] = []

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "Connection pool is full" in record.getMessage():
                    warnings.append(record.getMessage())

        logging.getLogger("urllib3").addHandler(Catch())
        ours_rate = concurrency(lambda: lambda: server.tokenize("hello world"))

        def raw_worker():  # type: ignore[no-untyped-def]
            conn = raw_conn(port)
            return lambda: raw_post(conn, "/tokenize", body)

        raw_rate = concurrency(raw_worker)
        ok = ours_rate / raw_rate >= 0.9 and not warnings
        record("32 threads x 50 calls (calls/s)", ours_rate, raw_rate, "/s", "ratio >= 0.9, no pool-full warning", ok)
    return report("Calls")


if __name__ == "__main__":
    sys.exit(main())
