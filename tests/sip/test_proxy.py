"""Proxy rules: forwarding the INVITE to the device, Record-Route, in-dialog routing, no relay."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI, Address, Via
from sipis.sip.message import SipRequest, SipResponse, make_response, parse_message
from sipis.sip.proxy import (
    DEFAULT_MAX_FORWARDS,
    DialogRef,
    Leg,
    ProxyIdentity,
    RecordRouteSigner,
    RelayRefused,
    TooManyHops,
    forward_request,
    forward_response,
    is_ours_for,
    make_ack_for_non2xx,
    make_cancel,
    nat_target,
    parse_record_route_token,
    process_route,
)
from tests.sip.test_message_hypothesis import requests as arbitrary_requests

KEY = b"k" * 32
SIGNER = RecordRouteSigner(KEY)
UPSTREAM = ProxyIdentity("sipis.example.com", 5060, "udp")
DEVICE_SIDE = ProxyIdentity("sipis.example.com", 5070, "tcp")
IS_OURS = is_ours_for([UPSTREAM, DEVICE_SIDE])
INSTANCE = "inst-42"
BRANCH = "z9hG4bKsipis1"
CONTACT = URI.parse("sip:alice@192.0.2.20:50123;transport=tcp;ob")
CALLER_TAG = "9fxced76sl"
CALLEE_TAG = "dev314159"
CALL_ID = "3848276298220188511@sbc.provider.example"
SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"

INVITE_BYTES = (
    "INVITE sip:ct-abc123@sipis.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP sbc.provider.example;branch=z9hG4bK776asdhds, "
    "SIP/2.0/UDP gw.provider.example;branch=z9hG4bKgw1\r\n"
    "Via: SIP/2.0/TCP pc33.caller.example;branch=z9hG4bKpc33\r\n"
    "Max-Forwards: 68\r\n"
    "Route: <sip:sipis.example.com;lr>\r\n"
    "Record-Route: <sip:sbc.provider.example;lr>\r\n"
    "To: Alice <sip:alice@provider.example>\r\n"
    f"From: Bob <sip:bob@provider.example>;tag={CALLER_TAG}\r\n"
    f"Call-ID: {CALL_ID}\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:bob@sbc.provider.example>\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n"
    "\r\n"
).encode() + SDP


def parsed_request(data: bytes) -> SipRequest:
    message = parse_message(data)
    assert isinstance(message, SipRequest)
    return message


def provider_invite() -> SipRequest:
    return parsed_request(INVITE_BYTES)


def record_route(upstream: ProxyIdentity = UPSTREAM, device: ProxyIdentity = DEVICE_SIDE,
                 *, signer: RecordRouteSigner = SIGNER, instance: str = INSTANCE,
                 call_id: str = CALL_ID) -> list[str]:
    return signer.record_route(call_id=call_id, from_tag=CALLER_TAG, instance_id=instance,
                               upstream=upstream, device=device)


def forwarded_invite(rr: list[str] | None = None) -> SipRequest:
    return forward_request(provider_invite(), via=DEVICE_SIDE, branch=BRANCH,
                           target_uri=CONTACT, record_route=record_route() if rr is None else rr,
                           is_ours=IS_OURS)


def in_dialog(method: str, uri: str, routes: list[str], *, from_tag: str, to_tag: str,
              via: str = "SIP/2.0/UDP sbc.provider.example;branch=z9hG4bKbye1") -> SipRequest:
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70"]
    lines += [f"Route: {r}" for r in routes]
    lines += [f"From: <sip:x@provider.example>;tag={from_tag}",
              f"To: <sip:y@provider.example>;tag={to_tag}",
              f"Call-ID: {CALL_ID}", f"CSeq: 2 {method}", "Content-Length: 0", "", ""]
    return parsed_request("\r\n".join(lines).encode())


# ---------------------------------------------------------------------------------------------
# forwarding the initial INVITE


def test_forwarded_invite_has_our_via_on_top_of_the_received_stack() -> None:
    """Our Via (outgoing transport, branch, rport) goes first; the received Vias follow intact."""
    invite = provider_invite()
    out = forwarded_invite()
    top = out.top_via
    assert (top.transport, top.host, top.port) == ("TCP", "sipis.example.com", 5070)
    assert top.branch == BRANCH and top.has_rport
    assert out.headers.get_all("Via")[1:] == invite.headers.get_all("Via")
    assert [str(v) for v in out.vias[1:]] == [str(v) for v in invite.vias]


def test_forwarded_invite_targets_the_binding_contact_and_keeps_the_body() -> None:
    """The Request-URI becomes the device binding's Contact; body and Content-Type are as sent."""
    out = forwarded_invite()
    assert out.uri == CONTACT
    assert out.body == SDP
    assert out.headers.get("Content-Type") == "application/sdp"
    assert parse_message(out.to_bytes()) == out


