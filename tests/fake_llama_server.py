"""A stdlib stand-in for llama-server, for lifecycle tests the real binary cannot stage.

Accepts the arguments llama_proc passes (``--port``, ``--host``, ...) and ignores the rest. The
behaviour is chosen with the ``FAKE_MODE`` environment variable (comma-separated):

* ``slow-load``: answer /health 503 for ``FAKE_LOAD_SECONDS`` (default 0.5), logging progress
* ``crash``: print an error and exit 3 before listening
* ``ignore-term``: ignore SIGTERM (only SIGKILL stops it)
* ``flood``: write ``FAKE_FLOOD_LINES`` lines to stderr before and while serving
* ``die-mid-stream``: exit abruptly after sending two stream events
* ``silent-hang``: never listen and never log (stall timeout)
* ``bad-utf8``: log bytes that are not UTF-8
* ``die-after``: exit with status 7 ``FAKE_DIE_SECONDS`` (default 0.3) after listening
* ``lose-first-term``: forget the first SIGTERM and exit 1 at once on the second (what llama-server
  does when the first lands just before its main loop starts)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = set(filter(None, os.environ.get("FAKE_MODE", "").split(",")))


def log(level: str, message: str) -> None:
    sys.stderr.write(f"0.00.000.001 {level} srv  fake: {message}\n")
    sys.stderr.flush()


def arg(name: str, default: str) -> str:
    argv = sys.argv[1:]
    return argv[argv.index(name) + 1] if name in argv else default


def main() -> int:
    if "--help" in sys.argv:
        sys.stdout.write(os.environ.get("FAKE_HELP", ""))  # empty: a build whose flags are the newest
        return 0
    if "--version" in sys.argv:
        sys.stderr.write("version: 9999 (fakefake)\nbuilt with python for fake-platform\n")
        return 0
    if "ignore-term" in MODES:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "bad-utf8" in MODES:
        sys.stderr.buffer.write(b"0.00.000.001 W srv  bad bytes: \xff\xfe\xc3(\n")
        sys.stderr.flush()
    if "crash" in MODES:
        log("E", "error loading model: this is a crash on purpose")
        return 3
    if "silent-hang" in MODES:
        time.sleep(3600)
        return 0
    flood = int(os.environ.get("FAKE_FLOOD_LINES", "20000"))
    if "flood" in MODES:
        for i in range(flood):
            sys.stderr.write(f"0.00.000.001 D flood line {i} " + "x" * 100 + "\n")
        sys.stderr.flush()

    host, port = arg("--host", "127.0.0.1"), int(arg("--port", "8080"))
    load_seconds = float(os.environ.get("FAKE_LOAD_SECONDS", "0.5")) if "slow-load" in MODES else 0.0
    started = time.monotonic()
    api_key = arg("--api-key", "")
    if "--api-key-file" in sys.argv:
        with open(arg("--api-key-file", ""), encoding="utf-8") as fh:
            api_key = fh.readline().strip()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            log("I", "request " + (format % args))

        def send_json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                if time.monotonic() - started < load_seconds:
                    self.send_json(
                        503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
                    )
                else:
                    self.send_json(200, {"status": "ok"})
                return
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self.send_json(
                    401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
                )
                return
            if self.path == "/v1/chat/completions" and body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(int(body.get("max_tokens", 3))):
                    event = b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    if "die-mid-stream" in MODES and i == 1:
                        os._exit(9)
                    time.sleep(float(os.environ.get("FAKE_TOKEN_SECONDS", "0.01")))
                done = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                return
            if self.path == "/v1/chat/completions":
                self.send_json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]})
                return
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    if load_seconds:

        def progress() -> None:
            while time.monotonic() - started < load_seconds:
                log("I", "loading...")
                time.sleep(0.05)

        threading.Thread(target=progress, daemon=True).start()
    stop = threading.Event()
    if "flood" in MODES:

        def chatter() -> None:
            i = 0
            while not stop.is_set():
                sys.stderr.write(f"0.00.000.001 D chatter {i} " + "y" * 100 + "\n")
                i += 1
                if i % 1000 == 0:
                    time.sleep(0.001)

        threading.Thread(target=chatter, daemon=True).start()
    log("I", f"listening on http://{host}:{port}")
    if "die-after" in MODES:

        def die() -> None:
            time.sleep(float(os.environ.get("FAKE_DIE_SECONDS", "0.3")))
            log("E", "dying on purpose")
            os._exit(7)

        threading.Thread(target=die, daemon=True).start()

    terms: list[int] = []

    def on_term(signum: int, frame: object) -> None:
        if "lose-first-term" in MODES:
            terms.append(signum)
            if len(terms) == 1:
                log("I", "first signal lost")
                return
            log("W", "second interrupt, terminating immediately")
            os._exit(1)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    if "ignore-term" not in MODES:
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
    server.serve_forever(poll_interval=0.01)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
