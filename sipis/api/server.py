"""Serve the API app over HTTPS (HTTP/2 and HTTP/1.1) with hypercorn's trio worker.

Why hypercorn in-process: it speaks h2 and HTTP/1.1 over one TLS listener with ALPN, runs on
trio, and its ``serve()`` takes a shutdown trigger and a ``task_status``, so the API is one more
service in the daemon's nursery tree (STYLE.md item 8): ``await nursery.start(server.run)``
returns the bound port once the socket listens, ``request_shutdown()`` stops taking new work
and lets in-flight requests finish within GRACEFUL_TIMEOUT, and cancelling the nursery stops it
at once. The hypercorn ``Config`` is built here in code (no file, no access log: request lines
would carry instance ids and the body never reaches a log anyway).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, cast

import hypercorn.trio.run
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer
from starlette.types import Receive, Scope, Send

from sipis.api.app import ApiSettings, CallControl, build_app
from sipis.api.schemas import ExpiresPolicy
from sipis.api.tls import ALPN_PROTOCOLS, ssl_context_for
from sipis.instances import InstanceServiceAPI

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

log = logging.getLogger(__name__)

# After request_shutdown(), in-flight requests get this long to finish before hypercorn
# starts closing connections (and then its own graceful_timeout, the same again).
GRACEFUL_TIMEOUT: Final = 5.0
# Once no request is in flight, this long for hypercorn to write the last frames out.
FLUSH_GRACE: Final = 0.05
# Idle keep-alive connections are closed after this long.
KEEP_ALIVE_TIMEOUT: Final = 30.0
# A client must finish its TLS handshake within this.
TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# A connection that sends nothing for this long is closed (slow-loris guard); at least
# twice api.create_timeout, as a client sends nothing while it waits for a create.
MIN_READ_TIMEOUT: Final = 60.0


class _Listen(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class ServerSettings(ApiSettings, Protocol):
    """``sipis.config.ApiConfig`` as the server reads it: the app's settings plus listen."""

    @property
    def listen(self) -> _Listen: ...


class _TlsHypercornConfig(HypercornConfig):
    """Hypercorn config whose TLS context is ours (``api.tls.ssl_context_for``)."""

    def __init__(self, context_factory: Callable[[], ssl.SSLContext]) -> None:
        self._context_factory = context_factory
        self.live_context: ssl.SSLContext | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        if not self.ssl_enabled:
            return None
        self.live_context = self._context_factory()
        return self.live_context


class _ContainedTCPServer(TCPServer):
    """A hypercorn connection whose failure ends that connection only.

    Under trio, hypercorn runs every connection in the listener's nursery, so any exception
    a connection raises ends the whole server. One is reachable by any client: HTTP/2 DATA
    that arrives after the app has answered the stream (e.g. the rest of an oversize body
    after our 413) raises KeyError in hypercorn's h2 protocol (pgjones/hypercorn#329, fix
    not released in 0.18). Containing it here keeps the API up for everyone else.
    """

    async def run(self) -> None:
        try:
            await super().run()
        except Exception as exc:
            log.info("closed an HTTP connection after a server error (%s)", type(exc).__name__)
            log.debug("HTTP connection error", exc_info=exc)


def _contain_connection_errors() -> None:
    """Make hypercorn's trio worker build _ContainedTCPServer for each connection."""
    if getattr(hypercorn.trio.run, "TCPServer", None) is not _ContainedTCPServer:
        setattr(hypercorn.trio.run, "TCPServer", _ContainedTCPServer)  # noqa: B010


class _InFlight:
    """ASGI wrapper counting the HTTP requests being served, so a graceful stop can wait
    for them *before* hypercorn starts its own shutdown: hypercorn 0.18 sends an HTTP/2
    GOAWAY for a stream whose last DATA frame is still queued, truncating that response."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self.count:
            await self._idle.wait()


def _bind(host: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _port_of(bind: str) -> int:
    """The port of one of hypercorn's "https://host:port" strings."""
    return int(bind.rsplit(":", 1)[1])


