"""Golden cases and round trips for URI, Address, Via and CSeq, and the SIP error types."""

from __future__ import annotations

import attrs
import hypothesis
import pytest
from hypothesis import strategies as st

from sipis.sip.errors import (
    DigestError,
    ResolveError,
    SipError,
    SipParseError,
    TransactionTimeout,
    TransportError,
    excerpt,
)
from sipis.sip.headers import (
    _PLAIN_ADDRESS_RE,
    _PLAIN_VIA_RE,
    URI,
    Address,
    CSeq,
    Via,
    check_address,
    quote,
    unquote,
)

# ---------------------------------------------------------------------------------------------
# URI


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sip:alice@example.com", URI("sip", "alice", "example.com")),
        ("sips:bob@example.com:5061", URI("sips", "bob", "example.com", 5061)),
        ("sip:example.com", URI("sip", None, "example.com")),
        ("sip:192.0.2.1:5060", URI("sip", None, "192.0.2.1", 5060)),
        ("sip:alice@[2001:db8::1]:5070", URI("sip", "alice", "2001:db8::1", 5070)),
        ("sip:[::1]", URI("sip", None, "::1")),
        (
            "sip:alice:secret@example.com",
            URI("sip", "alice", "example.com", password="secret"),
        ),
        (
            "sip:proxy.example.com;transport=tcp;lr",
            URI("sip", None, "proxy.example.com", params=(("transport", "tcp"), ("lr", None))),
        ),
        (
            "sip:bob@example.com?Subject=hi&Priority=urgent",
            URI("sip", "bob", "example.com", headers=(("Subject", "hi"), ("Priority", "urgent"))),
        ),
        # RFC 4475 3.1.1.3 (esc01): escapes are validated and kept as given.
        ("sip:sips%3Auser%40example.com@example.net",
         URI("sip", "sips%3Auser%40example.com", "example.net")),
        ("sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31",
         URI("sip", "cal%6Cer", "host5.example.net",
             params=(("%6C%72", None), ("n%61me", "v%61lue%25%34%31")))),
        # RFC 4475 3.1.1.9 (semiuri): a ';' before the '@' belongs to the user part.
        ("sip:user;par=u%40example.net@example.com",
         URI("sip", "user;par=u%40example.net", "example.com")),
        ("sip:host.example.com.", URI("sip", None, "host.example.com.")),
        ("tel:+1-201-555-0123;phone-context=example.com",
         URI("tel", "+1-201-555-0123", "", params=(("phone-context", "example.com"),))),
    ],
)
def test_uri_parse_golden_cases(text: str, expected: URI) -> None:
    """URI.parse gives the expected value, and str() gives the text back."""
    uri = URI.parse(text)
    assert uri == expected
    assert str(uri) == text
    assert URI.parse(str(uri)) == uri


def test_uri_scheme_is_lowercased_in_the_canonical_form() -> None:
    """The scheme is case-insensitive: SIP: parses and is written as sip:."""
    assert str(URI.parse("SIP:Alice@Example.COM")) == "sip:Alice@Example.COM"


def test_uri_rfc4475_intmeth_user_and_password() -> None:
    """The unusual-but-legal user and password of RFC 4475 3.1.1.2 parse."""
    uri = URI.parse(
        "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:"
        "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com"
    )
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"


def test_uri_param_lookup_is_case_insensitive() -> None:
    """param/has_param ignore the case of the name; transport is lower-cased."""
    uri = URI.parse("sip:h.example;Transport=TCP;LR")
    assert uri.param("transport") == "TCP"
    assert uri.transport == "tcp"
    assert uri.has_param("lr")
    assert uri.param("lr") is None
    assert not uri.has_param("maddr")
    assert URI.parse("sip:h.example").transport is None


def test_uri_host_port_brackets_ipv6() -> None:
    """host_port writes the IPv6 host in brackets and adds the port only when set."""
    assert URI("sip", None, "2001:db8::1", 5060).host_port == "[2001:db8::1]:5060"
    assert URI("sip", None, "example.com").host_port == "example.com"


