"""SIP messages: header multimap, parse/serialise, TCP/TLS stream framing, identifiers.

Strategy (sans-IO, like h11): ``parse_message`` turns one datagram or one framed stream
message into a ``SipRequest``/``SipResponse`` or raises ``SipParseError``; it never raises
anything else, whatever the bytes. ``StreamFramer`` cuts a byte stream into whole messages by
``Content-Length`` and reports RFC 5626 keep-alives. Nothing here touches a socket or a clock.

What ``parse_message`` guarantees about a message it returns:

- the header section was valid UTF-8, lines are unfolded and values stripped of SP/HTAB;
- Via (at least one, all parseable), From, To, Call-ID and CSeq are present, From, To,
  Call-ID and CSeq exactly once and parseable, and a request's CSeq method matches its method;
- Max-Forwards, if present, is 0..255; Content-Length, if present, is a non-negative integer,
  the body is exactly that long (a longer datagram is truncated, a shorter one is an error).

So the accessors (``call_id``, ``cseq``, ``from_``, ``to``, ``vias``, ``top_via``) do not fail
on parsed messages. On messages built in code they raise ``SipParseError`` if the header is
missing or malformed.

``Content-Length`` is derived data: ``to_bytes`` always writes the true body length, and
message equality ignores the header, so ``parse_message(m.to_bytes()) == m``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final

import attrs

from sipis import fastenum, randomness
from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI, Address, CSeq, Via, check_address

__all__ = [
    "COMPACT_FORMS",
    "KEEPALIVE_PING",
    "KEEPALIVE_PONG",
    "MAX_MESSAGE_SIZE",
    "REASON_PHRASES",
    "Headers",
    "KeepAlive",
    "SipMessage",
    "SipRequest",
    "SipResponse",
    "StreamFramer",
    "canonical_name",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
    "split_header_list",
]

#: Largest message we accept, datagram or stream (bytes, headers and body together).
MAX_MESSAGE_SIZE: Final = 65536

#: RFC 3261 §17.2.3: branches of RFC 3261-compliant transactions start with this cookie.
BRANCH_MAGIC_COOKIE: Final = "z9hG4bK"

#: Compact header forms (RFC 3261 §7.3.3 and the IANA SIP parameters registry).
COMPACT_FORMS: Final[dict[str, str]] = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}

_WELL_KNOWN_NAMES = (
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
    "Allow-Events", "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
    "Content-Disposition", "Content-Encoding", "Content-Language", "Content-Length",
    "Content-Type", "CSeq", "Date", "Error-Info", "Event", "Expires", "Flow-Timer", "From",
    "History-Info", "Identity", "Identity-Info", "In-Reply-To", "Max-Forwards", "MIME-Version",
    "Min-Expires", "Min-SE", "Organization", "P-Asserted-Identity", "P-Preferred-Identity",
    "Path", "Priority", "Privacy", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Require", "RAck", "Reason", "Record-Route", "Refer-To", "Referred-By",
    "Reject-Contact", "Replaces", "Reply-To", "Request-Disposition", "Require", "Retry-After",
    "Route", "RSeq", "Server", "Service-Route", "Session-Expires", "SIP-ETag", "SIP-If-Match",
    "Subject", "Subscription-State", "Supported", "Timestamp", "To", "Unsupported",
    "User-Agent", "Via", "Warning", "WWW-Authenticate",
)
_CANONICAL: Final[dict[str, str]] = {name.lower(): name for name in _WELL_KNOWN_NAMES}

#: Default reason phrases (RFC 3261 §21 and later RFCs).
REASON_PHRASES: Final[dict[int, str]] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated",
    200: "OK", 202: "Accepted", 204: "No Notification",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily",
    305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    412: "Conditional Request Failed", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 430: "Flow Failed",
    433: "Anonymity Disallowed", 436: "Bad Identity-Info", 437: "Unsupported Certificate",
    438: "Invalid Identity Header", 439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded", 469: "Bad Info Package", 470: "Consent Needed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 555: "Push Notification Service Not Supported",
    580: "Precondition Failure",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable", 607: "Unwanted", 608: "Rejected",
}
_CLASS_PHRASES: Final = {1: "Provisional", 2: "Success", 3: "Redirection",
                         4: "Client Error", 5: "Server Error", 6: "Global Failure"}

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_FOLD_RE = re.compile(r"\r\n[ \t]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_STATUS_RE = re.compile(r"[1-6][0-9][0-9]")
_VERSION_LIKE_RE = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE | re.ASCII)
_SIP_VERSION = "SIP/2.0"
_MAX_FORWARDS_LIMIT = 255
# Headers RFC 3261 §20 allows once per message; a second copy is a parse error.
_SINGLE_VALUED = ("From", "To", "Call-ID", "CSeq", "Max-Forwards")
_MANDATORY = ("Via", "From", "To", "Call-ID", "CSeq")


def canonical_name(name: str) -> str:
    """Expand a compact form and give well-known names their usual casing.

    ``"i"`` → ``"Call-ID"``, ``"cseq"`` → ``"CSeq"``, ``"X-Foo"`` → ``"X-Foo"`` (unchanged).
    """
    lower = name.lower()
    if len(lower) == 1:
        return COMPACT_FORMS.get(lower, name)
    return _CANONICAL.get(lower, name)


_NAME_MEMO_SIZE = 1024
_VALID_NAMES: dict[str, tuple[str, str]] = {}  # name as written → (lower key, canonical)
_LOOKUP_KEYS: dict[str, str] = {}  # name asked for → lower-case canonical key


def _remember_name(name: str) -> tuple[str, str]:
    """(lower-case key, canonical name) of a valid header name, memoised."""
    canonical = canonical_name(name)
    names = (canonical.lower(), canonical)
    if len(_VALID_NAMES) >= _NAME_MEMO_SIZE:
        _VALID_NAMES.clear()
    _VALID_NAMES[name] = names
    return names


def _lookup_key(name: str) -> str:
    """``canonical_name(name).lower()``, memoised (a few dozen names in practice)."""
    key = _LOOKUP_KEYS.get(name)
    if key is None:
        key = canonical_name(name).lower()
        if len(_LOOKUP_KEYS) >= _NAME_MEMO_SIZE:
            _LOOKUP_KEYS.clear()
        _LOOKUP_KEYS[name] = key
    return key


def split_header_list(value: str) -> list[str]:
    """Split a header value at commas outside quoted strings and ``<...>``; drop empty items.

    Not for Authorization/WWW-Authenticate/Date-style values whose grammar is not a list.
    """
    if "," not in value:  # the common case: one element, nothing to scan
        item = value.strip(" \t")
        return [item] if item else []
    items: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            items.append(value[start:i])
            start = i + 1
        i += 1
    items.append(value[start:])
    return [item.strip(" \t") for item in items if item.strip(" \t")]


class Headers:
    """Ordered, case-insensitive multimap of header lines.

    Names are stored canonical (``canonical_name``); values are single lines without CR/LF.
    Equality compares names case-insensitively and values exactly, in order.
    """

    # Each line is kept as (lower-case canonical name, canonical name, value): lookups
    # compare the stored key instead of lower-casing every line on every lookup.
    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str, str]] = []
        for name, value in items:
            self.add(name, value)

    @staticmethod
    def _checked(name: str, value: str) -> tuple[str, str, str]:
        names = _VALID_NAMES.get(name)
        if names is None:
            if not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            names = _remember_name(name)
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} value contains CR or LF")
        return names[0], names[1], value

    @classmethod
    def _of_lines(cls, items: list[tuple[str, str, str]]) -> Headers:
        """Headers from lines already checked (the parser's): (key, canonical name, value)."""
        headers = cls()
        headers._items = items
        return headers

    def get(self, name: str) -> str | None:
        """Value of the first ``name`` line, or None."""
        key = _lookup_key(name)
        for k, _, v in self._items:
            if k == key:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Values of every ``name`` line, in order (a line may hold a comma-separated list)."""
        key = _lookup_key(name)
        return [v for k, _, v in self._items if k == key]

    def get_list(self, name: str) -> list[str]:
        """Every comma-separated element of every ``name`` line, in order."""
        out: list[str] = []
        for value in self.get_all(name):
            out.extend(split_header_list(value))
        return out

    def add(self, name: str, value: str) -> None:
        """Append a line.

        Raises:
            ValueError: ``name`` is not a token or ``value`` contains CR/LF.
        """
        self._items.append(self._checked(name, value))

    def prepend(self, name: str, value: str) -> None:
        """Insert a line before all others (a proxy's own Via, RFC 3261 §16.6 step 8)."""
        self._items.insert(0, self._checked(name, value))

    def set(self, name: str, value: str) -> None:
        """Replace all ``name`` lines by one, at the place of the first (or at the end)."""
        item = self._checked(name, value)
        key = item[0]
        out: list[tuple[str, str, str]] = []
        placed = False
        for line in self._items:
            if line[0] == key:
                if not placed:
                    out.append(item)
                    placed = True
            else:
                out.append(line)
        if not placed:
            out.append(item)
        self._items = out

    def remove(self, name: str) -> int:
        """Remove all ``name`` lines; return how many there were."""
        key = _lookup_key(name)
        before = len(self._items)
        self._items = [line for line in self._items if line[0] != key]
        return before - len(self._items)

    def copy(self) -> Headers:
        """An independent copy."""
        new = Headers()
        new._items = list(self._items)
        return new

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter([(n, v) for _, n, v in self._items])

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _lookup_key(name)
        for line in self._items:  # noqa: SIM110 — any() with a generator costs twice this
            if line[0] == key:
                return True
        return False

    def _key(self, *, skip: str | None = None) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, _, v in self._items if k != skip)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({[(n, v) for _, n, v in self._items]!r})"


def _headers_eq_key(headers: Headers) -> tuple[tuple[str, str], ...]:
    # Content-Length is derived from the body; leave it out of message equality.
    return headers._key(skip="content-length")


class _MessageMixin:
    """Typed accessors shared by requests and responses."""

    __slots__ = ()
    headers: Headers
    body: bytes

    def _one(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SipParseError(f"missing {name} header")
        return value

    @property
    def call_id(self) -> str:
        """The Call-ID value."""
        return self._one("Call-ID")

    @property
    def cseq(self) -> CSeq:
        """The parsed CSeq."""
        return CSeq.parse(self._one("CSeq"))

    @property
    def from_(self) -> Address:
        """The parsed From."""
        return Address.parse(self._one("From"))

    @property
    def to(self) -> Address:
        """The parsed To."""
        return Address.parse(self._one("To"))

    @property
    def vias(self) -> list[Via]:
        """Every Via element, top first, across lines and comma-joined values."""
        return [Via.parse(v) for v in self.headers.get_list("Via")]

    @property
    def top_via(self) -> Via:
        """The first Via element (the sender's, for a request; ours, for a response)."""
        vias = self.headers.get_list("Via")
        if not vias:
            raise SipParseError("missing Via header")
        return Via.parse(vias[0])

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards as an int, or None if absent."""
        value = self.headers.get("Max-Forwards")
        if value is None:
            return None
        return _parse_max_forwards(value)

    def _wire(self, start_line: str) -> bytes:
        lines = [start_line]
        length_written = False
        for _, name, value in self.headers._items:  # (not iter(): it copies the lines)
            if name == "Content-Length":
                if length_written:
                    continue
                value = str(len(self.body))
                length_written = True
            lines.append(f"{name}: {value}")
        if not length_written:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


@attrs.define
class SipRequest(_MessageMixin):
    """A SIP request; equality is by value (Content-Length aside)."""

    method: str
    uri: URI
    headers: Headers = attrs.field(factory=Headers, eq=_headers_eq_key)
    body: bytes = b""

    def to_bytes(self) -> bytes:
        """The wire form, with a Content-Length that matches the body."""
        return self._wire(f"{self.method} {self.uri} {_SIP_VERSION}")


@attrs.define
class SipResponse(_MessageMixin):
    """A SIP response; equality is by value (Content-Length aside)."""

    status: int
    reason: str
    headers: Headers = attrs.field(factory=Headers, eq=_headers_eq_key)
    body: bytes = b""

    def to_bytes(self) -> bytes:
        """The wire form, with a Content-Length that matches the body."""
        return self._wire(f"{_SIP_VERSION} {self.status} {self.reason}")


SipMessage = SipRequest | SipResponse


# ---------------------------------------------------------------------------------------------
# parsing


def _check_version(version: str, line: str) -> None:
    if version.isascii() and version.upper() == _SIP_VERSION:
        return
    if _VERSION_LIKE_RE.fullmatch(version):
        raise SipParseError("unsupported SIP version", status_hint=505, offending=line)
    raise SipParseError("malformed SIP version", offending=line)


def _parse_max_forwards(value: str) -> int:
    if not _DIGITS_RE.fullmatch(value) or len(value) > 10 or int(value) > _MAX_FORWARDS_LIMIT:
        raise SipParseError("invalid Max-Forwards", offending=value)
    return int(value)


def _parse_content_length(values: list[str]) -> int | None:
    if not values:
        return None
    lengths = set()
    for value in values:
        if not _DIGITS_RE.fullmatch(value) or len(value) > 10:
            raise SipParseError("invalid Content-Length", offending=value)
        lengths.add(int(value))
    if len(lengths) > 1:
        raise SipParseError("conflicting Content-Length headers")
    return lengths.pop()


def _split_head(data: bytes, max_size: int) -> tuple[list[str], bytes]:
    if len(data) > max_size:
        raise SipParseError(f"message larger than {max_size} bytes", status_hint=413)
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2  # RFC 3261 §7.5: ignore CRLFs before the start line
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise SipParseError("no empty line after the header section", offending=data[start:])
    try:
        head = data[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(
            "header section is not valid UTF-8", offending=data[start + max(0, exc.start - 20):]
        ) from None
    # (A scan for the fold before the regex: nearly no sender folds.)
    unfolded = _FOLD_RE.sub(" ", head) if "\r\n " in head or "\r\n\t" in head else head
    lines = unfolded.split("\r\n")
    if unfolded.count("\r") != len(lines) - 1 or unfolded.count("\n") != len(lines) - 1:
        for line in lines:  # a CR or LF outside the line ends: find it for the error
            if "\r" in line or "\n" in line:
                raise SipParseError("bare CR or LF in header section", offending=line)
    return lines, data[end + 4:]


def _parse_status_line(line: str) -> tuple[int, str]:
    version, _, rest = line.partition(" ")
    _check_version(version, line)
    code, _, reason = rest.partition(" ")  # "SIP/2.0 200" without a reason is tolerated
    if not _STATUS_RE.fullmatch(code):
        raise SipParseError("invalid status code", offending=line)
    return int(code), reason


def _parse_request_line(line: str) -> tuple[str, URI]:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SipParseError("malformed request line", offending=line)
    method, uri_text, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise SipParseError("invalid method", offending=line)
    _check_version(version, line)
    return method, URI.parse(uri_text)


def _parse_headers(lines: list[str]) -> Headers:
    # Names seen before skip the token check; no value holds CR or LF (``_split_head``).
    items: list[tuple[str, str, str]] = []
    known_names = _VALID_NAMES
    for line in lines:
        name, colon, value = line.partition(":")
        names = known_names.get(name) if colon else None
        if names is None:
            name = name.rstrip(" \t")
            if not colon or not _TOKEN_RE.fullmatch(name):
                raise SipParseError("malformed header line", offending=line)
            names = known_names.get(name) or _remember_name(name)
        items.append((names[0], names[1], value.strip(" \t")))
    return Headers._of_lines(items)


# Lower-case key → canonical name of the headers _validate looks at.
_CHECKED = {name.lower(): name for name in (*_MANDATORY, *_SINGLE_VALUED)}


def _validate(headers: Headers, method: str | None) -> None:
    # One pass over the lines (this runs for every message received).
    first: dict[str, str] = {}
    repeated: list[str] = []
    vias: list[str] = []
    for key, _, value in headers._items:
        if key not in _CHECKED:
            continue
        if key == "via":
            vias.append(value)
        elif key in first:
            repeated.append(key)
        else:
            first[key] = value
    for name in _MANDATORY:
        if (not vias) if name == "Via" else name.lower() not in first:
            raise SipParseError(f"missing {name} header")
    for name in _SINGLE_VALUED:
        if name.lower() in repeated:
            raise SipParseError(f"more than one {name} header")
    cseq = CSeq.parse(first["cseq"])
    if method is not None and cseq.method != method:
        raise SipParseError("CSeq method does not match the request method",
                            offending=f"{method} / {cseq}")
    call_id = first["call-id"]
    if not call_id or " " in call_id or "\t" in call_id:
        raise SipParseError("invalid Call-ID", offending=call_id)
    check_address(first["from"])
    check_address(first["to"])
    elements = 0
    for value in vias:
        for via in split_header_list(value):
            Via.parse(via)
            elements += 1
    if not elements:
        raise SipParseError("empty Via header")
    max_forwards = first.get("max-forwards")
    if max_forwards is not None:
        _parse_max_forwards(max_forwards)


def parse_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SipRequest | SipResponse:
    """Parse one SIP message (a datagram, or one message cut by ``StreamFramer``).

    Args:
        data: the raw bytes.
        max_size: reject anything longer (413).

    Returns:
        The request or response; the body is raw bytes, cut to Content-Length if the
        datagram carried more.

    Raises:
        SipParseError: for anything malformed (see the module docstring for what is checked);
            ``status_hint`` says what to answer if it was a request. Nothing else is raised.
    """
    lines, body = _split_head(data, max_size)
    is_response = lines[0][:4].isascii() and lines[0][:4].upper() == "SIP/"
    if is_response:
        status, reason = _parse_status_line(lines[0])
    else:
        method, uri = _parse_request_line(lines[0])
    headers = _parse_headers(lines[1:])
    _validate(headers, None if is_response else method)
    length = _parse_content_length(headers.get_all("Content-Length"))
    if length is not None:
        if length > len(body):
            raise SipParseError(
                f"body shorter ({len(body)} bytes) than Content-Length ({length})")
        body = body[:length]
    if is_response:
        return SipResponse(status, reason, headers, body)
    return SipRequest(method, uri, headers, body)


# ---------------------------------------------------------------------------------------------
# responses


def make_response(
    request: SipRequest, status: int, reason: str | None = None, *, to_tag: str | None = None
) -> SipResponse:
    """Build a response to ``request`` per RFC 3261 §8.2.6.

    Copies every Via line in order, From, To (adding ``;tag=to_tag`` if given and To has no
    tag yet), Call-ID and CSeq; a 100 also copies Timestamp (§8.2.6.1). Record-Route and
    Contact are the dialog layer's business.

    Raises:
        ValueError: ``status`` outside 100..699 or ``to_tag`` not a token.
        SipParseError: the request's To header is malformed (only when ``to_tag`` is given).
    """
    if not 100 <= status <= 699:
        raise ValueError(f"status {status} outside 100..699")
    if reason is None:
        reason = REASON_PHRASES.get(status, _CLASS_PHRASES[status // 100])
    headers = Headers()
    for via in request.headers.get_all("Via"):
        headers.add("Via", via)
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is None:
            continue
        if name == "To" and to_tag is not None:
            if not _TOKEN_RE.fullmatch(to_tag):
                raise ValueError("to_tag is not a token")
            if Address.parse(value).tag is None:
                value = f"{value};tag={to_tag}"
        headers.add(name, value)
    if status == 100:
        timestamp = request.headers.get("Timestamp")
        if timestamp is not None:
            headers.add("Timestamp", timestamp)
    return SipResponse(status, reason, headers)


# ---------------------------------------------------------------------------------------------
# stream framing


class KeepAlive(fastenum.Enum):
    """RFC 5626 §3.5.1 keep-alives seen between messages on a stream."""

    PING = "ping"  #: CRLFCRLF: answer with a single CRLF
    PONG = "pong"  #: a lone CRLF: the answer to our ping


KEEPALIVE_PING: Final = KeepAlive.PING
KEEPALIVE_PONG: Final = KeepAlive.PONG


class StreamFramer:
    """Cut a TCP/TLS byte stream into SIP messages and keep-alives.

    Messages are framed by Content-Length, which is mandatory on streams (RFC 3261 §18.3).
    Between messages, CRLFCRLF is a ping and a lone CRLF a pong. A ping split by the network
    right after its first CRLF reads as two pongs: rare, and harmless (the peer pings again).

    After ``next_event`` raises ``SipParseError`` the stream has lost its framing: the caller
    must close the connection (answering ``status_hint`` first if it wants).
    """

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._scan_from = 0  # where to resume looking for the end of the header section
        self._total: int | None = None  # length of the current message once headers are in

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned."""
        return len(self._buf)

    def next_event(self) -> bytes | KeepAlive | None:
        """Return the next whole message's bytes, a keep-alive, or None if more bytes are needed.

        Raises:
            SipParseError: a message without a valid Content-Length (400), or one larger than
                ``max_message_size`` (413). The connection must be closed.
        """
        buf = self._buf
        if self._total is None:
            if buf[:1] == b"\r":
                if len(buf) < 2:
                    return None
                if buf[1:2] == b"\n":
                    if buf[:4] == b"\r\n\r\n":
                        del buf[:4]
                        return KEEPALIVE_PING
                    if buf[2:3] == b"\r" and len(buf) < 4:
                        return None  # maybe a ping still arriving
                    del buf[:2]
                    return KEEPALIVE_PONG
            end = buf.find(b"\r\n\r\n", max(0, self._scan_from - 3))
            if end < 0:
                self._scan_from = len(buf)
                if len(buf) > self.max_message_size:
                    raise SipParseError("stream message header section too large",
                                        status_hint=413)
                return None
            length = _stream_content_length(bytes(buf[:end]))
            self._total = end + 4 + length
            if self._total > self.max_message_size:
                raise SipParseError(f"stream message larger than {self.max_message_size} bytes",
                                    status_hint=413)
        if len(buf) < self._total:
            return None
        message = bytes(buf[: self._total])
        del buf[: self._total]
        self._total = None
        self._scan_from = 0
        return message


def _stream_content_length(head: bytes) -> int:
    """Content-Length from a raw header section; the full parse comes later."""
    text = _FOLD_RE.sub(" ", head.decode("latin-1"))
    values = []
    for line in text.split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon and name.rstrip(" \t").lower() in ("content-length", "l"):
            values.append(value.strip(" \t"))
    length = _parse_content_length(values)
    if length is None:
        raise SipParseError("stream message without Content-Length")
    return length


# ---------------------------------------------------------------------------------------------
# identifiers


def new_branch() -> str:
    """A fresh Via branch: the RFC 3261 magic cookie + 96 random bits."""
    return BRANCH_MAGIC_COOKIE + randomness.token_hex(12)


def new_tag() -> str:
    """A fresh From/To tag (64 random bits, RFC 3261 §19.3 asks for at least 32)."""
    return randomness.token_hex(8)


def new_call_id(host: str | None = None) -> str:
    """A fresh Call-ID (128 random bits), optionally ``@host``."""
    ident = randomness.token_hex(16)
    return ident if host is None else f"{ident}@{host}"