class ApiServer:
    """The HTTPS API listener.

    Args (keyword-only):
        service: the instance service behind the API.
        config: ``sipis.config.ApiConfig`` (listen address, limits; tls.* is resolved by the
            caller into cert_file/key_file).
        ready: answers /readyz.
        cert_file, key_file: PEM certificate chain and key; both None serves plain HTTP
            (api.tls.enabled: false).
        expires: REGISTER expiry bounds for create bodies (config ``registrar.*``).
        calls: the call layer behind the fast-channel routes (progress, decline); None
            answers them 404.
    """

    def __init__(
        self,
        *,
        service: InstanceServiceAPI,
        config: ServerSettings,
        ready: Callable[[], bool],
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        expires: ExpiresPolicy | None = None,
        calls: CallControl | None = None,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        self.config = config
        self.app = build_app(
            service=service, config=config, ready=ready, expires=expires, calls=calls
        )
        self._in_flight = _InFlight(self.app)
        self.cert_file = cert_file
        self.key_file = key_file
        self.port: int | None = None
        self._shutdown = trio.Event()
        self._hc: HypercornConfig | None = None

    def reconfigure(self, config: ServerSettings, expires: ExpiresPolicy) -> None:
        """SIGHUP: new allow-lists and limits for the next requests (the listen address stays:
        that takes a restart)."""
        self.config = config
        self.app.state.api.reconfigure(config, expires)

    def reload_tls(self, cert_file: Path | str, key_file: Path | str) -> None:
        """SIGHUP: serve a renewed certificate from the next TLS handshake on; connections
        already open keep theirs. The pair is checked on a fresh context first, so a bad pair
        raises (OSError / ssl.SSLError) and changes nothing."""
        ssl_context_for(cert_file, key_file)  # validates the pair
        hc = self._hc
        live = hc.live_context if isinstance(hc, _TlsHypercornConfig) else None
        if live is None:
            raise RuntimeError("the API is not serving TLS")
        live.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
        self.cert_file, self.key_file = cert_file, key_file

    def request_shutdown(self) -> None:
        """Let in-flight requests finish (up to GRACEFUL_TIMEOUT), then close and return."""
        self._shutdown.set()

    async def _wait_shutdown(self) -> None:
        """hypercorn's shutdown trigger: returns when it is time to stop serving."""
        await self._shutdown.wait()
        with trio.move_on_after(GRACEFUL_TIMEOUT):
            await self._in_flight.wait_idle()
            await trio.sleep(FLUSH_GRACE)

    def _hypercorn_config(self) -> HypercornConfig:
        cert_file, key_file = self.cert_file, self.key_file
        if cert_file is not None and key_file is not None:
            hc: HypercornConfig = _TlsHypercornConfig(
                functools.partial(ssl_context_for, cert_file, key_file)
            )
            hc.certfile = str(cert_file)
            hc.keyfile = str(key_file)
            hc.alpn_protocols = list(ALPN_PROTOCOLS)
        else:
            hc = HypercornConfig()
        listen = self.config.listen
        hc.bind = [_bind(listen.host, listen.port)]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("sipis.api.http")
        hc.graceful_timeout = GRACEFUL_TIMEOUT
        hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        hc.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
        hc.read_timeout = int(max(MIN_READ_TIMEOUT, 2 * self.config.create_timeout))
        hc.include_server_header = False
        return hc

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until request_shutdown() or cancellation.

        ``task_status.started(port)`` is called with the bound port once the socket listens
        (so a configured port 0 reports the real one).

        Raises:
            OSError: the address cannot be bound. ssl.SSLError: the cert/key are unusable.
        """
        self._hc = hc = self._hypercorn_config()
        _contain_connection_errors()
        if self.cert_file is None:
            log.warning("HTTPS API without TLS on %s: only for tests and local proxies", hc.bind[0])
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                functools.partial(
                    serve,
                    cast("ASGIFramework", self._in_flight),
                    hc,
                    shutdown_trigger=self._wait_shutdown,
                    mode="asgi",
                )
            )
            self.port = _port_of(binds[0])
            log.info("HTTPS API listening on %s", ", ".join(binds))
            task_status.started(self.port)
        log.info("HTTPS API stopped")
