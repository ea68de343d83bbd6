"""Headers, parse_message/to_bytes, make_response, StreamFramer and identifiers.

The RFC 4475 torture messages below are typed in from the RFC text (bodies shortened where
they do not matter); the test names give the RFC 4475 section and message name.
"""

from __future__ import annotations

import pytest

from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI, Address, CSeq, Via
from sipis.sip.message import (
    KEEPALIVE_PING,
    KEEPALIVE_PONG,
    MAX_MESSAGE_SIZE,
    Headers,
    KeepAlive,
    SipRequest,
    SipResponse,
    StreamFramer,
    canonical_name,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
    split_header_list,
)

SDP = (
    b"v=0\r\n"
    b"o=mhandley 29739 7272939 IN IP4 192.0.2.3\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.4\r\n"
    b"t=0 0\r\n"
    b"m=audio 49217 RTP/AVP 0 12\r\n"
    b"m=video 3227 RTP/AVP 31\r\n"
    b"a=rtpmap:31 LPC\r\n"
)


def wire(head: str, body: bytes = b"") -> bytes:
    """Header text written with '\\n' line ends → wire bytes with CRLF and the empty line."""
    return head.strip("\n").replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n" + body


def request(method: str = "OPTIONS", extra: str = "", body: bytes = b"") -> bytes:
    """A small valid request, with ``extra`` header lines appended."""
    head = (
        f"{method} sip:bob@example.com SIP/2.0\n"
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport\n"
        "Max-Forwards: 70\n"
        "From: \"Alice\" <sip:alice@example.com>;tag=a1\n"
        "To: <sip:bob@example.com>\n"
        "Call-ID: c1@192.0.2.1\n"
        f"CSeq: 1 {method}\n" + extra
    )
    return wire(head, body)


# ---------------------------------------------------------------------------------------------
# Headers


def test_canonical_name_expands_compact_forms_and_fixes_casing() -> None:
    """Compact forms expand, well-known names get their usual casing, others stay."""
    expected = {
        "i": "Call-ID", "m": "Contact", "f": "From", "t": "To", "v": "Via",
        "l": "Content-Length", "c": "Content-Type", "k": "Supported", "s": "Subject",
        "e": "Content-Encoding", "o": "Event", "u": "Allow-Events", "r": "Refer-To",
        "b": "Referred-By", "x": "Session-Expires", "a": "Accept-Contact",
        "j": "Reject-Contact", "d": "Request-Disposition", "y": "Identity",
        "n": "Identity-Info",
    }
    for compact, full in expected.items():
        assert canonical_name(compact) == full
        assert canonical_name(compact.upper()) == full
    assert canonical_name("call-id") == "Call-ID"
    assert canonical_name("CSEQ") == "CSeq"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("PROXY-AUTHORIZATION") == "Proxy-Authorization"
    assert canonical_name("record-route") == "Record-Route"
    assert canonical_name("min-expires") == "Min-Expires"
    assert canonical_name("X-Sipis-Push-Status") == "X-Sipis-Push-Status"
    assert canonical_name("q") == "q"


