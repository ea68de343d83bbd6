"""Free loopback ports for test peers, so parallel test runs do not clash."""

from __future__ import annotations

import contextlib
import random
import socket
from typing import Literal

PortKind = Literal["udp", "tcp", "both"]

HOST = "127.0.0.1"
# Below the Linux ephemeral range (32768-60999), so a port we hand out is not taken a
# moment later by some client socket's automatic bind.
_LOW, _HIGH = 20000, 32000
_handed_out: set[int] = set()


def _bindable(port: int, socktype: int) -> bool:
    with socket.socket(socket.AF_INET, socktype) as sock:
        if socktype == socket.SOCK_STREAM:
            # Kamailio and dnsmasq listen with SO_REUSEADDR too: TIME_WAIT leftovers are fine.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(kind: PortKind = "both") -> int:
    """Return a port on 127.0.0.1 that is free for `kind` (UDP, TCP or both) right now.

    Ports are picked at random in a range outside the ephemeral one and never handed out
    twice by this process, which keeps concurrent pytest workers (each its own process)
    from racing on the same number in practice.
    """
    kinds = {"udp": (socket.SOCK_DGRAM,), "tcp": (socket.SOCK_STREAM,)}.get(
        kind, (socket.SOCK_DGRAM, socket.SOCK_STREAM)
    )
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(_LOW, _HIGH)
        if port in _handed_out:
            continue
        if all(_bindable(port, t) for t in kinds):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free {kind} port on {HOST}")


def port_is_free(port: int, kind: PortKind = "both") -> bool:
    """Whether `port` can be bound on 127.0.0.1 now (e.g. after a peer stopped)."""
    kinds = {"udp": (socket.SOCK_DGRAM,), "tcp": (socket.SOCK_STREAM,)}.get(
        kind, (socket.SOCK_DGRAM, socket.SOCK_STREAM)
    )
    with contextlib.suppress(OSError):
        return all(_bindable(port, t) for t in kinds)
    return False
