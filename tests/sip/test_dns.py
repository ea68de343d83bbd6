"""RFC 3263 resolution against a real DNS server (dnsmasq) on 127.0.0.1."""

from __future__ import annotations

import random
import socket

import pytest
import trio
import trio.testing

from sipis.sip.dns import NEGATIVE_CACHE_TTL, SipResolver, Target, order_srv
from sipis.sip.errors import ResolveError
from sipis.sip.headers import URI
from tests.conftest import DnsServerFactory
from tests.peers.dnsserver import AAAA, NAPTR, SRV, A, DnsServer


def resolver_for(server: DnsServer, **kwargs: float) -> SipResolver:
    return SipResolver([server.host], port=server.port, rng=random.Random(7), **kwargs)


def uri(text: str) -> URI:
    return URI.parse(text)


# --- no DNS at all --------------------------------------------------------------------------


async def test_an_ip_literal_needs_no_lookup_and_gets_default_ports() -> None:
    """An IP-literal host is used as it is: udp/5060 for sip, tls/5061 for sips."""
    resolver = SipResolver(["127.0.0.1"], port=9)  # nothing listens there; nothing is asked
    assert await resolver.resolve(uri("sip:alice@127.0.0.1")) == [
        Target("udp", "127.0.0.1", 5060)]
    assert await resolver.resolve(uri("sips:127.0.0.1")) == [Target("tls", "127.0.0.1", 5061)]
    assert await resolver.resolve(uri("sip:127.0.0.1:5070;transport=TCP")) == [
        Target("tcp", "127.0.0.1", 5070)]
    assert await resolver.resolve(uri("sip:[::1]:5080")) == [Target("udp", "::1", 5080)]
    # A fully qualified (trailing-dot) literal is the literal, with or without a lookup.
    assert await resolver.resolve(uri("sip:127.0.0.1.:5070")) == [
        Target("udp", "127.0.0.1", 5070)]
    assert resolver.resolve_now(uri("sip:127.0.0.1.")) == [Target("udp", "127.0.0.1", 5060)]
    assert resolver.resolve_now(uri("sip:example.net")) is None
    assert resolver.queries_sent == 0


async def test_an_unsupported_transport_or_scheme_is_a_resolve_error() -> None:
    """transport=sctp and tel: URIs cannot be resolved to anything we can send on."""
    resolver = SipResolver(["127.0.0.1"], port=9)
    with pytest.raises(ResolveError, match="unsupported transport"):
        await resolver.resolve(uri("sip:127.0.0.1;transport=sctp"))
    with pytest.raises(ResolveError):
        await resolver.resolve(uri("tel:+4930123456"))
    with pytest.raises(ResolveError, match="UDP"):
        await resolver.resolve(uri("sips:127.0.0.1;transport=udp"))


def test_srv_records_are_ordered_by_priority_then_weighted_draw() -> None:
    """Lower priority first; within a priority a heavier record leads far more often."""
    records = [(20, 0, 5060, "c"), (10, 1, 5060, "light"), (10, 99, 5060, "heavy")]
    firsts = {"heavy": 0, "light": 0}
    rng = random.Random(1)
    for _ in range(400):
        ordered = order_srv(records, rng)
        assert ordered[-1][3] == "c"
        assert {r[3] for r in ordered[:2]} == {"heavy", "light"}
        firsts[ordered[0][3]] += 1
    assert firsts["heavy"] > 300
    assert firsts["light"] > 0


def test_zero_weight_srv_records_are_still_all_returned() -> None:
    """Records of weight 0 take part in the draw and are never dropped (RFC 2782)."""
    records = [(10, 0, 1, "a"), (10, 0, 2, "b"), (10, 0, 3, "c")]
    ordered = order_srv(records, random.Random(3))
    assert sorted(ordered) == sorted(records)


# --- against dnsmasq -----------------------------------------------------------------------


