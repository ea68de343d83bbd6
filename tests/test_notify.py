"""sd_notify without libsystemd (sipis/notify.py): datagrams, watchdog settings, no-op paths."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from sipis.notify import Notifier, socket_address, watchdog_usec

#: sockaddr_un.sun_path is 108 bytes, NUL included.
_SUN_PATH_MAX = 107


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short directory under /tmp when tmp_path is too long for a socket."""
    if len(str(tmp_path / "notify.sock")) <= _SUN_PATH_MAX:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        yield Path(short)


@pytest.fixture
def receiver(sock_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its path."""
    path = str(sock_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram queued right now."""
    out: list[bytes] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_ready_with_status_is_one_datagram_on_a_path_socket(
    receiver: tuple[socket.socket, str],
) -> None:
    """READY=1 and its STATUS= travel together, newline-separated, to a filesystem socket."""
    sock, path = receiver
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.ready("3 instances, 1 registered")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 instances, 1 registered"
    notifier.close()


def test_stopping_status_and_watchdog_messages(receiver: tuple[socket.socket, str]) -> None:
    """STOPPING=1, STATUS= and WATCHDOG=1 each go out as their own datagram."""
    sock, path = receiver
    notifier = Notifier(path)
    assert notifier.status("2 instances, 2 registered")
    assert notifier.watchdog()
    assert notifier.stopping("stopping")
    assert notifier.stopping()
    assert drain(sock) == [b"STATUS=2 instances, 2 registered", b"WATCHDOG=1",
                           b"STOPPING=1\nSTATUS=stopping", b"STOPPING=1"]
    notifier.close()


def test_status_text_is_kept_on_one_line(receiver: tuple[socket.socket, str]) -> None:
    """A newline would end STATUS= early and smuggle in another field: it becomes a space."""
    sock, path = receiver
    Notifier(path).status("line one\nREADY=1")
    assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_abstract_socket_name_with_a_leading_at() -> None:
    """``@name`` means the Linux abstract namespace: the address starts with a NUL byte."""
    name = "sipis-test-" + secrets.token_hex(8)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert socket_address("@" + name) == b"\0" + name.encode()
        assert Notifier("@" + name).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Started from a terminal or a test: nothing is sent and nothing fails."""
    for notifier in (Notifier(None), Notifier(""), Notifier.from_environ({})):
        assert not notifier.enabled
        assert notifier.watchdog_interval is None
        assert not notifier.ready("x")
        assert not notifier.stopping()
        assert not notifier.watchdog()


def test_unsupported_address_forms_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """vsock: and relative names are not for us: disabled with a warning, not a crash."""
    with caplog.at_level(logging.WARNING, logger="sipis.notify"):
        assert not Notifier("vsock:2:1234").enabled
        assert not Notifier("relative.sock").enabled
        assert not Notifier("@").enabled
    assert "vsock:2:1234" in caplog.text


def test_a_vanished_socket_never_raises_and_warns_once(
    sock_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """systemd gone (or the socket removed): sends return False; one warning, then debug."""
    notifier = Notifier(str(sock_dir / "gone.sock"))
    with caplog.at_level(logging.DEBUG, logger="sipis.notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    levels = [r.levelno for r in caplog.records if r.name == "sipis.notify"]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_full_socket_queue_does_not_block_or_raise(receiver: tuple[socket.socket, str]) -> None:
    """Nobody reading the socket: sends stop succeeding (EAGAIN) but never block the loop."""
    sock, path = receiver
    notifier = Notifier(path)
    results = [notifier.watchdog() for _ in range(2000)]
    assert results[0] and not results[-1]
    assert all(m == b"WATCHDOG=1" for m in drain(sock))
    assert notifier.watchdog()  # room again once the reader caught up


# -- watchdog settings (sd_watchdog_enabled semantics) ------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "200000"}, 200_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30_000_000),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "1.5"}, None),
    ({"WATCHDOG_USEC": "abc"}, None),
    ({"WATCHDOG_USEC": str(2**64 - 1)}, None),  # USEC_INFINITY
    ({"WATCHDOG_USEC": "٣"}, None),  # a non-ASCII digit
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "0"}, None),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_usec_follows_sd_watchdog_enabled(
    env: dict[str, str], expected: int | None,
) -> None:
    """WATCHDOG_USEC: a positive integer below infinity; WATCHDOG_PID must be us when set."""
    assert watchdog_usec(env, 4242) == expected


def test_from_environ_reads_socket_and_watchdog_for_this_process(
    receiver: tuple[socket.socket, str],
) -> None:
    """The environment systemd sets for the main process: ping every WATCHDOG_USEC/2."""
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(env)
    assert notifier.enabled
    assert notifier.watchdog_interval == pytest.approx(0.1)
    other = Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.enabled and other.watchdog_interval is None


def test_watchdog_without_a_socket_is_disabled() -> None:
    """WATCHDOG_USEC alone (no NOTIFY_SOCKET) has nowhere to ping."""
    assert Notifier(None, watchdog_usec=200_000).watchdog_interval is None


# -- trio tasks -----------------------------------------------------------------------------------


async def test_watchdog_task_pings_every_half_timeout(
    receiver: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock,
) -> None:
    """One ping at start, then one every WATCHDOG_USEC/2, until cancelled."""
    sock, path = receiver
    notifier = Notifier(path, watchdog_usec=200_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        assert drain(sock) == [b"WATCHDOG=1"]  # sent before started()
        await trio.sleep(1.05)
        assert drain(sock) == [b"WATCHDOG=1"] * 10
        nursery.cancel_scope.cancel()


async def test_watchdog_task_returns_when_not_asked_for(
    receiver: tuple[socket.socket, str],
) -> None:
    """No WATCHDOG_USEC: the task starts and ends at once, sending nothing."""
    sock, path = receiver
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(Notifier(path).run_watchdog)
    assert drain(sock) == []


async def test_status_task_sends_only_changes_and_survives_errors(
    receiver: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock,
) -> None:
    """STATUS= is refreshed each interval when the text changed; a failing describe is skipped."""
    sock, path = receiver
    texts = iter(["1 instances, 0 registered", "1 instances, 0 registered", "boom",
                  "1 instances, 1 registered"])

    async def describe() -> str:
        text = next(texts)
        if text == "boom":
            raise RuntimeError("store hiccup")
        return text

    async with trio.open_nursery() as nursery:
        await nursery.start(Notifier(path).run_status, describe, 5.0)
        await trio.sleep(21)
        nursery.cancel_scope.cancel()
    assert drain(sock) == [b"STATUS=1 instances, 0 registered",
                           b"STATUS=1 instances, 1 registered"]


async def test_status_task_without_a_socket_never_describes() -> None:
    """No NOTIFY_SOCKET: counting instances for nobody would be wasted work."""
    async def describe() -> str:
        raise AssertionError("called")

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(Notifier(None).run_status, describe, 0.01)
