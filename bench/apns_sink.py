"""A lean local APNs for the push-cost benchmark: HTTP/2 over TLS, answers every POST 200.

Why not ``tests.peers.apns_server``: it verifies every JWT and the whole payload schema with h2
in Python, about 280 µs of CPU per request, which caps it near the push rate we want to
measure: the clients under test would then measure the server. This one frames HTTP/2 by hand
(HPACK decoding through ``hpack``, needed to keep the dynamic table in step and to echo
``apns-id``, which aioapns matches answers by), about a fifth of that, in its own process so
its CPU never mixes with the client's. It counts the requests without ``:method POST`` or
without ``authorization`` as ``bad``.

Run: ``python -m bench.apns_sink CERT KEY`` prints ``{"port": N}`` and serves until SIGTERM;
it prints ``{"requests": N, "bad": M}`` on the way out.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import struct
import sys

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
BIG_WINDOW = 1 << 30
COUNTS = {"requests": 0, "bad": 0}


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream) + payload


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.preface = False
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 65536
        self.pending: dict[int, tuple[bytes, bool]] = {}  # stream → (apns-id, ok)
        self.block = b""  # header block being continued
        self.block_stream = 0
        self.block_end = False
        self.consumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # SETTINGS: MAX_CONCURRENT_STREAMS 1000, INITIAL_WINDOW_SIZE 2^30; a big connection
        # window, so flow control never limits the client.
        settings = struct.pack(">HIHI", 0x3, 1000, 0x4, BIG_WINDOW)
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(8, 0, 0, struct.pack(">I", BIG_WINDOW - 65535)))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        if not self.preface:
            if len(buf) < len(PREFACE):
                self.buf = buf
                return
            if not buf.startswith(PREFACE):
                self._close()
                return
            self.preface = True
            pos = len(PREFACE)
        out: list[bytes] = []
        end = len(buf)
        while end - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if pos + 9 + length > end:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = buf[pos + 9:pos + 9 + length]
            pos += 9 + length
            if kind == DATA:
                self.consumed += length
                if flags & END_STREAM:
                    self._answer(stream, out)
            elif kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    if flags & PADDED:
                        payload = payload[1:len(payload) - payload[0]]
                    if flags & PRIORITY:
                        payload = payload[5:]
                    self.block, self.block_stream = payload, stream
                    self.block_end = bool(flags & END_STREAM)
                else:
                    self.block += payload
                if flags & END_HEADERS:
                    self._headers(out)
            elif kind == SETTINGS:
                if not flags & ACK:
                    out.append(frame(SETTINGS, ACK, 0, b""))
            elif kind == PING:
                if not flags & ACK:
                    out.append(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                self.pending.pop(stream, None)
            elif kind == GOAWAY:
                self._close()
                return
        self.buf = buf[pos:]
        if self.consumed > BIG_WINDOW // 2:
            out.append(frame(8, 0, 0, struct.pack(">I", self.consumed)))
            self.consumed = 0
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _headers(self, out: list[bytes]) -> None:
        fields = dict(self.decoder.decode(self.block, raw=True))
        ok = fields.get(b":method") == b"POST" and b"authorization" in fields
        self.pending[self.block_stream] = (fields.get(b"apns-id", b""), ok)
        if self.block_end:
            self._answer(self.block_stream, out)

    def _answer(self, stream: int, out: list[bytes]) -> None:
        apns_id, ok = self.pending.pop(stream, (b"", False))
        COUNTS["requests"] += 1
        if not ok:
            COUNTS["bad"] += 1
        # :status 200 (static index 8), then apns-id as a literal without indexing.
        block = b"\x88\x00\x07apns-id" + bytes((len(apns_id),)) + apns_id
        out.append(frame(HEADERS, END_STREAM | END_HEADERS, stream, block))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _main(cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Protocol, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    print(json.dumps(COUNTS), flush=True)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