async def test_naptr_then_srv_then_a_gives_the_failover_order(
    dns_server_factory: DnsServerFactory,
) -> None:
    """NAPTR order picks TCP before UDP; each SRV set by priority; each target's addresses."""
    server = dns_server_factory([
        NAPTR("example.test", 10, 50, "SIP+D2T", "_sip._tcp.example.test"),
        NAPTR("example.test", 20, 50, "SIP+D2U", "_sip._udp.example.test"),
        NAPTR("example.test", 5, 50, "E2U+sip", "_sip._udp.example.test"),  # not SIP: ignored
        SRV("_sip._tcp.example.test", "b.example.test", 5070, priority=20),
        SRV("_sip._tcp.example.test", "a.example.test", 5060, priority=10),
        SRV("_sip._udp.example.test", "a.example.test", 5062, priority=10),
        A("a.example.test", "127.0.0.2"),
        A("b.example.test", "127.0.0.3"),
        AAAA("b.example.test", "::1"),
    ])
    targets = await resolver_for(server).resolve(uri("sip:alice@example.test"))
    assert targets == [
        Target("tcp", "127.0.0.2", 5060, "example.test"),
        Target("tcp", "127.0.0.3", 5070, "example.test"),
        Target("tcp", "::1", 5070, "example.test"),
        Target("udp", "127.0.0.2", 5062, "example.test"),
    ]


async def test_a_transport_parameter_restricts_the_naptr_choice(
    dns_server_factory: DnsServerFactory,
) -> None:
    """With ;transport=udp only the SIP+D2U NAPTR record is followed."""
    server = dns_server_factory([
        NAPTR("example.test", 10, 50, "SIP+D2T", "_sip._tcp.example.test"),
        NAPTR("example.test", 20, 50, "SIP+D2U", "_sip._udp.example.test"),
        SRV("_sip._tcp.example.test", "a.example.test", 5060),
        SRV("_sip._udp.example.test", "a.example.test", 5062),
        A("a.example.test", "127.0.0.2"),
    ])
    targets = await resolver_for(server).resolve(uri("sip:example.test;transport=udp"))
    assert targets == [Target("udp", "127.0.0.2", 5062, "example.test")]
    assert ("SRV", "_sip._tcp.example.test") not in server.queries()


async def test_without_naptr_the_srv_names_are_tried_in_our_order(
    dns_server_factory: DnsServerFactory,
) -> None:
    """No NAPTR: _sip._udp, _sip._tcp and _sips._tcp are all looked up, UDP first."""
    server = dns_server_factory([
        SRV("_sips._tcp.example.test", "a.example.test", 5061),
        SRV("_sip._tcp.example.test", "a.example.test", 5060),
        A("a.example.test", "127.0.0.2"),
    ])
    targets = await resolver_for(server).resolve(uri("sip:example.test"))
    assert targets == [
        Target("tcp", "127.0.0.2", 5060, "example.test"),
        Target("tls", "127.0.0.2", 5061, "example.test"),
    ]
    assert ("SRV", "_sip._udp.example.test") in server.queries()


async def test_a_sips_uri_only_looks_for_tls(dns_server_factory: DnsServerFactory) -> None:
    """sips: uses _sips._tcp only, never a UDP or TCP target."""
    server = dns_server_factory([
        SRV("_sip._udp.example.test", "a.example.test", 5060),
        SRV("_sips._tcp.example.test", "a.example.test", 5061),
        A("a.example.test", "127.0.0.2"),
    ])
    targets = await resolver_for(server).resolve(uri("sips:example.test"))
    assert targets == [Target("tls", "127.0.0.2", 5061, "example.test")]


async def test_srv_targets_within_a_priority_follow_the_weights(
    dns_server_factory: DnsServerFactory,
) -> None:
    """Two SRV records of one priority are both returned; the heavy one usually leads."""
    server = dns_server_factory([
        SRV("_sip._udp.example.test", "heavy.example.test", 5060, priority=10, weight=90),
        SRV("_sip._udp.example.test", "light.example.test", 5060, priority=10, weight=10),
        A("heavy.example.test", "127.0.0.2"),
        A("light.example.test", "127.0.0.3"),
    ])
    resolver = resolver_for(server)
    leaders = []
    for _ in range(30):
        targets = await resolver.resolve(uri("sip:example.test;transport=udp"))
        assert {t.host for t in targets} == {"127.0.0.2", "127.0.0.3"}
        leaders.append(targets[0].host)
    assert leaders.count("127.0.0.2") > 15


