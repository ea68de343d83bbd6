"""Property tests: the parsers never raise anything but SipParseError, and round trips hold."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI, Address, CSeq, Params, Via, quote
from sipis.sip.message import (
    Headers,
    KeepAlive,
    SipRequest,
    SipResponse,
    StreamFramer,
    parse_message,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The stream properties build several messages per example: fewer examples keep them fast.
STREAM_SETTINGS = settings(SETTINGS, max_examples=100)

# ---------------------------------------------------------------------------------------------
# strategies for valid values

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MARK = "-_.!~*'()"
TOKEN_CHARS = ALNUM + "-.!%*_+`'~"
ESCAPE = st.tuples(st.sampled_from("0123456789ABCDEFabcdef"),
                   st.sampled_from("0123456789ABCDEFabcdef")).map(lambda t: "%" + "".join(t))


def chars_with_escapes(alphabet: str, min_size: int = 1) -> st.SearchStrategy[str]:
    """Short strings over ``alphabet``, sometimes with a %HH escape in the middle."""
    return st.builds(
        lambda head, esc, tail: head + esc + tail,
        st.text(alphabet, min_size=min_size, max_size=6),
        st.one_of(st.just(""), ESCAPE),
        st.text(alphabet, max_size=4),
    )


tokens = st.text(TOKEN_CHARS, min_size=1, max_size=10)
label = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(ALNUM[:52]),
    st.text(ALNUM + "-", max_size=6),
    st.sampled_from(["", *ALNUM]),
).filter(lambda s: not s.endswith("-"))
hostnames = st.lists(label, min_size=1, max_size=4).map(".".join)
hosts = st.one_of(
    hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a))),
)
ports = st.one_of(st.none(), st.integers(0, 65535))
users = chars_with_escapes(ALNUM + MARK + "&=+$,;?/")
passwords = chars_with_escapes(ALNUM + MARK + "&=+$,", min_size=0)
paramchars = chars_with_escapes(ALNUM + MARK + "[]/:&+$")
hnv = ALNUM + MARK + "[]/?:+$"
uri_params = st.lists(
    st.tuples(paramchars, st.one_of(st.none(), paramchars)), max_size=2
).map(tuple)
uri_headers = st.lists(
    st.tuples(chars_with_escapes(hnv), chars_with_escapes(hnv, min_size=0)), max_size=1
).map(tuple)
# Text that can sit in a quoted string or a header value: no CR/LF, no surrogates.
line_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=20
)


def _uri(scheme: str, userinfo: tuple[str, str | None] | None, host: str, port: int | None,
         params: Params, headers: tuple[tuple[str, str], ...]) -> URI:
    user, password = userinfo if userinfo is not None else (None, None)
    return URI(scheme, user, host, port, params, headers, password)


sip_uris = st.builds(
    _uri,
    st.sampled_from(["sip", "sips"]),
    st.one_of(st.none(), st.tuples(users, st.one_of(st.none(), passwords))),
    hosts,
    ports,
    uri_params,
    uri_headers,
)
gen_values = st.one_of(st.none(), tokens, line_text.map(quote))
header_params = st.lists(st.tuples(tokens, gen_values), max_size=2).map(tuple)
addresses = st.builds(Address, sip_uris, st.one_of(st.none(), line_text), header_params)
via_params = st.builds(
    lambda branch, rport, received, extra: (
        (("branch", "z9hG4bK" + branch), *rport, *received, *extra)
    ),
    tokens,
    st.one_of(st.just(()), st.tuples(st.tuples(st.just("rport"), st.one_of(
        st.none(), st.integers(1, 65535).map(str))))),
    st.one_of(st.just(()), st.tuples(st.tuples(st.just("received"),
                                               st.ip_addresses().map(str)))),
    st.lists(st.tuples(tokens, st.one_of(st.none(), tokens)), max_size=2),
)
vias = st.builds(
    Via,
    st.one_of(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"]), tokens.map(str.upper)),
    hosts,
    ports,
    via_params,
)
methods = st.one_of(
    st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "MESSAGE"]), tokens
)
call_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
header_values = line_text.map(lambda s: s.strip(" \t"))
extra_headers = st.lists(st.tuples(tokens.map(lambda t: "X-" + t), header_values), max_size=3)
bodies = st.binary(max_size=200)


# Message-level strategies mix a pool of fixed values with generated ones: generating every
# field from scratch makes each message cost ~10 ms, and the value types have their own
# round-trip properties below.
ADDRESS_POOL = [
    Address.parse(text)
    for text in (
        '"Alice" <sip:alice@example.com>;tag=a1',
        "<sip:bob@example.com>",
        "sip:carol@192.0.2.3;tag=x",
        '"J Rosenberg \\\\\\"" <sip:jdrosen@example.com>;tag=98asjd8',
        "<sip:t@[2001:db8::1]:5060;transport=tcp>;+sip.instance=\"<urn:uuid:1>\";reg-id=1",
    )
]
VIA_POOL = [
    Via.parse(text)
    for text in (
        "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport",
        "SIP/2.0/TCP proxy.example.com;branch=z9hG4bK2;received=192.0.2.9;rport=40000",
        "SIP/2.0/TLS [::1]:5061;branch=z9hG4bK3",
    )
]
URI_POOL = [URI.parse(t) for t in ("sip:bob@example.com", "sips:[::1]:5061;transport=tls")]
msg_addresses = st.one_of(st.sampled_from(ADDRESS_POOL), addresses)
msg_vias = st.one_of(st.sampled_from(VIA_POOL), vias)
msg_uris = st.one_of(st.sampled_from(URI_POOL), sip_uris)


def _headers(method: str, via_list: list[Via], join_vias: bool, from_: Address, to: Address,
             call_id: str, seq: int, max_forwards: int | None,
             extra: list[tuple[str, str]], rnd: random.Random) -> Headers:
    """Mandatory headers (Vias maybe comma-joined) plus extension headers, in any order."""
    via_values = [str(v) for v in via_list]
    if join_vias:
        via_values = [", ".join(via_values)]
    lines = [("Via", v) for v in via_values]
    lines += [("From", str(from_)), ("To", str(to)), ("Call-ID", call_id),
              ("CSeq", str(CSeq(seq, method)))]
    if max_forwards is not None:
        lines.append(("Max-Forwards", str(max_forwards)))
    lines += extra
    rnd.shuffle(lines)
    # Keep the Via lines in their relative order: that order is meaningful.
    via_iter = iter(via_values)
    return Headers((n, next(via_iter)) if n == "Via" else (n, v) for n, v in lines)


def headers_for(method: str) -> st.SearchStrategy[Headers]:
    return st.builds(
        _headers,
        st.just(method),
        st.lists(msg_vias, min_size=1, max_size=3),
        st.booleans(),
        msg_addresses,
        msg_addresses,
        call_ids,
        st.integers(0, 2**31 - 1),
        st.one_of(st.none(), st.integers(0, 255)),
        extra_headers,
        st.randoms(use_true_random=False),
    )


requests = methods.flatmap(
    lambda method: st.builds(SipRequest, st.just(method), msg_uris, headers_for(method), bodies)
)
responses = st.builds(
    SipResponse,
    st.integers(100, 699),
    line_text,
    methods.flatmap(headers_for),
    bodies,
)
messages = st.one_of(requests, responses)

# SIP-looking noise: lines built from pieces of real messages, to reach deep into the parser.
# SIP-looking noise: a start line, the mandatory headers each maybe present, pieces of real
# header lines and random text over SIP's delimiters, shuffled — to reach deep into the parser.
_MANDATORY_LINES = [
    "Via: SIP/2.0/UDP h;branch=z9hG4bK1", "From: <sip:a@b>;tag=1", "To: sip:c@d",
    "Call-ID: x", "CSeq: 1 INVITE",
]
_NOISE_PIECES = [
    "Content-Length: 3", "l: 0", "Max-Forwards: 70", " folded", "", "v: ,", "f: \"unterminated",
    "t: <sip:[::1]:5060;lr>", "Contact: *", "CSeq: 99999999999 X", "Via: SIP/2.0/TCP [::1",
    "i: a@b", "Max-Forwards: 256", "To: Bob <sip:b@c>;tag", "m: <sip:x@y>, <sip:z@w>",
]


def _noise(start: str, keep: list[bool], extra: list[str], rnd: random.Random) -> list[str]:
    lines = [line for line, k in zip(_MANDATORY_LINES, keep, strict=True) if k] + extra
    rnd.shuffle(lines)
    return [start, *lines]


noise_lines = st.builds(
    _noise,
    st.one_of(
        st.sampled_from(["INVITE sip:a@b SIP/2.0", "SIP/2.0 200 OK", "SIP/2.0 100 "]),
        st.text(st.sampled_from(TOKEN_CHARS + " :;<>@/"), max_size=30),
    ),
    st.lists(st.sampled_from([True, True, True, False]),
             min_size=len(_MANDATORY_LINES), max_size=len(_MANDATORY_LINES)),
    st.lists(
        st.one_of(
            st.sampled_from(_NOISE_PIECES),
            st.text(st.sampled_from(TOKEN_CHARS + ' :;,<>"\\@[]/=?&\t%'), max_size=30),
        ),
        max_size=6,
    ),
    st.randoms(use_true_random=False),
)


# ---------------------------------------------------------------------------------------------
# properties


def parse_or_parse_error(data: bytes) -> SipRequest | SipResponse | None:
    try:
        return parse_message(data)
    except SipParseError:
        return None


@SETTINGS
@given(st.binary(max_size=3000))
def test_parse_message_raises_only_parse_error_on_arbitrary_bytes(data: bytes) -> None:
    """Whatever the bytes, parse_message returns a message or raises SipParseError."""
    parse_or_parse_error(data)


@SETTINGS
@given(noise_lines, st.binary(max_size=20))
def test_parse_message_raises_only_parse_error_on_sip_like_noise(
    lines: list[str], body: bytes
) -> None:
    """SIP-looking garbage only ever gives SipParseError; what parses re-serialises stably."""
    msg = parse_or_parse_error("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    if msg is not None:
        assert parse_message(msg.to_bytes()) == msg


@SETTINGS
@given(messages, st.data())
def test_parse_message_on_mutated_valid_messages(
    msg: SipRequest | SipResponse, data: st.DataObject
) -> None:
    """Mutations of valid messages give a message or SipParseError; what parses round-trips."""
    raw = bytearray(msg.to_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw)))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        if kind == "flip" and pos < len(raw):
            raw[pos] = data.draw(st.sampled_from(b"\x00\r\n \t:;,<>\"@\\%\xff\x80" + b"aZ9"))
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = raw[pos:pos + data.draw(st.integers(1, 16))]
    parsed = parse_or_parse_error(bytes(raw))
    if parsed is not None:
        assert parse_message(parsed.to_bytes()) == parsed


@SETTINGS
@given(messages)
def test_valid_messages_round_trip(msg: SipRequest | SipResponse) -> None:
    """For valid messages, parse_message(m.to_bytes()) == m."""
    assert parse_message(msg.to_bytes()) == msg


@STREAM_SETTINGS
@given(st.lists(st.tuples(messages, st.sampled_from([b"", b"\r\n\r\n"])), min_size=1, max_size=3))
def test_stream_framer_gives_the_same_messages_at_every_byte_boundary(
    items: list[tuple[SipRequest | SipResponse, bytes]],
) -> None:
    """Fed whole, or one byte at a time, the framer yields the same messages, which parse."""
    stream = b"".join(ping + m.to_bytes() for m, ping in items)

    def run(chunks: list[bytes]) -> tuple[list[bytes], list[KeepAlive]]:
        framer = StreamFramer()
        got: list[bytes] = []
        alives: list[KeepAlive] = []
        for chunk in chunks:
            framer.feed(chunk)
            while (event := framer.next_event()) is not None:
                if isinstance(event, bytes):
                    got.append(event)
                else:
                    alives.append(event)
        assert framer.buffered == 0
        return got, alives

    whole, pings = run([stream])
    assert pings == [KeepAlive.PING for _, ping in items if ping]
    assert [parse_message(m) for m in whole] == [m for m, _ in items]
    single, _ = run([stream[i:i + 1] for i in range(len(stream))])
    assert single == whole


@STREAM_SETTINGS
@given(messages, st.lists(st.integers(1, 50), min_size=1, max_size=40))
def test_stream_framer_any_chunking_gives_the_same_message(
    msg: SipRequest | SipResponse, sizes: list[int]
) -> None:
    """Arbitrary read sizes frame the same message."""
    data = msg.to_bytes()
    framer = StreamFramer()
    events: list[bytes | KeepAlive] = []
    pos = 0
    for size in sizes * (len(data) // sum(sizes) + 1):
        framer.feed(data[pos:pos + size])
        pos += size
        while (event := framer.next_event()) is not None:
            events.append(event)
        if pos >= len(data):
            break
    assert events == [data]


@SETTINGS
@given(st.binary(max_size=300), st.integers(1, 17))
def test_stream_framer_raises_only_parse_error_on_garbage(data: bytes, step: int) -> None:
    """The framer returns events or raises SipParseError on any byte stream."""
    framer = StreamFramer(max_message_size=256)
    try:
        for i in range(0, len(data), step):
            framer.feed(data[i:i + step])
            while framer.next_event() is not None:
                pass
    except SipParseError:
        pass


@SETTINGS
@given(sip_uris)
def test_uri_round_trip(uri: URI) -> None:
    """URI.parse(str(u)) == u for valid URIs."""
    assert URI.parse(str(uri)) == uri


@SETTINGS
@given(addresses)
def test_address_round_trip(addr: Address) -> None:
    """Address.parse(str(a)) == a for valid addresses."""
    assert Address.parse(str(addr)) == addr


@SETTINGS
@given(vias)
def test_via_round_trip(via: Via) -> None:
    """Via.parse(str(v)) == v for valid vias."""
    assert Via.parse(str(via)) == via


VALUE_NOISE = st.text(
    st.one_of(
        st.sampled_from('sip:tel:SIP/2.0/UDP <>"\\;,=@[]:?&% \t0123456789abc.-'),
        st.characters(exclude_categories=["Cs"]),
    ),
    max_size=60,
)


@SETTINGS
@given(VALUE_NOISE)
def test_value_parsers_raise_only_parse_error(text: str) -> None:
    """URI/Address/Via/CSeq.parse return a value or raise SipParseError; values re-parse."""
    for cls in (URI, Address, Via, CSeq):
        try:
            value = cls.parse(text)
        except SipParseError:
            continue
        assert cls.parse(str(value)) == value
