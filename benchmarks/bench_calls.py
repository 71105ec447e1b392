"""Calls as users feel them: llama_proc against raw ``http.client`` keep-alive and the official
``openai`` SDK, on one llama-server (the tiny generated model, ``n_parallel=4``).

Every comparison alternates between the contenders (one call, or one batch, of each per round, the
order rotating from round to round) so that drift in the machine's speed hits all alike, after a
warm-up of each; single calls are compared by their medians. The baselines do the same work a user
of them gets: raw ``http.client`` parses the JSON of the answer (and of each stream event), the
SDK builds its typed objects. Targets are the constants below; a row that misses its target prints
FAIL and the script exits with status 1.
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import socket
import statistics
import sys
import threading
import time
from typing import Any, Callable

import openai
from _common import compare, record, report, setup

from llama_proc import LlamaServer

#: Non-streamed chat completion, median seconds per call: llama_proc / raw http.client on a
#: kept-alive connection must be at most this.
CHAT_RATIO_VS_RAW = 1.05
#: Non-streamed chat completion: llama_proc / openai SDK must be below this (llama_proc is faster).
CHAT_RATIO_VS_OPENAI = 1.0
#: Streamed chat completion, median time from sending the request to the first parsed chunk:
#: llama_proc / raw (a new connection per stream, since llama-server closes it after each stream).
STREAM_FIRST_RATIO_VS_RAW = 1.10
#: Streamed chat completion, median time from sending the request until the stream is read to its
#: end and closed: llama_proc / raw.
STREAM_WHOLE_RATIO_VS_RAW = 1.05
#: Streamed chat completion, first chunk and whole stream: llama_proc / openai SDK must be below this.
STREAM_RATIO_VS_OPENAI = 1.0
#: 32 threads x chat completions (n_parallel 4): throughput llama_proc / raw (each raw thread has its
#: own connection) must be at least this ...
CONCURRENT_CHAT_MIN_RATIO = 0.9
#: ... with at most this many calls slower than SLOW_CALL_S (queueing included) ...
CONCURRENT_CHAT_MAX_SLOW = 0
#: ... no call that fails, and no urllib3 "Connection pool is full" warning.
CONCURRENT_CHAT_MAX_ERRORS = 0
#: /tokenize of "hello world", median seconds per call: llama_proc / raw keep-alive at most this.
TOKENIZE_RATIO_VS_RAW = 2.0
#: 32 threads x 50 /tokenize: the throughput ratio is only reported; calls slower than SLOW_CALL_S
#: (stalls) must number at most this.
CONCURRENT_TOKENIZE_MAX_STALLS = 0
#: A call that takes longer than this many seconds counts as slow (a stall).
SLOW_CALL_S = 1.0

#: Streamed and non-streamed single calls: at least this many alternating rounds, more while the
#: phase's time budget (seconds) lasts, never more than the maximum.
MIN_ROUNDS = 41
MAX_ROUNDS = 301
CHAT_BUDGET_S = 25.0
STREAM_BUDGET_S = 45.0
#: Concurrency: threads, calls per thread, and alternating batches of each contender.
THREADS = 32
CHAT_CALLS_PER_THREAD = 10
TOKENIZE_CALLS_PER_THREAD = 50
MIN_BATCHES = 2
MAX_BATCHES = 9
CONCURRENT_CHAT_BUDGET_S = 40.0
CONCURRENT_TOKENIZE_BUDGET_S = 15.0

MESSAGES: list[Any] = [{"role": "user", "content": "go"}]
CHAT: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 16, "seed": 1, "temperature": 0}
STREAM: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 64, "seed": 1, "temperature": 0, "stream": True}
JSON_HEADERS = {"Content-Type": "application/json"}


# -- raw http.client ------------------------------------------------------------------------------


def raw_conn(port: int) -> http.client.HTTPConnection:
    """A connected keep-alive connection with TCP_NODELAY (as urllib3 and httpx set it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def raw_post(conn: http.client.HTTPConnection, path: str, body: bytes) -> Any:
    conn.request("POST", path, body, JSON_HEADERS)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"raw POST {path}: HTTP {response.status}: {data[:200]!r}")
    return json.loads(data)


