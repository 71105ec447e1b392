"""Test hosts on one machine: network namespaces joined to this one by veth pairs.

Each host is a namespace with one address in a /29 of a /24 of 198.18.0.0/15 (set aside for
network tests, so never a real host's) chosen so that it overlaps no address or route of this
machine. Everything made is removed on exit (processes in the namespaces
are killed first), also when the test fails. Needs root; :func:`make_hosts` skips the test, with
the reason, where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import signal
import subprocess
import time
from typing import Iterator, NamedTuple

import pytest


class Host(NamedTuple):
    """A namespace: ``name`` for ``ip netns exec``, its ``address``, ``silent``, an address on its
    link that nothing answers (connections to it time out), and ``local``, this machine's own
    address on that link (not loopback, reachable from the host only)."""

    name: str
    address: str
    silent: str
    local: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _quietly(*args: str) -> None:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _ip(*args, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 198.18.x.0/24 or 198.19.x.0/24 that no address or route of this machine touches."""
    used = [
        ipaddress.ip_network(word, strict=False)
        for line in (_ip("-4", "addr").stdout + _ip("-4", "route").stdout).splitlines()
        for word in line.split()
        if word[:1].isdigit() and ("/" in word or word.count(".") == 3)
    ]
    for _ in range(200):
        net = ipaddress.ip_network(f"198.{random.randint(18, 19)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free private /24 found")


def pids_in(namespace: str) -> list[int]:
    """The processes running in ``namespace``."""
    try:
        done = _ip("netns", "pids", namespace, check=False)
    except (subprocess.SubprocessError, OSError):
        return []
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _remove_stale() -> None:
    """Namespaces left by test runs that were killed before they could clean up (their pid is gone)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(r"lp(\d+)(?:h\d+|probe)\b", line)
        if match and not os.path.exists(f"/proc/{match[1]}"):
            for pid in pids_in(line.split()[0]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _quietly("netns", "del", line.split()[0])


@contextlib.contextmanager
def make_hosts(count: int) -> Iterator[list[Host]]:
    """``count`` hosts, removed on exit with every process in them."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    tag = f"lp{os.getpid()}"
    made: list[str] = []
    links: list[str] = []
    try:
        probe = _ip("netns", "add", f"{tag}probe", check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
        made.append(f"{tag}probe")
        _remove_stale()
        net = _free_subnet()
        hosts = []
        for i in range(count):
            name, outer, inner = f"{tag}h{i}", f"{tag}a{i}", f"{tag}b{i}"
            base = int(net.network_address) + 8 * i
            mine, theirs, silent = (str(ipaddress.IPv4Address(base + k)) for k in (1, 2, 3))
            _ip("netns", "add", name)
            made.append(name)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            links.append(outer)
            _ip("link", "set", inner, "netns", name)
            _ip("addr", "add", f"{mine}/29", "dev", outer)
            _ip("link", "set", outer, "up")
            _ip("netns", "exec", name, "ip", "addr", "add", f"{theirs}/29", "dev", inner)
            _ip("netns", "exec", name, "ip", "link", "set", inner, "up")
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
            hosts.append(Host(name, theirs, silent, mine))
        yield hosts
    finally:
        for name in made:
            for pid in pids_in(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(pids_in(name) for name in made) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in made:
            _quietly("netns", "del", name)
        for link in links:  # gone with its namespace's end already, unless setup failed half-way
            _quietly("link", "del", link)
