"""Shared fixtures. Real test peers (tests/peers/) are started per test on 127.0.0.1.

- `kamailio`: a started Kamailio registrar/proxy with users alice and bob (`DEFAULT_USERS`).
- `kamailio_factory(**KamailioConfig fields, port=None, start=True)`: custom providers.
- `dns_server_factory(records, ttl=30, port=None)`: a started dnsmasq serving `records`.
Every peer's log is attached to the report of a test that fails while it exists.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, Protocol

import pytest

from tests.peers import dnsserver
from tests.peers import kamailio as kamailio_peer
from tests.peers.dnsserver import DnsServer, Record
from tests.peers.kamailio import Kamailio, KamailioConfig

DEFAULT_USERS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw"}
_LOG_LINES = 300


class _HasLogs(Protocol):
    def iter_logs(self) -> Iterator[tuple[str, str]]: ...


_PEERS = pytest.StashKey[list[_HasLogs]]()


def _track(request: pytest.FixtureRequest, peer: _HasLogs) -> None:
    request.node.stash.setdefault(_PEERS, []).append(peer)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of each peer's log to a failing test's report."""
    report = yield
    if report.failed:
        for peer in item.stash.get(_PEERS, []):
            for title, text in peer.iter_logs():
                report.sections.append((title, "\n".join(text.splitlines()[-_LOG_LINES:])))
    return report


KamailioFactory = Callable[..., Kamailio]
DnsServerFactory = Callable[..., DnsServer]


@pytest.fixture
def kamailio_factory(request: pytest.FixtureRequest) -> Iterator[KamailioFactory]:
    """Build (and by default start) Kamailio peers; all are stopped and removed afterwards."""
    if not kamailio_peer.available():
        pytest.skip("kamailio/kamcmd not installed")
    made: list[Kamailio] = []

    def make(*, port: int | None = None, start: bool = True, **params: Any) -> Kamailio:
        params.setdefault("users", DEFAULT_USERS)
        peer = Kamailio(KamailioConfig(**params), port=port)
        made.append(peer)
        _track(request, peer)
        if start:
            peer.start()
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def kamailio(kamailio_factory: KamailioFactory) -> Kamailio:
    """A started Kamailio on 127.0.0.1 with users alice and bob, domain/realm "sip.test"."""
    return kamailio_factory()


@pytest.fixture
def dns_server_factory(request: pytest.FixtureRequest) -> Iterator[DnsServerFactory]:
    """Start dnsmasq instances serving given records; all are stopped afterwards."""
    if not dnsserver.available():
        pytest.skip("dnsmasq not installed")
    made: list[DnsServer] = []

    def make(
        records: Iterable[Record] = (), *, ttl: int = 30, port: int | None = None
    ) -> DnsServer:
        server = DnsServer(records, ttl=ttl, port=port)
        made.append(server)
        _track(request, server)
        server.start()
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """After the whole suite: no log line holds a password, secret or full push token.

    Every record logged anywhere in the run goes through both production formatters (logfmt
    and JSON, what journald gets); daemons run as subprocesses log to files that are read
    too.
    """
    import logging

    from tests.integration import harness

    handler = harness.install_log_capture()
    yield
    logging.getLogger().removeHandler(handler)
    harness.SENSITIVE.update(DEFAULT_USERS.values())
    texts = list(harness.LOG_LINES) + list(harness.JSON_LOG_LINES)
    for path in harness.SUBPROCESS_LOGS:
        if path.exists():
            texts.extend(path.read_text(errors="replace").splitlines())
    leaks = [(s, line) for line in texts for s in harness.SENSITIVE if s and s in line]
    assert not leaks, f"{len(leaks)} log lines hold a secret, e.g. {leaks[0][1][:200]!r}"


# -- pjsua2 phones and sipp callers (tests/peers/phone.py, tests/peers/caller.py) ----------

from tests.peers import caller as caller_peer  # noqa: E402
from tests.peers import phone as phone_peer  # noqa: E402
from tests.peers.caller import Caller, Transport  # noqa: E402
from tests.peers.phone import Phone  # noqa: E402

PhoneFactory = Callable[..., Phone]
CallerFactory = Callable[..., Caller]


@pytest.fixture
def phone_factory(request: pytest.FixtureRequest) -> Iterator[PhoneFactory]:
    """Start pjsua2 phones, one subprocess each: `make(name=None, start=True, log_level=4)`.

    Every phone is closed and its process reaped afterwards; its log (every SIP message
    at level 4) is attached to a failing test's report. For trio tests wrap one in
    `tests.peers.phone.AsyncPhone` (or pass start=False and `await AsyncPhone(p).start()`).
    """
    if not phone_peer.available():
        pytest.skip("pjsua2 (PyPI pjsua2-python) not installed")
    made: list[Phone] = []

    def make(*, name: str | None = None, start: bool = True, log_level: int = 4) -> Phone:
        phone = Phone(name=name, log_level=log_level)
        made.append(phone)
        _track(request, phone)
        if start:
            phone.start()
        return phone

    yield make
    for phone in made:
        phone.cleanup()


@pytest.fixture
def caller_factory(request: pytest.FixtureRequest) -> Iterator[CallerFactory]:
    """sipp callers: `make(target, *, domain, from_user="caller", transport="udp")`.

    `target` is the (host, port) the INVITEs go to, e.g. `kamailio.address`. Running sipp
    processes are killed afterwards; each finished run's message list goes into a failing
    test's report.
    """
    if not caller_peer.available():
        pytest.skip("sipp not installed")
    made: list[Caller] = []

    def make(
        target: tuple[str, int],
        *,
        domain: str,
        from_user: str = "caller",
        transport: Transport = "udp",
    ) -> Caller:
        caller = Caller(target, domain=domain, from_user=from_user, transport=transport)
        made.append(caller)
        _track(request, caller)
        return caller

    yield make
    for caller in made:
        caller.close()
