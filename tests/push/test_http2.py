"""sipis.push.http2: the client HTTP/2 connection, against h2 as the server (an independent
implementation), and against hand-made frames for what a well-behaved server never sends."""

from __future__ import annotations

import contextlib
import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.push import http2
from sipis.push.http2 import ErrorCode, Http2ClientConnection, Http2ProtocolError

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"apns.test"),
           hpack.NeverIndexedHeaderTuple(b":path", b"/3/device/" + b"a" * 64),
           (b"authorization", b"bearer " + b"j" * 300), (b"apns-topic", b"com.example.voip")]


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame built by hand (RFC 9113 §4.1), well-formed or not."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) \
        + stream_id.to_bytes(4, "big") + payload


def pair(**server_settings: int) -> tuple[Http2ClientConnection, h2.connection.H2Connection]:
    """A client and an h2 server past both prefaces and SETTINGS exchanges."""
    client = Http2ClientConnection()
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None))
    if server_settings:
        server.local_settings = h2.settings.Settings(client=False, initial_values={
            getattr(h2.settings.SettingCodes, name.upper()): value
            for name, value in server_settings.items()})
    server.initiate_connection()
    client.initiate_connection()
    events = server.receive_data(client.data_to_send())
    assert isinstance(events[0], h2.events.RemoteSettingsChanged)
    assert events[0].changed_settings[h2.settings.SettingCodes.ENABLE_PUSH].new_value == 0
    client_events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, http2.ConnectionSettingsChanged) for e in client_events)
    server.receive_data(client.data_to_send())  # our SETTINGS ACK
    return client, server


def pump(client: Http2ClientConnection,
         server: h2.connection.H2Connection) -> tuple[list[h2.events.Event], list[http2.Event]]:
    """Move bytes both ways until both are quiet; the events each side saw."""
    server_events: list[h2.events.Event] = []
    client_events: list[http2.Event] = []
    while True:
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return server_events, client_events
        if to_server:
            server_events += server.receive_data(to_server)
        if to_client:
            client_events += client.receive_data(to_client)


def test_a_request_and_its_answer_cross_with_h2_on_many_streams() -> None:
    """Requests reach h2 whole (headers in order, body, END_STREAM); h2's answers (Huffman
    and dynamic-table coded, so the decoder's table is exercised from one stream to the
    next) come back as one ResponseReceived, the body and StreamEnded; finished streams are
    forgotten."""
    client, server = pair()
    for n in range(5):
        stream_id = client.send_headers(REQUEST, end_stream=False)
        assert stream_id == 2 * n + 1
        body = b'{"aps":{"n":%d}}' % n
        client.send_data(stream_id, body, end_stream=True)
        server_events, _ = pump(client, server)
        received = [e for e in server_events if isinstance(e, h2.events.RequestReceived)]
        assert [(bytes(k), bytes(v)) for k, v in received[0].headers] == [
            (k, v) for k, v in REQUEST]
        assert b"".join(e.data for e in server_events
                        if isinstance(e, h2.events.DataReceived)) == body
        assert any(isinstance(e, h2.events.StreamEnded) for e in server_events)
        server.send_headers(stream_id, [(b":status", b"200"), (b"apns-id", b"id-%d" % n)])
        server.send_data(stream_id, b"ok-%d" % n, end_stream=True)
        _, events = pump(client, server)
        assert [type(e) for e in events] == [
            http2.ResponseReceived, http2.DataReceived, http2.StreamEnded]
        assert isinstance(events[0], http2.ResponseReceived)
        assert events[0].headers == [(b":status", b"200"), (b"apns-id", b"id-%d" % n)]
        assert isinstance(events[1], http2.DataReceived) and events[1].data == b"ok-%d" % n
        assert client.open_streams == 0


def test_a_request_without_body_and_an_answer_in_one_headers_frame() -> None:
    client, server = pair()
    stream_id = client.send_headers(REQUEST, end_stream=True)
    server_events, _ = pump(client, server)
    assert any(isinstance(e, h2.events.StreamEnded) for e in server_events)
    server.send_headers(stream_id, [(b":status", b"410")], end_stream=True)
    _, events = pump(client, server)
    assert [type(e) for e in events] == [http2.ResponseReceived, http2.StreamEnded]
    assert client.open_streams == 0