def test_uri_with_params_replaces_in_place_and_appends() -> None:
    """with_params keeps order, replaces case-insensitively, appends new; None is a flag."""
    uri = URI.parse("sip:a@h;transport=udp;x=1")
    new = uri.with_params(Transport="tcp", lr=None)
    assert str(new) == "sip:a@h;transport=tcp;x=1;lr"
    assert str(new.without_params("x", "LR")) == "sip:a@h;transport=tcp"
    assert str(uri) == "sip:a@h;transport=udp;x=1"  # frozen: the original is unchanged


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alice@example.com",
        "sip:",
        "sip:alice@",
        "sip:@example.com",
        "sip:alice@exa mple.com",
        "sip:alice@example.com:65536",
        "sip:alice@example.com:-1",
        "sip:alice@example.com:5x",
        "sip:alice@-bad-.example.com",
        "sip:alice@example..com",
        "sip:alice@256.1.1.1",
        "sip:alice@[2001:db8::1",
        "sip:alice@[not-ipv6]",
        "sip:alice@[fe80::1%25eth0]",
        "sip:al ice@example.com",
        "sip:alice@example.com;;lr",
        "sip:alice@example.com;a=",
        "sip:alice@example.com;a=b c",
        "sip:alice@example.com?novalue",
        "sip:a%4@example.com",
        "sip:a:b:c@example.com",
        "sip:a@example.com junk",
        "tel:",
    ],
)
def test_uri_parse_rejects_malformed_text(text: str) -> None:
    """Malformed URIs raise SipParseError (400)."""
    with pytest.raises(SipParseError) as info:
        URI.parse(text)
    assert info.value.status_hint == 400


def test_uri_parse_unknown_scheme_hints_416() -> None:
    """An absolute URI of another scheme is "Unsupported URI Scheme" (RFC 4475 3.3.7)."""
    with pytest.raises(SipParseError) as info:
        URI.parse("nobodyKnowsThisScheme:totallyopaquecontent")
    assert info.value.status_hint == 416


def test_uri_parse_error_does_not_quote_the_password() -> None:
    """The quoted excerpt in the error blanks out a URI password."""
    with pytest.raises(SipParseError) as info:
        URI.parse("sip:alice:hunter2@example.com:99999")
    assert "hunter2" not in str(info.value)
    assert "alice" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Address


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        (
            '"Alice" <sip:alice@example.com>;tag=abc',
            Address(URI("sip", "alice", "example.com"), "Alice", (("tag", "abc"),)),
            '"Alice" <sip:alice@example.com>;tag=abc',
        ),
        (
            "<sip:bob@example.com>",
            Address(URI("sip", "bob", "example.com")),
            "<sip:bob@example.com>",
        ),
        (
            # RFC 3261 §20.10: bare addr-spec, the ;tag is a header parameter.
            "sip:bob@example.com;tag=xyz",
            Address(URI("sip", "bob", "example.com"), None, (("tag", "xyz"),)),
            "<sip:bob@example.com>;tag=xyz",
        ),
        (
            "Bob Smith <sip:bob@example.com;transport=tcp>;expires=60",
            Address(
                URI("sip", "bob", "example.com", params=(("transport", "tcp"),)),
                "Bob Smith",
                (("expires", "60"),),
            ),
            '"Bob Smith" <sip:bob@example.com;transport=tcp>;expires=60',
        ),
        (
            # RFC 4475 3.1.1.6 (lwsdisp): no LWS between display name and '<'.
            "caller<sip:caller@example.com>;tag=323",
            Address(URI("sip", "caller", "example.com"), "caller", (("tag", "323"),)),
            '"caller" <sip:caller@example.com>;tag=323',
        ),
        (
            '<sip:t@192.0.2.1:5060;transport=tcp>;+sip.instance="<urn:uuid:0a1b>";reg-id=1',
            Address(
                URI("sip", "t", "192.0.2.1", 5060, (("transport", "tcp"),)),
                None,
                (("+sip.instance", '"<urn:uuid:0a1b>"'), ("reg-id", "1")),
            ),
            '<sip:t@192.0.2.1:5060;transport=tcp>;+sip.instance="<urn:uuid:0a1b>";reg-id=1',
        ),
        (
            '"" <sip:anon@anonymous.invalid>',
            Address(URI("sip", "anon", "anonymous.invalid"), ""),
            '"" <sip:anon@anonymous.invalid>',
        ),
        (
            # Outside quotes RFC 3261 wants tokens; UTF-8 is tolerated (and then quoted).
            "Müller <sip:m@example.de>",
            Address(URI("sip", "m", "example.de"), "Müller"),
            '"Müller" <sip:m@example.de>',
        ),
        (
            "<tel:+15551234>;tag=9",
            Address(URI("tel", "+15551234", ""), None, (("tag", "9"),)),
            "<tel:+15551234>;tag=9",
        ),
    ],
)
def test_address_parse_golden_cases(text: str, expected: Address, canonical: str) -> None:
    """Address.parse gives the expected value and str() the canonical form, which re-parses."""
    addr = Address.parse(text)
    assert addr == expected
    assert str(addr) == canonical
    assert Address.parse(canonical) == addr


