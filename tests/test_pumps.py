"""The log pumps: warnings found without splitting a batch, batching once the server is up."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import pytest

from llama_proc.process import _severe_lines, parse_log_line

from .conftest import wait_until
from .test_lifecycle import make


def severe(lines: list[str]) -> list[str]:
    return [line for line in lines if parse_log_line(line)[0] >= logging.WARNING]


def test_severe_lines_of_known_shapes() -> None:
    lines = [
        "0.00.103.858 I srv  load: model loaded",
        "0.00.103.859 W srv  load: no GPU found",
        "W plain warning",
        "E plain error",
        "0.01.000.000 D slot print: E and W as words",
        "EOF WARN not a level",
        "0.00.000.001 E srv  crash",
        "",
    ]
    found = [raw.decode() for raw in _severe_lines("\n".join(lines).encode())]
    assert severe(found) == severe(lines) == [lines[1], lines[2], lines[3], lines[6]]


def test_severe_lines_never_miss_one() -> None:
    rng = random.Random(7)
    pieces = ["W", "E", "I", "D", " ", "  ", "0.00.000.001", "1.2.3.4", "x", "We", "Ex", ".", "\u00e9"]
    for _ in range(200):
        lines = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8))) for _ in range(50)]
        found = [raw.decode() for raw in _severe_lines("\n".join(lines).encode())]
        assert severe(found) == severe(lines)


def test_only_warnings_and_errors_are_logged_when_info_is_off(
    fake_exe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    caplog.set_level(logging.WARNING, logger="llama_proc.server")
    with make(fake_exe, model, "bad-utf8") as server:
        server.health()
        assert wait_until(lambda: any("bad bytes" in r.getMessage() for r in caplog.records), 5)
        tail = server.log_tail(50)
    records = [r for r in caplog.records if r.name == "llama_proc.server"]
    assert records and all(r.levelno >= logging.WARNING for r in records)
    assert any("\ufffd" in r.getMessage() for r in records)
    assert any("request" in line for line in tail)  # INFO lines are kept in the tail all the same


def test_lines_still_arrive_once_batched_and_stop_is_prompt(fake_exe: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with make(fake_exe, model) as server:
        assert server.process is not None
        pumps = server.process.threads
        before = len([line for line in server.log_tail(200) if "request" in line])
        for _ in range(50):
            server.health()
        assert wait_until(lambda: len([ln for ln in server.log_tail(200) if "request" in ln]) >= before + 50, 2)
        for _ in range(50):
            server.health()  # output is gathering in the pipe while the pumps wait
        t = time.monotonic()
        server.stop()
        assert time.monotonic() - t < 2.0  # not held up by the pumps' batching
        assert not any(pump.is_alive() for pump in pumps)


@pytest.mark.parametrize("expected", [True, False])
def test_an_expected_warning_is_logged_at_info(expected: bool, caplog: pytest.LogCaptureFixture) -> None:
    from llama_proc.process import ServerProcess

    line = "0.00.000.001 W srv  llama_server: security: no API key is set and CORS allows all origins"
    script = f"import sys; sys.stderr.write({line!r} + '\\n'); sys.stderr.write('0.00.000.002 W another warning\\n')"
    caplog.set_level(logging.DEBUG, logger="llama_proc.server")
    proc = ServerProcess([sys.executable, "-c", script], expected_warnings=("no API key is set",) if expected else ())
    proc.start()
    assert proc.wait(10) == 0
    proc.stop()
    no_key = next(r.levelno for r in caplog.records if "no API key" in r.getMessage())
    other = next(r.levelno for r in caplog.records if "another warning" in r.getMessage())
    assert no_key == (logging.INFO if expected else logging.WARNING) and other == logging.WARNING