def test_a_header_block_larger_than_a_frame_goes_on_in_continuation_frames() -> None:
    """A block above the peer's SETTINGS_MAX_FRAME_SIZE is split (HEADERS + CONTINUATION)
    and h2 reads it back whole; an answer split the same way is read back whole."""
    client, server = pair()
    big = [*REQUEST, (b"x-big", b"v" * 40_000)]
    server.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 100_000})
    pump(client, server)
    stream_id = client.send_headers(big, end_stream=True)
    data = client.data_to_send()
    assert data.count(bytes((http2.CONTINUATION,))) >= 2
    events = server.receive_data(data)
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert received and dict(received[0].headers)[b"x-big"] == b"v" * 40_000
    # The answer, split by hand: HEADERS without END_HEADERS, then two CONTINUATIONs.
    block = hpack.Encoder().encode([(b":status", b"200"), (b"x-long", b"w" * 20_000)])
    third = len(block) // 3
    answer = (raw_frame(http2.HEADERS, http2.END_STREAM, stream_id, block[:third])
              + raw_frame(http2.CONTINUATION, 0, stream_id, block[third:2 * third])
              + raw_frame(http2.CONTINUATION, http2.END_HEADERS, stream_id, block[2 * third:]))
    events2 = client.receive_data(answer[:100])  # and arriving in pieces
    events2 += client.receive_data(answer[100:])
    assert [type(e) for e in events2] == [http2.ResponseReceived, http2.StreamEnded]
    assert isinstance(events2[0], http2.ResponseReceived)
    assert events2[0].headers[1] == (b"x-long", b"w" * 20_000)


def test_the_peers_settings_bound_streams_frames_and_windows() -> None:
    """MAX_CONCURRENT_STREAMS and INITIAL_WINDOW_SIZE are read; DATA never exceeds the
    stream's window (Http2StateError, nothing queued); WINDOW_UPDATE opens it again, and
    a later INITIAL_WINDOW_SIZE moves the windows of open streams too (§6.9.2)."""
    client, server = pair(max_concurrent_streams=7, initial_window_size=10)
    assert client.max_concurrent_streams == 7
    stream_id = client.send_headers(REQUEST, end_stream=False)
    assert client.stream_window(stream_id) == 10
    pump(client, server)
    with pytest.raises(http2.Http2StateError):
        client.send_data(stream_id, b"x" * 11, end_stream=True)
    assert client.data_to_send() == b""  # nothing queued
    client.send_data(stream_id, b"x" * 10, end_stream=False)
    assert client.stream_window(stream_id) == 0
    server_events, _ = pump(client, server)
    server.increment_flow_control_window(5, stream_id=stream_id)
    _, events = pump(client, server)
    assert [type(e) for e in events] == [http2.WindowUpdated]
    assert client.stream_window(stream_id) == 5
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 110})
    pump(client, server)
    assert client.stream_window(stream_id) == 105
    client.send_data(stream_id, b"y" * 105, end_stream=True)
    server_events, _ = pump(client, server)
    assert sum(len(e.data) for e in server_events
               if isinstance(e, h2.events.DataReceived)) == 105
    assert client.outbound_window == 65_535 - 115


def test_a_long_answer_flows_because_our_windows_are_replenished() -> None:
    """200 KB of answer (three times the default windows): h2 sends only what our windows
    allow, so it gets through only if we send WINDOW_UPDATEs as we read."""
    client, server = pair()
    stream_id = client.send_headers(REQUEST, end_stream=True)
    pump(client, server)
    server.send_headers(stream_id, [(b":status", b"200")])
    body = bytes(range(256)) * 800
    sent = 0
    received = bytearray()
    ended = False
    for _ in range(1000):
        window = min(server.local_flow_control_window(stream_id),
                     server.max_outbound_frame_size)
        if sent < len(body) and window > 0:
            chunk = body[sent:sent + window]
            sent += len(chunk)
            server.send_data(stream_id, chunk, end_stream=sent == len(body))
        server_events, events = pump(client, server)
        for event in events:
            if isinstance(event, http2.DataReceived):
                received += event.data
            ended = ended or isinstance(event, http2.StreamEnded)
        if ended:
            break
    assert ended and bytes(received) == body