def test_address_rfc4475_wsinv_display_name_and_spaced_params() -> None:
    """Escaped quotes in the display name and LWS around ';' and '=' (RFC 4475 3.1.1.1)."""
    addr = Address.parse('"J Rosenberg \\\\\\""       <sip:jdrosen@example.com> ;  tag = 98asjd8')
    assert addr.display_name == 'J Rosenberg \\"'
    assert addr.tag == "98asjd8"
    assert str(addr) == '"J Rosenberg \\\\\\"" <sip:jdrosen@example.com>;tag=98asjd8'
    to = Address.parse("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n")
    assert to.uri.user == "vivekg"
    assert to.tag == "1918181833n"


def test_address_rfc4475_intmeth_token_display_name_and_odd_params() -> None:
    """Token display names and params full of token characters (RFC 4475 3.1.1.2)."""
    addr = Address.parse(
        "token1~` token2'+_ token3*%!.- <sip:mundane@example.com>"
        ";fromParam''~+*_!.-%=\"работающий\";tag=_token~1'+`*%!-."
    )
    assert addr.display_name == "token1~` token2'+_ token3*%!.-"
    assert addr.param("FROMPARAM''~+*_!.-%") == '"работающий"'
    assert unquote(addr.param("fromParam''~+*_!.-%") or "") == "работающий"
    assert addr.tag == "_token~1'+`*%!-."
    assert Address.parse(str(addr)) == addr


def test_address_display_name_with_control_characters_round_trips() -> None:
    """Quoted-pairs may escape control characters (RFC 4475 3.1.1.2 To header)."""
    addr = Address.parse('"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:x@example.com>')
    assert addr.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert Address.parse(str(addr)) == addr


def test_address_with_tag_sets_or_replaces_the_tag() -> None:
    """with_tag adds a tag, or replaces the existing one, leaving other params alone."""
    addr = Address.parse("<sip:a@example.com>;x=1")
    assert str(addr.with_tag("t1")) == "<sip:a@example.com>;x=1;tag=t1"
    assert str(addr.with_tag("t1").with_tag("t2")) == "<sip:a@example.com>;x=1;tag=t2"
    assert addr.tag is None
    assert addr.has_param("X")
    assert str(addr.without_params("x")) == "<sip:a@example.com>"


@pytest.mark.parametrize(
    "text",
    [
        "",
        '"unterminated <sip:a@example.com>',  # RFC 4475 3.1.2.6 quotbal
        '"Watson, Thomas" < sip:t.watson@example.org >',  # 3.1.2.14 badaspec
        "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",  # 3.1.2.15 baddn
        "sip:user@example.com?Route=%3Csip:sip.example.com%3E",  # 3.1.2.13 regbadct
        "<sip:a@example.com",
        '"name" sip:a@example.com',
        "<sip:a@example.com>;;tag=1",
        "<sip:a@example.com>;tag=",
        "<sip:a@example.com> junk",
        "<sip:a@example.com>, <sip:b@example.com>",
        '<sip:a@example.com>;p="open',
    ],
)
def test_address_parse_rejects_malformed_text(text: str) -> None:
    """Malformed addresses raise SipParseError."""
    with pytest.raises(SipParseError):
        Address.parse(text)


def test_quote_and_unquote_are_inverse() -> None:
    """quote escapes '"' and '\\'; unquote undoes it; unquoted text passes through."""
    for text in ['plain', 'with "quotes"', "back\\slash", "tab\there", ""]:
        assert unquote(quote(text)) == text
    assert quote('a"b') == '"a\\"b"'
    assert unquote("token") == "token"


# ---------------------------------------------------------------------------------------------
# Via


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        (
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds",
            Via("UDP", "192.0.2.1", 5060, (("branch", "z9hG4bK776asdhds"),)),
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds",
        ),
        (
            "SIP/2.0/tcp client.example.com;branch=z9hG4bKx;rport",
            Via("TCP", "client.example.com", None, (("branch", "z9hG4bKx"), ("rport", None))),
            "SIP/2.0/TCP client.example.com;branch=z9hG4bKx;rport",
        ),
        (
            "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKy;received=2001:db8::1;rport=40000",
            Via(
                "TLS",
                "2001:db8::9",
                5061,
                (("branch", "z9hG4bKy"), ("received", "2001:db8::1"), ("rport", "40000")),
            ),
            "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKy;received=2001:db8::1;rport=40000",
        ),
        (
            # RFC 4475 3.1.1.1 (wsinv): LWS around '/', ';', '=' and ':'.
            "SIP  /   2.0 /UDP    192.0.2.2 : 5060 ;  branch = 390skdjuw",
            Via("UDP", "192.0.2.2", 5060, (("branch", "390skdjuw"),)),
            "SIP/2.0/UDP 192.0.2.2:5060;branch=390skdjuw",
        ),
        (
            # RFC 4475 3.1.1.10 (transports): unknown transports are legal tokens.
            "SIP/2.0/UNKNOWN t5.example.com;branch=z9hG4bKasd",
            Via("UNKNOWN", "t5.example.com", None, (("branch", "z9hG4bKasd"),)),
            "SIP/2.0/UNKNOWN t5.example.com;branch=z9hG4bKasd",
        ),
    ],
)
def test_via_parse_golden_cases(text: str, expected: Via, canonical: str) -> None:
    """Via.parse gives the expected value and str() the canonical form, which re-parses."""
    via = Via.parse(text)
    assert via == expected
    assert str(via) == canonical
    assert Via.parse(canonical) == via


