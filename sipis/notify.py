"""sd_notify(3) for systemd's ``Type=notify`` and watchdog, without libsystemd.

Strategy: the protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=VALUE`` lines sent to
``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``), so the stdlib is
enough and no C library has to be installed. Every send is non-blocking and never raises: a
vanished or full socket must not take the daemon down with it, so the first failure is logged at
warning and later ones at debug. Without ``$NOTIFY_SOCKET`` (a terminal, a test, a container)
every call is a no-op.

The watchdog ping runs as a trio task, not a thread, on purpose: a thread would keep pinging
while the event loop is stuck, and the loop being stuck is what the watchdog is there to catch.

Imports nothing from sipis (like ``config`` and ``logs``), so any layer could use it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import trio

log = logging.getLogger(__name__)

#: How often the daemon refreshes ``STATUS=`` (seconds): often enough for ``systemctl status``
#: to look current, rare enough that counting instances costs nothing.
STATUS_INTERVAL = 10.0

#: systemd's ``USEC_INFINITY`` ((uint64_t) -1): WATCHDOG_USEC must be below it.
_USEC_INFINITY = 2**64 - 1


def watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout in microseconds, or None when this process need not ping.

    Follows ``sd_watchdog_enabled(3)``: ``WATCHDOG_USEC`` must be a positive integer below
    ``USEC_INFINITY``; when ``WATCHDOG_PID`` is set, the watchdog is meant for that process
    only (a child that inherited the environment must not ping). Invalid values disable the
    watchdog with a warning instead of failing the start.

    Args:
        environ: the environment to read (``os.environ`` in production).
        pid: this process's id (``os.getpid()``).
    Returns:
        The timeout in µs, or None if unset, invalid, or meant for another process.
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < _USEC_INFINITY:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", raw)
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        if not (owner.isascii() and owner.isdigit()) or int(owner) <= 0:
            log.warning("ignoring the watchdog: invalid WATCHDOG_PID=%r", owner)
            return None
        if int(owner) != pid:
            return None
    return int(raw)


def socket_address(value: str | None) -> bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, None if unset or unsupported.

    ``/path`` is a filesystem socket, ``@name`` an abstract one (Linux: a leading NUL byte).
    Other forms (``vsock:``, newer systemd) are not supported and logged once here.
    """
    if not value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    log.warning("ignoring NOTIFY_SOCKET=%r: only paths and @abstract names are supported",
                value)
    return None


class Notifier:
    """Sends sd_notify messages; a no-op without a socket address.

    Build it with ``from_environ()`` in production; tests pass the address and watchdog
    timeout directly. Messages go out at once from the calling task (sync, non-blocking), so
    ``ready()`` or ``stopping()`` can be called anywhere, even outside trio.
    """

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None) -> None:
        self._address = socket_address(address)
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through ``NOTIFY_SOCKET``, ``WATCHDOG_USEC/PID``."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=watchdog_usec(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere at all."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the timeout, as sd_watchdog_enabled(3) advises)."""
        if self._address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` fields (e.g. ``"READY=1"``).

        Returns:
            True if the datagram was handed to the kernel; False without a socket or on any
            error (logged at warning the first time, at debug after that). Never raises.
        """
        if self._address is None or not fields:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._address)
        except OSError as exc:
            first = fields[0].split("=", 1)[0]
            if not self._warned:
                self._warned = True
                log.warning("sd_notify %s failed: %s (further failures logged at debug)",
                            first, exc)
            else:
                log.debug("sd_notify %s failed: %s", first, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete (every listener bound, the store open)."""
        return self.notify("READY=1", *_status_field(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutting down on purpose, so systemd expects the exit."""
        return self.notify("STOPPING=1", *_status_field(status))

    def status(self, text: str) -> bool:
        """``STATUS=``: one line for ``systemctl status``."""
        return self.notify(*_status_field(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping ``WATCHDOG=1`` every ``watchdog_interval`` until cancelled.

        Returns at once when no watchdog was asked for. The first ping goes out before
        ``started()``, so the timer is fresh whatever start-up took before this task.
        """
        interval = self.watchdog_interval
        if interval is None:
            task_status.started()
            return
        log.debug("systemd watchdog: pinging every %.3f s", interval)
        self.watchdog()
        task_status.started()
        while True:
            await trio.sleep(interval)
            self.watchdog()

    async def run_status(
        self,
        describe: Callable[[], Awaitable[str]],
        interval: float = STATUS_INTERVAL,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send ``STATUS=await describe()`` every ``interval`` seconds when it has changed.

        Returns at once without a socket (``describe`` is then never called). An exception
        from ``describe`` is logged and the line kept: it must not stop the daemon.
        """
        task_status.started()
        if self._address is None:
            return
        last: str | None = None
        while True:
            await trio.sleep(interval)
            try:
                text = await describe()
            except Exception:  # a status line is never worth stopping the daemon for
                log.warning("STATUS: describing the daemon failed", exc_info=True)
                continue
            if text != last and self.status(text):
                last = text


def _status_field(text: str | None) -> tuple[str, ...]:
    """``STATUS=`` ends at a newline, so one line only."""
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)
