"""RFC 3263 client-side resolution of a SIP URI into an ordered list of targets.

Strategy: ``SipResolver.resolve`` turns a URI into the failover list of ``Target``s that the
endpoint tries in order (RFC 3263 §4.3): every NAPTR-selected (or guessed) SRV set, each SRV
target expanded to its addresses. Queries go through dnspython's asynchronous resolver on the
trio backend; answers are cached here, by record set, on trio's clock.

Rules (RFC 3263 §4.1, §4.2; RFC 2782):

- IP-literal host: no lookup; the port is the URI's or 5060 (5061 for TLS); the transport is
  the ``transport`` parameter, else UDP for ``sip:`` and TLS for ``sips:``.
- Explicit port: A/AAAA of the host only, same transport rule.
- Otherwise NAPTR: records with flag ``s`` and a service we speak (``SIP+D2U``, ``SIP+D2T``,
  ``SIPS+D2T``; only ``SIPS+D2T`` for a sips URI; only the ``transport`` parameter's when
  given), in (order, preference) order, each replacement queried for SRV.
- No usable NAPTR: SRV ``_sip._udp``, ``_sip._tcp``, ``_sips._tcp`` (only ``_sips._tcp`` for
  sips; only the ``transport`` parameter's when given), in that order.
- SRV sets are sorted by priority, and within one priority by the RFC 2782 weighted random
  draw (weight-0 records first in the running sums); a target of ``.`` means "no service".
- No SRV at all: A/AAAA of the host on 5060 (5061 for TLS), UDP unless the ``transport``
  parameter (or ``sips:``) says otherwise.
- A records come before AAAA records for one host name.
- Positive answers are cached for their TTL, capped at ``MAX_CACHE_TTL``; NXDOMAIN and empty
  answers for ``NEGATIVE_CACHE_TTL``. A DNS timeout ends the resolution at once (every further
  query would wait as long); SERVFAIL and friends count as "no records" and are not cached.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
from collections.abc import Iterable, Sequence

import attrs
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.NAPTR
import dns.rdtypes.IN.SRV
import dns.resolver
import trio

from sipis.sip.errors import ResolveError, excerpt
from sipis.sip.headers import URI

__all__ = [
    "DEFAULT_PORTS",
    "MAX_CACHE_TTL",
    "NEGATIVE_CACHE_TTL",
    "SipResolver",
    "Target",
    "default_transport",
    "order_srv",
]

log = logging.getLogger(__name__)

#: Default ports per transport (RFC 3261 §19.1.2, §26.2).
DEFAULT_PORTS: dict[str, int] = {"udp": 5060, "tcp": 5060, "tls": 5061}

#: Longest time (s) a positive answer is kept, whatever its TTL: providers move registrars.
MAX_CACHE_TTL = 300.0

#: How long (s) an NXDOMAIN or an empty answer is kept, so a broken domain is not hammered.
NEGATIVE_CACHE_TTL = 30.0

#: Most record sets kept; the oldest entry goes first when full.
MAX_CACHE_ENTRIES = 4096

# NAPTR service field → our transport name (RFC 3263 §4.1).
_NAPTR_SERVICES: dict[str, str] = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}
# Transport → SRV owner-name prefix, in our order of preference when guessing (§4.1).
_SRV_PREFIXES: dict[str, str] = {"udp": "_sip._udp.", "tcp": "_sip._tcp.", "tls": "_sips._tcp."}

_Rdatas = tuple[dns.rdata.Rdata, ...]


@attrs.frozen
class Target:
    """One place to send a request: transport, IP address and port.

    ``server_name`` is the SIP domain the target was found for (a TLS client checks the
    server certificate against it, RFC 5922); None for an IP-literal URI.
    """

    transport: str  # "udp" | "tcp" | "tls"
    host: str  # an IP literal, IPv6 without brackets
    port: int
    server_name: str | None = None


def default_transport(uri: URI) -> str:
    """The transport for a URI without NAPTR/SRV help: its parameter, else UDP (TLS for sips).

    ``transport=tcp`` on a sips URI means TLS (RFC 3261 §26.2.2: sips over TCP is TLS).

    Raises:
        ResolveError: a transport we do not speak (``sctp``, ``ws``...) or sips over UDP.
    """
    wanted = uri.transport
    secure = uri.scheme == "sips"
    if wanted is None:
        return "tls" if secure else "udp"
    if wanted not in DEFAULT_PORTS:
        raise ResolveError(f"unsupported transport {excerpt(wanted)} in {excerpt(str(uri))}")
    if secure:
        if wanted == "udp":
            raise ResolveError("a sips URI cannot use UDP")
        return "tls"
    return wanted


def _allowed_transports(uri: URI) -> tuple[str, ...]:
    """Transports RFC 3263 may pick for ``uri``, in our order of preference."""
    if uri.transport is not None:
        return (default_transport(uri),)
    if uri.scheme == "sips":
        return ("tls",)
    return ("udp", "tcp", "tls")


def order_srv(
    records: Iterable[tuple[int, int, int, str]], rng: random.Random
) -> list[tuple[int, int, int, str]]:
    """Order SRV records ``(priority, weight, port, target)`` per RFC 2782.

    Lowest priority first; within a priority, repeatedly draw a record with probability
    proportional to its weight (weight-0 records lead the running sums, so they are only
    picked early when nothing else is left or all weights are zero).
    """
    by_priority: dict[int, list[tuple[int, int, int, str]]] = {}
    for record in records:
        by_priority.setdefault(record[0], []).append(record)
    ordered: list[tuple[int, int, int, str]] = []
    for priority in sorted(by_priority):
        group = sorted(by_priority[priority], key=lambda r: r[1] != 0)  # weight 0 first
        while group:
            total = sum(r[1] for r in group)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(group):
                running += record[1]
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


def _ip_literal(host: str) -> bool:
    return _normal_ip(host) is not None


@functools.lru_cache(maxsize=1024)
def _normal_ip(host: str) -> str | None:
    """The canonical text of an IP literal, None for a name (cached: asked per REGISTER)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class _Timeout(Exception):
    """Internal: the DNS server did not answer; stop resolving."""


