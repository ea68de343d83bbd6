"""Typed SIP header values: ``URI``, ``Address``, ``Via``, ``CSeq``.

Strategy: each type is a frozen attrs value with a ``parse()`` classmethod that accepts the
RFC 3261 §25 grammar (including the LWS that RFC 4475 "wsinv" throws at it) and raises only
``SipParseError``, and a ``__str__`` that writes one canonical wire form, so that
``T.parse(str(v)) == v`` for every value ``parse`` returns.

- Escapes (``%41``) are validated but kept as given: comparing escaped URIs is the caller's
  business (RFC 3261 §19.1.4), re-escaping would change what the peer sent.
- Parameter names keep their case; lookups (``param``/``has_param``) ignore it.
- Header parameter values are stored raw: a quoted-string keeps its quotes (use ``unquote``).
- IPv6 hosts are stored without brackets and written with them.
- Besides ``sip:`` and ``sips:``, ``tel:`` (RFC 3966) is accepted in a minimal form, because
  carriers put it in From/To and the Request-URI: ``user`` holds the number, ``host`` is "".
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

import attrs

from sipis.sip.errors import SipParseError

_T = TypeVar("_T")

__all__ = [
    "URI",
    "Address",
    "CSeq",
    "Params",
    "Via",
    "quote",
    "unquote",
]

#: ``(name, value)`` pairs; ``None`` for a parameter without ``=value`` (like ``lr``).
Params = tuple[tuple[str, str | None], ...]

MAX_CSEQ = 2**31 - 1
"""RFC 3261 §8.1.1.5: the CSeq sequence number MUST be less than 2**31."""

_SCHEMES = frozenset({"sip", "sips", "tel"})

# RFC 3261 §25.1 character classes.
_ALNUM = "A-Za-z0-9"
_MARK = r"\-_.!~*'()"
_ESCAPED = "%[0-9A-Fa-f]{2}"
_USER_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}&=+$,;?/]|{_ESCAPED})+")
_PASSWORD_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}&=+$,]|{_ESCAPED})*")
_PARAMCHARS_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}\[\]/:&+$]|{_ESCAPED})+")
_HNAME_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}\[\]/?:+$]|{_ESCAPED})+")
_HVALUE_RE = re.compile(rf"(?:[{_ALNUM}{_MARK}\[\]/?:+$]|{_ESCAPED})*")
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# gen-value = token / host / quoted-string; host may be a bare or bracketed IPv6 address.
_GEN_VALUE_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~:\[\]]+")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9])?")
_IPV4_SHAPE_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
_DIGITS_RE = re.compile(r"[0-9]+")
_HOST_CHARS_RE = re.compile(r"[A-Za-z0-9.\-_]+")
# display-name = *(token LWS) / quoted-string; UTF-8 outside quotes is tolerated.
_DISPLAY_TOKENS_RE = re.compile(
    r"[A-Za-z0-9\-.!%*_+`'~\u0080-\U0010ffff]+(?:[ \t]+[A-Za-z0-9\-.!%*_+`'~\u0080-\U0010ffff]+)*"
)
_SENT_PROTOCOL_RE = re.compile(
    r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)"
    r"[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)"
)
_CSEQ_RE = re.compile(r"[ \t]*([0-9]+)[ \t]+([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*")


# ---------------------------------------------------------------------------------------------
# small shared helpers


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t":
        pos += 1
    return pos


def _scan_quoted(text: str, pos: int) -> int:
    """Return the index just past the quoted-string that starts at ``text[pos] == '"'``."""
    n = len(text)
    i = pos + 1
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n or text[i + 1] in "\r\n":
                break
            i += 2
        elif ch == '"':
            return i + 1
        else:
            i += 1
    raise SipParseError("unterminated quoted string", offending=text[pos:])


def unquote(value: str) -> str:
    """Strip the quotes of a quoted-string and resolve its quoted-pairs; other text unchanged."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        i = 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        return "".join(out)
    return value