def test_forwarding_does_not_modify_the_received_request() -> None:
    """The received request stays as it was (the server transaction still needs it)."""
    invite = provider_invite()
    before = parse_message(invite.to_bytes())
    forward_request(invite, via=DEVICE_SIDE, branch=BRANCH, target_uri=CONTACT,
                    record_route=record_route(), is_ours=IS_OURS)
    assert invite == before


def test_max_forwards_is_decremented() -> None:
    """Max-Forwards 68 leaves as 67."""
    assert forwarded_invite().max_forwards == 67


def test_missing_max_forwards_is_set_to_70() -> None:
    """A request without Max-Forwards gets 70 (RFC 3261 §16.6 step 3)."""
    invite = provider_invite()
    invite.headers.remove("Max-Forwards")
    out = forward_request(invite, via=UPSTREAM, branch=BRANCH)
    assert out.max_forwards == DEFAULT_MAX_FORWARDS


def test_max_forwards_zero_raises_too_many_hops() -> None:
    """Max-Forwards 0: TooManyHops, whose status tells the caller to answer 483."""
    invite = provider_invite()
    invite.headers.set("Max-Forwards", "0")
    with pytest.raises(TooManyHops) as info:
        forward_request(invite, via=UPSTREAM, branch=BRANCH)
    assert info.value.status == 483


def test_max_forwards_one_is_forwarded_with_zero() -> None:
    """Max-Forwards 1 is still forwarded, as 0."""
    invite = provider_invite()
    invite.headers.set("Max-Forwards", "1")
    assert forward_request(invite, via=UPSTREAM, branch=BRANCH).max_forwards == 0


def test_single_record_route_when_both_legs_share_one_identity() -> None:
    """Same transport and address on both legs: one entry with lr, token and marker, on top."""
    rr = record_route(UPSTREAM, UPSTREAM)
    assert len(rr) == 1
    out = forwarded_invite(rr)
    values = out.headers.get_list("Record-Route")
    assert values == [rr[0], "<sip:sbc.provider.example;lr>"]
    uri = Address.parse(values[0]).uri
    assert (uri.host, uri.port, uri.transport) == ("sipis.example.com", 5060, None)
    assert uri.has_param("lr") and uri.has_param("sipis")
    token = uri.param("r")
    assert token is not None
    assert parse_record_route_token(uri) == DialogRef(INSTANCE, None, token[:32])


def test_double_record_route_when_the_legs_differ() -> None:
    """RFC 5658: the device-facing entry first (device's transport), the provider-facing next."""
    rr = record_route()
    out = forwarded_invite(rr)
    values = out.headers.get_list("Record-Route")
    assert values == [*rr, "<sip:sbc.provider.example;lr>"]
    device_uri, upstream_uri = (Address.parse(v).uri for v in rr)
    assert (device_uri.port, device_uri.transport) == (5070, "tcp")
    assert (upstream_uri.port, upstream_uri.transport) == (5060, None)
    assert all(u.has_param("lr") and u.has_param("sipis") for u in (device_uri, upstream_uri))
    assert parse_record_route_token(device_uri).leg is Leg.DEVICE  # type: ignore[union-attr]
    assert parse_record_route_token(upstream_uri).leg is Leg.PROVIDER  # type: ignore[union-attr]
    assert device_uri.param("r") == upstream_uri.param("r")


def test_double_record_route_also_when_only_the_address_differs() -> None:
    """Two addresses with the same transport still need two entries (multi-homed)."""
    other = ProxyIdentity("10.0.0.1", 5060, "udp")
    assert len(record_route(UPSTREAM, other)) == 2


def test_ipv6_identity_is_bracketed_in_via_and_record_route() -> None:
    """IPv6 hosts appear in brackets in both Via and Record-Route."""
    v6 = ProxyIdentity("::1", 5060, "TLS")
    assert v6.transport == "tls"
    out = forward_request(provider_invite(), via=v6, branch=BRANCH,
                          record_route=record_route(v6, v6))
    assert out.headers.get_all("Via")[0].startswith("SIP/2.0/TLS [::1]:5060;")
    assert out.headers.get_list("Record-Route")[0].startswith("<sip:[::1]:5060;transport=tls;lr")


