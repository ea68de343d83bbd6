"""Stateful-proxy rules that put sipis in the path between the provider and the woken phone.

Strategy (sans-IO): pure functions over ``SipRequest``/``SipResponse``. The driver keeps the
transactions (RFC 3261 §16.2: one server transaction upstream, one client transaction toward
the device), calls these to build what it sends, and decides where packets go. No socket, no
clock, no dialog table.

Rules:

- Initial INVITE (provider → device), RFC 3261 §16.6: ``forward_request`` with the device
  binding's Contact as ``target_uri`` and ``RecordRouteSigner.record_route`` values. Our Via
  (with ``rport``, RFC 3581) goes on top, Max-Forwards goes down by one (0 → ``TooManyHops``,
  answer 483), Route entries naming us are removed, the body is never touched.
- Record-Route: one entry when both legs use the same ``ProxyIdentity``, else two (RFC 5658
  "double Record-Route"): the top one faces the device, the next one faces the provider, so
  that each UA's first route is an address it can reach over its own transport. Every entry
  is ``<sip:host:port;transport=..;lr;r=TOKEN[;leg=p|d];sipis>``.
- TOKEN = ``<hmac>.<instance>``: HMAC-SHA256(key, Call-ID, caller's From tag, instance)
  truncated to 128 bits, so it is verified without state and cannot be forged for another
  dialog or another instance. ``leg`` is not covered by the MAC: it only says which side an
  entry faces, it never chooses where a request goes.
- In-dialog requests (ACK for 2xx, BYE, re-INVITE, UPDATE, INFO, PRACK, NOTIFY...):
  ``process_route`` applies §16.4 (strict-router compatibility, then removal of our own
  top Route entries), checks that at least one removed entry carries a token that verifies
  for this Call-ID, and reports the next hop (§16.12 loose/strict next hop) and the direction.
  The direction comes from which tag the MAC verifies with: the caller's tag in From means the
  request comes from the provider (toward the device), in To that it comes from the device.
  Anything else is ``RelayRefused`` (answer 403): no open relay.
- Responses, §16.7: ``forward_response`` pops our Via (None = not ours, or meant for us, or a
  100 Trying, which is hop-by-hop: drop it). Record-Route is left as received; if a
  dialog-creating response lost our entries, they are put back on top.
- CANCEL (§9.1/§16.10) and the ACK for a non-2xx final response (§17.1.1.3) are hop-by-hop:
  ``make_cancel`` and ``make_ack_for_non2xx`` build them from the INVITE we forwarded.
- NAT (RFC 3581, RFC 5626): requests to a device binding go to the REGISTER's source address
  and flow (``nat_target``); the binding's Contact only becomes the Request-URI.

What stays with the driver: transaction matching, choosing the branch (``new_branch``), sending
toward the device over the binding's flow, and checking that a ``RouteDecision`` toward the
provider names the instance's provider (its registrar/outbound proxy or the source of the
INVITE) before sending anything.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs

from sipis import fastenum
from sipis.sip.errors import SipError, SipParseError
from sipis.sip.headers import URI, Address, CSeq, Via
from sipis.sip.message import BRANCH_MAGIC_COOKIE, Headers, SipRequest, SipResponse

__all__ = [
    "DEFAULT_MAX_FORWARDS",
    "DIALOG_PARAM",
    "LEG_PARAM",
    "MARKER_PARAM",
    "DialogRef",
    "Leg",
    "ProxyError",
    "ProxyIdentity",
    "RecordRouteSigner",
    "RelayRefused",
    "RouteDecision",
    "TooManyHops",
    "forward_request",
    "forward_response",
    "is_ours_for",
    "make_ack_for_non2xx",
    "make_cancel",
    "nat_target",
    "parse_record_route_token",
    "process_route",
]

#: RFC 3261 §16.6 step 3 / §8.1.1.6: the Max-Forwards a request gets when it has none.
DEFAULT_MAX_FORWARDS: Final = 70
#: URI parameter holding the dialog token in our Record-Route entries.
DIALOG_PARAM: Final = "r"
#: Valueless URI parameter marking a Record-Route entry as sipis's own.
MARKER_PARAM: Final = "sipis"
#: URI parameter saying which side a double Record-Route entry faces.
LEG_PARAM: Final = "leg"

_MAC_BYTES = 16  # 128 bits: unguessable, and short enough for a URI parameter
_MIN_KEY_BYTES = 16
_MAC_DOMAIN = b"sipis record-route v1"
_TOKEN_RE = re.compile(r"([0-9a-f]{32})\.(.+)")
_SIP_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_TRANSPORTS = frozenset({"udp", "tcp", "tls"})
# Characters an instance id keeps in the token; the rest is %-escaped (RFC 3261 paramchar).
_INSTANCE_SAFE = "-_~"


# ---------------------------------------------------------------------------------------------
# errors


class ProxyError(SipError):
    """A request sipis will not forward; answer ``status`` (with ``reason``) upstream."""

    status: int = 500
    reason: str = "Server Internal Error"


class TooManyHops(ProxyError):
    """Max-Forwards was 0 (RFC 3261 §16.3 step 3): answer 483, do not forward."""

    status = 483
    reason = "Too Many Hops"


class RelayRefused(ProxyError):
    """The request would leave the dialogs sipis record-routed (no open relay): answer 403.

    Raised when no Route through us carries a token we issued for this dialog, when a token
    does not verify (forged, another dialog, another instance, an old key), or when the
    request cannot be routed at all.
    """

    status = 403
    reason = "Relaying Forbidden"


# ---------------------------------------------------------------------------------------------
# values


def _lower(value: str) -> str:
    return value.lower()


@attrs.frozen
class ProxyIdentity:
    """One of sipis's own SIP addresses, as put in Via and Record-Route on one leg.

    ``transport`` is ``udp``, ``tcp`` or ``tls`` (stored lower case); ``host`` is what the
    peer on that leg can reach (a public name or address, IPv6 without brackets).
    """

    host: str
    port: int
    transport: str = attrs.field(converter=_lower)

    def __attrs_post_init__(self) -> None:
        if not self.host:
            raise ValueError("ProxyIdentity host is empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"ProxyIdentity port {self.port} outside 1..65535")
        if self.transport not in _TRANSPORTS:
            raise ValueError(f"ProxyIdentity transport {self.transport!r} is not udp/tcp/tls")

    def uri(self, *params: tuple[str, str | None]) -> URI:
        """``sip:host:port[;transport=t]`` plus ``params`` (UDP is the default, left out)."""
        base: tuple[tuple[str, str | None], ...] = ()
        if self.transport != "udp":
            base = (("transport", self.transport),)
        return URI("sip", None, self.host, self.port, base + params)

    def via(self, branch: str) -> Via:
        """Our Via on this leg: ``SIP/2.0/T host:port;branch=..;rport`` (RFC 3581)."""
        return Via(self.transport.upper(), self.host, self.port,
                   (("branch", branch), ("rport", None)))


class Leg(fastenum.Enum):
    """A side of sipis in a proxied dialog."""

    PROVIDER = "p"  #: toward the SIP provider (the caller's side: INVITEs come from here)
    DEVICE = "d"  #: toward the phone's device binding (the callee's side)


@attrs.frozen
class DialogRef:
    """What a Record-Route entry of ours says (unverified until ``RecordRouteSigner.verify``).

    ``leg`` is the side the entry faces in a double Record-Route, None for a single entry
    (it faces both).
    """

    instance_id: str
    leg: Leg | None
    mac: str = attrs.field(repr=False)


@attrs.frozen
class RouteDecision:
    """Where an in-dialog request goes after our Route entries are removed.

    ``request``: the request with our Route entries removed (and the Request-URI restored if
    a strict router put ours there); forward it with ``forward_request``.
    ``next_hop_uri``: the URI to send to (first remaining Route, else the Request-URI).
    ``dialog``: the verified token's instance. ``toward``: the leg the request must go out on;
    toward ``DEVICE`` send over the binding (``nat_target``), toward ``PROVIDER`` check that
    ``next_hop_uri`` is the instance's provider first.
    """

    next_hop_uri: URI
    request: SipRequest
    dialog: DialogRef
    toward: Leg


# ---------------------------------------------------------------------------------------------
# Record-Route tokens


def _field(data: str) -> bytes:
    raw = data.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(4, "big") + raw  # length-prefixed: no field can bleed into another


def parse_record_route_token(uri: URI) -> DialogRef | None:
    """Read our token from a Record-Route/Route URI, without verifying it.

    Returns:
        None when the URI is not one of our entries (no ``sipis`` marker) or its token is
        malformed; else the instance, leg and MAC it claims.
    """
    if not uri.has_param(MARKER_PARAM):
        return None
    value = uri.param(DIALOG_PARAM)
    if value is None:
        return None
    m = _TOKEN_RE.fullmatch(value)
    if m is None:
        return None
    try:
        instance_id = urllib.parse.unquote(m.group(2), errors="strict")
    except UnicodeDecodeError:
        return None
    leg_value = uri.param(LEG_PARAM)
    leg: Leg | None = None
    if leg_value is not None:
        try:
            leg = Leg(leg_value)
        except ValueError:
            return None
    return DialogRef(instance_id, leg, m.group(1))


class RecordRouteSigner:
    """Issues and verifies the dialog tokens in our Record-Route entries (HMAC-SHA256).

    Args:
        key: at least 16 secret bytes. Keep it across restarts (derive it from the store's
            key ring) and dialogs in progress keep working after one.
        previous_keys: older keys still accepted by ``verify`` (rotation).
    """

    __slots__ = ("_keys",)

    def __init__(self, key: bytes, *, previous_keys: Sequence[bytes] = ()) -> None:
        for k in (key, *previous_keys):
            if len(k) < _MIN_KEY_BYTES:
                raise ValueError(f"Record-Route key shorter than {_MIN_KEY_BYTES} bytes")
        self._keys: tuple[bytes, ...] = (bytes(key), *(bytes(k) for k in previous_keys))

    def __repr__(self) -> str:
        return f"RecordRouteSigner(<{len(self._keys)} key(s) hidden>)"

    def _mac(self, key: bytes, call_id: str, from_tag: str, instance_id: str) -> str:
        msg = _MAC_DOMAIN + _field(call_id) + _field(from_tag) + _field(instance_id)
        return hmac.new(key, msg, hashlib.sha256).digest()[:_MAC_BYTES].hex()

    def dialog_token(self, call_id: str, from_tag: str, instance_id: str) -> str:
        """The ``r=`` value for a dialog: ``<128-bit hmac hex>.<instance id, %-escaped>``.

        ``from_tag`` is the caller's tag (From of the initial INVITE; "" if it had none). The
        instance id is visible to both peers: pass an identifier that is not a secret.
        """
        if not instance_id:
            raise ValueError("empty instance id")
        mac = self._mac(self._keys[0], call_id, from_tag, instance_id)
        escaped = urllib.parse.quote(instance_id.encode("utf-8", "surrogatepass"),
                                     safe=_INSTANCE_SAFE)
        return f"{mac}.{escaped}"

    def verify(self, uri: URI, *, call_id: str, tag: str) -> DialogRef | None:
        """Check our token in ``uri`` against ``call_id`` and a candidate caller ``tag``.

        Returns:
            The token's ``DialogRef`` if it is ours and was issued for this Call-ID and tag,
            else None.
        """
        ref = parse_record_route_token(uri)
        if ref is None:
            return None
        for key in self._keys:
            expected = self._mac(key, call_id, tag, ref.instance_id)
            if hmac.compare_digest(expected, ref.mac):
                return ref
        return None

    def record_route(
        self,
        *,
        call_id: str,
        from_tag: str,
        instance_id: str,
        upstream: ProxyIdentity,
        device: ProxyIdentity,
    ) -> list[str]:
        """Record-Route values for an initial INVITE, top first (for ``forward_request``).

        One entry when both legs use the same identity; else two (RFC 5658): the device-facing
        entry on top (the callee's route set starts with it), the provider-facing one below
        (the caller's route set, reversed, reaches it first).
        """
        token = self.dialog_token(call_id, from_tag, instance_id)
        if upstream == device:
            return [f"<{upstream.uri(('lr', None), (DIALOG_PARAM, token), (MARKER_PARAM, None))}>"]
        values = []
        for identity, leg in ((device, Leg.DEVICE), (upstream, Leg.PROVIDER)):
            uri = identity.uri(("lr", None), (DIALOG_PARAM, token), (LEG_PARAM, leg.value),
                               (MARKER_PARAM, None))
            values.append(f"<{uri}>")
        return values


# ---------------------------------------------------------------------------------------------
# identity matching and NAT


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _default_port(uri: URI) -> int:
    return 5061 if uri.scheme == "sips" or uri.transport == "tls" else 5060


def is_ours_for(
    identities: Iterable[ProxyIdentity], *, extra_hosts: Iterable[tuple[str, int]] = ()
) -> Callable[[URI], bool]:
    """A predicate for ``process_route``/``forward_request``: does ``uri`` name sipis?

    Compares host (case-insensitive, IP addresses normalised) and port (5060, or 5061 for
    sips/TLS, when the URI has none); the transport is not compared, since UDP and TCP share
    the port. ``extra_hosts`` adds other ``(host, port)`` pairs that reach us (a listening
    address behind the advertised name).
    """
    ours = {(_normal_host(i.host), i.port) for i in identities}
    ours.update((_normal_host(h), p) for h, p in extra_hosts)

    def is_ours(uri: URI) -> bool:
        if uri.scheme == "tel":
            return False
        port = uri.port if uri.port is not None else _default_port(uri)
        return (_normal_host(uri.host), port) in ours

    return is_ours


def nat_target(binding_source: tuple[str, str, int], contact: URI) -> tuple[str, str, int]:
    """Where packets for a device binding go: the REGISTER's source, not the Contact's host.

    A phone behind NAT registers a Contact with its private address; only the address and
    port the REGISTER came from (RFC 3581 received/rport) reach it through the NAT, and over
    TCP/TLS only the flow the REGISTER came on (RFC 5626): send there, over that flow. The
    Contact stays the Request-URI, where the phone recognises itself.

    Args:
        binding_source: ``(transport, host, port)`` the REGISTER was received from.
        contact: the binding's Contact URI (checked, not used for addressing).

    Raises:
        ValueError: an unknown transport, a port outside 1..65535, or a tel: Contact.
    """
    transport, host, port = binding_source
    transport = transport.lower()
    if transport not in _TRANSPORTS:
        raise ValueError(f"binding transport {transport!r} is not udp/tcp/tls")
    if not 1 <= port <= 65535 or not host:
        raise ValueError("binding source address is incomplete")
    if contact.scheme == "tel":
        raise ValueError("a device binding's Contact must be a SIP URI")
    return transport, host, port


# ---------------------------------------------------------------------------------------------
# requests


def _copy(request: SipRequest) -> SipRequest:
    return SipRequest(request.method, request.uri, request.headers.copy(), request.body)


def _routes(request: SipRequest) -> list[str]:
    return request.headers.get_list("Route")


def _set_routes(headers: Headers, routes: list[str]) -> None:
    if routes:
        headers.set("Route", ", ".join(routes))
    else:
        headers.remove("Route")


def _strict_route_compat(
    request: SipRequest, is_ours: Callable[[URI], bool], tokens: list[URI]
) -> None:
    """§16.4: a strict router put our Record-Route URI in the Request-URI; undo that."""
    if not (is_ours(request.uri) and parse_record_route_token(request.uri) is not None):
        return
    routes = _routes(request)
    if not routes:
        raise RelayRefused("strict-routed request carries no Route to restore the target from")
    tokens.append(request.uri)
    request.uri = Address.parse(routes[-1]).uri
    _set_routes(request.headers, routes[:-1])


def _pop_own_routes(
    request: SipRequest, is_ours: Callable[[URI], bool], tokens: list[URI]
) -> None:
    """§16.4: remove the top Route entries that name us (two of them after double RR)."""
    routes = _routes(request)
    popped = 0
    while popped < len(routes):
        uri = Address.parse(routes[popped]).uri
        if not is_ours(uri):
            break
        if parse_record_route_token(uri) is not None:
            tokens.append(uri)
        popped += 1
    if popped:
        _set_routes(request.headers, routes[popped:])


def _insert_before_first(headers: Headers, name: str, values: Sequence[str]) -> Headers:
    """A copy with ``values`` as lines just before the first ``name`` line (or at the end)."""
    items = list(headers)
    key = name.lower()
    at = next((i for i, (n, _) in enumerate(items) if n.lower() == key), len(items))
    items[at:at] = [(name, v) for v in values]
    return Headers(items)


def forward_request(
    request: SipRequest,
    *,
    via: ProxyIdentity,
    branch: str,
    target_uri: URI | None = None,
    record_route: Sequence[str] | None = None,
    is_ours: Callable[[URI], bool] | None = None,
) -> SipRequest:
    """The copy of ``request`` to send on, per RFC 3261 §16.6.

    Args:
        request: as received (not modified).
        via: our identity on the outgoing leg (its transport and address go in our Via).
        branch: the client transaction's branch (``z9hG4bK``…; the same one again only for
            the CANCEL of this request, see ``make_cancel``).
        target_uri: the new Request-URI (the device binding's Contact for the initial INVITE);
            None keeps it (in-dialog requests after ``process_route``).
        record_route: values to insert above the existing Record-Route (dialog-creating
            requests only; see ``RecordRouteSigner.record_route``).
        is_ours: when given, Route entries naming us are removed from the top, and a
            Request-URI holding our Record-Route URI (strict router) is restored from the
            last Route first (§16.4).

    Returns:
        A new request: Max-Forwards decremented (set to 70 if absent), our Via on top with
        ``branch`` and ``rport``, the Record-Route values inserted, the body unchanged.

    Raises:
        TooManyHops: Max-Forwards is 0 (answer 483).
        RelayRefused: a strict-routed request has no Route to restore its target from.
        SipParseError: a Route or Max-Forwards value is malformed (answer 400).
        ValueError: ``branch`` is not a token starting with ``z9hG4bK`` (a caller bug).
    """
    if not branch.startswith(BRANCH_MAGIC_COOKIE) or not _SIP_TOKEN_RE.fullmatch(branch):
        raise ValueError("branch must be a token starting with z9hG4bK")
    max_forwards = request.max_forwards
    if max_forwards == 0:
        raise TooManyHops("Max-Forwards reached 0")
    out = _copy(request)
    if is_ours is not None:
        ignored: list[URI] = []
        _strict_route_compat(out, is_ours, ignored)
        _pop_own_routes(out, is_ours, ignored)
    if target_uri is not None:
        out.uri = target_uri
    out.headers.set("Max-Forwards", str(
        DEFAULT_MAX_FORWARDS if max_forwards is None else max_forwards - 1))
    if record_route:
        out.headers = _insert_before_first(out.headers, "Record-Route", record_route)
    out.headers.prepend("Via", str(via.via(branch)))
    return out


def _direction(
    signer: RecordRouteSigner, request: SipRequest, tokens: list[URI]
) -> tuple[DialogRef, Leg]:
    call_id = request.call_id
    from_tag = request.from_.tag or ""
    to_tag = request.to.tag or ""
    refs: list[tuple[DialogRef, Leg | None]] = []
    for uri in tokens:
        by_from = signer.verify(uri, call_id=call_id, tag=from_tag)
        by_to = signer.verify(uri, call_id=call_id, tag=to_tag)
        ref = by_from or by_to
        if ref is None:
            raise RelayRefused("Route token does not verify for this dialog")
        if by_from is not None and by_to is not None:
            refs.append((ref, None))  # caller's tag on both sides: decide by the leg below
        else:
            refs.append((ref, Leg.DEVICE if by_from is not None else Leg.PROVIDER))
    first = refs[0][0]
    if any(ref.instance_id != first.instance_id for ref, _ in refs):
        raise RelayRefused("Route tokens name different instances")
    toward = {leg for _, leg in refs if leg is not None}
    if len(toward) > 1:
        raise RelayRefused("Route tokens disagree on the direction")
    if toward:
        return first, toward.pop()
    # From tag == To tag: the entry the request came in through says where it came from.
    if first.leg is Leg.PROVIDER:
        return first, Leg.DEVICE
    if first.leg is Leg.DEVICE:
        return first, Leg.PROVIDER
    raise RelayRefused("cannot tell the direction of the request")


def process_route(
    request: SipRequest, is_ours: Callable[[URI], bool], *, signer: RecordRouteSigner
) -> RouteDecision:
    """Route an in-dialog request through our Record-Route entries (RFC 3261 §16.4, §16.12).

    Not for CANCEL or the ACK of a non-2xx response: those are hop-by-hop, matched to the
    INVITE transaction.

    Steps: a Request-URI holding our Record-Route URI (a strict router upstream) is replaced
    by the last Route, which is removed; then the top Route entries naming us are removed.
    At least one of the removed entries must carry our token, verified for this Call-ID and
    the From or To tag. If the next Route lacks ``lr`` (a strict router next), the
    Request-URI goes to the end of Route and that Route becomes the Request-URI (§16.6 step 7).

    Returns:
        The decision; ``toward`` is ``DEVICE`` when the caller's tag is in From (the request
        comes from the provider), ``PROVIDER`` when it is in To.

    Raises:
        RelayRefused: no Route of ours with a valid token (a Route to a third party, a forged
            or unknown token, tokens of two instances), or a request that would come back
            to us.
        SipParseError: a malformed Route, From or To value (answer 400).
    """
    out = _copy(request)
    tokens: list[URI] = []
    _strict_route_compat(out, is_ours, tokens)
    _pop_own_routes(out, is_ours, tokens)
    if not tokens:
        raise RelayRefused("request has no Route through sipis with a dialog token")
    ref, toward = _direction(signer, out, tokens)
    routes = _routes(out)
    if routes:
        first = Address.parse(routes[0]).uri
        if not first.has_param("lr"):
            _set_routes(out.headers, [*routes[1:], f"<{out.uri}>"])
            out.uri = first
        next_hop = first
    else:
        next_hop = out.uri
    if is_ours(next_hop):
        raise RelayRefused("request would be routed back to sipis")
    return RouteDecision(next_hop, out, ref, toward)


# ---------------------------------------------------------------------------------------------
# responses


def _pop_top_via(headers: Headers) -> Headers:
    out: list[tuple[str, str]] = []
    done = False
    for name, value in headers:
        if not done and name == "Via":
            done = True
            rest = _split_vias(value)[1:]
            if rest:
                out.append((name, ", ".join(rest)))
            continue
        out.append((name, value))
    return Headers(out)


def _split_vias(value: str) -> list[str]:
    return Headers([("Via", value)]).get_list("Via")


def _has_any_route_of(values: Sequence[str], wanted: Sequence[str]) -> bool:
    wanted_uris = set()
    for value in wanted:
        try:
            wanted_uris.add(str(Address.parse(value).uri))
        except SipError:
            continue
    for value in values:
        try:
            if str(Address.parse(value).uri) in wanted_uris:
                return True
        except SipError:
            continue
    return False


def forward_response(
    response: SipResponse,
    *,
    is_our_via: Callable[[Via], bool],
    record_route: Sequence[str] | None = None,
) -> SipResponse | None:
    """The copy of ``response`` to relay upstream, per RFC 3261 §16.7.

    Args:
        response: as received from the device.
        is_our_via: recognises the Via we pushed (e.g. by the client transaction's branch).
        record_route: the values we put in the forwarded INVITE. A 101..299 response to an
            INVITE that lost all of them gets them back on top, so that the provider's route
            set still passes through us (the device's route set comes from the request).

    Returns:
        The response without our top Via; None when the top Via is not ours, when no Via
        would remain (the response was for a request we sent ourselves), or for a 100
        (hop-by-hop, §16.7 step 5). Everything else, Record-Route included, as received.

    Raises:
        SipParseError: the top Via or the CSeq is malformed (only on messages built in code).
    """
    vias = response.headers.get_list("Via")
    if len(vias) < 2 or not is_our_via(Via.parse(vias[0])):
        return None
    if response.status == 100:
        return None
    headers = _pop_top_via(response.headers)
    if (record_route and 101 <= response.status <= 299 and response.cseq.method == "INVITE"
            and not _has_any_route_of(headers.get_list("Record-Route"), record_route)):
        headers = _insert_before_first(headers, "Record-Route", record_route)
    return SipResponse(response.status, response.reason, headers, response.body)


# ---------------------------------------------------------------------------------------------
# hop-by-hop requests


def _required(message: SipRequest | SipResponse, name: str) -> str:
    value = message.headers.get(name)
    if value is None:
        raise SipParseError(f"missing {name} header")
    return value


def _hop_by_hop(invite: SipRequest, method: str, to: str, extra: Iterable[tuple[str, str]]
                ) -> SipRequest:
    if invite.method != "INVITE":
        raise ValueError(f"{method} is built from an INVITE, not a {invite.method}")
    vias = invite.headers.get_list("Via")
    if not vias:
        raise SipParseError("missing Via header")
    headers = Headers([("Via", vias[0]),
                       ("Max-Forwards", str(DEFAULT_MAX_FORWARDS))])
    for route in invite.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("From", _required(invite, "From"))
    headers.add("To", to)
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", str(CSeq(invite.cseq.seq, method)))
    for name, value in extra:
        headers.add(name, value)
    return SipRequest(method, invite.uri, headers)


def make_cancel(forwarded_invite: SipRequest, *, reason: str | None = None) -> SipRequest:
    """The CANCEL for an INVITE we forwarded (RFC 3261 §9.1, §16.10).

    Same Request-URI, Call-ID, From, To and CSeq number (method CANCEL), only the top Via
    (ours, so the same branch), the same Route, Max-Forwards 70, no body. ``reason`` is an
    RFC 3326 Reason value to pass on (``SIP;cause=200;text="Call completed elsewhere"``).

    Raises:
        ValueError: ``forwarded_invite`` is not an INVITE.
        SipParseError: its Via, From, To, Call-ID or CSeq is missing (only on built messages).
    """
    extra = [] if reason is None else [("Reason", reason)]
    return _hop_by_hop(forwarded_invite, "CANCEL", _required(forwarded_invite, "To"), extra)


def make_ack_for_non2xx(forwarded_invite: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK our INVITE client transaction sends for a 300..699 (RFC 3261 §17.1.1.3).

    Request-URI, Call-ID, From, CSeq number and Route of the INVITE, To of the response (with
    the device's tag), a single Via equal to the INVITE's top Via (same branch: it belongs to
    the INVITE transaction), Max-Forwards 70, no body. The ACK for a 2xx is end-to-end and
    goes through ``process_route`` instead.

    Raises:
        ValueError: not an INVITE, or not a 300..699 response.
        SipParseError: a mandatory header is missing (only on built messages).
    """
    if not 300 <= response.status <= 699:
        raise ValueError(f"ACK for a {response.status} is not hop-by-hop")
    return _hop_by_hop(forwarded_invite, "ACK", _required(response, "To"), ())