def test_pings_both_ways() -> None:
    client, server = pair()
    client.ping(b"12345678")
    server_events, client_events = pump(client, server)
    assert [e.ping_data for e in server_events if isinstance(e, h2.events.PingReceived)] == [
        b"12345678"]
    assert [e.data for e in client_events if isinstance(e, http2.PingAckReceived)] == [
        b"12345678"]
    server.ping(b"abcdefgh")
    server_events, _ = pump(client, server)
    assert [e.ping_data for e in server_events
            if isinstance(e, h2.events.PingAckReceived)] == [b"abcdefgh"]
    with pytest.raises(ValueError, match="8 bytes"):
        client.ping(b"short")


def test_goaway_and_refused_streams_are_reported_and_late_frames_ignored() -> None:
    """A GOAWAY is an event (the caller decides what is left); RST_STREAM is reported with
    its code and the stream forgotten; frames still arriving for it are ignored."""
    client, server = pair()
    first = client.send_headers(REQUEST, end_stream=True)
    second = client.send_headers(REQUEST, end_stream=True)
    pump(client, server)
    server.reset_stream(second, h2.errors.ErrorCodes.REFUSED_STREAM)
    _, events = pump(client, server)
    assert len(events) == 1 and isinstance(events[0], http2.StreamReset)
    assert (events[0].stream_id, events[0].error_code, events[0].by_peer) == (
        second, ErrorCode.REFUSED_STREAM, True)
    assert client.open_streams == 1
    late = raw_frame(http2.DATA, 0, second, b"late") + raw_frame(
        http2.WINDOW_UPDATE, 0, second, struct.pack(">L", 5))
    assert client.receive_data(late) == []
    server.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, last_stream_id=first,
                            additional_data=b"shutting down")
    _, events = pump(client, server)
    assert len(events) == 1 and isinstance(events[0], http2.GoAwayReceived)
    assert (events[0].last_stream_id, events[0].error_code, events[0].debug) == (
        first, 0, b"shutting down")


def test_informational_answers_are_skipped_and_trailers_end_the_stream() -> None:
    client, server = pair()
    stream_id = client.send_headers(REQUEST, end_stream=True)
    pump(client, server)
    block = hpack.Encoder()
    frames = (raw_frame(http2.HEADERS, http2.END_HEADERS, stream_id,
                        block.encode([(b":status", b"100")]))
              + raw_frame(http2.HEADERS, http2.END_HEADERS, stream_id,
                          block.encode([(b":status", b"200")]))
              + raw_frame(http2.DATA, 0, stream_id, b"body")
              + raw_frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, stream_id,
                          block.encode([(b"x-trailer", b"t")])))
    events = client.receive_data(frames)
    assert [type(e) for e in events] == [
        http2.ResponseReceived, http2.DataReceived, http2.StreamEnded]
    assert isinstance(events[0], http2.ResponseReceived)
    assert events[0].headers == [(b":status", b"200")]


def test_padding_and_priority_are_read_past() -> None:
    client, _ = pair()
    stream_id = client.send_headers(REQUEST, end_stream=True)
    client.data_to_send()
    block = hpack.Encoder().encode([(b":status", b"200")])
    headers = bytes((3,)) + b"\x00\x00\x00\x00\x10" + block + b"\x00" * 3
    data = bytes((2,)) + b"hi" + b"\x00\x00"
    events = client.receive_data(
        raw_frame(http2.HEADERS, http2.END_HEADERS | http2.PADDED | http2.PRIORITY_FLAG,
                  stream_id, headers)
        + raw_frame(http2.PRIORITY, 0, stream_id, b"\x00\x00\x00\x00\x10")
        + raw_frame(0xFA, 0, 0, b"an extension frame")
        + raw_frame(http2.DATA, http2.PADDED | http2.END_STREAM, stream_id, data))
    assert [type(e) for e in events] == [
        http2.ResponseReceived, http2.DataReceived, http2.StreamEnded]
    assert isinstance(events[1], http2.DataReceived) and events[1].data == b"hi"