def quote(value: str) -> str:
    """Write ``value`` as a quoted-string (RFC 3261 §25.1), escaping what qdtext cannot hold.

    CR and LF cannot appear in a quoted-string at all; they become spaces.
    """
    out = ['"']
    for ch in value:
        if ch in "\r\n":
            out.append(" ")
        elif ch in '"\\' or (ord(ch) < 0x20 and ch != "\t") or ch == "\x7f":
            out.append("\\" + ch)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _find_param(params: Params, name: str) -> tuple[bool, str | None]:
    lname = name.lower()
    for pname, value in params:
        if pname.lower() == lname:
            return True, value
    return False, None


def parse_header_params(text: str, pos: int = 0) -> Params:
    """The header parameters ``*( SEMI generic-param )`` of ``text[pos:]``, as ``Address``
    parses them after its ``>`` (for a reader that has matched what comes before itself).

    Raises:
        SipParseError: malformed parameters.
    """
    return _parse_header_params(text, pos, "address")


def param_value(params: Params, name: str) -> str | None:
    """Value of parameter ``name`` (case-insensitive, the first one), raw; None if absent or
    valueless."""
    return _find_param(params, name)[1]


def _update_params(params: Params, updates: dict[str, str | None]) -> Params:
    """Replace parameters in place (matching names case-insensitively), append new ones."""
    pending = {name.lower(): (name, value) for name, value in updates.items()}
    out: list[tuple[str, str | None]] = []
    for pname, value in params:
        key = pname.lower()
        if key in pending:
            new = pending.pop(key)
            out.append((pname, new[1]))
        else:
            out.append((pname, value))
    out.extend(pending.values())
    return tuple(out)


def _drop_params(params: Params, names: Iterable[str]) -> Params:
    drop = {name.lower() for name in names}
    return tuple((n, v) for n, v in params if n.lower() not in drop)


def _format_params(params: Params) -> str:
    return "".join([f";{n}" if v is None else f";{n}={v}" for n, v in params])


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_port(text: str, whole: str) -> int:
    if not _DIGITS_RE.fullmatch(text) or len(text) > 5 or int(text) > 65535:
        raise SipParseError("invalid port", offending=whole)
    return int(text)


def _check_host(host: str, whole: str) -> None:
    """Validate a hostname or IPv4 address (IPv6 references are checked by the caller)."""
    if not host:
        raise SipParseError("empty host", offending=whole)
    if _IPV4_SHAPE_RE.fullmatch(host):
        if not _valid_ipv4(host):
            raise SipParseError("invalid IPv4 address", offending=whole)
        return
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise SipParseError("invalid host name", offending=whole)