async def test_no_srv_falls_back_to_a_records_on_5060(
    dns_server_factory: DnsServerFactory,
) -> None:
    """Neither NAPTR nor SRV: the host's addresses on the default port, UDP unless told."""
    server = dns_server_factory([A("sip.example.test", "127.0.0.2")])
    resolver = resolver_for(server)
    assert await resolver.resolve(uri("sip:alice@sip.example.test")) == [
        Target("udp", "127.0.0.2", 5060, "sip.example.test")]
    assert await resolver.resolve(uri("sip:sip.example.test;transport=tcp")) == [
        Target("tcp", "127.0.0.2", 5060, "sip.example.test")]
    assert await resolver.resolve(uri("sips:sip.example.test")) == [
        Target("tls", "127.0.0.2", 5061, "sip.example.test")]


async def test_an_explicit_port_skips_naptr_and_srv(dns_server_factory: DnsServerFactory) -> None:
    """host:port means A/AAAA only (RFC 3263 §4.2), even if SRV records exist."""
    server = dns_server_factory([
        NAPTR("example.test", 10, 50, "SIP+D2T", "_sip._tcp.example.test"),
        SRV("_sip._tcp.example.test", "a.example.test", 5099),
        A("example.test", "127.0.0.4"),
    ])
    targets = await resolver_for(server).resolve(uri("sip:example.test:5080;transport=tcp"))
    assert targets == [Target("tcp", "127.0.0.4", 5080, "example.test")]
    assert {qtype for qtype, _ in server.queries()} <= {"A", "AAAA"}


async def test_answers_are_cached_until_their_ttl_runs_out(
    dns_server_factory: DnsServerFactory, mock_clock: trio.testing.MockClock
) -> None:
    """A second resolution within the TTL asks nothing; after the TTL it asks again."""
    server = dns_server_factory([A("sip.example.test", "127.0.0.2")], ttl=60)
    resolver = resolver_for(server)
    first = await resolver.resolve(uri("sip:sip.example.test"))
    sent = resolver.queries_sent
    assert await resolver.resolve(uri("sip:sip.example.test")) == first
    assert resolver.queries_sent == sent
    mock_clock.jump(61)
    assert await resolver.resolve(uri("sip:sip.example.test")) == first
    assert resolver.queries_sent == 2 * sent


async def test_nxdomain_is_a_resolve_error_and_is_cached_briefly(
    dns_server_factory: DnsServerFactory, mock_clock: trio.testing.MockClock
) -> None:
    """An unknown domain raises ResolveError; asking again soon sends no query."""
    server = dns_server_factory([A("other.example.test", "127.0.0.2")])
    resolver = resolver_for(server)
    with pytest.raises(ResolveError, match="no SIP target"):
        await resolver.resolve(uri("sip:nowhere.example.test"))
    sent = resolver.queries_sent
    assert sent > 0
    with pytest.raises(ResolveError):
        await resolver.resolve(uri("sip:nowhere.example.test"))
    assert resolver.queries_sent == sent
    mock_clock.jump(NEGATIVE_CACHE_TTL + 1)
    with pytest.raises(ResolveError):
        await resolver.resolve(uri("sip:nowhere.example.test"))
    assert resolver.queries_sent == 2 * sent


async def test_a_dns_server_that_never_answers_gives_a_resolve_error() -> None:
    """A silent server: ResolveError naming the timeout, after one query's timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = SipResolver(["127.0.0.1"], port=silent.getsockname()[1], timeout=0.2)
        with trio.fail_after(3):
            with pytest.raises(ResolveError, match="timeout"):
                await resolver.resolve(uri("sip:example.test"))
        assert resolver.queries_sent == 1