def settled() -> Http2ClientConnection:
    """A client past the server's SETTINGS, with streams 1 and 3 open (3 answered)."""
    client = Http2ClientConnection()
    client.initiate_connection()
    client.receive_data(raw_frame(http2.SETTINGS, 0, 0))
    client.send_headers(REQUEST, end_stream=True)
    client.send_headers(REQUEST, end_stream=True)
    client.receive_data(raw_frame(http2.HEADERS, http2.END_HEADERS, 3,
                                  hpack.Encoder().encode([(b":status", b"200")])))
    client.data_to_send()
    return client


@pytest.mark.parametrize(("frames", "code"), [
    (raw_frame(http2.PING, 0, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR),  # before SETTINGS
])
def test_the_servers_preface_must_be_settings(frames: bytes, code: ErrorCode) -> None:
    client = Http2ClientConnection()
    client.initiate_connection()
    with pytest.raises(Http2ProtocolError) as info:
        client.receive_data(frames)
    assert info.value.error_code == code


@pytest.mark.parametrize(("frames", "code"), [
    (raw_frame(http2.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.HEADERS, http2.END_HEADERS, 2, b"\x88"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.HEADERS, http2.END_HEADERS, 5, b"\x88"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.DATA, 0, 9, b"x"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.PUSH_PROMISE, http2.END_HEADERS, 1, b"\x00\x00\x00\x02\x88"),
     ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.CONTINUATION, http2.END_HEADERS, 1, b"\x88"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.HEADERS, 0, 1, b"\x88") + raw_frame(http2.PING, 0, 0, b"12345678"),
     ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.HEADERS, 0, 1, b"\x88") + raw_frame(http2.CONTINUATION, 0, 3, b""),
     ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.HEADERS, http2.END_HEADERS, 1, b"\xff\xff\xff\xff"),
     ErrorCode.COMPRESSION_ERROR),
    (raw_frame(http2.HEADERS, http2.END_HEADERS, 1, b"\xbf"),  # index 63: no such entry
     ErrorCode.COMPRESSION_ERROR),
    (raw_frame(http2.HEADERS, http2.END_HEADERS | http2.PADDED, 1, b"\x05\x88"),
     ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.DATA, 0, 1, b"x" * 16_385), ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.SETTINGS, 0, 0, b"\x00\x01\x00"), ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.SETTINGS, http2.ACK, 0, b"\x00\x01\x00\x00\x00\x00"),
     ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.SETTINGS, 0, 0, struct.pack(">HL", 5, 100)), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.SETTINGS, 0, 0, struct.pack(">HL", 2, 7)), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.SETTINGS, 0, 0, struct.pack(">HL", 4, 2**31)),
     ErrorCode.FLOW_CONTROL_ERROR),
    (raw_frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)),
     ErrorCode.FLOW_CONTROL_ERROR),
    (raw_frame(http2.WINDOW_UPDATE, 0, 0, b"\x00\x01"), ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.RST_STREAM, 0, 1, b"\x00"), ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.RST_STREAM, 0, 0, b"\x00\x00\x00\x08"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.PING, 0, 0, b"1234"), ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.GOAWAY, 0, 0, b"\x00\x00\x00\x01"), ErrorCode.FRAME_SIZE_ERROR),
    (raw_frame(http2.GOAWAY, 0, 1, b"\x00" * 8), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.PRIORITY, 0, 0, b"\x00" * 5), ErrorCode.PROTOCOL_ERROR),
], ids=lambda v: v.name if isinstance(v, ErrorCode) else None)
def test_connection_errors_of_the_peer(frames: bytes, code: ErrorCode) -> None:
    """Each breach of RFC 9113 that ends the connection raises Http2ProtocolError with the
    code our GOAWAY carries, and nothing else (no IndexError, struct.error, HPACK error)."""
    client = settled()
    with pytest.raises(Http2ProtocolError) as info:
        client.receive_data(frames)
    assert info.value.error_code == code