def test_route_naming_us_is_removed_and_others_kept() -> None:
    """A preloaded Route naming sipis goes; a Route to someone else further down stays."""
    invite = provider_invite()
    invite.headers.add("Route", "<sip:next.example.net;lr>")
    out = forward_request(invite, via=UPSTREAM, branch=BRANCH, target_uri=CONTACT,
                          is_ours=IS_OURS)
    assert out.headers.get_list("Route") == ["<sip:next.example.net;lr>"]


def test_routes_are_untouched_without_is_ours() -> None:
    """Without an ``is_ours`` predicate the Route header is left alone."""
    out = forward_request(provider_invite(), via=UPSTREAM, branch=BRANCH)
    assert out.headers.get_list("Route") == ["<sip:sipis.example.com;lr>"]


def test_branch_must_carry_the_magic_cookie() -> None:
    """A branch without z9hG4bK (or not a token) is a caller bug: ValueError."""
    for bad in ("abc", "z9hG4bK a", ""):
        with pytest.raises(ValueError, match="branch"):
            forward_request(provider_invite(), via=UPSTREAM, branch=bad)


def test_proxy_identity_rejects_bad_values() -> None:
    """Unknown transport, port 0 or an empty host are refused at construction."""
    with pytest.raises(ValueError):
        ProxyIdentity("h", 5060, "sctp")
    with pytest.raises(ValueError):
        ProxyIdentity("h", 0, "udp")
    with pytest.raises(ValueError):
        ProxyIdentity("", 5060, "udp")


# ---------------------------------------------------------------------------------------------
# in-dialog requests


def route_sets(rr: list[str]) -> tuple[list[str], list[str]]:
    """(device's route set, provider's route set as it reaches us) for a forwarded INVITE."""
    full = forwarded_invite(rr).headers.get_list("Record-Route")
    device_routes = full
    provider_routes = list(reversed(full))[1:]  # sbc.provider.example popped its own entry
    return device_routes, provider_routes


