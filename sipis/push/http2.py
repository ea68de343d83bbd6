"""A client-side HTTP/2 connection (RFC 9113), sans-IO, for a client that POSTs small bodies.

Why our own and not ``h2``: APNs pushes are tiny requests, thousands a second on one
connection, and h2's general machinery was the largest part of a push's CPU (frame objects,
flag sets, a state machine per stream, events for everything, a ``repr`` of every frame for
its trace log). This connection does what such a client needs and no more:

- requests only: odd stream ids, one header block (HEADERS, then CONTINUATION when it exceeds
  the peer's SETTINGS_MAX_FRAME_SIZE), then DATA within both flow-control windows;
- HPACK out: static-table references and literals that are never indexed, so the server's
  decoder keeps no state of ours (``HeaderBlockEncoder``); HPACK in: ``hpack.Decoder``;
- inbound flow control replenished as data arrives (the caller consumes all it gets);
- SETTINGS, PING, WINDOW_UPDATE, RST_STREAM and GOAWAY as the RFC says; server push refused
  (SETTINGS_ENABLE_PUSH = 0, so a PUSH_PROMISE is a protocol error); PRIORITY and unknown
  frame types ignored.

It reads bytes (``receive_data``) and returns events; it queues bytes to send
(``data_to_send``). No sockets, no clock, no logging.

Errors (the caller ends the connection on the first, the second is a caller bug):

    Http2ProtocolError   the peer broke the protocol (``error_code`` for our GOAWAY)
    Http2StateError      a send the connection's state does not allow (stream ids used up,
                         a closed stream, more data than the windows hold, after close)

A stream-level fault of the peer (DATA before HEADERS, a zero WINDOW_UPDATE, a window
overflow) resets that stream only: RST_STREAM goes out and a ``StreamReset`` event comes back,
as if the peer had reset it.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final, cast

import hpack
from hpack import NeverIndexedHeaderTuple

__all__ = [
    "ConnectionSettingsChanged",
    "DataReceived",
    "ErrorCode",
    "Event",
    "GoAwayReceived",
    "HeaderBlockEncoder",
    "Http2ClientConnection",
    "Http2Error",
    "Http2ProtocolError",
    "Http2StateError",
    "PingAckReceived",
    "ResponseReceived",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags.
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

# Settings (RFC 9113 §6.5.2).
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

DEFAULT_WINDOW: Final = 65_535
DEFAULT_MAX_FRAME_SIZE: Final = 16_384
MAX_WINDOW: Final = 2**31 - 1
MAX_STREAM_ID: Final = 2**31 - 1
#: Largest header block we decode (all HEADERS/CONTINUATION of one block): a server that
#: sends more is out to exhaust memory, not answering a push.
MAX_HEADER_BLOCK: Final = 65_536
#: Inbound windows are topped up once they fall below this (half the default).
_REPLENISH_BELOW: Final = DEFAULT_WINDOW // 2

_FRAME_HEADER: Final = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, id
_SETTING: Final = struct.Struct(">HL")
_UINT32: Final = struct.Struct(">L")
_GOAWAY_HEAD: Final = struct.Struct(">LL")


class ErrorCode(IntEnum):
    """RFC 9113 §7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def error_name(code: int) -> str:
    """``REFUSED_STREAM`` for a known code, the number for another (codes are extensible)."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class Http2Error(Exception):
    """Base of this module's errors."""


class Http2ProtocolError(Http2Error):
    """The peer broke HTTP/2: end the connection (GOAWAY with ``error_code``)."""

    def __init__(self, error_code: ErrorCode, message: str) -> None:
        super().__init__(f"{error_code.name}: {message}")
        self.error_code = error_code


class Http2StateError(Http2Error):
    """A send the connection's state does not allow; nothing of it was queued."""


# --- events ------------------------------------------------------------------------------------

class Event:
    """Something the peer did that the caller may act on."""

    __slots__ = ()


class ResponseReceived(Event):
    """The final response's header block (informational 1xx blocks and trailers are not
    reported). ``headers`` are raw (name, value) pairs as decoded, unchecked."""

    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived(Event):
    """Body bytes of a response (padding removed; flow control already replenished)."""

    __slots__ = ("data", "stream_id")

    def __init__(self, stream_id: int, data: bytes) -> None:
        self.stream_id = stream_id
        self.data = data