class SipResolver:
    """RFC 3263 resolver with a TTL cache (see the module rules).

    Args:
        nameservers: IP addresses of the DNS servers to ask; empty means the system's
            ``/etc/resolv.conf``.
        port: their UDP/TCP port.
        timeout: seconds to wait for one query (all servers together) before giving up.
        rng: the random source for SRV weights (tests pass a seeded one).
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        port: int = 53,
        timeout: float = 2.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.timeout = timeout
        # Load balancing, not security: a predictable draw harms nobody.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._cache: dict[tuple[str, int], tuple[float, _Rdatas]] = {}
        self._config_error: str | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        try:
            if nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(address, port) for address in nameservers
                ]
            else:
                resolver = dns.asyncresolver.Resolver(configure=True)
        except (dns.exception.DNSException, ValueError, OSError) as exc:
            self._config_error = f"no usable DNS configuration ({exc})"
        else:
            resolver.timeout = timeout
            resolver.lifetime = timeout
            resolver.cache = None  # ours is on trio's clock and capped
            self._resolver = resolver
        self.queries_sent = 0

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    def resolve_now(self, uri: URI) -> list[Target] | None:
        """``resolve`` when no lookup is needed (the host is an IP literal): its targets, or
        None for a name. Lets a caller go on without waiting when nothing can block.

        Raises:
            ResolveError: a non-SIP URI or an unsupported transport, as ``resolve``.
        """
        if uri.scheme not in ("sip", "sips") or not uri.host:
            raise ResolveError(f"cannot resolve a {uri.scheme}: URI")
        address = _normal_ip(uri.host.rstrip("."))  # "192.0.2.1." is the literal too
        if address is None:
            return None
        transport = default_transport(uri)
        port = uri.port if uri.port is not None else DEFAULT_PORTS[transport]
        return [Target(transport, address, port, None)]

    async def resolve(self, uri: URI) -> list[Target]:
        """Resolve ``uri`` (its host, port and ``transport`` parameter) to the failover list.

        Returns:
            Every target in the order to try, never empty; duplicates removed.

        Raises:
            ResolveError: a non-SIP URI, an unsupported transport, a DNS timeout, or no
                address at all.
        """
        literal = self.resolve_now(uri)
        if literal is not None:
            return literal
        host = uri.host.rstrip(".")
        if self._resolver is None:
            raise ResolveError(self._config_error or "no DNS configuration")
        try:
            targets = await self._resolve_name(uri, host)
        except _Timeout as exc:
            raise ResolveError(f"DNS timeout resolving {excerpt(host)}: {exc}") from None
        unique = list(dict.fromkeys(targets))
        if not unique:
            raise ResolveError(f"no SIP target found for {excerpt(host)}")
        return unique

    async def _resolve_name(self, uri: URI, host: str) -> list[Target]:
        if uri.port is not None:  # §4.2: an explicit port means no NAPTR and no SRV
            transport = default_transport(uri)
            return [Target(transport, address, uri.port, host)
                    for address in await self._addresses(host)]
        allowed = _allowed_transports(uri)
        targets: list[Target] = []
        found_srv = False
        for transport, srv_name in await self._naptr(host, allowed):
            srv = await self._srv(srv_name)
            found_srv = found_srv or bool(srv)
            targets.extend(await self._expand(srv, transport, host))
        if not found_srv:  # no (usable) NAPTR, or NAPTR pointing at nothing: guess SRV names
            for transport in allowed:
                srv = await self._srv(_SRV_PREFIXES[transport] + host)
                found_srv = found_srv or bool(srv)
                targets.extend(await self._expand(srv, transport, host))
        if not found_srv:  # §4.2: plain A/AAAA on the default port
            transport = default_transport(uri)
            port = DEFAULT_PORTS[transport]
            targets.extend(Target(transport, address, port, host)
                           for address in await self._addresses(host))
        return targets

    async def _naptr(self, host: str, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
        """(transport, SRV name) for the usable NAPTR records of ``host``, best first."""
        usable: list[tuple[int, int, str, str]] = []
        for rdata in await self._query(host, dns.rdatatype.NAPTR):
            if not isinstance(rdata, dns.rdtypes.IN.NAPTR.NAPTR):
                continue
            if rdata.flags.lower() != b"s":
                continue
            transport = _NAPTR_SERVICES.get(rdata.service.decode("ascii", "replace").upper())
            if transport is None or transport not in allowed:
                continue
            name = rdata.replacement.to_text(omit_final_dot=True)
            usable.append((rdata.order, rdata.preference, transport, name))
        usable.sort(key=lambda item: (item[0], item[1]))
        return [(transport, name) for _, _, transport, name in usable]

    async def _srv(self, name: str) -> list[tuple[int, int, int, str]]:
        """SRV records of ``name`` in RFC 2782 order; ``.`` targets dropped."""
        records = []
        for rdata in await self._query(name, dns.rdatatype.SRV):
            if not isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
                continue
            if rdata.target == dns.name.root:
                continue
            target = rdata.target.to_text(omit_final_dot=True)
            records.append((rdata.priority, rdata.weight, rdata.port, target))
        return order_srv(records, self._rng)

    async def _expand(
        self, srv: list[tuple[int, int, int, str]], transport: str, domain: str
    ) -> list[Target]:
        targets: list[Target] = []
        for _, _, port, name in srv:
            targets.extend(Target(transport, address, port, domain)
                           for address in await self._addresses(name))
        return targets

    async def _addresses(self, name: str) -> list[str]:
        """A then AAAA addresses of ``name``."""
        if _ip_literal(name):  # an SRV target may (wrongly, but it happens) be a literal
            return [name]
        addresses: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rdata in await self._query(name, rdtype):
                if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                    addresses.append(str(ipaddress.ip_address(rdata.address)))
        return addresses

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Rdatas:
        """The records of (name, rdtype), from the cache or the DNS; () for none.

        Raises:
            _Timeout: no server answered in time.
        """
        key = (name.lower(), int(rdtype))
        now = trio.current_time()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[key]
        assert self._resolver is not None
        self.queries_sent += 1
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(name),
                rdtype,
                search=False,
                raise_on_no_answer=False,
                backend=dns.asyncbackend.get_backend("trio"),
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self._store(key, now + NEGATIVE_CACHE_TTL, ())
            return ()
        except dns.exception.Timeout as exc:
            raise _Timeout(str(exc)) from None
        except dns.exception.DNSException as exc:
            # SERVFAIL, REFUSED, a malformed answer...: nothing usable here, try the next step.
            log.info("DNS %s %s failed: %s", dns.rdatatype.to_text(rdtype), excerpt(name), exc)
            return ()
        if answer.rrset is None:
            self._store(key, now + NEGATIVE_CACHE_TTL, ())
            return ()
        rdatas: _Rdatas = tuple(answer.rrset)
        self._store(key, now + min(float(answer.rrset.ttl), MAX_CACHE_TTL), rdatas)
        return rdatas

    def _store(self, key: tuple[str, int], expires: float, rdatas: _Rdatas) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (expires, rdatas)
