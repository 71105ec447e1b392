"""``kill_group``: the one place that stops process groups (servers, stale servers, builds)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from llama_proc._kill import kill_group

from .conftest import pid_alive, wait_until

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")

# A child that says when it is ready, then ignores the first `IGNORE` SIGTERMs and exits with 3 on the next.
CHILD = """
import signal, sys, time
left = int(sys.argv[1])
def on_term(*_):
    global left
    if left == 0:
        sys.exit(3)
    left -= 1
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""


def _child(ignore: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ignore)], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline() == b"ready\n"
    return proc


def test_sigterm_is_enough() -> None:
    proc = _child(ignore=0)
    started = time.monotonic()
    assert kill_group(proc, 5.0) == 3
    assert time.monotonic() - started < 2.0


def test_sigkill_after_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    proc = _child(ignore=100)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "llama_proc.process"):
        assert kill_group(proc, 0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 3.0
    assert "did not stop within 0.3 s of SIGTERM; killing it" in caplog.text


def test_a_second_sigterm_ends_what_ignored_the_first(caplog: pytest.LogCaptureFixture) -> None:
    proc = _child(ignore=1)
    with caplog.at_level(logging.INFO, "llama_proc.process"):
        assert kill_group(proc, 10.0, second_term_after=0.2) == 3
    assert "still runs 0.2 s after SIGTERM; sending a second one" in caplog.text
    assert "killing it" not in caplog.text


def test_the_whole_group_goes() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    kill_group(proc, 5.0)
    proc.stdout.close()
    assert wait_until(lambda: not pid_alive(grandchild), 5), "the group's other process outlived it"


def test_a_reaped_child_is_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    monkeypatch.setattr(os, "killpg", lambda *a: pytest.fail("a reaped child's pid was signalled"))
    assert kill_group(proc, 1.0) == 0


def test_a_pid_that_is_not_our_child() -> None:
    proc = _child(ignore=0)
    try:
        assert kill_group(proc.pid, 5.0, kill_wait=1.0, ended=lambda: proc.poll() is not None) is None
        assert proc.returncode == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_group_that_is_gone_is_left_alone() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    started = time.monotonic()
    assert kill_group(proc.pid, 30.0) is None  # no such group: nothing to wait for
    assert time.monotonic() - started < 1.0