def raw_stream(port: int, body: bytes) -> tuple[float, float, int]:
    """Seconds to the first parsed event and to the stream's end (connection closed), and the
    number of chunks; a new connection, as llama-server closes it after each stream."""
    t = time.perf_counter()
    conn = raw_conn(port)
    first = 0.0
    chunks = 0
    try:
        conn.request("POST", "/v1/chat/completions", body, JSON_HEADERS)
        response = conn.getresponse()
        buffer = b""
        done = False
        while not done:
            data = response.read1(65536)
            if not data:
                break
            buffer += data
            while not done and b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                json.loads(payload)
                chunks += 1
                if chunks == 1:
                    first = time.perf_counter() - t
    finally:
        conn.close()
    return first, time.perf_counter() - t, chunks


# -- llama_proc and openai streams ----------------------------------------------------------------


def ours_stream(server: LlamaServer) -> tuple[float, float, int]:
    t = time.perf_counter()
    first = 0.0
    chunks = 0
    with server.chat_completions(STREAM) as stream:
        for _ in stream:
            chunks += 1
            if chunks == 1:
                first = time.perf_counter() - t
    return first, time.perf_counter() - t, chunks


def openai_chat(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=16, seed=1, temperature=0)


def openai_stream(client: openai.OpenAI) -> tuple[float, float, int]:
    t = time.perf_counter()
    first = 0.0
    chunks = 0
    with client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=64, seed=1, temperature=0, stream=True
    ) as stream:
        for _ in stream:
            chunks += 1
            if chunks == 1:
                first = time.perf_counter() - t
    return first, time.perf_counter() - t, chunks


# -- harness --------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> Callable[[], tuple[float, ...]]:
    def call() -> tuple[float, ...]:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t,)

    return call


def alternate(
    contenders: dict[str, Callable[[], tuple[float, ...]]],
    budget_s: float,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    warmup: int = 5,
) -> dict[str, list[tuple[float, ...]]]:
    """One call of each contender per round, the order rotating, after ``warmup`` calls of each;
    rounds go on until ``budget_s`` is spent (at least ``min_rounds``, at most ``max_rounds``)."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    gc.collect()
    samples: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(max_rounds):
        if i >= min_rounds and time.perf_counter() - start > budget_s:
            break
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(contenders[name]())
    return samples


def median_of(samples: list[tuple[float, ...]], index: int = 0) -> float:
    return statistics.median(s[index] for s in samples)


class PoolFullCatcher(logging.Handler):
    """Counts urllib3's "Connection pool is full" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Connection pool is full" in record.getMessage():
            self.count += 1


