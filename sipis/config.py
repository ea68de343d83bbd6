"""Configuration: one YAML file becomes a frozen, typed tree (STYLE.md item 12).

Strategy:

- The schema *is* the attrs classes below, one per section. Every field carries its parser in
  ``metadata``; ``_build`` walks a YAML mapping node against the fields of a class, so there is
  one place to add a setting, and the docs test (every leaf key appears in ``conf/sipis.yaml``)
  can walk the same classes.
- We read the file with ``yaml.compose`` (SafeLoader) and build from the node tree rather than from
  ``safe_load``'s plain dicts: nodes carry ``start_mark.line``, so every error names the key path
  *and* the line, and duplicate keys (which ``safe_load`` silently collapses) are caught.
- Everything is validated here, at load time, so that ``sipis check-config`` finds every mistake
  and ``sipis run`` fails before ``READY=1``. File existence is *not* checked: the example
  config must load on any machine, and the daemon reports a missing file when it opens it.
- Relative paths resolve against the directory of the config file, never the working directory
  (systemd and ``make run`` start us in different places).
- Only :class:`ConfigError` leaves this module for any input text; a property test holds us to it.

Errors::

    ConfigError(message, path, line)   # str(): Error in configuration at 'sip.listen[1].port'
                                       #        (line 14): must be an integer from 1 to 65535
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeVar

import attrs
import yaml

from sipis import __version__

EX_CONFIG: Final = 78  # sysexits.h: configuration error

# Longest duration any setting accepts; beyond this a value is a typo (and would overflow
# deadline arithmetic).
MAX_DURATION: Final = 365 * 86400.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be used: the operator must fix the file (exit ``EX_CONFIG``).

    Attributes:
        message: what is wrong, without the location.
        path: dotted key path such as ``sip.listen[1].port``; ``""`` for the whole file.
        line: 1-based line in the file, or None when it is not known.
        file: the file name when the error came from :func:`load_config`.
    """

    def __init__(self, message: str, path: str = "", line: int | None = None, *,
                 file: str | None = None) -> None:
        super().__init__(message, path, line)
        self.message = message
        self.path = path
        self.line = line
        self.file = file

    def __str__(self) -> str:
        where = f" at '{self.path}'" if self.path else ""
        if self.line is not None:
            where += f" (line {self.line})"
        return f"Error in configuration{where}: {self.message}"


def format_config_error(err: ConfigError) -> str:
    """The text ``sipis check-config`` and ``sipis run`` print for ``err`` (no secrets in it)."""
    text = str(err)
    if err.file is not None:
        text += f"\n  in file {err.file}"
    return text


# --- durations -------------------------------------------------------------------------------

_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                        "w": 604800.0}
_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|[wdhms]))+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|[wdhms])")
_SECONDS_RE = re.compile(rf"{_NUMBER}")


def parse_duration(value: str | float) -> float:
    """Seconds in a duration setting.

    Args:
        value: a number of seconds (int or float), or a string such as ``"500ms"``, ``"30s"``,
            ``"10m"``, ``"12h"``, ``"5d"``, ``"1w"``, ``"1d12h"`` or ``"90"`` (seconds).

    Returns:
        The duration in seconds, finite and not negative.

    Raises:
        ValueError: anything else (negative, NaN, infinite, bool, malformed text).
    """
    if isinstance(value, bool):
        raise ValueError("a duration cannot be true/false")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("duration too large") from None
    elif isinstance(value, str):
        text = value.strip()
        if _SECONDS_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(float(number) * _UNIT_SECONDS[unit]
                          for number, unit in _DURATION_PART_RE.findall(text))
        else:
            raise ValueError("not a duration")
    else:
        raise ValueError("not a duration")
    if not math.isfinite(seconds):
        raise ValueError("duration must be finite")
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


def _format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --- parsing context and helpers -------------------------------------------------------------

_STD_TAG = "tag:yaml.org,2002:"
_NULL_TAG = _STD_TAG + "null"
_STR_TAG = _STD_TAG + "str"
_PARSE: Final = "sipis.config.parse"
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARENT_RE = re.compile(r'(.*?)(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\["(?:[^"\\]|\\.)*"\])')

Parser = Callable[[yaml.Node, str, "_Ctx"], Any]
_T = TypeVar("_T", bound=attrs.AttrsInstance)


@attrs.define
class _Ctx:
    """State of one load: where relative paths start, and the node of every path seen."""

    base_dir: Path
    nodes: dict[str, yaml.Node] = attrs.Factory(dict)
    constructor: yaml.constructor.SafeConstructor = attrs.Factory(
        yaml.constructor.SafeConstructor)

    def resolve(self, path: Path) -> Path:
        return Path(os.path.normpath(self.base_dir / path))

    def given(self, path: str) -> bool:
        return path in self.nodes

    def line(self, path: str) -> int | None:
        """Line of ``path``, or of its nearest ancestor present in the file."""
        while True:
            node = self.nodes.get(path)
            if node is not None:
                return _line(node)
            match = _PARENT_RE.fullmatch(path)
            if match is None:
                return None
            path = match.group(1)

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(message, path, self.line(path))


