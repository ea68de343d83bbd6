"""Exceptions of the SIP layer.

Every failure inside ``sipis.sip`` surfaces as one of these; no socket, trio or dnspython
exception type leaves the package.

    SipError                      base class: catch this to handle "anything SIP went wrong"
    ├── SipParseError             the remote sent bytes we cannot parse (``status_hint``)
    ├── DigestError               a challenge we cannot answer (unknown algorithm, no qop we know)
    ├── TransactionTimeout        RFC 3261 Timer F fired: no final response in time
    ├── TransportError            a socket or connection failed (``flow`` when known)
    └── ResolveError              RFC 3263 resolution found no target

What the caller does:

- ``SipParseError``: if the bytes were a request, answer ``status_hint`` (400 malformed,
  413 too large, 416 unsupported URI scheme, 505 bad version); otherwise drop them. On a stream
  (TCP/TLS) the framing is lost: close the connection.
- ``DigestError``: treat the registration as failed (auth-failed); retrying will not help.
- ``TransactionTimeout``: the peer did not answer; back off and retry, or fail over to the next
  RFC 3263 target.
- ``TransportError``: the flow is gone; fail over to the next target or reconnect.
- ``ResolveError``: no target at all; back off and retry later.

Messages quote at most ``EXCERPT_LIMIT`` characters of the offending text, with anything that
looks like a URI password blanked out, so an exception can be logged as it is.
"""

from __future__ import annotations

import re

__all__ = [
    "EXCERPT_LIMIT",
    "DigestError",
    "ResolveError",
    "SipError",
    "SipParseError",
    "TransactionTimeout",
    "TransportError",
    "excerpt",
]

#: Longest slice of offending input quoted in an exception message.
EXCERPT_LIMIT = 60

# "sip:user:password@host" -> "sip:user:***@host" wherever it appears in a quoted excerpt,
# also when the excerpt is cut before the '@'.
_URI_PASSWORD = re.compile(r"(sips?:[^:@\s<>\"]*):[^@\s<>\"]*(@|$)", re.IGNORECASE)


def excerpt(text: str | bytes, limit: int = EXCERPT_LIMIT) -> str:
    """Quote at most ``limit`` characters of ``text`` for an error message.

    Bytes are shown with ``repr`` so that control characters stay visible; a URI password is
    replaced by ``***`` so that the message is safe to log.
    """
    if isinstance(text, bytes):
        shown: str = repr(text[:limit])
    else:
        shown = repr(_URI_PASSWORD.sub(r"\1:***\2", text[:limit]))
    return shown + ("…" if len(text) > limit else "")


class SipError(Exception):
    """Base class of every SIP-layer error."""


class SipParseError(SipError):
    """The remote sent bytes that are not valid SIP.

    Attributes:
        status_hint: the status code to answer if the bytes were a request (400 by default,
            413 for an oversized message, 416 for an unsupported URI scheme, 505 for an
            unsupported SIP version).
    """

    def __init__(
        self, message: str, status_hint: int = 400, *, offending: str | bytes | None = None
    ) -> None:
        if offending is not None:
            message = f"{message}: {excerpt(offending)}"
        super().__init__(message)
        self.status_hint = status_hint


class DigestError(SipError):
    """A digest challenge we cannot answer, or a malformed one; retrying will not help."""


class TransactionTimeout(SipError):
    """No final response before RFC 3261 Timer F (64*T1) fired."""


class TransportError(SipError):
    """Sending or receiving failed: the socket or connection is gone.

    Attributes:
        flow: the transport's flow (connection) object when known, so the caller can drop it.
    """

    def __init__(self, message: str, *, flow: object | None = None) -> None:
        super().__init__(message)
        self.flow: object | None = flow


class ResolveError(SipError):
    """RFC 3263 resolution found no usable target for a URI."""