def test_a_header_block_beyond_the_limit_is_refused() -> None:
    client = settled()
    frames = raw_frame(http2.HEADERS, 0, 1, b"\x00" * 16_000) + raw_frame(
        http2.CONTINUATION, 0, 1, b"\x00" * 16_000) * 4
    with pytest.raises(Http2ProtocolError) as info:
        client.receive_data(frames)
    assert info.value.error_code == ErrorCode.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(("frames", "code"), [
    (raw_frame(http2.DATA, 0, 1, b"x"), ErrorCode.PROTOCOL_ERROR),  # DATA before HEADERS
    (raw_frame(http2.WINDOW_UPDATE, 0, 1, struct.pack(">L", 0)), ErrorCode.PROTOCOL_ERROR),
    (raw_frame(http2.WINDOW_UPDATE, 0, 1, struct.pack(">L", 2**31 - 1)),
     ErrorCode.FLOW_CONTROL_ERROR),
    (raw_frame(http2.HEADERS, http2.END_HEADERS, 3, b"\x88"), ErrorCode.PROTOCOL_ERROR),
], ids=["data-first", "window-0", "window-overflow", "trailers-not-ending"])
def test_stream_errors_of_the_peer_reset_only_that_stream(frames: bytes,
                                                          code: ErrorCode) -> None:
    """A fault on one stream resets it (RST_STREAM with the code, StreamReset not by the
    peer); the connection goes on."""
    client = settled()
    stream_id = 1 if frames[8] == 1 else 3
    events = client.receive_data(frames)
    assert len(events) == 1 and isinstance(events[0], http2.StreamReset)
    assert (events[0].stream_id, events[0].error_code, events[0].by_peer) == (
        stream_id, code, False)
    assert client.data_to_send() == raw_frame(http2.RST_STREAM, 0, stream_id,
                                              struct.pack(">L", code))
    assert client.receive_data(raw_frame(http2.PING, 0, 0, b"still-up")) == []


def test_an_answer_before_the_request_is_complete_ends_our_side() -> None:
    """A server may answer before our body is complete (RFC 9113 §8.1): the stream ends
    for us too (RST_STREAM CANCEL), so no further DATA can be sent on it."""
    client = settled()
    stream_id = client.send_headers(REQUEST, end_stream=False)
    client.data_to_send()
    events = client.receive_data(raw_frame(
        http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, stream_id,
        hpack.Encoder().encode([(b":status", b"400")])))
    assert [type(e) for e in events] == [http2.ResponseReceived, http2.StreamEnded]
    assert client.data_to_send() == raw_frame(http2.RST_STREAM, 0, stream_id,
                                              struct.pack(">L", ErrorCode.CANCEL))
    with pytest.raises(http2.Http2StateError):
        client.send_data(stream_id, b"x", end_stream=True)


def test_sends_the_state_does_not_allow() -> None:
    client = settled()
    with pytest.raises(http2.Http2StateError):
        client.send_data(3, b"x", end_stream=True)  # 3 ended
    with pytest.raises(http2.Http2StateError):
        client.send_data(1, b"x", end_stream=True)  # 1: our END_STREAM is sent
    client._next_stream_id = 2**31 + 1
    with pytest.raises(http2.Http2StateError, match="used up"):
        client.send_headers(REQUEST, end_stream=True)
    client.close_connection(ErrorCode.PROTOCOL_ERROR)
    assert client.data_to_send() == raw_frame(http2.GOAWAY, 0, 0,
                                              struct.pack(">LL", 0, ErrorCode.PROTOCOL_ERROR))
    client.close_connection()  # once only
    assert client.data_to_send() == b""
    with pytest.raises(http2.Http2StateError):
        client.ping(b"12345678")
    client._next_stream_id = 5
    with pytest.raises(http2.Http2StateError, match="closed"):
        client.send_headers(REQUEST, end_stream=True)