def test_via_accessors_branch_received_rport() -> None:
    """branch, received and rport read the parameters; rport is an int."""
    via = Via.parse("SIP/2.0/UDP h.example;BRANCH=z9hG4bK1;received=192.0.2.7;rport=5099")
    assert via.branch == "z9hG4bK1"
    assert via.received == "192.0.2.7"
    assert via.rport == 5099
    assert via.has_rport
    assert via.sent_by == "h.example"


def test_via_bare_rport_flag_has_no_value() -> None:
    """A bare rport flag (RFC 3581 client) gives has_rport True and rport None."""
    via = Via.parse("SIP/2.0/UDP h.example:5060;rport;branch=z9hG4bK1")
    assert via.has_rport
    assert via.rport is None
    assert not Via.parse("SIP/2.0/UDP h.example;branch=z9hG4bK1").has_rport


def test_via_with_params_fills_received_and_rport_in_place() -> None:
    """A server fills rport where the flag was and appends received (RFC 3581 §4)."""
    via = Via.parse("SIP/2.0/UDP h.example:5060;rport;branch=z9hG4bK1")
    filled = via.with_params(received="192.0.2.9", rport="40123")
    assert str(filled) == (
        "SIP/2.0/UDP h.example:5060;rport=40123;branch=z9hG4bK1;received=192.0.2.9"
    )
    assert filled.rport == 40123
    assert str(filled.without_params("received", "rport")) == (
        "SIP/2.0/UDP h.example:5060;branch=z9hG4bK1"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP/3.0/UDP h.example",
        "HTTP/2.0/UDP h.example",
        "SIP/2.0/UDPh.example",
        "SIP/2.0/UDP h.example:99999",
        "SIP/2.0/UDP h.example:",
        "SIP/2.0/UDP 192.0.2.15;;,;,,",  # RFC 4475 3.1.2.1 badinv01
        "SIP/2.0/UDP h.example;rport=abc",
        "SIP/2.0/UDP h.example;rport=70000",
        "SIP/2.0/UDP [::1;branch=x",
        "SIP/2.0/UDP h.example junk",
        "SIP/2.0/UDP h.example;branch=",
    ],
)
def test_via_parse_rejects_malformed_text(text: str) -> None:
    """Malformed via-parms raise SipParseError."""
    with pytest.raises(SipParseError):
        Via.parse(text)


# ---------------------------------------------------------------------------------------------
# CSeq


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("4711 REGISTER", CSeq(4711, "REGISTER"), "4711 REGISTER"),
        ("0009 INVITE", CSeq(9, "INVITE"), "9 INVITE"),
        ("  0   ACK  ", CSeq(0, "ACK"), "0 ACK"),
        ("2147483647 OPTIONS", CSeq(2**31 - 1, "OPTIONS"), "2147483647 OPTIONS"),
        ("1 RE%47IST%45R", CSeq(1, "RE%47IST%45R"), "1 RE%47IST%45R"),
    ],
)
def test_cseq_parse_golden_cases(text: str, expected: CSeq, canonical: str) -> None:
    """CSeq.parse reads number and method; str() writes them with one space."""
    cseq = CSeq.parse(text)
    assert cseq == expected
    assert str(cseq) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "INVITE",
        "12",
        "-1 INVITE",
        "2147483648 INVITE",
        "36893488147419103232 INVITE",  # RFC 4475 3.1.2.4 scalar02
        "1" * 5000 + " INVITE",
        "1 INV ITE",
        "1 INVITE;x",
        "١ INVITE",
    ],
)
def test_cseq_parse_rejects_malformed_or_out_of_range(text: str) -> None:
    """Malformed CSeq values, and numbers of 2**31 or more, raise SipParseError."""
    with pytest.raises(SipParseError):
        CSeq.parse(text)