@pytest.mark.parametrize("double", [True, False])
def test_bye_from_the_provider_goes_to_the_device(double: bool) -> None:
    """Provider's BYE: our Route entries are removed, the next hop is the device's Contact."""
    rr = record_route() if double else record_route(UPSTREAM, UPSTREAM)
    _, provider_routes = route_sets(rr)
    bye = in_dialog("BYE", str(CONTACT), provider_routes, from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    decision = process_route(bye, IS_OURS, signer=SIGNER)
    assert decision.toward is Leg.DEVICE
    assert decision.dialog.instance_id == INSTANCE
    assert decision.next_hop_uri == CONTACT
    assert decision.request.uri == CONTACT
    assert "Route" not in decision.request.headers
    assert decision.request.headers.get_all("Via") == bye.headers.get_all("Via")


@pytest.mark.parametrize("double", [True, False])
def test_bye_from_the_device_goes_to_the_provider(double: bool) -> None:
    """Device's BYE (tags swapped): next hop is the provider's Record-Route entry."""
    rr = record_route() if double else record_route(UPSTREAM, UPSTREAM)
    device_routes, _ = route_sets(rr)
    bye = in_dialog("BYE", "sip:bob@sbc.provider.example", device_routes,
                    from_tag=CALLEE_TAG, to_tag=CALLER_TAG,
                    via="SIP/2.0/TCP 192.0.2.20:50123;branch=z9hG4bKdev1;alias")
    decision = process_route(bye, IS_OURS, signer=SIGNER)
    assert decision.toward is Leg.PROVIDER
    assert decision.dialog.instance_id == INSTANCE
    assert decision.next_hop_uri == URI.parse("sip:sbc.provider.example;lr")
    assert decision.request.headers.get_list("Route") == ["<sip:sbc.provider.example;lr>"]
    assert str(decision.request.uri) == "sip:bob@sbc.provider.example"


def test_in_dialog_request_can_then_be_forwarded() -> None:
    """process_route's request goes through forward_request unchanged in target and Route."""
    device_routes, _ = route_sets(record_route())
    reinvite = in_dialog("INVITE", "sip:bob@sbc.provider.example", device_routes,
                         from_tag=CALLEE_TAG, to_tag=CALLER_TAG)
    decision = process_route(reinvite, IS_OURS, signer=SIGNER)
    out = forward_request(decision.request, via=UPSTREAM, branch=BRANCH, is_ours=IS_OURS)
    assert out.uri == decision.request.uri
    assert out.headers.get_list("Route") == ["<sip:sbc.provider.example;lr>"]
    assert out.max_forwards == 69


@pytest.mark.parametrize("method", ["ACK", "UPDATE", "INFO", "PRACK", "NOTIFY"])
def test_other_in_dialog_methods_route_the_same_way(method: str) -> None:
    """ACK for 2xx, UPDATE, INFO, PRACK, NOTIFY are routed like BYE."""
    _, provider_routes = route_sets(record_route())
    request = in_dialog(method, str(CONTACT), provider_routes,
                        from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    assert process_route(request, IS_OURS, signer=SIGNER).toward is Leg.DEVICE


def test_strict_router_upstream_is_undone() -> None:
    """RFC 3261 §16.4: our RR URI in the Request-URI is replaced by the last Route."""
    _, provider_routes = route_sets(record_route())
    strict_uri = Address.parse(provider_routes[0]).uri
    bye = in_dialog("BYE", str(strict_uri), [*provider_routes[1:], f"<{CONTACT}>"],
                    from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    decision = process_route(bye, IS_OURS, signer=SIGNER)
    assert decision.request.uri == CONTACT
    assert "Route" not in decision.request.headers
    assert decision.next_hop_uri == CONTACT
    assert decision.toward is Leg.DEVICE


def test_strict_routed_request_without_route_is_refused() -> None:
    """Our RR URI in the Request-URI and no Route: nothing to restore, refused."""
    _, provider_routes = route_sets(record_route())
    uri = Address.parse(provider_routes[0]).uri
    bye = in_dialog("BYE", str(uri), [], from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_strict_router_as_next_hop_gets_the_request_uri() -> None:
    """§16.6 step 7: a next Route without lr becomes the Request-URI; the target moves last."""
    rr = record_route()
    routes = [*rr, "<sip:strict.provider.example>"]
    bye = in_dialog("BYE", "sip:bob@sbc.provider.example", routes,
                    from_tag=CALLEE_TAG, to_tag=CALLER_TAG)
    decision = process_route(bye, IS_OURS, signer=SIGNER)
    assert decision.next_hop_uri == URI.parse("sip:strict.provider.example")
    assert decision.request.uri == decision.next_hop_uri
    assert decision.request.headers.get_list("Route") == ["<sip:bob@sbc.provider.example>"]


def test_forged_token_is_refused() -> None:
    """One changed MAC digit: RelayRefused."""
    _, provider_routes = route_sets(record_route())
    forged = []
    for route in provider_routes:
        uri = Address.parse(route).uri
        token = uri.param("r")
        assert token is not None
        flipped = ("1" if token[0] == "0" else "0") + token[1:]
        forged.append(f"<{uri.with_params(r=flipped)}>")
    bye = in_dialog("BYE", str(CONTACT), forged, from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused) as info:
        process_route(bye, IS_OURS, signer=SIGNER)
    assert info.value.status == 403


def test_token_from_another_key_is_refused() -> None:
    """A token made with another key (another sipis, or a guess) does not verify."""
    other = RecordRouteSigner(b"x" * 32)
    _, provider_routes = route_sets(record_route(signer=other))
    bye = in_dialog("BYE", str(CONTACT), provider_routes, from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_previous_key_still_verifies() -> None:
    """After a key rotation, tokens of the previous key keep working."""
    old = RecordRouteSigner(b"o" * 32)
    _, provider_routes = route_sets(record_route(signer=old))
    bye = in_dialog("BYE", str(CONTACT), provider_routes, from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    rotated = RecordRouteSigner(KEY, previous_keys=[b"o" * 32])
    assert process_route(bye, IS_OURS, signer=rotated).toward is Leg.DEVICE


def test_token_of_another_dialog_is_refused() -> None:
    """A valid token reused with another Call-ID, or with tags that are not the caller's."""
    _, provider_routes = route_sets(record_route(call_id="other-call@x"))
    bye = in_dialog("BYE", str(CONTACT), provider_routes, from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)
    _, provider_routes = route_sets(record_route())
    bye = in_dialog("BYE", str(CONTACT), provider_routes, from_tag="a", to_tag="b")
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_instance_id_in_a_token_cannot_be_swapped() -> None:
    """Changing the instance part of a valid token breaks its MAC."""
    rr = record_route(UPSTREAM, UPSTREAM)
    uri = Address.parse(rr[0]).uri
    token = uri.param("r")
    assert token is not None
    swapped = f"<{uri.with_params(r=token.split('.')[0] + '.victim')}>"
    bye = in_dialog("BYE", str(CONTACT), [swapped], from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_tokens_of_two_instances_are_refused() -> None:
    """Two valid-looking entries naming different instances: refused."""
    a = record_route(UPSTREAM, UPSTREAM)[0]
    b = record_route(DEVICE_SIDE, DEVICE_SIDE, instance="other")[0]
    bye = in_dialog("BYE", str(CONTACT), [a, b], from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_route_to_a_third_party_without_our_token_is_refused() -> None:
    """A Route to someone else, with no entry of ours: we would be an open relay."""
    for routes in (["<sip:victim.example.net;lr>"],
                   ["<sip:sipis.example.com;lr>", "<sip:victim.example.net;lr>"],
                   []):
        request = in_dialog("BYE", "sip:victim@victim.example.net", routes,
                            from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
        with pytest.raises(RelayRefused):
            process_route(request, IS_OURS, signer=SIGNER)


def test_our_token_below_a_foreign_route_is_refused() -> None:
    """Our entry must be on top: below a third party's it does not make us route there."""
    rr = record_route(UPSTREAM, UPSTREAM)
    bye = in_dialog("BYE", str(CONTACT), ["<sip:victim.example.net;lr>", *rr],
                    from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_token_on_a_host_that_is_not_ours_is_not_ours() -> None:
    """A copied token on someone else's host is a foreign Route: refused."""
    uri = Address.parse(record_route(UPSTREAM, UPSTREAM)[0]).uri
    foreign = f"<{URI('sip', None, 'victim.example.net', 5060, uri.params)}>"
    bye = in_dialog("BYE", str(CONTACT), [foreign], from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_request_routed_back_to_us_is_refused() -> None:
    """Valid token, but the Request-URI names sipis itself: nowhere to forward to."""
    rr = record_route(UPSTREAM, UPSTREAM)
    bye = in_dialog("BYE", "sip:ct-abc@sipis.example.com", rr,
                    from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(RelayRefused):
        process_route(bye, IS_OURS, signer=SIGNER)


def test_equal_tags_fall_back_to_the_entry_leg() -> None:
    """From tag == To tag == caller's: the first entry's leg says where the request came in."""
    device_routes, provider_routes = route_sets(record_route())
    from_device = in_dialog("BYE", "sip:bob@sbc.provider.example", device_routes,
                            from_tag=CALLER_TAG, to_tag=CALLER_TAG)
    assert process_route(from_device, IS_OURS, signer=SIGNER).toward is Leg.PROVIDER
    from_provider = in_dialog("BYE", str(CONTACT), provider_routes,
                              from_tag=CALLER_TAG, to_tag=CALLER_TAG)
    assert process_route(from_provider, IS_OURS, signer=SIGNER).toward is Leg.DEVICE
    single = record_route(UPSTREAM, UPSTREAM)
    ambiguous = in_dialog("BYE", str(CONTACT), single, from_tag=CALLER_TAG, to_tag=CALLER_TAG)
    with pytest.raises(RelayRefused):
        process_route(ambiguous, IS_OURS, signer=SIGNER)


def test_malformed_route_is_a_parse_error() -> None:
    """A Route value that is not an address: SipParseError (answer 400)."""
    bye = in_dialog("BYE", str(CONTACT), ["<not a uri>"], from_tag=CALLER_TAG, to_tag=CALLEE_TAG)
    with pytest.raises(SipParseError):
        process_route(bye, IS_OURS, signer=SIGNER)


# ---------------------------------------------------------------------------------------------
# tokens, identities, NAT


@settings(max_examples=100, deadline=None)
@given(instance=st.text(min_size=1, max_size=20), call_id=st.text(max_size=20),
       tag=st.text(max_size=10))
def test_any_instance_id_round_trips_through_the_token(instance: str, call_id: str,
                                                       tag: str) -> None:
    """Whatever the instance id, the token fits a URI parameter and verifies back to it."""
    token = SIGNER.dialog_token(call_id, tag, instance)
    uri = URI.parse(str(UPSTREAM.uri(("lr", None), ("r", token), ("sipis", None))))
    ref = SIGNER.verify(uri, call_id=call_id, tag=tag)
    assert ref is not None and ref.instance_id == instance
    assert SIGNER.verify(uri, call_id=call_id + "x", tag=tag) is None


def test_parse_record_route_token_ignores_uris_that_are_not_ours() -> None:
    """No marker, no token or a malformed token: None."""
    for text in ("sip:h;lr", "sip:h;lr;sipis", "sip:h;r=abc;sipis",
                 "sip:h;r=" + "0" * 32 + ".%FF;sipis", "sip:h;r=" + "0" * 32 + ".i;leg=x;sipis"):
        assert parse_record_route_token(URI.parse(text)) is None


def test_signer_hides_its_key_and_wants_a_long_one() -> None:
    """The key never shows in repr; keys under 16 bytes are refused."""
    assert "k" * 8 not in repr(SIGNER)
    with pytest.raises(ValueError):
        RecordRouteSigner(b"short")
    with pytest.raises(ValueError):
        RecordRouteSigner(KEY, previous_keys=[b"short"])


def test_is_ours_compares_host_and_effective_port() -> None:
    """Default ports, host case and IPv6 spelling do not matter; other ports and tel: do."""
    ours = is_ours_for([ProxyIdentity("SIPis.example.com", 5060, "udp"),
                        ProxyIdentity("2001:db8::1", 5061, "tls")],
                       extra_hosts=[("127.0.0.1", 5080)])
    assert ours(URI.parse("sip:sipis.EXAMPLE.com"))
    assert ours(URI.parse("sip:x@sipis.example.com:5060;transport=tcp"))
    assert ours(URI.parse("sips:[2001:db8:0::1]"))
    assert ours(URI.parse("sip:[2001:db8::1];transport=tls"))
    assert ours(URI.parse("sip:127.0.0.1:5080"))
    assert not ours(URI.parse("sip:sipis.example.com:5062"))
    assert not ours(URI.parse("sip:[2001:db8::1]"))
    assert not ours(URI.parse("tel:+15551234"))


def test_nat_target_is_the_register_source_not_the_contact() -> None:
    """A Contact with a private address is reached at the REGISTER's source."""
    contact = URI.parse("sip:alice@10.0.0.5:5060;transport=udp")
    assert nat_target(("UDP", "192.0.2.77", 40123), contact) == ("udp", "192.0.2.77", 40123)
    assert nat_target(("tcp", "::1", 50000), CONTACT) == ("tcp", "::1", 50000)
    with pytest.raises(ValueError):
        nat_target(("sctp", "192.0.2.77", 1), contact)
    with pytest.raises(ValueError):
        nat_target(("udp", "192.0.2.77", 0), contact)


# ---------------------------------------------------------------------------------------------
# responses


def our_via(via: Via) -> bool:
    return via.branch == BRANCH


def test_response_loses_our_via_and_keeps_the_rest() -> None:
    """A 180 from the device: our Via popped, the provider's stack as it came."""
    invite = provider_invite()
    ringing = make_response(forwarded_invite(), 180, to_tag=CALLEE_TAG)
    out = forward_response(ringing, is_our_via=our_via)
    assert out is not None
    assert out.headers.get_all("Via") == invite.headers.get_all("Via")
    assert out.status == 180 and out.to.tag == CALLEE_TAG


def test_comma_joined_via_line_is_split_when_popping() -> None:
    """Our Via first in a comma-joined line: only it goes."""
    response = SipResponse(200, "OK")
    response.headers.add("Via", f"SIP/2.0/UDP sipis.example.com;branch={BRANCH}, "
                                "SIP/2.0/UDP a.example;branch=z9hG4bKa")
    response.headers.add("Via", "SIP/2.0/UDP b.example;branch=z9hG4bKb")
    for name, value in (("From", "<sip:a@b>;tag=1"), ("To", "<sip:c@d>;tag=2"),
                        ("Call-ID", "c"), ("CSeq", "1 BYE")):
        response.headers.add(name, value)
    out = forward_response(response, is_our_via=our_via)
    assert out is not None
    assert out.headers.get_all("Via") == ["SIP/2.0/UDP a.example;branch=z9hG4bKa",
                                          "SIP/2.0/UDP b.example;branch=z9hG4bKb"]


def test_response_with_a_foreign_top_via_is_dropped() -> None:
    """A response whose top Via is not ours is not ours to relay: None."""
    ringing = make_response(provider_invite(), 180, to_tag=CALLEE_TAG)
    assert forward_response(ringing, is_our_via=our_via) is None


def test_response_with_only_our_via_is_not_relayed() -> None:
    """Only our Via: the response was for a request we sent ourselves (§16.7 step 3)."""
    request = in_dialog("BYE", str(CONTACT), [], from_tag="a", to_tag="b",
                        via=f"SIP/2.0/UDP sipis.example.com;branch={BRANCH}")
    assert forward_response(make_response(request, 200), is_our_via=our_via) is None


def test_100_trying_is_hop_by_hop() -> None:
    """A 100 from the device is not relayed (§16.7 step 5)."""
    trying = make_response(forwarded_invite(), 100)
    assert forward_response(trying, is_our_via=our_via) is None


def test_2xx_record_route_is_left_as_received() -> None:
    """The device's 200 carries our entries: Record-Route goes upstream unchanged."""
    rr = record_route()
    forwarded = forwarded_invite(rr)
    ok = make_response(forwarded, 200, to_tag=CALLEE_TAG)
    for value in forwarded.headers.get_all("Record-Route"):
        ok.headers.add("Record-Route", value)
    ok.body = SDP
    out = forward_response(ok, is_our_via=our_via, record_route=rr)
    assert out is not None
    assert out.headers.get_all("Record-Route") == forwarded.headers.get_all("Record-Route")
    assert out.body == SDP


def test_2xx_that_lost_our_record_route_gets_it_back() -> None:
    """A device that dropped Record-Route from its 200: our entries are put back on top."""
    rr = record_route()
    ok = make_response(forwarded_invite(rr), 200, to_tag=CALLEE_TAG)
    out = forward_response(ok, is_our_via=our_via, record_route=rr)
    assert out is not None
    assert out.headers.get_list("Record-Route") == rr
    ok.headers.add("Record-Route", "<sip:sbc.provider.example;lr>")
    out = forward_response(ok, is_our_via=our_via, record_route=rr)
    assert out is not None
    assert out.headers.get_list("Record-Route") == [*rr, "<sip:sbc.provider.example;lr>"]


def test_error_responses_do_not_get_record_route() -> None:
    """A 486 creates no dialog: nothing is added."""
    busy = make_response(forwarded_invite(), 486, to_tag=CALLEE_TAG)
    out = forward_response(busy, is_our_via=our_via, record_route=record_route())
    assert out is not None and "Record-Route" not in out.headers


# ---------------------------------------------------------------------------------------------
# CANCEL and ACK


def test_cancel_per_rfc_3261_section_9_1() -> None:
    """CANCEL: same Request-URI, Call-ID, From, To, CSeq number; our Via only; Route; MF 70."""
    forwarded = forwarded_invite()
    forwarded.headers.add("Route", "<sip:edge.example.net;lr>")
    cancel = make_cancel(forwarded)
    assert cancel.method == "CANCEL" and cancel.uri == forwarded.uri
    assert cancel.headers.get_all("Via") == [
        f"SIP/2.0/TCP sipis.example.com:5070;branch={BRANCH};rport"]
    assert cancel.headers.get_all("Route") == forwarded.headers.get_all("Route")
    for name in ("From", "To", "Call-ID"):
        assert cancel.headers.get(name) == forwarded.headers.get(name)
    assert cancel.headers.get("CSeq") == "314159 CANCEL"
    assert cancel.max_forwards == 70
    assert cancel.body == b"" and "Content-Type" not in cancel.headers
    assert "Reason" not in cancel.headers
    assert parse_message(cancel.to_bytes()) == cancel


def test_cancel_passes_on_a_reason() -> None:
    """RFC 3326 Reason (answered elsewhere) goes into the CANCEL."""
    reason = 'SIP;cause=200;text="Call completed elsewhere"'
    assert make_cancel(forwarded_invite(), reason=reason).headers.get("Reason") == reason


def test_ack_for_non_2xx_per_rfc_3261_section_17_1_1_3() -> None:
    """ACK: To from the response (device tag), the INVITE's top Via and branch, CSeq ACK."""
    forwarded = forwarded_invite()
    busy = make_response(forwarded, 486, to_tag=CALLEE_TAG)
    ack = make_ack_for_non2xx(forwarded, busy)
    assert ack.method == "ACK" and ack.uri == forwarded.uri
    assert ack.headers.get_all("Via") == forwarded.headers.get_list("Via")[:1]
    assert ack.top_via.branch == BRANCH
    assert ack.to.tag == CALLEE_TAG
    assert ack.headers.get("From") == forwarded.headers.get("From")
    assert ack.call_id == CALL_ID and ack.headers.get("CSeq") == "314159 ACK"
    assert ack.headers.get_all("Route") == forwarded.headers.get_all("Route")
    assert ack.max_forwards == 70 and ack.body == b""


def test_cancel_and_ack_need_an_invite_and_ack_a_final_error() -> None:
    """Wrong inputs are caller bugs: ValueError."""
    forwarded = forwarded_invite()
    bye = in_dialog("BYE", str(CONTACT), [], from_tag="a", to_tag="b")
    with pytest.raises(ValueError):
        make_cancel(bye)
    for status in (180, 200):
        with pytest.raises(ValueError):
            make_ack_for_non2xx(forwarded, make_response(forwarded, status, to_tag="t"))


# ---------------------------------------------------------------------------------------------
# properties on arbitrary parsed requests

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
_TOKEN_ROUTES = record_route()
ROUTE_POOL = [
    "<sip:sipis.example.com;lr>",
    "<sip:sipis.example.com:5070;transport=tcp;lr>",
    "<sip:victim.example.net;lr>",
    "<sip:strict.example.net>",
    "sip:sipis.example.com;lr",
    *_TOKEN_ROUTES,
    ", ".join(_TOKEN_ROUTES),
    "<not a uri>",
    "garbage,,",
    "tel:+1555",
    "<sip:sipis.example.com;r=deadbeef;sipis>",
]


def with_routes(request: SipRequest, routes: list[str], max_forwards: int | None,
                tags: tuple[str, str] | None) -> SipRequest | None:
    """The request with extra Route lines, maybe another Max-Forwards, re-parsed from bytes."""
    for route in routes:
        request.headers.add("Route", route)
    if max_forwards is not None:
        request.headers.set("Max-Forwards", str(max_forwards))
    if tags is not None:
        request.headers.set("Call-ID", CALL_ID)
        request.headers.set("From", f"<sip:a@b>;tag={tags[0]}")
        request.headers.set("To", f"<sip:c@d>;tag={tags[1]}")
    try:
        message = parse_message(request.to_bytes())
    except SipParseError:
        return None
    return message if isinstance(message, SipRequest) else None


parsed_requests = st.builds(
    with_routes,
    arbitrary_requests,
    st.lists(st.sampled_from(ROUTE_POOL), max_size=3),
    st.one_of(st.none(), st.integers(0, 255)),
    st.one_of(st.none(), st.sampled_from([(CALLER_TAG, CALLEE_TAG), (CALLEE_TAG, CALLER_TAG)])),
).filter(lambda r: r is not None)


@PROPERTY_SETTINGS
@given(request=parsed_requests, record=st.booleans(), retarget=st.booleans())
def test_forward_request_raises_only_documented_errors(
    request: SipRequest, record: bool, retarget: bool
) -> None:
    """Any parsed request: a well-formed forward, or TooManyHops/RelayRefused/SipParseError."""
    before = request.max_forwards
    try:
        out = forward_request(request, via=DEVICE_SIDE, branch=BRANCH,
                              target_uri=CONTACT if retarget else None,
                              record_route=_TOKEN_ROUTES if record else None, is_ours=IS_OURS)
    except (TooManyHops, RelayRefused, SipParseError):
        return
    assert out.top_via.branch == BRANCH
    assert out.max_forwards == (DEFAULT_MAX_FORWARDS if before is None else before - 1)
    assert out.body == request.body
    assert parse_message(out.to_bytes()) == out


@PROPERTY_SETTINGS
@given(request=parsed_requests)
def test_process_route_raises_only_documented_errors(request: SipRequest) -> None:
    """Any parsed request: a decision toward a leg, or RelayRefused/SipParseError."""
    try:
        decision = process_route(request, IS_OURS, signer=SIGNER)
    except (RelayRefused, SipParseError):
        return
    assert decision.dialog.instance_id == INSTANCE
    assert not IS_OURS(decision.next_hop_uri)


@PROPERTY_SETTINGS
@given(request=parsed_requests, status=st.integers(101, 699))
def test_forward_then_response_restores_the_via_stack(request: SipRequest, status: int) -> None:
    """forward → response → forward_response gives the received Via lines back, in order."""
    try:
        out = forward_request(request, via=UPSTREAM, branch=BRANCH)
    except TooManyHops:
        return
    back = forward_response(make_response(out, status), is_our_via=our_via)
    assert back is not None
    assert back.headers.get_all("Via") == request.headers.get_all("Via")
    assert back.status == status