def test_request_header_blocks_decode_to_the_headers_and_leave_no_decoder_state() -> None:
    """Our encoder (static table and literals only) is read back by a real HPACK decoder, the
    same headers in order, the sensitive ones flagged never-indexed, and the decoder's
    dynamic table stays empty across pushes and a table size change."""
    encoder, decoder = http2.HeaderBlockEncoder(), hpack.Decoder()
    token = "a" * 64
    for n in range(3):
        headers = [(b":method", b"POST"), (b":scheme", b"https"),
                   (b":authority", b"api.push.apple.com"),
                   hpack.NeverIndexedHeaderTuple(b":path", f"/3/device/{token}".encode()),
                   (b"authorization", b"bearer " + b"j" * 300),  # long: multi-byte lengths
                   (b"apns-topic", b"com.example.phone.voip"), (b"apns-push-type", b"voip"),
                   (b"apns-priority", b"10"), (b"apns-expiration", b"0"),
                   hpack.NeverIndexedHeaderTuple(b"apns-id", f"id-{n}".encode())]
        if n == 2:
            encoder.table_size_changed()  # the server's SETTINGS changed it
        block = encoder.encode(headers)
        # The first block, and the first after a change, open with "table size 0"; the
        # others with :method POST, static index 3.
        assert block[:2] == (b"\x83\x87" if n == 1 else b"\x20\x83")
        decoded = decoder.decode(block, raw=True)
        assert [(h[0], h[1]) for h in decoded] == [(h[0], h[1]) for h in headers]
        never = {h[0] for h in decoded if isinstance(h, hpack.NeverIndexedHeaderTuple)}
        assert never == {b":path", b"authorization", b"apns-id"}
        assert len(decoder.header_table.dynamic_entries) == 0


def test_a_header_table_size_setting_makes_the_next_block_say_size_0() -> None:
    client = settled()
    client.send_headers(REQUEST, end_stream=True)
    assert client.data_to_send()[9:11] == b"\x83\x87"
    client.receive_data(raw_frame(http2.SETTINGS, 0, 0, struct.pack(">HL", 1, 256)))
    client.send_headers(REQUEST, end_stream=True)
    sent = client.data_to_send()
    assert sent[:9] == raw_frame(http2.SETTINGS, http2.ACK, 0)  # the ACK first
    assert sent[18:20] == b"\x20\x83"


_FRAME_KINDS = st.sampled_from([*range(10), 0xFA])


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Frames of every type on a few stream ids, with any flags and payloads: mostly
    nonsense, some of it well-formed."""
    kind = draw(_FRAME_KINDS)
    flags = draw(st.integers(0, 255))
    stream_id = draw(st.sampled_from([0, 1, 3, 5, 7, 2, 2**31 - 1]))
    payload = draw(st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\x88", b"\x00" * 8, struct.pack(">L", 100),
                         struct.pack(">HL", 4, 70_000), b"\x00\x00\x00\x07"]),
    ))
    return raw_frame(kind, flags, stream_id, payload)


@settings(max_examples=400, deadline=None)
@given(st.lists(frames(), max_size=12), st.integers(1, 64))
def test_any_frames_give_events_or_a_protocol_error_never_a_crash(
        sequence: list[bytes], cut: int) -> None:
    """Whatever a server sends, in whatever pieces, the connection answers with events or
    Http2ProtocolError, never another exception; and once it has raised, nothing else."""
    client = settled()
    data = b"".join(sequence)
    try:
        for start in range(0, len(data), cut):
            for event in client.receive_data(data[start:start + cut]):
                assert isinstance(event, http2.Event)
    except Http2ProtocolError as exc:
        assert isinstance(exc.error_code, ErrorCode)
    # Windows stay within the protocol's bounds, whatever was accepted.
    assert client.outbound_window <= http2.MAX_WINDOW
    for stream_id in (1, 5, 7):
        assert client.stream_window(stream_id) <= http2.MAX_WINDOW


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_after_the_preface_give_events_or_a_protocol_error(data: bytes) -> None:
    client = settled()
    with contextlib.suppress(Http2ProtocolError):
        client.receive_data(data)
