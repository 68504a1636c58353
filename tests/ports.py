"""Ports for the servers the tests start on loopback, taken from below the kernel's
ephemeral range.

``bind(port 0)`` hands out a port from the ephemeral range, which the kernel also gives
every outgoing connection, and Ray opens hundreds. Between the probe closing such a port
and a server binding it, a connection may take it: seen in CI as HAProxy's "cannot bind
socket (Address already in use)" for a port a test had just found free. Ports from
20000 up to the ephemeral range are handed to no connection; Ray's workers use
10002-19999 by default.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOW = 20000
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every interface: also refused if one listens on 127.0.0.1 only
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on, none handed out before in this process."""
    high = min(_ephemeral_low(), 65536) - 1
    if high - LOW < 1000:  # an unusual kernel range: fall back to the kernel's choice
        return _kernel_ports(n)
    ports: list[int] = []
    for _ in range(200 * n):
        port = random.randint(LOW, high)
        if port not in _given and _bindable(port):
            _given.add(port)
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports between {LOW} and {high}")


def free_port() -> int:
    return free_ports(1)[0]


def _kernel_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