@functools.lru_cache(maxsize=1024)
def _valid_ipv4(host: str) -> bool:
    """Whether ``host`` is a valid IPv4 address (cached: every message names a few)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


_MEMO_SIZE = 4096
_URI_MEMO: dict[str, URI] = {}
_ADDRESS_MEMO: dict[str, Address] = {}
_VIA_MEMO: dict[str, Via] = {}
_CSEQ_MEMO: dict[str, CSeq] = {}


def _memo(table: dict[str, _T], parse: Callable[[str], _T], text: str) -> _T:
    """``parse(text)`` through ``table`` (emptied when full: a bounded, cheap cache).

    Parse errors are not remembered; a value is only ever an immutable (frozen) object.
    """
    found = table.get(text)
    if found is None:
        found = parse(text)
        if len(table) >= _MEMO_SIZE:
            table.clear()
        table[text] = found
    return found


def _check_ipv6(host: str, whole: str) -> None:
    # ipaddress accepts a "%zone" suffix, which has no place in a SIP URI.
    if "%" in host:
        raise SipParseError("invalid IPv6 reference", offending=whole)
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise SipParseError("invalid IPv6 reference", offending=whole) from None


# One generic-param with its leading SEMI and SWS: the fast path of _parse_header_params.
_HEADER_PARAM_RE = re.compile(
    r"[ \t]*;[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)"
    r"(?:[ \t]*=[ \t]*(?:([A-Za-z0-9\-.!%*_+`'~:\[\]]+)|(\"(?:[^\"\\]|\\[^\r\n])*\")))?"
)


def _parse_header_params(text: str, pos: int, what: str) -> Params:
    """Parse ``*( SEMI generic-param )`` from ``text[pos:]`` to its end, allowing SWS.

    Well-formed parameters are taken a whole one per regex match; anything else goes to
    the character-by-character parser, which says what is wrong.
    """
    out: list[tuple[str, str | None]] = []
    n = len(text)
    match = _HEADER_PARAM_RE.match
    start = pos
    while True:
        m = match(text, pos)
        if m is None:
            break
        name, token, quoted = m.groups()
        out.append((name, token if quoted is None else quoted))
        pos = m.end()
    if pos == n or not text[pos:].strip(" \t"):
        return tuple(out)
    return _parse_header_params_slowly(text, start, what)


def _parse_header_params_slowly(text: str, pos: int, what: str) -> Params:
    out: list[tuple[str, str | None]] = []
    n = len(text)
    while True:
        pos = _skip_ws(text, pos)
        if pos >= n:
            return tuple(out)
        if text[pos] != ";":
            raise SipParseError(f"unexpected text in {what}", offending=text[pos:])
        pos = _skip_ws(text, pos + 1)
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise SipParseError(f"empty or invalid parameter name in {what}", offending=text)
        name = m.group()
        pos = _skip_ws(text, m.end())
        value: str | None = None
        if pos < n and text[pos] == "=":
            pos = _skip_ws(text, pos + 1)
            if pos < n and text[pos] == '"':
                end = _scan_quoted(text, pos)
                value = text[pos:end]
                pos = end
            else:
                m = _GEN_VALUE_RE.match(text, pos)
                if m is None:
                    raise SipParseError(f"invalid value of parameter {name!r} in {what}",
                                        offending=text)
                value = m.group()
                pos = m.end()
        out.append((name, value))


def _parse_uri_params(text: str, whole: str) -> Params:
    """Parse ``;name[=value]...`` inside a URI (no whitespace, paramchar only)."""
    out: list[tuple[str, str | None]] = []
    for item in text.split(";")[1:]:
        name, eq, value = item.partition("=")
        if not _PARAMCHARS_RE.fullmatch(name):
            raise SipParseError("invalid URI parameter", offending=whole)
        if eq:
            if not _PARAMCHARS_RE.fullmatch(value):
                raise SipParseError("invalid URI parameter value", offending=whole)
            out.append((name, value))
        else:
            out.append((name, None))
    return tuple(out)


def _parse_uri_headers(text: str, whole: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for item in text.split("&"):
        name, eq, value = item.partition("=")
        if not eq or not _HNAME_RE.fullmatch(name) or not _HVALUE_RE.fullmatch(value):
            raise SipParseError("invalid URI header", offending=whole)
        out.append((name, value))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# URI


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9])?"
_PLAIN_WORD = r"[A-Za-z0-9\-.!%*_+`'~]+"
#: A host the fast paths take: a name whose last label starts with a letter (never
#: IPv4-shaped), or a dotted-quad IPv4 without leading zeros; and a port in 0..65535.
_PLAIN_HOST = (rf"(?:(?:{_PLAIN_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9_\-]*[A-Za-z0-9])?"
               rf"|(?:{_OCTET}\.){{3}}{_OCTET})")
_PLAIN_PORT = (r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
               r"|[1-9][0-9]{0,3}|0)")
#: The everyday shape of From/To, a subset of what ``Address.parse`` accepts:
#: ``["display"] <sip:user@host[:port][;p=v]...>[;p=v]...``, no escapes anywhere.
_PLAIN_ADDRESS_RE = re.compile(
    r'(?:"[^"\\]*"[ \t]*)?<sips?:'
    r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]+@)?"
    rf"{_PLAIN_HOST}(?::{_PLAIN_PORT})?"
    r"(?:;[A-Za-z0-9\-_.!~*'()]+(?:=[A-Za-z0-9\-_.!~*'()]+)?)*>"
    rf'(?:;{_PLAIN_WORD}(?:=(?:{_PLAIN_WORD}|"[^"\\]*"))?)*'
)

#: The everyday head of a Via (``SIP/2.0/UDP host[:port]`` right before ``;`` or the end):
#: a subset of what ``Via._parse`` accepts there, parsed by one match.
_PLAIN_VIA_RE = re.compile(
    rf"SIP/2\.0/([A-Za-z]+) ({_PLAIN_HOST})(?::({_PLAIN_PORT}))?(?=;|$)")


def check_address(text: str) -> None:
    """Raise ``SipParseError`` unless ``text`` is a valid From/To/Contact value.

    The everyday shape is recognised by one regex, without building the ``Address``: the
    received messages whose From/To nobody reads (a REGISTER's answers) skip two parses
    of ~12 µs each. Anything else is parsed in full (and memoised for its readers)."""
    if _PLAIN_ADDRESS_RE.fullmatch(text) is None:
        Address.parse(text)


@attrs.frozen
class URI:
    """A SIP or SIPS URI (RFC 3261 §19.1), or a minimal tel URI (RFC 3966).

    ``str(uri)`` is the canonical wire form: lower-case scheme, IPv6 host in brackets,
    parameters and escapes as given.
    """

    scheme: str
    user: str | None
    host: str
    port: int | None = None
    params: Params = ()
    headers: tuple[tuple[str, str], ...] = ()
    password: str | None = None
    # str(self), kept once made: a binding's AOR, registrar and Contact are written into
    # every REGISTER (~6 formats per registration).
    _text: str | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> URI:
        """Parse (see ``_parse``); memoised, since the value is immutable and the same
        header text is parsed again and again (validation, then each reader)."""
        return _memo(_URI_MEMO, cls._parse, text)

    @classmethod
    def _parse(cls, text: str) -> URI:
        """Parse a ``sip:``/``sips:``/``tel:`` URI.

        Raises:
            SipParseError: malformed URI (``status_hint`` 416 for another scheme).
        """
        m = _SCHEME_RE.match(text)
        if m is None:
            raise SipParseError("URI without a scheme", offending=text)
        scheme = m.group(1).lower()
        if scheme not in _SCHEMES:
            raise SipParseError("unsupported URI scheme", status_hint=416, offending=text)
        rest = text[m.end():]
        if scheme == "tel":
            return cls._parse_tel(rest, text)

        user: str | None = None
        password: str | None = None
        at = rest.find("@")
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1:]
            user, colon, pw = userinfo.partition(":")
            if not _USER_RE.fullmatch(user):
                raise SipParseError("invalid user part in URI", offending=text)
            if colon:
                if not _PASSWORD_RE.fullmatch(pw):
                    raise SipParseError("invalid password in URI", offending=text)
                password = pw

        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise SipParseError("unterminated IPv6 reference", offending=text)
            host = rest[1:close]
            _check_ipv6(host, text)
            rest = rest[close + 1:]
        else:
            end = len(rest)
            for stop in ":;?":
                i = rest.find(stop)
                if 0 <= i < end:
                    end = i
            host = rest[:end]
            _check_host(host, text)
            rest = rest[end:]

        port: int | None = None
        if rest.startswith(":"):
            end = len(rest)
            for stop in ";?":
                i = rest.find(stop)
                if 0 <= i < end:
                    end = i
            port = _parse_port(rest[1:end], text)
            rest = rest[end:]

        query = ""
        q = rest.find("?")
        if q >= 0:
            rest, query = rest[:q], rest[q + 1:]
        if rest and not rest.startswith(";"):
            raise SipParseError("unexpected text after host in URI", offending=text)
        params = _parse_uri_params(rest, text)
        headers = _parse_uri_headers(query, text) if q >= 0 else ()
        return cls(scheme, user, host, port, params, headers, password)

    @classmethod
    def _parse_tel(cls, rest: str, text: str) -> URI:
        number, _, _ = rest.partition(";")
        if not _PARAMCHARS_RE.fullmatch(number) or "?" in rest:
            raise SipParseError("invalid tel URI", offending=text)
        return cls("tel", number, "", None, _parse_uri_params(rest[len(number):], text))

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = self._format()
            object.__setattr__(self, "_text", text)
        return text

    def _format(self) -> str:
        params = _format_params(self.params)
        if self.scheme == "tel":
            return f"tel:{self.user or ''}{params}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.host_port)
        out.append(params)
        if self.headers:
            out.append("?" + "&".join(f"{n}={v}" for n, v in self.headers))
        return "".join(out)

    @property
    def host_port(self) -> str:
        """``host[:port]`` with an IPv6 host in brackets ("" for a tel URI)."""
        host = _format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def param(self, name: str) -> str | None:
        """Value of URI parameter ``name`` (case-insensitive); None if absent or valueless."""
        return _find_param(self.params, name)[1]

    def has_param(self, name: str) -> bool:
        """Whether URI parameter ``name`` is present, with or without a value."""
        return _find_param(self.params, name)[0]

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter in lower case (``"udp"``, ``"tcp"``, ...), or None."""
        value = self.param("transport")
        return None if value is None else value.lower()

    def with_params(self, **params: str | None) -> URI:
        """Copy with parameters set (replaced in place or appended); None = no ``=value``."""
        return attrs.evolve(self, params=_update_params(self.params, params))

    def without_params(self, *names: str) -> URI:
        """Copy without the named parameters."""
        return attrs.evolve(self, params=_drop_params(self.params, names))


# ---------------------------------------------------------------------------------------------
# Address (name-addr / addr-spec with header parameters)


@attrs.frozen
class Address:
    """The value of From, To, Contact, Route, Record-Route... (RFC 3261 §20.10).

    ``display_name`` holds the decoded text (no quotes, no backslashes); ``params`` are the
    header parameters (``tag``, ``expires``, ``+sip.instance``...), values raw.
    """

    uri: URI
    display_name: str | None = None
    params: Params = ()

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse (see ``_parse``); memoised, since the value is immutable and the same
        header text is parsed again and again (validation, then each reader)."""
        return _memo(_ADDRESS_MEMO, cls._parse, text)

    @classmethod
    def _parse(cls, text: str) -> Address:
        """Parse a name-addr or addr-spec followed by header parameters.

        Per RFC 3261 §20.10, in the bare addr-spec form everything after the first ``;`` is a
        header parameter, and the URI may not contain ``,`` or ``?``.

        Raises:
            SipParseError: malformed value.
        """
        s = text.strip(" \t")
        if not s:
            raise SipParseError("empty address")
        display: str | None = None
        if s[0] == '"':
            end = _scan_quoted(s, 0)
            display = unquote(s[:end])
            lt = _skip_ws(s, end)
            if lt >= len(s) or s[lt] != "<":
                raise SipParseError("expected '<' after display name", offending=text)
            return cls._parse_name_addr(s, lt, display, text)
        lt = s.find("<")
        if lt >= 0:
            before = s[:lt].rstrip(" \t")
            if not before:
                return cls._parse_name_addr(s, lt, None, text)
            if _DISPLAY_TOKENS_RE.fullmatch(before):
                return cls._parse_name_addr(s, lt, before, text)
            if ":" not in before:  # no scheme before '<': not an addr-spec either
                raise SipParseError("invalid display name (quote it)", offending=text)
        semi = s.find(";")
        uri_text = (s if semi < 0 else s[:semi]).rstrip(" \t")
        if "?" in uri_text or "," in uri_text:
            raise SipParseError("addr-spec with '?' or ',' must be in <>", offending=text)
        uri = URI.parse(uri_text)
        params = _parse_header_params(s, len(s) if semi < 0 else semi, "address")
        return cls(uri, None, params)

    @classmethod
    def _parse_name_addr(cls, s: str, lt: int, display: str | None, text: str) -> Address:
        gt = s.find(">", lt)
        if gt < 0:
            raise SipParseError("missing '>' in address", offending=text)
        uri = URI.parse(s[lt + 1:gt])
        return cls(uri, display, _parse_header_params(s, gt + 1, "address"))

    def __str__(self) -> str:
        name = "" if self.display_name is None else quote(self.display_name) + " "
        return f"{name}<{self.uri}>{_format_params(self.params)}"

    def param(self, name: str) -> str | None:
        """Value of header parameter ``name`` (case-insensitive), raw; None if absent/valueless."""
        return _find_param(self.params, name)[1]

    def has_param(self, name: str) -> bool:
        """Whether header parameter ``name`` is present."""
        return _find_param(self.params, name)[0]

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (dialog identification, RFC 3261 §19.3)."""
        return self.param("tag")

    def with_tag(self, tag: str) -> Address:
        """Copy with ``tag`` set."""
        return self.with_params(tag=tag)

    def with_params(self, **params: str | None) -> Address:
        """Copy with header parameters set (replaced in place or appended)."""
        return attrs.evolve(self, params=_update_params(self.params, params))

    def without_params(self, *names: str) -> Address:
        """Copy without the named header parameters."""
        return attrs.evolve(self, params=_drop_params(self.params, names))


# ---------------------------------------------------------------------------------------------
# Via


@attrs.frozen
class Via:
    """One via-parm (RFC 3261 §20.42): ``SIP/2.0/UDP host:port;branch=...``.

    ``transport`` is upper case. ``rport`` (RFC 3581) is the port when given as ``rport=N``;
    ``has_rport`` is also True for the bare ``rport`` flag a client sends.
    """

    transport: str
    host: str
    port: int | None
    params: Params = ()

    @classmethod
    def parse(cls, text: str) -> Via:
        """Parse (see ``_parse``); memoised, since the value is immutable and the same
        header text is parsed again and again (validation, then each reader)."""
        return _memo(_VIA_MEMO, cls._parse, text)

    @classmethod
    def _parse(cls, text: str) -> Via:
        """Parse one via-parm (not a comma-separated list; see ``Headers.get_list``).

        Raises:
            SipParseError: malformed value, a protocol other than SIP/2.0, or a bad rport.
        """
        plain = _PLAIN_VIA_RE.match(text)
        if plain is not None:  # "SIP/2.0/UDP host[:port]" in its everyday shape
            port_text = plain.group(3)
            return cls._with_params(text, plain.end(), plain.group(1).upper(), plain.group(2),
                                    None if port_text is None else int(port_text))
        return cls._parse_slowly(text)

    @classmethod
    def _parse_slowly(cls, text: str) -> Via:
        """Any via-parm, piece by piece, saying what is wrong."""
        pos = _skip_ws(text, 0)
        m = _SENT_PROTOCOL_RE.match(text, pos)
        if m is None:
            raise SipParseError("invalid Via sent-protocol", offending=text)
        if m.group(1).upper() != "SIP" or m.group(2) != "2.0":
            raise SipParseError("Via protocol is not SIP/2.0", offending=text)
        transport = m.group(3).upper()
        pos = _skip_ws(text, m.end())
        if pos == m.end():
            raise SipParseError("missing sent-by in Via", offending=text)
        if text.startswith("[", pos):
            close = text.find("]", pos)
            if close < 0:
                raise SipParseError("unterminated IPv6 reference in Via", offending=text)
            host = text[pos + 1:close]
            _check_ipv6(host, text)
            pos = close + 1
        else:
            hm = _HOST_CHARS_RE.match(text, pos)
            if hm is None:
                raise SipParseError("missing sent-by in Via", offending=text)
            host = hm.group()
            _check_host(host, text)
            pos = hm.end()
        port: int | None = None
        after = _skip_ws(text, pos)
        if after < len(text) and text[after] == ":":
            pos = _skip_ws(text, after + 1)
            dm = _DIGITS_RE.match(text, pos)
            if dm is None:
                raise SipParseError("invalid port in Via", offending=text)
            port = _parse_port(dm.group(), text)
            pos = dm.end()
        return cls._with_params(text, pos, transport, host, port)

    @classmethod
    def _with_params(cls, text: str, pos: int, transport: str, host: str,
                     port: int | None) -> Via:
        params = _parse_header_params(text, pos, "Via")
        found, rport = _find_param(params, "rport")
        if found and rport is not None:
            _parse_port(rport, text)
        return cls(transport, host, port, params)

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {self.sent_by}{_format_params(self.params)}"

    @property
    def sent_by(self) -> str:
        """``host[:port]`` with an IPv6 host in brackets."""
        host = _format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def param(self, name: str) -> str | None:
        """Value of Via parameter ``name`` (case-insensitive); None if absent or valueless."""
        return _find_param(self.params, name)[1]

    def has_param(self, name: str) -> bool:
        """Whether Via parameter ``name`` is present."""
        return _find_param(self.params, name)[0]

    @property
    def branch(self) -> str | None:
        """The transaction ``branch`` (RFC 3261 §17.2.3); ours start with ``z9hG4bK``."""
        return self.param("branch")

    @property
    def received(self) -> str | None:
        """The ``received`` address a server added (RFC 3261 §18.2.1)."""
        return self.param("received")

    @property
    def rport(self) -> int | None:
        """The ``rport=N`` source port (RFC 3581), None if absent or a bare flag."""
        value = self.param("rport")
        if value is None or not _DIGITS_RE.fullmatch(value) or len(value) > 5:
            return None
        return int(value)

    @property
    def has_rport(self) -> bool:
        """Whether an ``rport`` parameter is present, bare or with a value."""
        return self.has_param("rport")

    def with_params(self, **params: str | None) -> Via:
        """Copy with parameters set, e.g. ``with_params(received="192.0.2.1", rport="5060")``."""
        return attrs.evolve(self, params=_update_params(self.params, params))

    def without_params(self, *names: str) -> Via:
        """Copy without the named parameters."""
        return attrs.evolve(self, params=_drop_params(self.params, names))


# ---------------------------------------------------------------------------------------------
# CSeq


@attrs.frozen
class CSeq:
    """``CSeq: 4711 REGISTER`` (RFC 3261 §20.16); ``seq`` in 0..2**31-1."""

    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        """Parse (see ``_parse``); memoised: a message's CSeq is read several times, and
        values such as ``2 REGISTER`` recur."""
        return _memo(_CSEQ_MEMO, cls._parse, text)

    @classmethod
    def _parse(cls, text: str) -> CSeq:
        """Parse ``1*DIGIT LWS Method``.

        Raises:
            SipParseError: malformed value or a sequence number of 2**31 or more.
        """
        m = _CSEQ_RE.fullmatch(text)
        if m is None:
            raise SipParseError("invalid CSeq", offending=text)
        digits = m.group(1).lstrip("0") or "0"
        if len(digits) > 10 or int(digits) > MAX_CSEQ:
            raise SipParseError("CSeq number out of range", offending=text)
        return cls(int(digits), m.group(2))

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"