def test_headers_lookup_is_case_insensitive_and_ordered() -> None:
    """get finds the first line whatever the case or compact form; get_all keeps order."""
    h = Headers([("v", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("VIA", "SIP/2.0/UDP b;branch=z9hG4bK2")])
    h.add("call-id", "x@y")
    assert h.get("Via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert h.get_all("v") == ["SIP/2.0/UDP a;branch=z9hG4bK1", "SIP/2.0/UDP b;branch=z9hG4bK2"]
    assert h.get("i") == "x@y"
    assert list(h) == [
        ("Via", "SIP/2.0/UDP a;branch=z9hG4bK1"),
        ("Via", "SIP/2.0/UDP b;branch=z9hG4bK2"),
        ("Call-ID", "x@y"),
    ]
    assert "CALL-ID" in h
    assert "Route" not in h
    assert h.get("Route") is None
    assert h.get_all("Route") == []
    assert len(h) == 3


def test_headers_get_list_splits_at_top_level_commas_only() -> None:
    """get_list splits every line at commas outside quotes and <...>."""
    h = Headers()
    h.add("Contact", '"Doe, John" <sip:j@a.example;x=1,2>;q=0.5, <sip:k@b.example>')
    h.add("Contact", "sip:l@c.example")
    assert h.get_list("m") == [
        '"Doe, John" <sip:j@a.example;x=1,2>;q=0.5',
        "<sip:k@b.example>",
        "sip:l@c.example",
    ]
    assert split_header_list('a, "b \\" , c", , d') == ["a", '"b \\" , c"', "d"]
    assert split_header_list("") == []


def test_headers_set_remove_prepend_copy() -> None:
    """set replaces all lines in place, remove drops them, prepend goes first, copy is deep."""
    h = Headers([("Route", "<sip:a>"), ("To", "<sip:t@x>"), ("Route", "<sip:b>")])
    h.set("route", "<sip:c>")
    assert list(h) == [("Route", "<sip:c>"), ("To", "<sip:t@x>")]
    h.set("Expires", "60")
    assert list(h)[-1] == ("Expires", "60")
    copy = h.copy()
    copy.prepend("v", "SIP/2.0/UDP p;branch=z9hG4bK9")
    assert next(iter(copy)) == ("Via", "SIP/2.0/UDP p;branch=z9hG4bK9")
    assert "Via" not in h
    assert copy.remove("ROUTE") == 1
    assert copy.remove("Route") == 0
    assert "Route" in h


def test_headers_equality_ignores_name_case_but_not_order_or_values() -> None:
    """Two multimaps are equal when they hold the same lines in the same order."""
    assert Headers([("call-id", "x"), ("X-A", "1")]) == Headers([("i", "x"), ("x-a", "1")])
    assert Headers([("X-A", "1"), ("X-B", "2")]) != Headers([("X-B", "2"), ("X-A", "1")])
    assert Headers([("X-A", "1")]) != Headers([("X-A", "2")])


@pytest.mark.parametrize(
    ("name", "value"),
    [("Bad Name", "v"), ("", "v"), ("X:Y", "v"), ("X-A", "a\r\nInjected: 1"), ("X-A", "a\nb")],
)
def test_headers_reject_bad_names_and_line_breaks(name: str, value: str) -> None:
    """add/set refuse non-token names and CR/LF in values (no header injection)."""
    h = Headers()
    with pytest.raises(ValueError, match="header"):
        h.add(name, value)
    with pytest.raises(ValueError, match="header"):
        h.set(name, value)


# ---------------------------------------------------------------------------------------------
# parse_message: basics


def test_parse_request_reads_start_line_headers_and_accessors() -> None:
    """A simple request parses; accessors return typed values."""
    msg = parse_message(request("OPTIONS", "Content-Length: 0\n"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "OPTIONS"
    assert msg.uri == URI("sip", "bob", "example.com")
    assert msg.call_id == "c1@192.0.2.1"
    assert msg.cseq == CSeq(1, "OPTIONS")
    assert msg.from_.tag == "a1"
    assert msg.from_.display_name == "Alice"
    assert msg.to == Address(URI("sip", "bob", "example.com"))
    assert msg.top_via.branch == "z9hG4bKabc"
    assert msg.top_via.has_rport
    assert msg.max_forwards == 70
    assert msg.body == b""


def test_parse_response_reads_status_and_reason() -> None:
    """A response parses into status, reason and headers."""
    data = wire(
        """
SIP/2.0 401 Unauthorized
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport=5060;received=192.0.2.1
From: <sip:alice@example.com>;tag=a1
To: <sip:alice@example.com>;tag=srv
Call-ID: c1@192.0.2.1
CSeq: 1 REGISTER
WWW-Authenticate: Digest realm="example.com", nonce="abc", qop="auth", algorithm=MD5
Content-Length: 0
"""
    )
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    assert (msg.status, msg.reason) == (401, "Unauthorized")
    assert msg.top_via.rport == 5060
    assert msg.headers.get("www-authenticate") == (
        'Digest realm="example.com", nonce="abc", qop="auth", algorithm=MD5'
    )
    assert msg.cseq.method == "REGISTER"
    assert msg.max_forwards is None


def test_vias_come_from_every_line_and_comma_joined_values() -> None:
    """.vias lists every via-parm, top first, across lines and commas."""
    msg = parse_message(
        request(
            "OPTIONS",
            "Via: SIP/2.0/TCP p1.example;branch=z9hG4bK2, SIP/2.0/TLS p2.example;branch=z9hG4bK3\n",
        )
    )
    assert [v.host for v in msg.vias] == ["192.0.2.1", "p1.example", "p2.example"]
    assert [v.transport for v in msg.vias] == ["UDP", "TCP", "TLS"]


def test_body_is_cut_to_content_length_for_datagrams() -> None:
    """A datagram longer than Content-Length is truncated (RFC 3261 §18.3)."""
    msg = parse_message(request("MESSAGE", "Content-Length: 5\n", b"hello world"))
    assert msg.body == b"hello"


def test_body_without_content_length_is_the_rest_of_the_datagram() -> None:
    """Without Content-Length a datagram's body runs to its end; binary bytes kept raw."""
    msg = parse_message(request("MESSAGE", "", b"\x00\xff\xfe raw"))
    assert msg.body == b"\x00\xff\xfe raw"


def test_leading_crlfs_before_the_start_line_are_ignored() -> None:
    """RFC 3261 §7.5: CRLFs before the start line are skipped."""
    assert parse_message(b"\r\n\r\n" + request()).method == "OPTIONS"  # type: ignore[union-attr]


def test_header_folding_and_whitespace_around_colon() -> None:
    """Continuation lines join with one space; SP/HTAB around ':' and at the ends go."""
    msg = parse_message(request("OPTIONS", "Subject :\t  first\n   second\n\tthird  \n"))
    assert msg.headers.get("Subject") == "first second third"


def test_identical_duplicate_content_length_is_accepted() -> None:
    """Two Content-Length lines with the same value are harmless."""
    msg = parse_message(request("MESSAGE", "Content-Length: 2\nl: 2\n", b"hi"))
    assert msg.body == b"hi"


def test_empty_header_value_is_allowed() -> None:
    """An empty header value (RFC 4475 wsinv 's :') parses as ''."""
    msg = parse_message(request("OPTIONS", "Subject:\n"))
    assert msg.headers.get("Subject") == ""


def test_status_line_without_reason_phrase_is_tolerated() -> None:
    """'SIP/2.0 200' with no space and reason parses with an empty reason."""
    data = request().replace(b"OPTIONS sip:bob@example.com SIP/2.0", b"SIP/2.0 200", 1)
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    assert msg.reason == ""


def test_lower_case_version_is_accepted_and_written_canonically() -> None:
    """'sip/2.0' is SIP/2.0 (ABNF strings are case-insensitive); output uses SIP/2.0."""
    msg = parse_message(request().replace(b" SIP/2.0\r\n", b" sip/2.0\r\n", 1))
    assert msg.to_bytes().startswith(b"OPTIONS sip:bob@example.com SIP/2.0\r\n")


# ---------------------------------------------------------------------------------------------
# parse_message: RFC 4475 valid messages


def test_rfc4475_3_1_1_1_wsinv_short_tortuous_invite() -> None:
    """Unusual whitespace, folding, case and compact forms all parse (wsinv)."""
    head = (
        "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\n"
        "TO :\n"
        " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\n"
        'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\n'
        "  ;\n"
        "  tag = 98asjd8\n"
        "MaX-fOrWaRdS: 0068\n"
        "Call-ID: wsinv.ndaksdj@192.0.2.1\n"
        f"Content-Length   : {len(SDP)}\n"
        "cseq: 0009\n"
        "  INVITE\n"
        "Via  : SIP  /   2.0\n"
        " /UDP\n"
        "    192.0.2.2;branch=390skdjuw\n"
        "s :\n"
        "NewFangledHeader:   newfangled value\n"
        " continued newfangled value\n"
        "UnknownHeaderWithUnusualValue: ;;,,;;,;\n"
        "Content-Type: application/sdp\n"
        "Route:\n"
        " <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\n"
        "v:  SIP  / 2.0  / TCP     spindle.example.com   ;\n"
        "  branch  =   z9hG4bK9ikj8  ,\n"
        " SIP  /    2.0   / UDP  192.168.255.111   ; branch=\n"
        " z9hG4bK30239\n"
        'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =\n'
        "      newvalue ;\n"
        "  secondparam ; q = 0.33\n"
    )
    msg = parse_message(wire(head, SDP))
    assert isinstance(msg, SipRequest)
    assert msg.uri.has_param("unknownparam")
    assert msg.to.tag == "1918181833n"
    assert msg.from_.display_name == 'J Rosenberg \\"'
    assert msg.from_.tag == "98asjd8"
    assert msg.max_forwards == 68
    assert msg.cseq == CSeq(9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.headers.get("Subject") == ""
    assert msg.headers.get("newfangledheader") == "newfangled value continued newfangled value"
    contact = Address.parse(msg.headers.get("Contact") or "")
    assert contact.display_name == 'Quoted string ""'
    assert contact.param("q") == "0.33"
    assert contact.has_param("secondparam")
    assert msg.body == SDP
    assert parse_message(msg.to_bytes()) == msg


def test_rfc4475_3_1_1_2_intmeth_wide_range_of_valid_characters() -> None:
    """Unknown method full of token characters, odd URI, control chars in quotes (intmeth)."""
    method = "!interesting-Method0123456789_*+`.%indeed'~"
    head = (
        f"{method} sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$"
        "wo~d_too.(doesn't-it)@example.com SIP/2.0\n"
        "Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~\n"
        'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:1_unusual.URI~(to-be!sure)&isn\'t+it$/'
        "crazy?,/;;*@example.com>\n"
        "From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%="
        '"работающий";tag=_token~1\'+`*%!-.\n'
        "Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\n"
        f"CSeq: 139122385 {method}\n"
        "Max-Forwards: 255\n"
        "extensionHeader-!.%*+_`'~:\ufeff大停電\n"
        "Content-Length: 0\n"
    )
    msg = parse_message(wire(head))
    assert isinstance(msg, SipRequest)
    assert msg.method == method
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.top_via.branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.headers.get("EXTENSIONHEADER-!.%*+_`'~") == "\ufeff大停電"
    assert parse_message(msg.to_bytes()) == msg


def test_rfc4475_3_1_1_3_esc01_escaped_uris_are_kept_as_given() -> None:
    """Escapes in Request-URI, To, From and Contact parse and stay escaped (esc01)."""
    head = (
        "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0\n"
        "To: sip:%75se%72@example.com\n"
        "From: <sip:I%20have%20spaces@example.net>;tag=938\n"
        "Max-Forwards: 87\n"
        "i: esc01.239409asdfakjkn23onasd0-3234\n"
        "CSeq: 234234 INVITE\n"
        "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw\n"
        "C: application/sdp\n"
        "Contact:\n"
        "  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>\n"
        f"Content-Length: {len(SDP)}\n"
    )
    msg = parse_message(wire(head, SDP))
    assert isinstance(msg, SipRequest)
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert msg.to.uri.user == "%75se%72"
    assert msg.from_.uri.user == "I%20have%20spaces"
    assert msg.headers.get("Content-Type") == "application/sdp"
    contact = Address.parse(msg.headers.get("Contact") or "")
    assert contact.uri.param("n%61me") == "v%61lue%25%34%31"
    assert str(msg.uri) == "sip:sips%3Auser%40example.com@example.net"


def test_rfc4475_3_1_1_4_escnull_escaped_nulls_in_uris() -> None:
    """%00 in URIs is legal and kept (escnull)."""
    head = (
        "REGISTER sip:example.com SIP/2.0\n"
        "To: sip:null-%00-null@example.com\n"
        "From: sip:null-%00-null@example.com;tag=839923423\n"
        "Max-Forwards: 70\n"
        "Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd\n"
        "CSeq: 14398234 REGISTER\n"
        "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw\n"
        "Contact: <sip:%00@host5.example.com>\n"
        "Contact: <sip:%00%00@host5.example.com>\n"
        "L:0\n"
    )
    msg = parse_message(wire(head))
    assert msg.to.uri.user == "null-%00-null"
    assert [Address.parse(c).uri.user for c in msg.headers.get_list("Contact")] == [
        "%00",
        "%00%00",
    ]


def test_rfc4475_3_1_1_5_esc02_escapes_in_method_and_header_name() -> None:
    """A method with '%' is a different, unknown method; 'C%6Fntact' is not Contact (esc02)."""
    head = (
        "RE%47IST%45R sip:registrar.example.com SIP/2.0\n"
        'To: "%Z%45" <sip:resource@example.com>\n'
        'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23\n'
        "Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf\n"
        "Via: SIP/2.0/TCP host.example.com;rport;branch=z9hG4bK209asDfn\n"
        "CSeq: 29344 RE%47IST%45R\n"
        "Max-Forwards: 70\n"
        "Contact: <sip:alias1@host1.example.com>\n"
        "C%6Fntact: <sip:alias2@host2.example.com>\n"
        "Contact: <sip:alias3@host3.example.com>\n"
        "l: 0\n"
    )
    msg = parse_message(wire(head))
    assert isinstance(msg, SipRequest)
    assert msg.method == "RE%47IST%45R"
    assert msg.to.display_name == "%Z%45"
    assert len(msg.headers.get_all("Contact")) == 2
    assert msg.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_rfc4475_3_1_1_7_longreq_long_values_parse() -> None:
    """Very long header values, many Vias and a long Call-ID parse (longreq)."""
    long_name = "I have a user name of " + "extreme " * 60 + "proportion"
    vias = "".join(
        f"Via: SIP/2.0/TCP sip{i}.example.com;branch=z9hG4bK{'x' * 200}{i}\n" for i in range(20)
    )
    head = (
        "INVITE sip:user@example.com SIP/2.0\n"
        f'To: "{long_name}"<sip:user@example.com:6000;unknownparam1=verylonguri'
        f"{'x' * 300};longparam{'y' * 300}=shortvalue>\n"
        f"From: sip:caller@example.net;tag={'t' * 300}\n"
        f"Call-ID: longreq.{'o' * 500}\n"
        "CSeq: 3882340 INVITE\n"
        f"Unknown-{'L' * 100}-Header: {'unknown-long-value ' * 40}end\n"
        + vias
        + "Max-Forwards: 70\n"
        + f"Contact: <sip:amazinglylongcallername{'n' * 200}@host5.example.net>\n"
        + "Content-Length: 0\n"
    )
    msg = parse_message(wire(head))
    assert msg.to.display_name == long_name
    assert len(msg.vias) == 21 - 1
    assert msg.to.uri.port == 6000
    assert len(msg.call_id) == len("longreq.") + 500
    assert parse_message(msg.to_bytes()) == msg


def test_rfc4475_3_1_1_8_dblreq_extra_bytes_after_content_length_are_dropped() -> None:
    """A second request after Content-Length: 0 in one datagram is ignored (dblreq)."""
    second = wire(
        "INVITE sip:joe@example.com SIP/2.0\n"
        "t: sip:joe@example.com\n"
        "From: sip:caller@example.net;tag=141334\n"
        "Max-Forwards: 8\n"
        "Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15\n"
        "CSeq: 8 INVITE\n"
        "Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234\n"
        "Content-Length: 0\n"
    )
    head = (
        "REGISTER sip:example.com SIP/2.0\n"
        "To: sip:j.user@example.com\n"
        "From: sip:j.user@example.com;tag=43251j3j324\n"
        "Max-Forwards: 8\n"
        "I: dblreq.0ha0isndaksdj99sdfafnl3lk233412\n"
        "Contact: sip:j.user@host.example.com\n"
        "CSeq: 8 REGISTER\n"
        "Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492\n"
        "Content-Length: 0\n"
    )
    msg = parse_message(wire(head, b"\r\n" + second))
    assert isinstance(msg, SipRequest)
    assert msg.method == "REGISTER"
    assert msg.body == b""


def test_rfc4475_3_1_1_9_semiuri_semicolon_in_user_part() -> None:
    """'sip:user;par=u%40example.net@example.com': the ';par' is in the user (semiuri)."""
    head = (
        "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0\n"
        "To: sip:j_user@example.com\n"
        "From: sip:caller@example.org;tag=33242\n"
        "Max-Forwards: 3\n"
        "Call-ID: semiuri.0ha0isndaksdj\n"
        "CSeq: 8 OPTIONS\n"
        "Accept: application/sdp, application/pkcs7-mime,\n"
        "        multipart/mixed, multipart/signed,\n"
        "        message/sip, message/sipfrag\n"
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw\n"
        "l: 0\n"
    )
    msg = parse_message(wire(head))
    assert isinstance(msg, SipRequest)
    assert msg.uri.user == "user;par=u%40example.net"
    assert msg.uri.params == ()
    assert len(msg.headers.get_list("Accept")) == 6


def test_rfc4475_3_1_1_10_transports_unknown_transports_are_legal() -> None:
    """Via lines with UDP, SCTP, TLS, UNKNOWN and TCP all parse (transports)."""
    head = (
        "OPTIONS sip:user@example.com SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: <sip:caller@example.com>;tag=323\n"
        "Max-Forwards: 70\n"
        "Call-ID:  transports.kijh4akdnaqjkwendsasfdj\n"
        "Accept: application/sdp\n"
        "CSeq: 60 OPTIONS\n"
        "Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw\n"
        "Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf\n"
        "Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj\n"
        "Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en\n"
        "Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee\n"
        "l: 0\n"
    )
    msg = parse_message(wire(head))
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert msg.call_id == "transports.kijh4akdnaqjkwendsasfdj"


def test_rfc4475_3_1_1_11_mpart01_binary_body_is_kept_raw() -> None:
    """A multipart body with binary bytes is returned untouched (mpart01)."""
    body = (
        b"--++\r\nContent-Type: application/sdp\r\n\r\n" + SDP
        + b"--++\r\nContent-Type: application/pkcs7-signature\r\n\r\n"
        + bytes(range(256)) + b"\r\n--++--"
    )
    head = (
        "MESSAGE sip:kumiko@example.org SIP/2.0\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport\n"
        "Max-Forwards: 70\n"
        "Route: <sip:127.0.0.1:5080>\n"
        "Identity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq"
        "37CD+813gvYjcBUaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQ"
        "FteeivUhkMWYUA=\n"
        "Contact: <sip:fluffy@127.0.0.1:5070>\n"
        "To: <sip:kumiko@example.org>\n"
        "From: <sip:fluffy@example.com>;tag=2fb0dcc9\n"
        "Call-ID: 3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..\n"
        "CSeq: 1 MESSAGE\n"
        'Content-Type: multipart/mixed;boundary=++\n'
        f"Content-Length: {len(body)}\n"
    )
    msg = parse_message(wire(head, body))
    assert msg.body == body
    assert parse_message(msg.to_bytes()) == msg


def test_rfc4475_3_1_1_12_unreason_utf8_reason_phrase() -> None:
    """A UTF-8 reason phrase with symbols parses and round-trips (unreason)."""
    reason = "= 2**3 * 5**2 но сто девяносто девять - простое"
    head = (
        f"SIP/2.0 200 {reason}\n"
        "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\n"
        "Call-ID: unreason.1234ksdfak3j2erwedfsASdf\n"
        "CSeq: 35 INVITE\n"
        "From: sip:user@example.com;tag=11141343\n"
        "To: sip:user@example.edu;tag=2229\n"
        f"Content-Length: {len(SDP)}\n"
        "Content-Type: application/sdp\n"
        "Contact: <sip:user@host198.example.com>\n"
    )
    msg = parse_message(wire(head, SDP))
    assert isinstance(msg, SipResponse)
    assert msg.reason == reason
    assert parse_message(msg.to_bytes()) == msg


def test_rfc4475_3_1_1_13_noreason_empty_reason_phrase() -> None:
    """'SIP/2.0 100 ' with an empty reason phrase parses (noreason)."""
    head = (
        "SIP/2.0 100 \n"
        "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe\n"
        "Call-ID: noreason.asndj203insdf99223ndf\n"
        "CSeq: 35 INVITE\n"
        "From: <sip:user@example.com>;tag=39ansfi3\n"
        "To: <sip:user@example.edu>;tag=902jndnke3\n"
        "Content-Length: 0\n"
        "Contact: <sip:user@host105.example.com>\n"
    )
    msg = parse_message(wire(head))
    assert isinstance(msg, SipResponse)
    assert (msg.status, msg.reason) == (100, "")


# ---------------------------------------------------------------------------------------------
# parse_message: RFC 4475 invalid messages and other malformations

_BASE = (
    "Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw\n"
    "To: sip:j.user@example.com\n"
    "From: sip:caller@example.net;tag=134161461246\n"
    "Max-Forwards: 7\n"
    "Call-ID: bad.0ha0isndaksdjasdf3234nas\n"
)


@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        pytest.param(  # 3.1.2.1
            "INVITE sip:user@example.com SIP/2.0\n"
            "To: sip:j.user@example.com\n"
            "From: sip:caller@example.net;tag=134161461246\n"
            "Max-Forwards: 7\n"
            "Call-ID: badinv01.0ha0isndaksdjasdf3234nas\n"
            "CSeq: 8 INVITE\n"
            "Via: SIP/2.0/UDP 192.0.2.15;;,;,,\n"
            'Contact: "Joe" <sip:joe@example.org>;;;;\n'
            "Content-Length: 152\n"
            "Content-Type: application/sdp\n",
            SDP, 400, id="badinv01-extraneous-separators",
        ),
        pytest.param(  # 3.1.2.2
            "INVITE sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n"
            "Content-Length: 9999\nContent-Type: application/sdp\n",
            SDP, 400, id="clerr-content-length-larger-than-message",
        ),
        pytest.param(  # 3.1.2.3
            "INVITE sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n"
            "Content-Length: -999\nContent-Type: application/sdp\n",
            SDP, 400, id="ncl-negative-content-length",
        ),
        pytest.param(  # 3.1.2.4
            "REGISTER sip:example.com SIP/2.0\n"
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3\n"
            "To: <sip:user@example.com>\n"
            "From: <sip:user@example.com>;tag=239232jh3\n"
            "CSeq: 36893488147419103232 REGISTER\n"
            "Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32\n"
            "Max-Forwards: 300\n"
            "Expires: 1" + "0" * 40 + "\n"
            "Contact: <sip:user@host129.example.com>;expires=280297596632815\n"
            "Content-Length: 0\n",
            b"", 400, id="scalar02-overlarge-request-scalars",
        ),
        pytest.param(  # 3.1.2.4, Max-Forwards alone
            "OPTIONS sip:example.com SIP/2.0\n"
            + _BASE.replace("Max-Forwards: 7", "Max-Forwards: 300")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="scalar02-max-forwards-300",
        ),
        pytest.param(  # 3.1.2.5
            "SIP/2.0 503 Service Unavailable\n"
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129\n"
            "To: <sip:user@example.com>\n"
            "From: <sip:other@example.net>;tag=2easdjfejw\n"
            "CSeq: 9292394834772304023312 OPTIONS\n"
            "Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r\n"
            "Retry-After: 949302838503028349304023988\n"
            'Warning: 1812 overture "In Progress"\n'
            "Content-Length: 0\n",
            b"", 400, id="scalarlg-overlarge-response-scalars",
        ),
        pytest.param(  # 3.1.2.6
            "INVITE sip:user@example.com SIP/2.0\n"
            'To: "Mr. J. User <sip:j.user@example.com>\n'
            "From: sip:caller@example.net;tag=93334\n"
            "Max-Forwards: 10\n"
            "Call-ID: quotbal.aksdj\n"
            "Contact: <sip:caller@host59.example.net>\n"
            "CSeq: 8 INVITE\n"
            "Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234\n"
            "Content-Length: 0\n",
            b"", 400, id="quotbal-unterminated-quoted-display-name",
        ),
        pytest.param(  # 3.1.2.7
            "INVITE <sip:user@example.com> SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n",
            b"", 400, id="ltgtruri-angle-brackets-around-request-uri",
        ),
        pytest.param(  # 3.1.2.8
            "INVITE sip:user@example.com; lr SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n",
            b"", 400, id="lwsruri-whitespace-in-request-uri",
        ),
        pytest.param(  # 3.1.2.9
            "INVITE  sip:user@example.com  SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n",
            b"", 400, id="lwsstart-multiple-spaces-in-request-line",
        ),
        pytest.param(  # 3.1.2.10
            "OPTIONS sip:remote-target@example.com SIP/2.0  \n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 400, id="trws-trailing-spaces-after-request-line",
        ),
        pytest.param(  # 3.1.2.14
            "OPTIONS sip:user@example.org SIP/2.0\n"
            + _BASE.replace("To: sip:j.user@example.com",
                            'To: "Watson, Thomas" < sip:t.watson@example.org >')
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="badaspec-spaces-within-addr-spec",
        ),
        pytest.param(  # 3.1.2.15
            "OPTIONS sip:t.watson@example.org SIP/2.0\n"
            + _BASE.replace("From: sip:caller@example.net;tag=134161461246",
                            "From: Bell, Alexander <sip:a.g.bell@example.com>;tag=43")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="baddn-non-token-characters-in-display-name",
        ),
        pytest.param(  # 3.1.2.16
            "OPTIONS sip:t.watson@example.org SIP/7.0\n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 505, id="badvers-unknown-protocol-version",
        ),
        pytest.param(
            "SIP/3.0 200 OK\n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 505, id="response-with-sip-3-0",
        ),
        pytest.param(
            "OPTIONS sip:t.watson@example.org HTTP/1.1\n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 400, id="http-version",
        ),
        pytest.param(  # 3.1.2.17
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n",
            b"", 400, id="mismatch01-start-line-and-cseq-method",
        ),
        pytest.param(  # 3.1.2.18
            "NEWMETHOD sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 INVITE\n",
            b"", 400, id="mismatch02-unknown-method-with-cseq-mismatch",
        ),
        pytest.param(  # 3.1.2.19
            "SIP/2.0 4294967301 better not break the receiver\n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 400, id="bigcode-overlarge-status-code",
        ),
        pytest.param(
            "SIP/2.0 099 Too Small\n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 400, id="status-code-below-100",
        ),
        pytest.param(  # 3.3.1
            "INVITE sip:user@example.com SIP/2.0\n"
            "CSeq: 193942 INVITE\n"
            "Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf\n"
            "Content-Type: application/sdp\n"
            f"l: {len(SDP)}\n",
            SDP, 400, id="insuf-missing-call-id-from-to",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE,
            b"", 400, id="missing-cseq",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n"
            + _BASE.replace("Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw\n", "")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="missing-via",
        ),
        pytest.param(
            "SIP/2.0 200 OK\n"
            + _BASE.replace("Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw\n", "")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="response-missing-via",
        ),
        pytest.param(  # 3.3.7
            "OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0\n" + _BASE
            + "CSeq: 8 OPTIONS\n",
            b"", 416, id="unksm-unknown-request-uri-scheme",
        ),
        pytest.param(  # 3.3.8
            "OPTIONS sip:user@example.com SIP/2.0\n"
            + _BASE.replace("To: sip:j.user@example.com", "To: isbn:2983792873")
            + "CSeq: 8 OPTIONS\n",
            b"", 416, id="unksm2-unknown-scheme-in-to",
        ),
        pytest.param(  # 3.1.2.? multi01
            "INVITE sip:user@company.com SIP/2.0\n"
            "Contact: <sip:caller@host25.example.net>\n"
            "Via: SIP/2.0/UDP 192.0.2.25;branch=z9hG4bKkdjuw\n"
            "Max-Forwards: 70\n"
            "CSeq: 5 INVITE\n"
            "Call-ID: multi01.98asdh@192.0.2.1\n"
            "CSeq: 59 INVITE\n"
            "Call-ID: multi01.98asdh@192.0.2.2\n"
            "From: sip:caller@example.com;tag=3413415\n"
            "To: sip:user@example.com\n"
            "To: sip:other@example.net\n"
            "From: sip:caller@example.net;tag=2923420123\n",
            b"", 400, id="multi01-multiple-single-valued-headers",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 OPTIONS\n"
            "Content-Length: 0\nContent-Length: 3\n",
            b"abc", 400, id="conflicting-content-lengths",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 OPTIONS\n"
            "Content-Length: 0x10\n",
            b"", 400, id="hex-content-length",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 OPTIONS\n"
            "Content-Length: " + "9" * 5000 + "\n",
            b"", 400, id="huge-content-length-digits",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 OPTIONS\n"
            "No colon here\n",
            b"", 400, id="header-line-without-colon",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 OPTIONS\n"
            "Bad Name: x\n",
            b"", 400, id="header-name-with-space",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n"
            + _BASE.replace("Call-ID: bad.0ha0isndaksdjasdf3234nas", "Call-ID:")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="empty-call-id",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n"
            + _BASE.replace("Call-ID: bad.0ha0isndaksdjasdf3234nas", "Call-ID: a b")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="call-id-with-space",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com SIP/2.0\n"
            + _BASE.replace("Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw", "Via: ,")
            + "CSeq: 8 OPTIONS\n",
            b"", 400, id="empty-via-list",
        ),
        pytest.param(
            "OPTIONS sip:user@example.com\n" + _BASE + "CSeq: 8 OPTIONS\n",
            b"", 400, id="request-line-without-version",
        ),
        pytest.param(
            "OPT:IONS sip:user@example.com SIP/2.0\n" + _BASE + "CSeq: 8 OPT:IONS\n",
            b"", 400, id="method-not-a-token",
        ),
    ],
)
def test_malformed_messages_raise_parse_error_with_status_hint(
    head: str, body: bytes, status: int
) -> None:
    """Each malformed message raises SipParseError with the status to answer."""
    with pytest.raises(SipParseError) as info:
        parse_message(wire(head, body))
    assert info.value.status_hint == status


def test_unknown_method_is_legal() -> None:
    """An unknown method with a matching CSeq parses (RFC 3261 §8.2.1 answers it with 405)."""
    msg = parse_message(request("NEWMETHOD"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "NEWMETHOD"


def test_non_utf8_header_bytes_are_rejected() -> None:
    """The header section must be UTF-8; a Latin-1 byte is a parse error."""
    with pytest.raises(SipParseError, match="UTF-8"):
        parse_message(request("OPTIONS", "Subject: caf\xe9\n").replace(b"caf\xc3\xa9", b"caf\xe9"))


def test_bare_lf_in_header_section_is_rejected() -> None:
    """Lines end with CRLF; a bare LF inside the header section is a parse error."""
    data = request().replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\nX-A: 1\r\n")
    with pytest.raises(SipParseError, match="bare CR or LF"):
        parse_message(data)


def test_message_without_empty_line_is_rejected() -> None:
    """Without CRLFCRLF there is no end of headers."""
    with pytest.raises(SipParseError, match="empty line"):
        parse_message(request().rstrip(b"\r\n"))
    with pytest.raises(SipParseError):
        parse_message(b"")
    with pytest.raises(SipParseError):
        parse_message(b"\r\n\r\n")


def test_oversized_message_hints_413() -> None:
    """A message above max_size is refused with 413 before any parsing."""
    data = request("MESSAGE", "", b"x" * MAX_MESSAGE_SIZE)
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status_hint == 413
    small = request("MESSAGE", "", b"x" * 100)
    with pytest.raises(SipParseError):
        parse_message(small, max_size=100)
    assert parse_message(small, max_size=len(small)).body == b"x" * 100


def test_accessors_raise_parse_error_on_built_messages_missing_headers() -> None:
    """A message built in code without Call-ID/Via makes the accessors raise SipParseError."""
    msg = SipRequest("OPTIONS", URI("sip", None, "example.com"), Headers())
    for attr in ("call_id", "cseq", "from_", "to", "top_via"):
        with pytest.raises(SipParseError, match="missing"):
            getattr(msg, attr)
    assert msg.vias == []
    assert msg.max_forwards is None


# ---------------------------------------------------------------------------------------------
# to_bytes


def test_to_bytes_always_writes_the_true_content_length() -> None:
    """A missing Content-Length is added; a wrong one is corrected in place."""
    headers = Headers(
        [("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("Content-Length", "99"), ("To", "<sip:a@b>")]
    )
    msg = SipRequest("MESSAGE", URI("sip", "a", "b"), headers, b"hello")
    assert msg.to_bytes() == (
        b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"Content-Length: 5\r\nTo: <sip:a@b>\r\n\r\nhello"
    )
    bare = SipResponse(200, "OK", Headers([("Call-ID", "x")]))
    assert bare.to_bytes() == b"SIP/2.0 200 OK\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"


def test_to_bytes_writes_canonical_names_and_one_content_length() -> None:
    """Compact forms are written in full; duplicate Content-Length lines collapse to one."""
    msg = parse_message(request("MESSAGE", "l: 2\nContent-Length: 2\ni2: x\n", b"hi"))
    data = msg.to_bytes()
    assert data.count(b"Content-Length:") == 1
    assert b"\r\nl:" not in data
    assert b"\r\ni2: x\r\n" in data


def test_message_equality_is_by_value_and_ignores_content_length() -> None:
    """Parsed and built messages compare by value; Content-Length is derived, not compared."""
    msg = parse_message(request("OPTIONS", "Content-Length: 0\n"))
    assert isinstance(msg, SipRequest)
    without = msg.headers.copy()
    without.remove("Content-Length")
    assert SipRequest(msg.method, msg.uri, without, b"") == msg
    assert SipRequest(msg.method, msg.uri, without, b"x") != msg
    assert SipRequest("INFO", msg.uri, without, b"") != msg


def test_round_trip_of_a_parsed_request_is_stable() -> None:
    """parse → to_bytes → parse gives an equal message, and the bytes are stable."""
    msg = parse_message(request("INVITE", "Content-Type: application/sdp\n", SDP))
    again = parse_message(msg.to_bytes())
    assert again == msg
    assert again.to_bytes() == msg.to_bytes()


# ---------------------------------------------------------------------------------------------
# make_response


def test_make_response_copies_headers_per_rfc3261_8_2_6() -> None:
    """Vias in order, From, To (+tag), Call-ID, CSeq are copied; nothing else."""
    req = parse_message(
        request(
            "INVITE",
            "Via: SIP/2.0/TCP p1.example;branch=z9hG4bK2\nRecord-Route: <sip:p1.example;lr>\n"
            "Content-Type: application/sdp\n",
            SDP,
        )
    )
    assert isinstance(req, SipRequest)
    resp = make_response(req, 180, to_tag="b2")
    assert (resp.status, resp.reason) == (180, "Ringing")
    assert list(resp.headers) == [
        ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport"),
        ("Via", "SIP/2.0/TCP p1.example;branch=z9hG4bK2"),
        ("From", '"Alice" <sip:alice@example.com>;tag=a1'),
        ("To", "<sip:bob@example.com>;tag=b2"),
        ("Call-ID", "c1@192.0.2.1"),
        ("CSeq", "1 INVITE"),
    ]
    assert resp.body == b""
    assert resp.to.tag == "b2"
    assert parse_message(resp.to_bytes()) == resp


def test_make_response_keeps_an_existing_to_tag() -> None:
    """An in-dialog request already has a To tag: it is kept, to_tag ignored."""
    to = b"To: <sip:bob@example.com>"
    data = request("BYE").replace(to, to + b";tag=old")
    req = parse_message(data)
    assert isinstance(req, SipRequest)
    assert make_response(req, 200, to_tag="new").to.tag == "old"
    assert make_response(req, 200).to.tag == "old"


def test_make_response_reason_phrases() -> None:
    """Default reason phrases come from the table; unknown codes get a class phrase."""
    req = parse_message(request())
    assert isinstance(req, SipRequest)
    assert make_response(req, 200).reason == "OK"
    assert make_response(req, 423).reason == "Interval Too Brief"
    assert make_response(req, 480).reason == "Temporarily Unavailable"
    assert make_response(req, 603).reason == "Decline"
    assert make_response(req, 499).reason == "Client Error"
    assert make_response(req, 404, "Nobody Home").reason == "Nobody Home"


def test_make_response_100_copies_timestamp() -> None:
    """A 100 Trying echoes Timestamp (RFC 3261 §8.2.6.1); other responses do not."""
    req = parse_message(request("INVITE", "Timestamp: 54.2\n"))
    assert isinstance(req, SipRequest)
    assert make_response(req, 100).headers.get("Timestamp") == "54.2"
    assert make_response(req, 180).headers.get("Timestamp") is None


def test_make_response_rejects_bad_status_and_tag() -> None:
    """Status outside 100..699 or a non-token tag is a programming error (ValueError)."""
    req = parse_message(request())
    assert isinstance(req, SipRequest)
    with pytest.raises(ValueError, match="status"):
        make_response(req, 99)
    with pytest.raises(ValueError, match="status"):
        make_response(req, 700)
    with pytest.raises(ValueError, match="to_tag"):
        make_response(req, 200, to_tag="a b")


# ---------------------------------------------------------------------------------------------
# StreamFramer


def drain(framer: StreamFramer) -> list[bytes | KeepAlive]:
    """Every event the framer can give now."""
    events: list[bytes | KeepAlive] = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    return events


def test_framer_returns_whole_messages_by_content_length() -> None:
    """Two messages in one read come out one by one, bodies included."""
    one = request("MESSAGE", "Content-Length: 5\n", b"hello")
    two = request("OPTIONS", "Content-Length: 0\n")
    framer = StreamFramer()
    framer.feed(one + two)
    assert drain(framer) == [one, two]
    assert framer.buffered == 0


def test_framer_waits_for_the_rest_of_the_message() -> None:
    """Partial headers or a partial body give None until the bytes arrive."""
    msg = request("MESSAGE", "Content-Length: 5\n", b"hello")
    framer = StreamFramer()
    framer.feed(msg[:20])
    assert framer.next_event() is None
    framer.feed(msg[20:-2])
    assert framer.next_event() is None
    framer.feed(msg[-2:])
    assert framer.next_event() == msg
    assert framer.next_event() is None


def test_framer_reports_ping_and_pong_between_messages() -> None:
    """CRLFCRLF is a ping, a lone CRLF a pong (RFC 5626 §3.5.1)."""
    msg = request("OPTIONS", "Content-Length: 0\n")
    framer = StreamFramer()
    framer.feed(b"\r\n\r\n" + msg + b"\r\n")
    assert drain(framer) == [KEEPALIVE_PING, msg, KEEPALIVE_PONG]
    framer.feed(b"\r\n" + msg)
    assert drain(framer) == [KEEPALIVE_PONG, msg]


def test_framer_waits_while_a_ping_may_still_be_arriving() -> None:
    """After CRLF CR, the framer waits for the last LF to tell a ping from a pong."""
    framer = StreamFramer()
    framer.feed(b"\r")
    assert framer.next_event() is None
    framer.feed(b"\n\r")
    assert framer.next_event() is None
    framer.feed(b"\n")
    assert framer.next_event() is KEEPALIVE_PING


def test_framer_rejects_stream_message_without_content_length() -> None:
    """Content-Length is mandatory on streams (RFC 3261 §18.3): SipParseError."""
    framer = StreamFramer()
    framer.feed(request())
    with pytest.raises(SipParseError, match="Content-Length"):
        framer.next_event()


def test_framer_rejects_bad_content_length() -> None:
    """A negative or conflicting Content-Length loses the framing: SipParseError."""
    for extra in ("Content-Length: -1\n", "Content-Length: 1\nl: 2\n"):
        framer = StreamFramer()
        framer.feed(request("OPTIONS", extra))
        with pytest.raises(SipParseError):
            framer.next_event()


def test_framer_rejects_oversized_messages_with_413() -> None:
    """A declared length or a header section above the limit raises with status 413."""
    framer = StreamFramer(max_message_size=1000)
    framer.feed(request("MESSAGE", "Content-Length: 5000\n"))
    with pytest.raises(SipParseError) as info:
        framer.next_event()
    assert info.value.status_hint == 413
    endless = StreamFramer(max_message_size=1000)
    endless.feed(b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X-A: " + b"a" * 2000)
    with pytest.raises(SipParseError) as info:
        endless.next_event()
    assert info.value.status_hint == 413


def test_framer_accepts_compact_and_folded_content_length() -> None:
    """'l:' and a folded Content-Length frame the message too."""
    msg = request("MESSAGE", "l:\n  3\n", b"abc")
    framer = StreamFramer()
    framer.feed(msg + msg)
    assert drain(framer) == [msg, msg]
    assert parse_message(msg).body == b"abc"


# ---------------------------------------------------------------------------------------------
# identifiers


def test_new_branch_has_magic_cookie_and_enough_randomness() -> None:
    """Branches start with z9hG4bK and carry at least 64 random bits; they differ."""
    branches = {new_branch() for _ in range(100)}
    assert len(branches) == 100
    for branch in branches:
        assert branch.startswith("z9hG4bK")
        assert len(branch) - len("z9hG4bK") >= 16  # hex digits: 4 bits each
        assert Via.parse(f"SIP/2.0/UDP h;branch={branch}").branch == branch


def test_new_tag_and_call_id_are_unique_tokens() -> None:
    """Tags and Call-IDs differ each time and are valid in headers."""
    tags = {new_tag() for _ in range(100)}
    assert len(tags) == 100
    assert all(len(t) >= 16 for t in tags)
    call_ids = {new_call_id() for _ in range(100)}
    assert len(call_ids) == 100
    assert new_call_id("192.0.2.1").endswith("@192.0.2.1")
    msg = parse_message(
        request().replace(b"Call-ID: c1@192.0.2.1", f"Call-ID: {new_call_id('h')}".encode())
    )
    assert msg.call_id.endswith("@h")