def _line(node: yaml.Node | None) -> int | None:
    return None if node is None else int(node.start_mark.line) + 1


def _fail(message: str, path: str, node: yaml.Node | None) -> NoReturn:
    raise ConfigError(message, path, _line(node))


def _join(path: str, key: str) -> str:
    if _IDENT_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _is_null(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a single value"


def _quote(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _construct(node: yaml.Node, path: str, ctx: _Ctx) -> Any:
    """Python value of ``node`` (YAML 1.1 core types only); ConfigError if it has none."""
    if not node.tag.startswith(_STD_TAG):
        _fail(f"YAML tag {_quote(node.tag)} is not supported", path, node)
    try:
        return ctx.constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError,
            OverflowError) as exc:
        # PyYAML raises plain ValueError/KeyError/AttributeError for e.g. "!!int abc",
        # "!!bool maybe", "!!timestamp x".
        problem = getattr(exc, "problem", None) or "not a valid value for its YAML tag"
        _fail(f"cannot read this value: {problem}", path, node)


def _scalar(node: yaml.Node, path: str, ctx: _Ctx, expected: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        _fail(f"must be {expected}, not {_kind(node)}", path, node)
    return _construct(node, path, ctx)


def _mapping_items(node: yaml.Node | None, path: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Key text → (key node, value node); null counts as an empty mapping."""
    if _is_null(node):
        return {}
    assert node is not None
    if not isinstance(node, yaml.MappingNode):
        _fail(f"must be a mapping, not {_kind(node)}", path, node)
    items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            _fail(f"keys must be plain names, not {_kind(key_node)}", path, key_node)
        key = str(key_node.value)
        if key in items:
            _fail(f"duplicate key (first given on line {_line(items[key][0])})",
                  _join(path, key), key_node)
        items[key] = (key_node, value_node)
    return items


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return "unknown key; this section knows: " + ", ".join(known)


def _meta(parse: Parser) -> dict[str, Any]:
    return {_PARSE: parse}


class _Section:
    """Parser of a nested section: a mapping node built into ``cls``."""

    def __init__(self, cls: type[attrs.AttrsInstance]) -> None:
        self.cls = cls

    def __call__(self, node: yaml.Node | None, path: str, ctx: _Ctx,
                 base: attrs.AttrsInstance | None = None) -> Any:
        return _build(self.cls, node, path, ctx, base)


_CHECKS: dict[type, Callable[[Any, str, _Ctx], Any]] = {}


def _check(cls: type[_T]) -> Callable[[Callable[[_T, str, _Ctx], _T]],
                                       Callable[[_T, str, _Ctx], _T]]:
    """Register a cross-field check for ``cls``; it may return a completed copy."""

    def register(fn: Callable[[_T, str, _Ctx], _T]) -> Callable[[_T, str, _Ctx], _T]:
        _CHECKS[cls] = fn
        return fn

    return register


def _build(cls: type[_T], node: yaml.Node | None, path: str, ctx: _Ctx,
           base: attrs.AttrsInstance | None = None) -> _T:
    """Build ``cls`` from a mapping node: unknown keys are errors, absent keys take defaults.

    ``base`` holds the defaults when they differ from the class's own (``metrics.listen`` is a
    ``ListenAddress`` whose default port is not the API's).
    """
    defaults = cls() if base is None else base
    items = _mapping_items(node, path)
    if node is not None:
        ctx.nodes[path] = node
    fields = attrs.fields_dict(cls)
    for key, (key_node, _value) in items.items():
        if key not in fields:
            _fail(_unknown_key(key, list(fields)), _join(path, key), key_node)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        parse = field.metadata[_PARSE]
        sub = _join(path, name)
        default = getattr(defaults, name)
        if name in items:
            value_node = items[name][1]
            ctx.nodes[sub] = value_node
            if isinstance(parse, _Section):
                kwargs[name] = parse(value_node, sub, ctx, default)
            else:
                kwargs[name] = parse(value_node, sub, ctx)
        elif isinstance(parse, _Section):
            kwargs[name] = parse(None, sub, ctx, default)
        elif isinstance(default, Path):
            kwargs[name] = ctx.resolve(default)
        else:
            kwargs[name] = default
    obj = cls(**kwargs)
    check = _CHECKS.get(cls)
    return obj if check is None else check(obj, path, ctx)


# --- value parsers ---------------------------------------------------------------------------


def _optional(parse: Parser) -> Parser:
    def parse_optional(node: yaml.Node, path: str, ctx: _Ctx) -> Any:
        return None if _is_null(node) else parse(node, path, ctx)

    return parse_optional


def _int(lo: int, hi: int, expected: str | None = None) -> Parser:
    expected = expected or f"an integer from {lo} to {hi}"

    def parse_int(node: yaml.Node, path: str, ctx: _Ctx) -> int:
        value = _scalar(node, path, ctx, expected)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            _fail(f"must be {expected}", path, node)
        return value

    return parse_int


_port = _int(0, 65535, "an integer from 1 to 65535 (or 0 for any free port)")


def _number(lo: float, hi: float, *, lo_open: bool = False) -> Parser:
    low = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
    expected = f"a number {low} and at most {hi:g}"

    def parse_number(node: yaml.Node, path: str, ctx: _Ctx) -> float:
        value = _scalar(node, path, ctx, expected)
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(f"must be {expected}", path, node)
        try:
            number = float(value)
        except OverflowError:
            _fail(f"must be {expected}", path, node)
        if (not math.isfinite(number) or number > hi
                or (number <= lo if lo_open else number < lo)):
            _fail(f"must be {expected}", path, node)
        return number

    return parse_number


_DURATION_HINT = "a duration such as 500ms, 30s, 10m, 12h, 5d or 1d12h (or a number of seconds)"


def _duration(*, allow_zero: bool = False) -> Parser:
    def parse_duration_node(node: yaml.Node, path: str, ctx: _Ctx) -> float:
        value = _scalar(node, path, ctx, _DURATION_HINT)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            _fail(f"must be {_DURATION_HINT}", path, node)
        try:
            seconds = parse_duration(value)
        except ValueError:
            _fail(f"must be {_DURATION_HINT}", path, node)
        if seconds == 0 and not allow_zero:
            _fail("must be more than zero", path, node)
        if seconds > MAX_DURATION:
            _fail(f"must be at most {_format_duration(MAX_DURATION)}", path, node)
        return seconds

    return parse_duration_node


def _bool(node: yaml.Node, path: str, ctx: _Ctx) -> bool:
    value = _scalar(node, path, ctx, "true or false")
    if not isinstance(value, bool):
        _fail("must be true or false", path, node)
    return value


def _str(node: yaml.Node, path: str, ctx: _Ctx, expected: str = "a string") -> str:
    value = _scalar(node, path, ctx, expected)
    if not isinstance(value, str):
        _fail(f"must be {expected} (quote it if it looks like a number or true/false)",
              path, node)
    return value


def _choice(*options: str, reserved: Mapping[str, str] | None = None) -> Parser:
    expected = "one of: " + ", ".join(options)

    def parse_choice(node: yaml.Node, path: str, ctx: _Ctx) -> str:
        value = _str(node, path, ctx, expected).lower()
        if reserved and value in reserved:
            _fail(reserved[value], path, node)
        if value not in options:
            _fail(f"must be {expected}, not {_quote(value)}", path, node)
        return value

    return parse_choice


def _ip_text(text: str) -> str | None:
    """Canonical text of an IP literal (IPv6 without brackets), or None."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _hostname_text(text: str) -> str | None:
    """Lower-cased DNS name (RFC 1123 labels), or None."""
    name = text.lower()
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # "10.0.0.300" is a broken address, not a name
        return None
    return name


def _ip(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = "an IP address such as 127.0.0.1 or ::1"
    address = _ip_text(_str(node, path, ctx, expected))
    if address is None:
        _fail(f"must be {expected}", path, node)
    return address


def _host(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = "a host name or an IP address"
    text = _str(node, path, ctx, expected)
    host = _ip_text(text) or _hostname_text(text)
    if host is None:
        _fail(f"must be {expected}", path, node)
    return host


def _domain_pattern(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = 'a domain, "*.domain" or "*"'
    text = _str(node, path, ctx, expected)
    if text == "*":
        return text
    if text.startswith("*."):
        name = _hostname_text(text[2:])
        if name is None:
            _fail(f"must be {expected}", path, node)
        return "*." + name
    host = _ip_text(text) or _hostname_text(text)
    if host is None:
        _fail(f"must be {expected}", path, node)
    return host


_APP_PATTERN_RE = re.compile(r"\*|(?:\*\.)?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _app_pattern(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = 'an app id such as "com.example.phone", "*.example" or "*"'
    text = _str(node, path, ctx, expected)
    if len(text) > 255 or not _APP_PATTERN_RE.fullmatch(text):
        _fail(f"must be {expected}", path, node)
    return text


def _network(node: yaml.Node, path: str, ctx: _Ctx) -> IPNetwork:
    expected = 'a network such as "127.0.0.0/8" or "::1/128"'
    text = _str(node, path, ctx, expected)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        hint = " (host bits set)" if "host bits" in str(exc) else ""
        _fail(f"must be {expected}{hint}", path, node)


def _path(node: yaml.Node, path: str, ctx: _Ctx) -> Path:
    text = _str(node, path, ctx, "a file path")
    if not text or "\0" in text:
        _fail("must be a file path", path, node)
    return ctx.resolve(Path(text))


_HEADER_TEXT_RE = re.compile(r"[\x20-\x7e]{1,200}")


def _header_text(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = "printable ASCII text of 1 to 200 characters"
    text = _str(node, path, ctx, expected)
    if not _HEADER_TEXT_RE.fullmatch(text) or text.strip() != text:
        _fail(f"must be {expected}", path, node)
    return text


_SIP_URI_RE = re.compile(r"sips?:[\x21-\x7e]{1,250}", re.IGNORECASE)


def _sip_uri(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = 'a SIP URI such as "sip:sipis.example.com:5060;transport=tcp"'
    text = _str(node, path, ctx, expected)
    if not _SIP_URI_RE.fullmatch(text):
        _fail(f"must be {expected}", path, node)
    return text


def _list(item: Parser, *, non_empty: str | None = None) -> Parser:
    """A YAML list → tuple; null is an empty list. ``non_empty``: message if empty."""

    def parse_list(node: yaml.Node, path: str, ctx: _Ctx) -> tuple[Any, ...]:
        if _is_null(node):
            values: list[yaml.Node] = []
        elif isinstance(node, yaml.SequenceNode):
            values = list(node.value)
        else:
            _fail(f"must be a list, not {_kind(node)}", path, node)
        if not values and non_empty:
            _fail(non_empty, path, node)
        out = []
        for index, item_node in enumerate(values):
            sub = f"{path}[{index}]"
            ctx.nodes[sub] = item_node
            out.append(item(item_node, sub, ctx))
        return tuple(out)

    return parse_list


# --- the schema ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LogConfig:
    """``log``: how much is logged, and in which line format (journald reads either)."""

    level: str = attrs.field(default="info",
                             metadata=_meta(_choice("debug", "info", "warning", "error")))
    format: str = attrs.field(default="logfmt", metadata=_meta(_choice("logfmt", "json")))


@attrs.frozen(kw_only=True)
class StoreConfig:
    """``store``: where instances live, and the key that encrypts their credentials."""

    backend: str = attrs.field(default="sqlite", metadata=_meta(_choice(
        "sqlite", reserved={"postgresql": "backend 'postgresql' is not supported yet"})))
    path: Path = attrs.field(default=Path("var/sipis.db"), metadata=_meta(_path))
    key_file: Path = attrs.field(default=Path("var/sipis.key"), metadata=_meta(_path))
    # Development only: generate the key file on first start when it is missing.
    create_key_file: bool = attrs.field(default=False, metadata=_meta(_bool))
    # The daemon's admin control socket (Unix, mode 0600); None = sipis.ctl beside ``path``.
    admin_socket: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))


#: Longest path a Unix socket may have on Linux (``sun_path`` is 108 bytes with its NUL).
UNIX_SOCKET_PATH_MAX: Final = 107


@_check(StoreConfig)
def _check_store(store: StoreConfig, path: str, ctx: _Ctx) -> StoreConfig:
    """Fill in the admin socket beside the database, and refuse one too long to bind."""
    if store.admin_socket is None:
        store = attrs.evolve(store, admin_socket=store.path.parent / "sipis.ctl")
    assert store.admin_socket is not None
    size = len(os.fsencode(store.admin_socket))
    if size > UNIX_SOCKET_PATH_MAX:
        ctx.fail(_join(path, "admin_socket"),
                 f"the socket path is {size} bytes, more than the {UNIX_SOCKET_PATH_MAX} a "
                 "Unix socket allows: set a shorter store.admin_socket")
    return store


@attrs.frozen(kw_only=True)
class ListenConfig:
    """One item of ``sip.listen``: a socket we receive SIP on (and put in our Contact)."""

    transport: str = attrs.field(default="udp", metadata=_meta(_choice("udp", "tcp", "tls")))
    host: str = attrs.field(default="127.0.0.1", metadata=_meta(_ip))
    port: int = attrs.field(default=5060, metadata=_meta(_port))  # 5061 for tls when absent
    public_port: int | None = attrs.field(default=None,
                                          metadata=_meta(_optional(_int(1, 65535))))
    cert_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    key_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))


@attrs.frozen(kw_only=True)
class TimersConfig:
    """``sip.timers``: RFC 3261 §17.1.1.1 T1, T2, T4 (seconds)."""

    t1: float = attrs.field(default=0.5, metadata=_meta(_duration()))
    t2: float = attrs.field(default=4.0, metadata=_meta(_duration()))
    t4: float = attrs.field(default=5.0, metadata=_meta(_duration()))


@attrs.frozen(kw_only=True)
class DnsConfig:
    """``sip.dns``: RFC 3263 lookups. No nameservers = the system resolver."""

    nameservers: tuple[str, ...] = attrs.field(default=(), metadata=_meta(_list(_ip)))
    port: int = attrs.field(default=53, metadata=_meta(_int(1, 65535)))
    timeout: float = attrs.field(default=2.0, metadata=_meta(_duration()))


@attrs.frozen(kw_only=True)
class SipTlsConfig:
    """``sip.tls``: how we check the certificates of providers we reach over TLS."""

    ca_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    verify: bool = attrs.field(default=True, metadata=_meta(_bool))


_DEFAULT_LISTEN: Final = (ListenConfig(transport="udp"), ListenConfig(transport="tcp"))


@attrs.frozen(kw_only=True)
class SipConfig:
    """``sip``: our SIP endpoint (sockets, timers, keep-alives, DNS, outbound guard)."""

    public_host: str = attrs.field(default="127.0.0.1", metadata=_meta(_host))
    listen: tuple[ListenConfig, ...] = attrs.field(default=_DEFAULT_LISTEN, metadata=_meta(
        _list(_Section(ListenConfig), non_empty="needs at least one listener")))
    timers: TimersConfig = attrs.field(factory=TimersConfig,
                                       metadata=_meta(_Section(TimersConfig)))
    # CRLF keep-alive on connection-oriented flows (RFC 5626 §4.4.1).
    keepalive_interval: float = attrs.field(default=30.0, metadata=_meta(_duration()))
    tcp_idle_timeout: float = attrs.field(default=600.0, metadata=_meta(_duration()))
    max_message_size: int = attrs.field(default=65536, metadata=_meta(_int(1024, 16 * 2**20)))
    dns: DnsConfig = attrs.field(factory=DnsConfig, metadata=_meta(_Section(DnsConfig)))
    # Where sipis may send SIP; empty = anywhere.
    upstream_allow: tuple[IPNetwork, ...] = attrs.field(default=(),
                                                        metadata=_meta(_list(_network)))
    tls: SipTlsConfig = attrs.field(factory=SipTlsConfig, metadata=_meta(_Section(SipTlsConfig)))
    user_agent: str = attrs.field(default=f"sipis/{__version__}", metadata=_meta(_header_text))


_EXPIRES = _int(30, 86400)


@attrs.frozen(kw_only=True)
class RegistrarConfig:
    """``registrar``: how upstream REGISTER bindings are kept (expiry, refresh, backoff, rate)."""

    default_expires: int = attrs.field(default=600, metadata=_meta(_EXPIRES))
    min_expires: int = attrs.field(default=60, metadata=_meta(_EXPIRES))
    max_expires: int = attrs.field(default=7200, metadata=_meta(_EXPIRES))
    refresh_ratio: float = attrs.field(default=0.8, metadata=_meta(_number(0.5, 0.95)))
    backoff_base: float = attrs.field(default=30.0, metadata=_meta(_duration()))  # RFC 5626 §4.5
    backoff_cap: float = attrs.field(default=1800.0, metadata=_meta(_duration()))
    auth_failures_before_give_up: int = attrs.field(default=2, metadata=_meta(_int(1, 100)))
    register_rate: float = attrs.field(default=100.0,
                                       metadata=_meta(_number(0, 1e6, lo_open=True)))
    register_burst: int = attrs.field(default=20, metadata=_meta(_int(1, 1_000_000)))
    request_timeout: float = attrs.field(default=32.0, metadata=_meta(_duration()))


@attrs.frozen(kw_only=True)
class DomainLifetimeConfig:
    """One ``lifetime.domains`` entry; None = the global value."""

    default: float | None = attrs.field(default=None, metadata=_meta(_optional(_duration())))
    max: float | None = attrs.field(default=None, metadata=_meta(_optional(_duration())))


def _domains(node: yaml.Node, path: str, ctx: _Ctx) -> Mapping[str, DomainLifetimeConfig]:
    items = _mapping_items(node, path)
    out: dict[str, DomainLifetimeConfig] = {}
    for key, (key_node, value_node) in items.items():
        name = None
        if key_node.tag == _STR_TAG:
            name = _ip_text(key) or _hostname_text(key)
        if name is None:
            _fail("must be a domain name such as sip.example.net", _join(path, key), key_node)
        sub = _join(path, name)
        if name in out:
            _fail("duplicate domain (domain names are not case-sensitive)", sub, key_node)
        ctx.nodes[sub] = value_node
        out[name] = _build(DomainLifetimeConfig, value_node, sub, ctx)
    return MappingProxyType(out)


@attrs.frozen(kw_only=True)
class LifetimeConfig:
    """``lifetime``: how long a push instance lives without being heard from."""

    default: float = attrs.field(default=3 * 86400.0, metadata=_meta(_duration()))
    max: float = attrs.field(default=6 * 86400.0, metadata=_meta(_duration()))
    domains: Mapping[str, DomainLifetimeConfig] = attrs.field(
        factory=lambda: MappingProxyType({}), metadata=_meta(_domains))
    not_registered_max_age: float = attrs.field(default=12 * 3600.0, metadata=_meta(_duration()))
    sweep_interval: float = attrs.field(default=30.0, metadata=_meta(_duration()))
    expiry_warnings: tuple[float, ...] = attrs.field(default=(12 * 3600.0, 3600.0),
                                                     metadata=_meta(_list(_duration())))


@attrs.frozen(kw_only=True)
class ListenAddress:
    """A host and TCP port to serve on (``api.listen``, ``metrics.listen``)."""

    host: str = attrs.field(default="127.0.0.1", metadata=_meta(_ip))
    port: int = attrs.field(default=8443, metadata=_meta(_port))


@attrs.frozen(kw_only=True)
class ApiTlsConfig:
    """``api.tls``: certificate of the HTTPS API, or a generated self-signed one (dev)."""

    enabled: bool = attrs.field(default=True, metadata=_meta(_bool))
    cert_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    key_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    self_signed_dir: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))


@attrs.frozen(kw_only=True)
class RateConfig:
    """A token bucket: ``per_minute`` refill, ``burst`` deep."""

    per_minute: float = attrs.field(default=10.0, metadata=_meta(_number(0, 1e6, lo_open=True)))
    burst: int = attrs.field(default=10, metadata=_meta(_int(1, 1_000_000)))


@attrs.frozen(kw_only=True)
class ApiConfig:
    """``api``: the HTTPS API the apps call."""

    listen: ListenAddress = attrs.field(factory=ListenAddress,
                                        metadata=_meta(_Section(ListenAddress)))
    tls: ApiTlsConfig = attrs.field(factory=ApiTlsConfig, metadata=_meta(_Section(ApiTlsConfig)))
    allowed_domains: tuple[str, ...] = attrs.field(default=("*",), metadata=_meta(_list(
        _domain_pattern, non_empty='must not be empty (use ["*"] to allow any domain)')))
    allowed_apps: tuple[str, ...] = attrs.field(default=("*",), metadata=_meta(_list(
        _app_pattern, non_empty='must not be empty (use ["*"] to allow any app)')))
    max_body_bytes: int = attrs.field(default=16384, metadata=_meta(_int(1024, 2**20)))
    create_rate: RateConfig = attrs.field(factory=RateConfig, metadata=_meta(_Section(RateConfig)))
    create_timeout: float = attrs.field(default=10.0, metadata=_meta(_duration()))
    # Reserved: not used yet.
    trusted_proxies: tuple[IPNetwork, ...] = attrs.field(default=(),
                                                         metadata=_meta(_list(_network)))
    # URI shown to apps as "device.registrar"; None = derived from sip.listen.
    device_registrar: str | None = attrs.field(default=None, metadata=_meta(_optional(_sip_uri)))


_HTTP_URL_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[\x21-\x7e]*)?")


def _http_url(node: yaml.Node, path: str, ctx: _Ctx) -> str:
    expected = 'an http(s) URL such as "https://api.push.apple.com"'
    text = _str(node, path, ctx, expected)
    if not _HTTP_URL_RE.fullmatch(text):
        _fail(f"must be {expected}", path, node)
    return text


@attrs.frozen(kw_only=True)
class ApnsConfig:
    """``push.apns``: Apple Push Notification service with token (.p8 key) authentication."""

    team_id: str = attrs.field(default="", metadata=_meta(_header_text))
    key_id: str = attrs.field(default="", metadata=_meta(_header_text))
    key_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    production_url: str = attrs.field(default="https://api.push.apple.com",
                                      metadata=_meta(_http_url))
    sandbox_url: str = attrs.field(default="https://api.sandbox.push.apple.com",
                                   metadata=_meta(_http_url))
    # CA bundle to trust instead of the system's (on-premises gateways, tests).
    ca_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    request_timeout: float = attrs.field(default=10.0, metadata=_meta(_duration()))


@attrs.frozen(kw_only=True)
class FcmConfig:
    """``push.fcm``: Firebase Cloud Messaging HTTP v1 with a service-account key."""

    service_account_file: Path | None = attrs.field(default=None,
                                                    metadata=_meta(_optional(_path)))
    # Default: the key file's project_id.
    project_id: str | None = attrs.field(default=None, metadata=_meta(_optional(_header_text)))
    # Default: https://fcm.googleapis.com/v1/projects/{project_id}/messages:send
    url: str | None = attrs.field(default=None, metadata=_meta(_optional(_http_url)))
    # Default: the key file's token_uri.
    token_uri: str | None = attrs.field(default=None, metadata=_meta(_optional(_http_url)))
    ca_file: Path | None = attrs.field(default=None, metadata=_meta(_optional(_path)))
    call_ttl: float = attrs.field(default=30.0, metadata=_meta(_duration()))
    request_timeout: float = attrs.field(default=10.0, metadata=_meta(_duration()))


@attrs.frozen(kw_only=True)
class PushConfig:
    """``push``: where pushes go. ``log`` writes every push as one log line instead."""

    # log: every push becomes a log line (development); live: sent to APNs / FCM.
    provider: str = attrs.field(default="log", metadata=_meta(_choice("log", "live")))
    apns: ApnsConfig | None = attrs.field(default=None,
                                          metadata=_meta(_optional(_Section(ApnsConfig))))
    fcm: FcmConfig | None = attrs.field(default=None,
                                        metadata=_meta(_optional(_Section(FcmConfig))))
    # Retries of 429/5xx answers, within the call's ring timer.
    retry_backoff_base: float = attrs.field(default=0.5, metadata=_meta(_duration()))
    retry_backoff_cap: float = attrs.field(default=8.0, metadata=_meta(_duration()))
    # Put a MESSAGE's text in its push (otherwise only the sender is named).
    message_body: bool = attrs.field(default=False, metadata=_meta(_bool))


@attrs.frozen(kw_only=True)
class CallsConfig:
    """``calls``: incoming calls and messages (SPEC.md "SIP behaviour")."""

    ring_timeout: float = attrs.field(default=120.0, metadata=_meta(_duration()))  # T1
    progress_timeout: float = attrs.field(default=120.0, metadata=_meta(_duration()))  # T2
    timer_c: float = attrs.field(default=180.0, metadata=_meta(_duration()))  # RFC 3261 16.8
    message_retention: float = attrs.field(default=7 * 86400.0, metadata=_meta(_duration()))
    max_held_messages: int = attrs.field(default=100, metadata=_meta(_int(1, 100_000)))
    call_record_retention: float = attrs.field(default=7 * 86400.0,
                                               metadata=_meta(_duration()))
    # Expiry of the woken app's REGISTER to sipis (its device binding), in seconds.
    device_min_expires: int = attrs.field(default=60, metadata=_meta(_int(10, 86400)))
    device_max_expires: int = attrs.field(default=3600, metadata=_meta(_int(10, 86400)))


@attrs.frozen(kw_only=True)
class MetricsConfig:
    """``metrics``: the Prometheus listener (``/metrics``, plain HTTP)."""

    enabled: bool = attrs.field(default=True, metadata=_meta(_bool))
    listen: ListenAddress = attrs.field(factory=lambda: ListenAddress(port=9460),
                                        metadata=_meta(_Section(ListenAddress)))


@attrs.frozen(kw_only=True)
class Config:
    """The whole file. Build it with :func:`load_config`; ``attrs.evolve`` for variations."""

    log: LogConfig = attrs.field(factory=LogConfig, metadata=_meta(_Section(LogConfig)))
    store: StoreConfig = attrs.field(factory=StoreConfig, metadata=_meta(_Section(StoreConfig)))
    sip: SipConfig = attrs.field(factory=SipConfig, metadata=_meta(_Section(SipConfig)))
    registrar: RegistrarConfig = attrs.field(factory=RegistrarConfig,
                                             metadata=_meta(_Section(RegistrarConfig)))
    lifetime: LifetimeConfig = attrs.field(factory=LifetimeConfig,
                                           metadata=_meta(_Section(LifetimeConfig)))
    api: ApiConfig = attrs.field(factory=ApiConfig, metadata=_meta(_Section(ApiConfig)))
    push: PushConfig = attrs.field(factory=PushConfig, metadata=_meta(_Section(PushConfig)))
    calls: CallsConfig = attrs.field(factory=CallsConfig, metadata=_meta(_Section(CallsConfig)))
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig,
                                         metadata=_meta(_Section(MetricsConfig)))
    # How long a stopping daemon waits for in-flight work (STYLE.md item 8).
    shutdown_grace: float = attrs.field(default=10.0,
                                        metadata=_meta(_duration(allow_zero=True)))


# --- cross-field checks ----------------------------------------------------------------------


@_check(ListenConfig)
def _check_listen(item: ListenConfig, path: str, ctx: _Ctx) -> ListenConfig:
    if not ctx.given(_join(path, "transport")):
        ctx.fail(_join(path, "transport"), "required: udp, tcp or tls")
    if item.transport == "tls":
        for name in ("cert_file", "key_file"):
            if getattr(item, name) is None:
                ctx.fail(_join(path, name), "a tls listener needs cert_file and key_file")
        if not ctx.given(_join(path, "port")):
            item = attrs.evolve(item, port=5061)
    else:
        for name in ("cert_file", "key_file"):
            if getattr(item, name) is not None:
                ctx.fail(_join(path, name), "only a tls listener takes a certificate")
    return item


@_check(ApnsConfig)
def _check_apns(apns: ApnsConfig, path: str, ctx: _Ctx) -> ApnsConfig:
    for name in ("team_id", "key_id", "key_file"):
        if not ctx.given(_join(path, name)):
            ctx.fail(_join(path, name), "required for APNs token authentication")
    return apns


@_check(FcmConfig)
def _check_fcm(fcm: FcmConfig, path: str, ctx: _Ctx) -> FcmConfig:
    if fcm.service_account_file is None:
        ctx.fail(_join(path, "service_account_file"), "required: the service-account key file")
    return fcm


@_check(PushConfig)
def _check_push(push: PushConfig, path: str, ctx: _Ctx) -> PushConfig:
    if push.provider == "live" and push.apns is None and push.fcm is None:
        ctx.fail(_join(path, "provider"), "live pushes need push.apns or push.fcm")
    if push.retry_backoff_cap < push.retry_backoff_base:
        ctx.fail(_join(path, "retry_backoff_cap"), "must not be shorter than retry_backoff_base")
    return push


@_check(SipConfig)
def _check_sip(sip: SipConfig, path: str, ctx: _Ctx) -> SipConfig:
    seen: dict[tuple[str, str, int], int] = {}
    for index, item in enumerate(sip.listen):
        key = (item.transport, item.host, item.port)
        if item.port != 0 and key in seen:
            ctx.fail(f"{_join(path, 'listen')}[{index}]",
                     f"same transport, host and port as listen[{seen[key]}]")
        seen[key] = index
    if sip.timers.t2 < sip.timers.t1:
        ctx.fail(_join(_join(path, "timers"), "t2"), "must not be shorter than t1")
    return sip


@_check(RegistrarConfig)
def _check_registrar(reg: RegistrarConfig, path: str, ctx: _Ctx) -> RegistrarConfig:
    if reg.min_expires > reg.max_expires:
        ctx.fail(_join(path, "min_expires"), "must not be more than max_expires")
    if not reg.min_expires <= reg.default_expires <= reg.max_expires:
        ctx.fail(_join(path, "default_expires"),
                 "must be between min_expires and max_expires")
    if reg.backoff_cap < reg.backoff_base:
        ctx.fail(_join(path, "backoff_cap"), "must not be shorter than backoff_base")
    return reg


@_check(CallsConfig)
def _check_calls(calls: CallsConfig, path: str, ctx: _Ctx) -> CallsConfig:
    if calls.device_min_expires > calls.device_max_expires:
        ctx.fail(_join(path, "device_min_expires"), "must not be more than device_max_expires")
    return calls


@_check(LifetimeConfig)
def _check_lifetime(life: LifetimeConfig, path: str, ctx: _Ctx) -> LifetimeConfig:
    if life.default > life.max:
        ctx.fail(_join(path, "default"), "must not be longer than lifetime.max")
    for name, rule in life.domains.items():
        sub = _join(_join(path, "domains"), name)
        if rule.max is not None and rule.max > life.max:
            ctx.fail(_join(sub, "max"), "must not be longer than lifetime.max (the global cap)")
        cap = rule.max if rule.max is not None else life.max
        if rule.default is not None and rule.default > cap:
            ctx.fail(_join(sub, "default"), "must not be longer than this domain's max")
    return life


@_check(ApiTlsConfig)
def _check_api_tls(tls: ApiTlsConfig, path: str, ctx: _Ctx) -> ApiTlsConfig:
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        ctx.fail(_join(path, missing), "cert_file and key_file go together")
    if tls.enabled and tls.cert_file is None and tls.self_signed_dir is None:
        ctx.fail(path, "TLS is enabled: set cert_file and key_file, or self_signed_dir to "
                       "generate a self-signed certificate (development), or enabled: false")
    return tls


def _tcp_listeners(config: Config) -> Iterator[tuple[str, str, int]]:
    for index, item in enumerate(config.sip.listen):
        if item.transport != "udp":
            yield f"sip.listen[{index}]", item.host, item.port
    yield "api.listen", config.api.listen.host, config.api.listen.port
    if config.metrics.enabled:
        yield "metrics.listen", config.metrics.listen.host, config.metrics.listen.port


def _overlap(a: str, b: str) -> bool:
    """Two listen hosts clash on one port: the same address, or either is the wildcard."""
    return (a == b or ipaddress.ip_address(a).is_unspecified
            or ipaddress.ip_address(b).is_unspecified)


@_check(Config)
def _check_config(config: Config, path: str, ctx: _Ctx) -> Config:
    taken: list[tuple[str, str, int]] = []
    for where, host, port in _tcp_listeners(config):
        for other, other_host, other_port in taken:
            if port != 0 and port == other_port and _overlap(host, other_host):
                # Point at the one the operator wrote (the other may be a default).
                if ctx.given(where) or not ctx.given(other):
                    ctx.fail(where, f"TCP port {port} is already taken by {other}")
                ctx.fail(other, f"TCP port {port} is also used by {where}")
        taken.append((where, host, port))
    return config


# --- loading ---------------------------------------------------------------------------------


def load_config_text(text: str, *, base_dir: Path) -> Config:
    """Parse and validate a whole configuration.

    Args:
        text: the YAML document. An empty document means every default.
        base_dir: where relative paths in the document start (the file's directory).

    Returns:
        The frozen tree; every value checked, relative paths made absolute against ``base_dir``
        (as far as ``base_dir`` is).

    Raises:
        ConfigError: for any problem, with the key path and the line where known.
    """
    ctx = _Ctx(base_dir=Path(base_dir))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and not isinstance(root, yaml.MappingNode):
            _fail(f"the top level must be a mapping of sections, not {_kind(root)}", "", root)
        return _build(Config, root, "", ctx)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else int(mark.line) + 1
        problem = exc.problem or exc.context or "cannot parse"
        raise ConfigError(f"YAML syntax error: {problem}", "", line) from None
    except yaml.YAMLError as exc:  # ReaderError: characters YAML does not allow
        line = None
        position = getattr(exc, "position", None)
        if isinstance(position, int):
            line = text.count("\n", 0, position) + 1
        reason = getattr(exc, "reason", "cannot read")
        raise ConfigError(f"YAML syntax error: {reason}", "", line) from None
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply", "", None) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the configuration file at ``path``.

    Relative paths in the file resolve against the file's directory. File paths named *in* the
    file are not checked for existence here.

    Raises:
        ConfigError: the file cannot be read or is invalid; ``err.file`` names it.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", file=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=str(file)) from None
    try:
        return load_config_text(text, base_dir=file.absolute().parent)
    except ConfigError as exc:
        exc.file = str(file)
        raise


# The embedded development default (SPEC.md "The embedded default"): the schema defaults plus a
# key file generated on first start and a self-signed API certificate under var/tls.
_DEV_OVERRIDES: Final = """
store: {create_key_file: true}
api: {tls: {self_signed_dir: var/tls}}
"""


def default_config(base_dir: Path) -> Config:
    """The ``make run`` configuration with its files under ``base_dir`` (the repository root).

    Equals what ``conf/dev.yaml`` loads to: SQLite ``var/sipis.db``, key ``var/sipis.key``
    (generated if missing), a self-signed API certificate under ``var/tls``, SIP on
    127.0.0.1:5060 over UDP and TCP, the API on 127.0.0.1:8443, metrics on 127.0.0.1:9460.
    """
    return load_config_text(_DEV_OVERRIDES, base_dir=base_dir)