class Batch:
    """One concurrent batch: per-call seconds, errors, and the batch's wall time."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self.wall = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def slow(self) -> int:
        return sum(1 for t in self.latencies if t > SLOW_CALL_S)


def close(worker: object) -> None:
    closer = getattr(worker, "close", None)
    if closer is not None:
        closer()


def concurrent_batch(make_worker: Callable[[], Callable[[], object]], threads: int, calls: int) -> Batch:
    """``threads`` threads make ``calls`` calls each, all released at once; each thread's worker is
    made (connections opened) before the clock starts and closed at its end. A failed call counts as
    an error and the thread goes on with a fresh worker."""
    batch = Batch()
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def run() -> None:
        try:
            worker = make_worker()
        except BaseException as exc:
            with lock:
                batch.errors.append(exc)
            barrier.abort()
            return
        latencies = []
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        for _ in range(calls):
            t = time.perf_counter()
            try:
                worker()
            except Exception as exc:
                with lock:
                    batch.errors.append(exc)
                close(worker)
                try:
                    worker = make_worker()
                except Exception:
                    pass
                continue
            latencies.append(time.perf_counter() - t)
        close(worker)
        with lock:
            batch.latencies.extend(latencies)

    pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for p in pool:
        p.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t = time.perf_counter()
    for p in pool:
        p.join()
    batch.wall = time.perf_counter() - t
    return batch


def alternate_batches(
    contenders: dict[str, Callable[[], Callable[[], object]]], calls: int, budget_s: float
) -> dict[str, list[Batch]]:
    """Alternating concurrent batches (order rotating), after a warm-up batch of one call per
    thread of each; at least MIN_BATCHES and at most MAX_BATCHES of each, within ``budget_s``."""
    names = list(contenders)
    for name in names:
        concurrent_batch(contenders[name], THREADS, 1)
    gc.collect()
    batches: dict[str, list[Batch]] = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(MAX_BATCHES):
        if i >= MIN_BATCHES and time.perf_counter() - start > budget_s:
            break
        k = i % len(names)
        for name in names[k:] + names[:k]:
            batches[name].append(concurrent_batch(contenders[name], THREADS, calls))
    return batches


def summary(batches: list[Batch]) -> tuple[float, int, int, int]:
    """Median calls/s over the batches, slow calls, errors, and calls made in all."""
    rate = statistics.median(b.rate for b in batches)
    return (
        rate,
        sum(b.slow() for b in batches),
        sum(len(b.errors) for b in batches),
        sum(len(b.latencies) for b in batches),
    )


# -- the rows -------------------------------------------------------------------------------------


def bench_chat(server: LlamaServer, port: int, client: openai.OpenAI) -> None:
    conn = raw_conn(port)
    body = json.dumps(CHAT).encode()
    tokens = {
        "llama_proc": server.chat_completions(CHAT)["usage"]["completion_tokens"],
        "raw": raw_post(conn, "/v1/chat/completions", body)["usage"]["completion_tokens"],
        "openai": openai_chat(client).usage.completion_tokens,
    }
    if len(set(tokens.values())) != 1:
        print(f"note: chat completions differ in length: {tokens}")
    samples = alternate(
        {
            "llama_proc": timed(lambda: server.chat_completions(CHAT)),
            "raw": timed(lambda: raw_post(conn, "/v1/chat/completions", body)),
            "openai": timed(lambda: openai_chat(client)),
        },
        CHAT_BUDGET_S,
    )
    conn.close()
    ours, raw, sdk = (median_of(samples[n]) * 1e3 for n in ("llama_proc", "raw", "openai"))
    n = len(samples["raw"])
    record(
        f"chat, per call vs raw ({n} rounds)",
        ours,
        raw,
        "ms",
        f"ratio <= {CHAT_RATIO_VS_RAW}",
        ours / raw <= CHAT_RATIO_VS_RAW,
    )
    record(
        f"chat, per call vs openai ({n} rounds)",
        ours,
        sdk,
        "ms",
        f"ratio < {CHAT_RATIO_VS_OPENAI}",
        ours / sdk < CHAT_RATIO_VS_OPENAI,
    )


def bench_stream(server: LlamaServer, port: int, client: openai.OpenAI) -> None:
    body = json.dumps(STREAM).encode()
    samples = alternate(
        {
            "llama_proc": lambda: ours_stream(server),
            "raw": lambda: raw_stream(port, body),
            "openai": lambda: openai_stream(client),
        },
        STREAM_BUDGET_S,
    )
    chunk_counts = {name: sorted({s[2] for s in samples[name]}) for name in samples}
    if len({tuple(c) for c in chunk_counts.values()}) != 1:
        print(f"note: streams differ in chunk counts: {chunk_counts}")
    n = len(samples["raw"])
    for index, what, vs_raw in ((0, "first chunk", STREAM_FIRST_RATIO_VS_RAW), (1, "whole", STREAM_WHOLE_RATIO_VS_RAW)):
        ours, raw, sdk = (median_of(samples[name], index) * 1e3 for name in ("llama_proc", "raw", "openai"))
        record(f"stream {what} vs raw ({n} rounds)", ours, raw, "ms", f"ratio <= {vs_raw}", ours / raw <= vs_raw)
        record(
            f"stream {what} vs openai ({n} rounds)",
            ours,
            sdk,
            "ms",
            f"ratio < {STREAM_RATIO_VS_OPENAI}",
            ours / sdk < STREAM_RATIO_VS_OPENAI,
        )


class RawWorker:
    """One thread's own keep-alive connection, POSTing one body; closed at the end of its batch."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        self.conn = raw_conn(port)
        self.path = path
        self.body = body

    def __call__(self) -> object:
        return raw_post(self.conn, self.path, self.body)

    def close(self) -> None:
        self.conn.close()


def raw_worker(port: int, path: str, body: bytes) -> Callable[[], Callable[[], object]]:
    return lambda: RawWorker(port, path, body)


