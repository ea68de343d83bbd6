"""Random identifiers (SIP tags, branches, Call-IDs, cnonces, call references, apns-ids)
from a buffered pool of the kernel's CSPRNG.

``secrets.token_hex`` and ``uuid.uuid4`` each made a ``getrandom()`` syscall: four or five
per registration and per call. On the VMs sipis runs on a syscall costs tens of µs and now and
then stalls for milliseconds. The pool reads 4 KiB at a time from the same source
(``os.urandom``) and hands each byte out once, so the identifiers are exactly as unpredictable
as before (RFC 3261 §19.3 asks for cryptographically random tags). A forked child starts with
an empty pool: two processes never hand out the same bytes. Keys and secrets still come from
``secrets`` directly.
"""

from __future__ import annotations

import os
import threading
from typing import Final

#: Bytes read from the kernel at a time.
POOL_SIZE: Final = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the store's worker threads may draw too
        self._bytes = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            end = self._pos + n
            if end > len(self._bytes):
                self._bytes = os.urandom(max(POOL_SIZE, n))
                self._pos, end = 0, n
            out = self._bytes[self._pos:end]
            self._pos = end
        return out

    def forget(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held
        self._bytes = b""
        self._pos = 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def token_bytes(n: int) -> bytes:
    """``n`` random bytes (as ``secrets.token_bytes``)."""
    return _POOL.take(n)


def token_hex(n: int) -> str:
    """``n`` random bytes as ``2n`` lower-case hex digits (as ``secrets.token_hex``)."""
    return _POOL.take(n).hex()


def uuid4() -> str:
    """A random (version 4, RFC 9562) UUID in its usual text form (as ``str(uuid.uuid4())``)."""
    raw = bytearray(_POOL.take(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