class StreamEnded(Event):
    """The peer ended its side of the stream (END_STREAM)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset(Event):
    """The stream was reset: by the peer (RST_STREAM), or by us for the peer's stream-level
    fault (``by_peer`` False)."""

    __slots__ = ("by_peer", "error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int, *, by_peer: bool = True) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.by_peer = by_peer


class WindowUpdated(Event):
    """A send window grew (``stream_id`` 0: the connection's)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class ConnectionSettingsChanged(Event):
    """The peer's SETTINGS arrived (and were acknowledged); the first one ends its preface."""

    __slots__ = ()


class PingAckReceived(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class GoAwayReceived(Event):
    """No new streams; streams above ``last_stream_id`` were not processed (RFC 9113 §6.8)."""

    __slots__ = ("debug", "error_code", "last_stream_id")

    def __init__(self, last_stream_id: int, error_code: int, debug: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.debug = debug


# --- HPACK out ---------------------------------------------------------------------------------

# RFC 7541 Appendix A: the static-table entries our requests use.
_STATIC_FIELDS: Final = {(b":method", b"POST"): 3, (b":scheme", b"https"): 7}
_STATIC_NAMES: Final = {b":authority": 1, b":path": 4, b"authorization": 23,
                        b"content-length": 28, b"content-type": 31}
#: Header fields whose coding an encoder keeps (the constant ones: topic, priority...).
_FIELD_CACHE: Final = 64


def _hpack_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; ``flags`` fills the first byte's top bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(data: bytes) -> bytes:
    """RFC 7541 §5.2 string literal, not Huffman-coded."""
    return _hpack_integer(len(data), 7, 0x00) + data


def _hpack_field(name: bytes, value: bytes, *, never: bool) -> bytes:
    """One header field: a static-table index, else a literal that is not indexed."""
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))  # indexed field (§6.1)
    name_index = _STATIC_NAMES.get(name, 0)
    coded = _hpack_integer(name_index, 4, 0x10 if never else 0x00)
    if not name_index:
        coded += _hpack_string(name)
    return coded + _hpack_string(value)


class HeaderBlockEncoder:
    """HPACK for requests without the dynamic table: static-table references and literals
    "without indexing" / "never indexed" (RFC 7541 §6.1, §6.2.2, §6.2.3), no Huffman.

    hpack's encoder searched its dynamic table for every header of every push and coded
    Huffman in a Python loop per byte. A block is then a few hundred bytes longer (the
    provider token goes in full each time), nothing on a connection that carries thousands of
    pushes a second. The first block, and the first after the peer changes
    SETTINGS_HEADER_TABLE_SIZE, open with a table size update to 0 (§4.2, §6.3).

    Fields given as ``hpack.NeverIndexedHeaderTuple`` (per request: the path, an id) and
    ``authorization`` are coded "never indexed"; the other fields' codings are kept, since
    the same few recur on every request.
    """

    def __init__(self) -> None:
        self._announce_size = True
        self._fields: dict[tuple[bytes, bytes], bytes] = {}

    def table_size_changed(self) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: say "0" again in the next block."""
        self._announce_size = True

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        out = bytearray()
        if self._announce_size:
            out.append(0x20)  # dynamic table size update: 0
            self._announce_size = False
        fields = self._fields
        for header in headers:
            if isinstance(header, NeverIndexedHeaderTuple):
                out += _hpack_field(header[0], header[1], never=True)
                continue
            key = (header[0], header[1])
            coded = fields.get(key)
            if coded is None:
                coded = _hpack_field(key[0], key[1], never=key[0] == b"authorization")
                if len(fields) >= _FIELD_CACHE:
                    fields.clear()
                fields[key] = coded
            out += coded
        return bytes(out)


# --- the connection ----------------------------------------------------------------------------

class _StreamState:
    __slots__ = ("inbound_window", "local_closed", "outbound_window", "response_seen")

    def __init__(self, outbound_window: int) -> None:
        self.outbound_window = outbound_window
        self.inbound_window = DEFAULT_WINDOW
        self.local_closed = False
        self.response_seen = False


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def _unpad(payload: bytes, flags: int) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]


def _status_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b":status":
            return value
    return None


class Http2ClientConnection:
    """One client connection's HTTP/2 state: feed it bytes, send requests, read its events."""

    def __init__(self, *, max_header_list_size: int = MAX_HEADER_BLOCK) -> None:
        self._out = bytearray()
        self._in = bytearray()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list_size
        self._max_header_list_size = max_header_list_size
        self.encoder = HeaderBlockEncoder()
        self._streams: dict[int, _StreamState] = {}
        self._next_stream_id = 1
        self._settings_seen = False
        # (stream id, END_STREAM of the HEADERS, block so far) while CONTINUATION must follow
        self._continuation: tuple[int, bool, bytearray] | None = None
        self._closed = False
        # The peer's settings (what our sends must respect).
        self.max_concurrent_streams = MAX_STREAM_ID  # "no limit" until its SETTINGS say
        self.initial_window_size = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.outbound_window = DEFAULT_WINDOW  # the connection's send window
        self._inbound_window = DEFAULT_WINDOW
        self.max_inbound_frame_size = DEFAULT_MAX_FRAME_SIZE

    # -- outbound

    def initiate_connection(self) -> None:
        """Queue the connection preface and our SETTINGS (no server push)."""
        self._out += PREFACE + _frame(SETTINGS, 0, 0, _SETTING.pack(SETTINGS_ENABLE_PUSH, 0)
                                      + _SETTING.pack(SETTINGS_MAX_HEADER_LIST_SIZE,
                                                      self._max_header_list_size))

    def data_to_send(self) -> bytes:
        """Everything queued since the last call."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def open_streams(self) -> int:
        """Streams we opened and have not seen closed or reset."""
        return len(self._streams)

    def stream_window(self, stream_id: int) -> int:
        """How much DATA the stream may send now (both windows and the frame size)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return min(stream.outbound_window, self.outbound_window, self.max_outbound_frame_size)

    def send_headers(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> int:
        """Open the next stream with this request's header block; its id."""
        stream_id = self._next_stream_id
        if self._closed:
            raise Http2StateError("connection closed")
        if stream_id > MAX_STREAM_ID:
            raise Http2StateError("stream ids used up")
        block = self.encoder.encode(headers)
        self._next_stream_id = stream_id + 2
        size = self.max_outbound_frame_size
        flags = END_STREAM if end_stream else 0
        if len(block) <= size:
            self._out += _frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._out += _frame(HEADERS, flags, stream_id, block[:size])
            for start in range(size, len(block), size):
                last = start + size >= len(block)
                self._out += _frame(CONTINUATION, END_HEADERS if last else 0, stream_id,
                                    block[start:start + size])
        stream = self._streams[stream_id] = _StreamState(self.initial_window_size)
        stream.local_closed = end_stream
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        """One DATA frame; it must fit ``stream_window`` (nothing is queued if not)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self._closed:
            raise Http2StateError(f"stream {stream_id} is closed")
        size = len(data)
        if size > min(stream.outbound_window, self.outbound_window,
                      self.max_outbound_frame_size):
            raise Http2StateError("DATA larger than the flow-control windows allow")
        stream.outbound_window -= size
        self.outbound_window -= size
        self._out += _frame(DATA, END_STREAM if end_stream else 0, stream_id, data)
        if end_stream:
            stream.local_closed = True

    def reset_stream(self, stream_id: int, error_code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Reset a stream still open (a no-op for one already closed or reset)."""
        if self._streams.pop(stream_id, None) is not None and not self._closed:
            self._out += _frame(RST_STREAM, 0, stream_id, _UINT32.pack(error_code))

    def ping(self, data: bytes) -> None:
        if len(data) != 8:
            raise ValueError("PING data must be 8 bytes")
        if self._closed:
            raise Http2StateError("connection closed")
        self._out += _frame(PING, 0, 0, data)

    def close_connection(self, error_code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Queue GOAWAY (we accept no streams of the peer's: last stream id 0)."""
        if not self._closed:
            self._closed = True
            self._out += _frame(GOAWAY, 0, 0, _GOAWAY_HEAD.pack(0, error_code))

    # -- inbound

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for the whole frames in ``data`` (with what earlier calls left over).

        Raises:
            Http2ProtocolError: the peer broke the protocol; the connection is unusable.
        """
        buf = self._in
        buf += data
        events: list[Event] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 9:
                high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(buf, pos)
                length = high << 16 | low
                if length > self.max_inbound_frame_size:
                    raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                             "frame larger than SETTINGS_MAX_FRAME_SIZE")
                frame_end = pos + 9 + length
                if frame_end > end:
                    break
                payload = bytes(buf[pos + 9:frame_end])
                pos = frame_end
                self._receive_frame(kind, flags, stream_id & MAX_STREAM_ID, payload, events)
        finally:
            del buf[:pos]
        return events

    def _receive_frame(self, kind: int, flags: int, stream_id: int, payload: bytes,
                       events: list[Event]) -> None:
        if not self._settings_seen:
            if kind != SETTINGS or flags & ACK:
                raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                         "the server's preface is not SETTINGS")
            self._settings_seen = True
        if self._continuation is not None:
            self._receive_continuation(kind, flags, stream_id, payload, events)
        elif kind == HEADERS:
            self._receive_headers(flags, stream_id, payload, events)
        elif kind == DATA:
            self._receive_body(flags, stream_id, payload, events)
        elif kind == RST_STREAM:
            self._receive_reset(stream_id, payload, events)
        elif kind == SETTINGS:
            self._receive_settings(flags, stream_id, payload, events)
        elif kind == WINDOW_UPDATE:
            self._receive_window_update(stream_id, payload, events)
        elif kind == PING:
            if stream_id:
                raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING not 8 bytes")
            if flags & ACK:
                events.append(PingAckReceived(payload))
            elif not self._closed:
                self._out += _frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            if stream_id:
                raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = _GOAWAY_HEAD.unpack_from(payload)
            events.append(GoAwayReceived(last & MAX_STREAM_ID, code, payload[8:]))
        elif kind == PUSH_PROMISE:
            raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE, push is disabled")
        elif kind == CONTINUATION:
            raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION out of place")
        elif kind == PRIORITY and not stream_id:
            raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        # Other frame types: ignored (RFC 9113 §5.5).

    def _known_stream(self, stream_id: int, what: str) -> _StreamState | None:
        """The open stream; None for one we opened and closed (its frames are ignored);
        a protocol error for stream 0, a stream we never opened, or one of the peer's."""
        stream = self._streams.get(stream_id)
        if stream is None and (not stream_id or not stream_id & 1
                               or stream_id >= self._next_stream_id):
            raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                     f"{what} on stream {stream_id}, which we never opened")
        return stream

    def _receive_headers(self, flags: int, stream_id: int, payload: bytes,
                         events: list[Event]) -> None:
        self._known_stream(stream_id, "HEADERS")
        block = _unpad(payload, flags)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
            block = block[5:]
        end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._header_block(stream_id, end_stream, block, events)
        else:
            self._continuation = (stream_id, end_stream, bytearray(block))

    def _receive_continuation(self, kind: int, flags: int, stream_id: int, payload: bytes,
                              events: list[Event]) -> None:
        assert self._continuation is not None
        expected, end_stream, block = self._continuation
        if kind != CONTINUATION or stream_id != expected:
            raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                     "a header block interrupted (CONTINUATION expected)")
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise Http2ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._continuation = None
            self._header_block(stream_id, end_stream, bytes(block), events)

    def _header_block(self, stream_id: int, end_stream: bool, block: bytes,
                      events: list[Event]) -> None:
        # Decoded even for a stream we no longer track: the decoder's table must follow.
        try:
            # raw=True: a list of (bytes, bytes) pairs, whatever hpack's annotation says.
            headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
        except (hpack.HPACKError, IndexError, ValueError) as exc:
            raise Http2ProtocolError(ErrorCode.COMPRESSION_ERROR,
                                     f"header block not decodable ({type(exc).__name__})"
                                     ) from None
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not stream.response_seen:
            status = _status_of(headers)
            if status is not None and status[:1] == b"1" and not end_stream:
                return  # informational (1xx): the final response follows
            stream.response_seen = True
            events.append(ResponseReceived(stream_id, headers))
        elif not end_stream:  # trailers must end the stream (RFC 9113 §8.1)
            self._reset_for_peer_fault(stream_id, ErrorCode.PROTOCOL_ERROR, events)
            return
        if end_stream:
            self._remote_end(stream_id, stream, events)

    def _remote_end(self, stream_id: int, stream: _StreamState, events: list[Event]) -> None:
        events.append(StreamEnded(stream_id))
        if stream.local_closed:
            del self._streams[stream_id]
        else:  # the peer answered before our body was complete: we stop sending it
            self.reset_stream(stream_id, ErrorCode.CANCEL)

    def _receive_body(self, flags: int, stream_id: int, payload: bytes,
                      events: list[Event]) -> None:
        stream = self._known_stream(stream_id, "DATA")
        size = len(payload)  # padding counts against flow control (§6.1)
        # The windows are topped up below half, and a frame is at most 16,384 bytes (our
        # SETTINGS_MAX_FRAME_SIZE): the two window checks below are a defence in depth.
        if size > self._inbound_window:
            raise Http2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR,
                                     "DATA beyond the connection's window")
        self._inbound_window -= size
        if self._inbound_window < _REPLENISH_BELOW and not self._closed:
            self._out += _frame(WINDOW_UPDATE, 0, 0,
                                _UINT32.pack(DEFAULT_WINDOW - self._inbound_window))
            self._inbound_window = DEFAULT_WINDOW
        data = _unpad(payload, flags)
        if stream is None:
            return
        if not stream.response_seen:
            self._reset_for_peer_fault(stream_id, ErrorCode.PROTOCOL_ERROR, events)
            return
        if size > stream.inbound_window:
            self._reset_for_peer_fault(stream_id, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        stream.inbound_window -= size
        if data:
            events.append(DataReceived(stream_id, data))
        if flags & END_STREAM:
            self._remote_end(stream_id, stream, events)
        elif stream.inbound_window < _REPLENISH_BELOW:
            self._out += _frame(WINDOW_UPDATE, 0, stream_id,
                                _UINT32.pack(DEFAULT_WINDOW - stream.inbound_window))
            stream.inbound_window = DEFAULT_WINDOW

    def _reset_for_peer_fault(self, stream_id: int, code: ErrorCode,
                              events: list[Event]) -> None:
        self.reset_stream(stream_id, code)
        events.append(StreamReset(stream_id, code, by_peer=False))

    def _receive_reset(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if self._known_stream(stream_id, "RST_STREAM") is not None:
            del self._streams[stream_id]
            events.append(StreamReset(stream_id, _UINT32.unpack(payload)[0]))

    def _receive_settings(self, flags: int, stream_id: int, payload: bytes,
                          events: list[Event]) -> None:
        if stream_id:
            raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with data")
            return
        if len(payload) % 6:
            raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not in 6-byte units")
        for offset in range(0, len(payload), 6):
            setting, value = _SETTING.unpack_from(payload, offset)
            self._apply_setting(setting, value)
        if not self._closed:
            self._out += _frame(SETTINGS, ACK, 0)
        events.append(ConnectionSettingsChanged())

    def _apply_setting(self, setting: int, value: int) -> None:
        if setting == SETTINGS_MAX_CONCURRENT_STREAMS:
            self.max_concurrent_streams = value
        elif setting == SETTINGS_INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise Http2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR,
                                         "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
            delta = value - self.initial_window_size
            self.initial_window_size = value
            for stream in self._streams.values():  # §6.9.2: open streams move too
                stream.outbound_window += delta
                if stream.outbound_window > MAX_WINDOW:
                    raise Http2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR,
                                             "a stream's window above 2^31-1")
        elif setting == SETTINGS_MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME_SIZE <= value <= 2**24 - 1:
                raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                         "SETTINGS_MAX_FRAME_SIZE out of range")
            self.max_outbound_frame_size = value
        elif setting == SETTINGS_ENABLE_PUSH:
            if value > 1:
                raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                         "SETTINGS_ENABLE_PUSH not 0 or 1")
        elif setting == SETTINGS_HEADER_TABLE_SIZE:
            self.encoder.table_size_changed()
        # SETTINGS_MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored (§6.5.2).

    def _receive_window_update(self, stream_id: int, payload: bytes,
                               events: list[Event]) -> None:
        if len(payload) != 4:
            raise Http2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = _UINT32.unpack(payload)[0] & MAX_WINDOW
        if not stream_id:
            if not increment:
                raise Http2ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.outbound_window += increment
            if self.outbound_window > MAX_WINDOW:
                raise Http2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR,
                                         "the connection's window above 2^31-1")
            events.append(WindowUpdated(0))
            return
        stream = self._known_stream(stream_id, "WINDOW_UPDATE")
        if stream is None:
            return
        if not increment:
            self._reset_for_peer_fault(stream_id, ErrorCode.PROTOCOL_ERROR, events)
            return
        stream.outbound_window += increment
        if stream.outbound_window > MAX_WINDOW:
            self._reset_for_peer_fault(stream_id, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id))