def bench_concurrent_chat(server: LlamaServer, port: int, pool_full: PoolFullCatcher) -> None:
    before = pool_full.count
    body = json.dumps(CHAT).encode()
    batches = alternate_batches(
        {
            "llama_proc": lambda: lambda: server.chat_completions(CHAT),
            "raw": raw_worker(port, "/v1/chat/completions", body),
        },
        CHAT_CALLS_PER_THREAD,
        CONCURRENT_CHAT_BUDGET_S,
    )
    warnings = pool_full.count - before
    ours_rate, ours_slow, ours_errors, ours_calls = summary(batches["llama_proc"])
    raw_rate, raw_slow, raw_errors, _ = summary(batches["raw"])
    ok = (
        ours_rate / raw_rate >= CONCURRENT_CHAT_MIN_RATIO
        and ours_slow <= CONCURRENT_CHAT_MAX_SLOW
        and ours_errors <= CONCURRENT_CHAT_MAX_ERRORS
        and warnings == 0
    )
    target = (
        f"ratio >= {CONCURRENT_CHAT_MIN_RATIO}; calls > {SLOW_CALL_S:g} s <= {CONCURRENT_CHAT_MAX_SLOW} "
        f"(got {ours_slow}/{ours_calls}, raw {raw_slow}); errors <= {CONCURRENT_CHAT_MAX_ERRORS} "
        f"(got {ours_errors}, raw {raw_errors}); no pool-full warning (got {warnings})"
    )
    n = len(batches["raw"])
    name = f"{THREADS} thr x {CHAT_CALLS_PER_THREAD} chat ({n} batches)"
    record(name, ours_rate, raw_rate, "/s", target, ok)


def bench_tokenize(server: LlamaServer, port: int) -> None:
    conn = raw_conn(port)
    body = json.dumps({"content": "hello world"}).encode()
    ours_s, raw_s = compare(lambda: server.tokenize("hello world"), lambda: raw_post(conn, "/tokenize", body), 200)
    conn.close()
    ours_us, raw_us = ours_s * 1e6, raw_s * 1e6
    record(
        "tokenize, per call",
        ours_us,
        raw_us,
        "us",
        f"ratio <= {TOKENIZE_RATIO_VS_RAW}",
        ours_us / raw_us <= TOKENIZE_RATIO_VS_RAW,
    )


def bench_concurrent_tokenize(server: LlamaServer, port: int) -> None:
    body = json.dumps({"content": "hello world"}).encode()
    batches = alternate_batches(
        {
            "llama_proc": lambda: lambda: server.tokenize("hello world"),
            "raw": raw_worker(port, "/tokenize", body),
        },
        TOKENIZE_CALLS_PER_THREAD,
        CONCURRENT_TOKENIZE_BUDGET_S,
    )
    ours_rate, ours_stalls, ours_errors, ours_calls = summary(batches["llama_proc"])
    raw_rate, raw_stalls, raw_errors, _ = summary(batches["raw"])
    ok = ours_stalls <= CONCURRENT_TOKENIZE_MAX_STALLS and ours_errors == 0
    target = (
        f"reported; stalls > {SLOW_CALL_S:g} s <= {CONCURRENT_TOKENIZE_MAX_STALLS} "
        f"(got {ours_stalls}/{ours_calls}, raw {raw_stalls}); errors {ours_errors} (raw {raw_errors})"
    )
    n = len(batches["raw"])
    name = f"{THREADS} thr x {TOKENIZE_CALLS_PER_THREAD} tokenize ({n} batches)"
    record(name, ours_rate, raw_rate, "/s", target, ok)


def main() -> int:
    pool_full = PoolFullCatcher()
    urllib3_log = logging.getLogger("urllib3")
    urllib3_log.addHandler(pool_full)
    if urllib3_log.getEffectiveLevel() > logging.WARNING:
        urllib3_log.setLevel(logging.WARNING)
    executable, args = setup()
    started = time.perf_counter()
    with LlamaServer(executable, args.evolve(n_parallel=4)) as server:
        port = server.port
        assert port is not None
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        try:
            bench_chat(server, port, client)
            bench_stream(server, port, client)
            bench_concurrent_chat(server, port, pool_full)
            bench_tokenize(server, port)
            bench_concurrent_tokenize(server, port)
        finally:
            client.close()
    print(f"\n({time.perf_counter() - started:.0f} s with the server up)")
    return report("Calls")


if __name__ == "__main__":
    sys.exit(main())