# ---------------------------------------------------------------------------------------------
# errors


def test_error_hierarchy_has_one_root() -> None:
    """Every SIP error is a SipError, so callers can catch the layer as a whole."""
    for cls in (SipParseError, DigestError, TransactionTimeout, TransportError, ResolveError):
        assert issubclass(cls, SipError)


def test_parse_error_defaults_to_400_and_keeps_a_hint() -> None:
    """SipParseError carries status_hint, 400 unless told otherwise."""
    assert SipParseError("bad").status_hint == 400
    assert SipParseError("too big", status_hint=413).status_hint == 413
    assert SipParseError("version", 505).status_hint == 505


def test_parse_error_quotes_at_most_sixty_characters() -> None:
    """The offending text is quoted, cut to 60 characters with an ellipsis."""
    err = SipParseError("bad thing", offending="x" * 500)
    assert str(err).startswith("bad thing: 'xxx")
    assert "x" * 61 not in str(err)
    assert str(err).endswith("…")
    assert excerpt(b"\x00\xff") == "b'\\x00\\xff'"


def test_excerpt_blanks_uri_passwords_even_when_cut() -> None:
    """A URI password is replaced by *** in excerpts, also when the '@' falls past the cut."""
    assert excerpt("To: <sip:bob:pw1@example.com>") == "'To: <sip:bob:***@example.com>'"
    assert excerpt("From: SIPS:a;b:pw2@h") == "'From: SIPS:a;b:***@h'"
    cut = excerpt("x" * 40 + " sip:bob:" + "p" * 100 + "@example.com")
    assert "p" * 5 not in cut
    assert cut.endswith("sip:bob:***'…")


def test_transport_error_carries_the_flow() -> None:
    """TransportError has an optional flow attribute."""
    flow = object()
    assert TransportError("reset", flow=flow).flow is flow
    assert TransportError("reset").flow is None


# --- check_address: the regex fast path of From/To validation --------------------------------

@hypothesis.settings(max_examples=400, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(text=st.from_regex(_PLAIN_ADDRESS_RE, fullmatch=True))
def test_what_the_plain_address_regex_accepts_the_full_parser_accepts(text: str) -> None:
    """The fast path never lets through a value ``Address.parse`` would refuse."""
    Address.parse(text)
    check_address(text)


@pytest.mark.parametrize("text", [
    "<sip:user1@bench.test>;tag=0123abcd",
    '"Bob" <sip:bob@sip.test>;tag=caller',
    "<sip:alice@127.0.0.1:5060;transport=udp>;expires=3600",
    '<sip:tok@10.0.0.1:5070>;+sip.instance="<urn:uuid:1>"',
])
def test_everyday_from_and_to_values_take_the_fast_path(text: str) -> None:
    assert _PLAIN_ADDRESS_RE.fullmatch(text)


@pytest.mark.parametrize("text", [
    "<sip:a@1.2.3.256>", "<sip:a@host:65536>", "<sip:a@-bad.test>", '"unterminated <sip:a@b>',
    "<sip:a@b", "<sip:a@b>;=x",
])
def test_check_address_refuses_what_the_parser_refuses(text: str) -> None:
    with pytest.raises(SipParseError):
        Address.parse(text)
    with pytest.raises(SipParseError):
        check_address(text)


_VIA_TAIL = st.lists(st.sampled_from([
    ";branch=z9hG4bK1", ";rport", ";rport=5070", ";rport=99999", ";received=10.0.0.1", " ;lr",
    ";maddr=h.test", ";x", ";=", ":5060", " :5060", ".", "_x", ";ttl=\"1\"", ",",
]), max_size=4).map("".join)


@hypothesis.settings(max_examples=400, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(head=st.from_regex(_PLAIN_VIA_RE, fullmatch=True), tail=_VIA_TAIL)
def test_the_plain_via_fast_path_parses_as_the_exact_parser(head: str, tail: str) -> None:
    """Same Via or the same refusal, whichever path parses it."""
    text = head + tail
    try:
        expected = Via._parse_slowly(text)
    except SipParseError:
        with pytest.raises(SipParseError):
            Via._parse(text)
        return
    assert Via._parse(text) == expected


def test_uri_text_is_kept_once_made_and_not_carried_by_evolve() -> None:
    uri = URI.parse("sip:alice@sip.test:5070;transport=tcp")
    assert str(uri) == uri._format() == "sip:alice@sip.test:5070;transport=tcp"
    assert str(uri) is str(uri)
    other = attrs.evolve(uri, port=5080)
    assert str(other) == "sip:alice@sip.test:5080;transport=tcp"
    assert other != uri and URI.parse(str(uri)) == uri
