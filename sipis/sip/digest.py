"""HTTP Digest authentication for SIP: RFC 7616 and RFC 8760 on top of RFC 3261 §22.

Strategy: everything here is a pure function of strings, so that the RFC example vectors can be
checked directly and the registration flow (``sipis.registrar.binding``) stays sans-IO.

Client side:

- ``parse_challenge`` turns one ``WWW-Authenticate``/``Proxy-Authenticate`` value into a frozen
  ``Challenge``; anything we could not answer (malformed, another scheme, an algorithm we do not
  implement, a qop list with neither ``auth`` nor ``auth-int``) raises ``DigestError``.
- ``choose_challenge`` picks among the challenges of one response (RFC 8760 §2.4 lets the UAC
  apply a local policy; ours is the strongest algorithm first, then the server's order).
- ``DigestClient`` computes the credentials and counts ``nc`` per (realm, nonce).

Server side (the device registrar): ``make_challenge`` and ``verify_authorization``. They keep no
state: creating nonces, expiring them (answer ``stale=true``) and refusing replayed ``nc`` values
needs a clock and memory, so that is the caller's job, done through the ``accept`` callback of
``verify_authorization``.

Rules (RFC 7616 §3.4, RFC 2617 §3.2.2):

- ``A1 = username:realm:password``; for ``-sess`` algorithms ``A1 = H(that):nonce:cnonce``.
- ``A2 = method:uri``; with ``qop=auth-int`` ``A2 = method:uri:H(body)``.
- With qop: ``response = H(H(A1):nonce:nc:cnonce:qop:H(A2))``; without (RFC 2069):
  ``response = H(H(A1):nonce:H(A2))``. ``-sess`` needs a cnonce, so it needs qop.
- ``userhash=true`` (RFC 7616 §3.4.4) sends ``H(username:realm)`` instead of the username.

No password, HA1 or response value ever appears in an exception message or a ``repr``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Collection, Iterable

import attrs

from sipis import randomness
from sipis.sip.errors import DigestError, excerpt

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "Challenge",
    "Credentials",
    "DigestClient",
    "choose_challenge",
    "compute_response",
    "make_challenge",
    "parse_challenge",
    "parse_credentials",
    "verify_authorization",
]

# Canonical algorithm name -> hashlib name. Ordered weakest to strongest: the index is the
# preference of ``choose_challenge``. SHA-512-256 only where the local OpenSSL has it.
_HASHES: dict[str, str] = {"MD5": "md5", "SHA-256": "sha256"}
if "sha512_256" in hashlib.algorithms_available:  # pragma: no branch - OpenSSL >= 1.1.1
    _HASHES["SHA-512-256"] = "sha512_256"
_PREFERENCE: tuple[str, ...] = tuple(_HASHES)
# hashlib name → constructor: hashlib.md5 directly costs half of hashlib.new("md5").
_HASH_NEW: dict[str, Callable[[bytes], hashlib._Hash]] = {
    name: getattr(hashlib, name, functools.partial(hashlib.new, name))
    for name in _HASHES.values()
}

#: Every algorithm name we can answer and verify, canonical spelling (RFC 8760 §2.1).
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(
    [*_HASHES, *(name + "-sess" for name in _HASHES)]
)
_CANONICAL: dict[str, str] = {name.upper(): name for name in SUPPORTED_ALGORITHMS}

#: Nonces whose ``nc`` a ``DigestClient`` remembers. A registration sees one or two live nonces
#: (registrar, maybe an outbound proxy); the bound only stops the map growing with every new
#: nonce over a long life.
NONCE_COUNT_MEMORY = 16

_KNOWN_QOPS = ("auth", "auth-int")
# RFC 3261 §25.1 token plus the extra tchar of RFC 9110 §5.6.2, so HTTP-style names parse too.
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~#$&^|]+")
# Unquoted values are read leniently: some servers send base64 nonces without quotes.
_BARE_VALUE = re.compile(r"[^\s,\"]+")
_NC = re.compile(r"[0-9A-Fa-f]{8}")
# Characters that may not appear in a value we put on the wire (header injection).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A value that goes between quotes as it is: no control character, quote or backslash.
_PLAIN_QUOTED = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f\"\\]*")


def _canonical_algorithm(name: str) -> str | None:
    # ASCII only: str.upper() maps some non-ASCII letters onto ASCII ones ("ſ" -> "S").
    return _CANONICAL.get(name.upper()) if name.isascii() else None


def _supported_algorithm(name: str) -> str:
    """The canonical name of a supported algorithm; DigestError for any other."""
    canonical = _canonical_algorithm(name)
    if canonical is None:
        raise DigestError(f"unsupported digest algorithm {excerpt(name)}")
    return canonical


def _base_hash(algorithm: str) -> str:
    return _HASHES[algorithm.removesuffix("-sess")]


def _h(algorithm: str, data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _HASH_NEW[_base_hash(algorithm)](data).hexdigest()


# --- auth-param parsing ---------------------------------------------------------------------


def _skip_lws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parse_params(header_value: str, what: str, *, echo: bool = True) -> dict[str, str]:
    """Split ``Digest name=value, name="quoted", ...`` into a dict with lower-case names.

    Raises ``DigestError`` for another scheme, bad syntax or a repeated parameter. With
    ``echo=False`` (credentials, which hold a password-derived hash) messages quote no input.
    """
    text = header_value

    def show(fragment: str) -> str:
        return excerpt(fragment) if echo else f"({len(fragment)} characters)"

    pos = _skip_lws(text, 0)
    scheme = _TOKEN.match(text, pos)
    if scheme is None:
        raise DigestError(f"{what} has no auth scheme: {show(header_value)}")
    if scheme.group().lower() != "digest":
        raise DigestError(f"{what} uses scheme {show(scheme.group())}, not Digest")
    pos = scheme.end()
    if pos < len(text) and text[pos] not in " \t\r\n":
        raise DigestError(f"{what}: no space after the Digest scheme: {show(header_value)}")
    params: dict[str, str] = {}
    expect_comma = False
    while True:
        pos = _skip_lws(text, pos)
        if pos >= len(text):
            break
        if text[pos] == ",":  # RFC 9110 §5.6.1: empty list elements are allowed
            pos += 1
            expect_comma = False
            continue
        if expect_comma:
            raise DigestError(f"{what}: expected ',' at offset {pos}: {show(text[pos:])}")
        name_match = _TOKEN.match(text, pos)
        if name_match is None:
            raise DigestError(f"{what}: expected a parameter name at offset {pos}: "
                              f"{show(text[pos:])}")
        name = name_match.group().lower()
        pos = _skip_lws(text, name_match.end())
        if pos >= len(text) or text[pos] != "=":
            raise DigestError(f"{what}: parameter {excerpt(name)} has no '=' value")
        pos = _skip_lws(text, pos + 1)
        if pos < len(text) and text[pos] == '"':
            value, pos = _read_quoted(text, pos, what, echo)
        else:
            bare = _BARE_VALUE.match(text, pos)
            if bare is None:
                raise DigestError(f"{what}: parameter {excerpt(name)} has an empty value")
            value, pos = bare.group(), bare.end()
        if name in params:
            raise DigestError(f"{what}: parameter {excerpt(name)} appears twice")
        params[name] = value
        expect_comma = True
    return params


def _read_quoted(text: str, pos: int, what: str, echo: bool) -> tuple[str, int]:
    """Read the quoted-string starting at ``text[pos] == '"'``; return (unescaped, end)."""
    out: list[str] = []
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            i += 1
            if i >= len(text):
                break
            ch = text[i]
        if _CONTROL.match(ch):
            raise DigestError(f"{what}: control character in a quoted string at offset {i}")
        out.append(ch)
        i += 1
    shown = excerpt(text[pos:]) if echo else f"at offset {pos}"
    raise DigestError(f"{what}: unterminated quoted string {shown}")


def _quote(value: str, what: str) -> str:
    """``value`` as a quoted-string; DigestError if it cannot be sent safely."""
    if _PLAIN_QUOTED.fullmatch(value):  # nothing to escape or refuse: the common case
        return f'"{value}"'
    if _CONTROL.search(value):
        raise DigestError(f"{what} contains a control character")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flag(value: str | None) -> bool:
    # RFC 7616 §3.3: only a case-insensitive "true" means true; anything else is false.
    return value is not None and value.lower() == "true"


# --- challenges -----------------------------------------------------------------------------


@attrs.frozen
class Challenge:
    """One parsed ``WWW-Authenticate`` (``proxy=False``) or ``Proxy-Authenticate`` challenge.

    ``algorithm`` is the canonical spelling (``"SHA-256"``, ``"MD5-sess"``); ``qop`` holds the
    lower-cased qop options the server offered, empty for an RFC 2069 challenge. ``proxy``
    tells the caller which header to answer in: ``Proxy-Authorization`` if true, else
    ``Authorization``.
    """

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    proxy: bool = False
    userhash: bool = False


_CHALLENGE_MEMO: dict[tuple[str, bool], Challenge] = {}
_CHALLENGE_MEMO_SIZE = 256


def parse_challenge(header_value: str, *, proxy: bool = False) -> Challenge:
    """Parse one Digest challenge (see ``_parse_challenge``).

    Memoised (a small bounded table, errors not kept): a registration parses the challenge
    it got when choosing it and again when answering it; ``Challenge`` is immutable.
    """
    key = (header_value, proxy)
    found = _CHALLENGE_MEMO.get(key)
    if found is None:
        found = _parse_challenge(header_value, proxy=proxy)
        if len(_CHALLENGE_MEMO) >= _CHALLENGE_MEMO_SIZE:
            _CHALLENGE_MEMO.clear()
        _CHALLENGE_MEMO[key] = found
    return found


def _parse_challenge(header_value: str, *, proxy: bool = False) -> Challenge:
    """Parse one Digest challenge.

    Args:
        header_value: the value of a ``WWW-Authenticate`` or ``Proxy-Authenticate`` header.
        proxy: true for ``Proxy-Authenticate`` (407); stored in ``Challenge.proxy``.

    Returns:
        The challenge; parameter names are case-insensitive and unknown ones (``domain``,
        ``charset``, extensions) are ignored. A missing ``algorithm`` means MD5.

    Raises:
        DigestError: another scheme, malformed syntax, no realm or nonce, an algorithm we do
            not support, a qop list with neither ``auth`` nor ``auth-int``, or a ``-sess``
            algorithm without qop (it needs a cnonce, which RFC 2069 mode cannot send).
    """
    what = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
    params = _parse_params(header_value, what)
    for required in ("realm", "nonce"):
        if required not in params:
            raise DigestError(f"{what} challenge has no {required}")
    raw_algorithm = params.get("algorithm", "MD5")
    algorithm = _canonical_algorithm(raw_algorithm)
    if algorithm is None:
        raise DigestError(f"unsupported digest algorithm {excerpt(raw_algorithm)}")
    qop: tuple[str, ...] = ()
    if "qop" in params:
        qop = tuple(q.strip().lower() for q in params["qop"].split(",") if q.strip())
        if not any(q in _KNOWN_QOPS for q in qop):
            raise DigestError(f"{what} offers no qop we know: {excerpt(params['qop'])}")
    if algorithm.endswith("-sess") and not qop:
        raise DigestError(f"{what}: {algorithm} without qop cannot be answered")
    return Challenge(
        realm=params["realm"],
        nonce=params["nonce"],
        algorithm=algorithm,
        qop=qop,
        opaque=params.get("opaque"),
        stale=_flag(params.get("stale")),
        proxy=proxy,
        userhash=_flag(params.get("userhash")),
    )


def _is_answerable(challenge: Challenge) -> bool:
    if challenge.algorithm not in SUPPORTED_ALGORITHMS:
        return False
    if challenge.qop:
        return any(q in _KNOWN_QOPS for q in challenge.qop)
    return not challenge.algorithm.endswith("-sess")


def choose_challenge(challenges: Iterable[Challenge]) -> Challenge:
    """Pick the challenge to answer among those of one response.

    RFC 8760 §2.4 allows a local policy: ours is the strongest hash first (SHA-512-256, then
    SHA-256, then MD5; ``-sess`` ranks with its base), and among equals the first one, i.e.
    the server's own order of preference (RFC 8760 §2.3).

    Raises:
        DigestError: none of them can be answered.
    """
    best: Challenge | None = None
    best_rank = -1
    for challenge in challenges:
        if not _is_answerable(challenge):
            continue
        rank = _PREFERENCE.index(challenge.algorithm.removesuffix("-sess"))
        if rank > best_rank:
            best, best_rank = challenge, rank
    if best is None:
        raise DigestError("no digest challenge with a supported algorithm and qop")
    return best


def make_challenge(
    realm: str,
    nonce: str,
    *,
    algorithm: str,
    opaque: str | None = None,
    stale: bool = False,
    qop: tuple[str, ...] = ("auth",),
) -> str:
    """Build a ``WWW-Authenticate``/``Proxy-Authenticate`` value for the device registrar.

    The caller creates the nonce (unpredictable, e.g. from ``secrets``), remembers when it
    expires, and sets ``stale=True`` when it rejects credentials only because their nonce is
    too old (RFC 7616 §3.3). Offer one challenge per algorithm, most preferred first.

    Raises:
        DigestError: an unsupported algorithm or a value that cannot be quoted safely.
    """
    canonical = _supported_algorithm(algorithm)
    if canonical.endswith("-sess") and not qop:
        raise DigestError(f"{canonical} needs qop")
    parts = [f"realm={_quote(realm, 'realm')}", f"nonce={_quote(nonce, 'nonce')}"]
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque, 'opaque')}")
    if stale:
        parts.append("stale=TRUE")
    parts.append(f"algorithm={canonical}")
    if qop:
        parts.append(f"qop={_quote(','.join(qop), 'qop')}")
    return "Digest " + ", ".join(parts)


# --- the response computation ---------------------------------------------------------------


def compute_response(
    *,
    algorithm: str,
    username: str,
    password: str,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` value (lower-case hex), RFC 7616 §3.4.1.

    Args:
        algorithm: one of ``SUPPORTED_ALGORITHMS`` (case-insensitive).
        username: the plain username, also when the header carries a userhash.
        qop: ``"auth"``, ``"auth-int"`` or None for the RFC 2069 form.
        nc, cnonce: required with qop (and cnonce with any ``-sess`` algorithm).
        body: the message body, only used by ``auth-int``.

    Raises:
        DigestError: unsupported algorithm or qop, or a missing nc/cnonce.
    """
    canonical = _supported_algorithm(algorithm)
    return compute_response_from_ha1(
        algorithm=canonical,
        ha1=compute_ha1(canonical, username, realm, password),
        nonce=nonce, method=method, uri=uri, qop=qop, nc=nc, cnonce=cnonce, body=body,
    )


def compute_ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """``H(username:realm:password)``: what a registrar stores instead of the password.

    A ``-sess`` algorithm uses the same stored value (the session part needs the nonce).

    Raises:
        DigestError: unsupported algorithm.
    """
    canonical = _supported_algorithm(algorithm)
    return _h(canonical, f"{username}:{realm}:{password}")


def compute_response_from_ha1(
    *,
    algorithm: str,
    ha1: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` value from a stored HA1 (RFC 7616 §3.4.1); rules as ``compute_response``.

    Raises:
        DigestError: unsupported algorithm or qop, or a missing nc/cnonce.
    """
    canonical = _supported_algorithm(algorithm)
    if qop is not None and qop not in _KNOWN_QOPS:
        raise DigestError(f"unsupported qop {excerpt(qop)}")
    if qop is not None and (nc is None or cnonce is None):
        raise DigestError("qop needs an nc and a cnonce")
    if canonical.endswith("-sess"):
        if cnonce is None:
            raise DigestError(f"{canonical} needs a cnonce")
        ha1 = _h(canonical, f"{ha1}:{nonce}:{cnonce}")
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + _h(canonical, body)
    ha2 = _h(canonical, a2)
    if qop is None:
        return _h(canonical, f"{ha1}:{nonce}:{ha2}")
    return _h(canonical, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _userhash(algorithm: str, username: str, realm: str) -> str:
    return _h(algorithm, f"{username}:{realm}")


# --- client ---------------------------------------------------------------------------------


class DigestClient:
    """Answers digest challenges for one username/password (RFC 3261 §22.2, §22.3).

    The password is never shown by ``repr``/``str``. ``nc`` is counted per (realm, nonce):
    each ``authorize`` for the same nonce sends the next value (00000001, 00000002, …), so a
    refresh can reuse a nonce without a new 401 (RFC 7616 §3.4). The last
    ``NONCE_COUNT_MEMORY`` nonces are remembered.
    """

    __slots__ = ("_nonce_counts", "_password", "username")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        # A plain dict (insertion-ordered) rather than an OrderedDict: one per binding, so
        # its size counts at 100k bindings; oldest first is all the pruning needs.
        self._nonce_counts: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"DigestClient(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__

    def _next_nc(self, realm: str, nonce: str) -> int:
        key = (realm, nonce)
        count = self._nonce_counts.pop(key, 0) + 1
        self._nonce_counts[key] = count
        while len(self._nonce_counts) > NONCE_COUNT_MEMORY:
            del self._nonce_counts[next(iter(self._nonce_counts))]
        return count

    def authorize(
        self,
        challenge: Challenge,
        *,
        method: str,
        uri: str,
        body: bytes = b"",
        cnonce: str | None = None,
    ) -> str:
        """The ``Authorization``/``Proxy-Authorization`` value answering ``challenge``.

        Args:
            challenge: from ``parse_challenge``; ``challenge.proxy`` names the header to use.
            method: the SIP method of the request being sent (for REGISTER: ``"REGISTER"``).
            uri: the Request-URI of that request, as sent (RFC 3261 §22.4 ``digest-uri``).
            body: the request body, only hashed for ``qop=auth-int``.
            cnonce: fixed client nonce for tests; by default 128 random bits from ``secrets``.

        Returns:
            ``Digest username="…", realm="…", nonce="…", uri="…", response="…",
            algorithm=…[, cnonce="…", qop=…, nc=…][, opaque="…"][, userhash=true]``.
            ``qop=auth`` when offered, else ``auth-int``; no qop (RFC 2069 form) when the
            challenge offered none. Every call with qop increments that nonce's ``nc``.

        Raises:
            DigestError: the challenge cannot be answered, or a value holds control characters.
        """
        if not _is_answerable(challenge):
            raise DigestError(
                f"cannot answer a {excerpt(challenge.algorithm)} challenge with qop "
                f"{excerpt(','.join(challenge.qop))}"
            )
        algorithm = challenge.algorithm
        qop: str | None = None
        if challenge.qop:
            qop = "auth" if "auth" in challenge.qop else "auth-int"
        nc_text: str | None = None
        if qop is not None:
            if cnonce is None:
                cnonce = randomness.token_hex(16)
            nc_text = f"{self._next_nc(challenge.realm, challenge.nonce):08x}"
        else:
            cnonce = None  # RFC 2617 §3.2.2: no cnonce when the server sent no qop
        response = compute_response(
            algorithm=algorithm,
            username=self.username,
            password=self._password,
            realm=challenge.realm,
            nonce=challenge.nonce,
            method=method,
            uri=uri,
            qop=qop,
            nc=nc_text,
            cnonce=cnonce,
            body=body,
        )
        username = (
            _userhash(algorithm, self.username, challenge.realm)
            if challenge.userhash
            else self.username
        )
        parts = [
            f"username={_quote(username, 'username')}",
            f"realm={_quote(challenge.realm, 'realm')}",
            f"nonce={_quote(challenge.nonce, 'nonce')}",
            f"uri={_quote(uri, 'uri')}",
            f'response="{response}"',
            f"algorithm={algorithm}",
        ]
        if qop is not None and cnonce is not None:
            parts += [f"cnonce={_quote(cnonce, 'cnonce')}", f"qop={qop}", f"nc={nc_text}"]
        if challenge.opaque is not None:
            parts.append(f"opaque={_quote(challenge.opaque, 'opaque')}")
        if challenge.userhash:
            parts.append("userhash=true")
        return "Digest " + ", ".join(parts)


# --- server ---------------------------------------------------------------------------------


@attrs.frozen
class Credentials:
    """A parsed ``Authorization``/``Proxy-Authorization`` Digest value (RFC 3261 §25.1).

    ``algorithm`` is canonical; ``qop``, ``nc`` and ``cnonce`` are None in the RFC 2069 form.
    ``response`` is lower-cased hex. ``repr`` shows no response value.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str = attrs.field(repr=False)
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    userhash: bool = False

    @property
    def nonce_count(self) -> int | None:
        """``nc`` as a number, for the caller's replay check (must grow per nonce)."""
        return None if self.nc is None else int(self.nc, 16)


def parse_credentials(header_value: str) -> Credentials:
    """Parse a Digest ``Authorization``/``Proxy-Authorization`` value.

    Raises:
        DigestError: another scheme, bad syntax, a missing username/realm/nonce/uri/response,
            an unsupported algorithm or qop, or qop without a valid nc and cnonce.
    """
    what = "Authorization"
    params = _parse_params(header_value, what, echo=False)
    for required in ("username", "realm", "nonce", "uri", "response"):
        if required not in params:
            raise DigestError(f"{what} has no {required}")
    raw_algorithm = params.get("algorithm", "MD5")
    algorithm = _canonical_algorithm(raw_algorithm)
    if algorithm is None:
        raise DigestError(f"unsupported digest algorithm {excerpt(raw_algorithm)}")
    qop = params.get("qop")
    if qop is not None:
        qop = qop.lower()
        if qop not in _KNOWN_QOPS:
            raise DigestError(f"{what}: unsupported qop {excerpt(qop)}")
        if "cnonce" not in params or not _NC.fullmatch(params.get("nc", "")):
            raise DigestError(f"{what}: qop needs a cnonce and an 8-hex-digit nc")
    elif algorithm.endswith("-sess") and "cnonce" not in params:
        raise DigestError(f"{what}: {algorithm} needs a cnonce")
    return Credentials(
        username=params["username"],
        realm=params["realm"],
        nonce=params["nonce"],
        uri=params["uri"],
        response=params["response"].lower(),
        algorithm=algorithm,
        qop=qop,
        nc=params.get("nc") if qop is not None else None,
        cnonce=params.get("cnonce"),
        opaque=params.get("opaque"),
        userhash=_flag(params.get("userhash")),
    )


def verify_authorization(
    header_value: str,
    *,
    method: str,
    password_lookup: Callable[[str], str | None],
    realm: str,
    body: bytes = b"",
    algorithms: Collection[str] = SUPPORTED_ALGORITHMS,
    require_qop: bool = True,
    accept: Callable[[Credentials], bool] | None = None,
) -> str | None:
    """Check Digest credentials sent to us; return the username if they are valid.

    Args:
        header_value: the ``Authorization`` (or ``Proxy-Authorization``) value.
        method: the method of the request that carried it (§22.4: A2 uses it).
        password_lookup: username → password, or None for an unknown user.
        realm: our realm; credentials for another realm are refused.
        body: the request body, for ``qop=auth-int``.
        algorithms: the algorithms we offered (canonical names); others are refused, so a
            client cannot pick a weaker one than we asked for.
        require_qop: refuse the RFC 2069 form (our ``make_challenge`` always offers qop).
        accept: called only once the response matches, with the parsed credentials; return
            False to refuse them. This is where the caller checks that it issued the nonce and
            that it is fresh (else answer with a ``stale=True`` challenge), that ``nc`` grows
            (replay), and that ``uri`` names the Request-URI.

    Returns:
        The username, or None for anything else: malformed header, unknown user, wrong
        password, wrong realm or algorithm, userhash (not supported here), or ``accept``
        said no. Never raises for bad input from the network.
    """
    def ha1_lookup(username: str, algorithm: str) -> str | None:
        password = password_lookup(username)
        return None if password is None else compute_ha1(algorithm, username, realm, password)

    return verify_authorization_ha1(
        header_value, method=method, ha1_lookup=ha1_lookup, realm=realm, body=body,
        algorithms=algorithms, require_qop=require_qop, accept=accept,
    )


def verify_authorization_ha1(
    header_value: str,
    *,
    method: str,
    ha1_lookup: Callable[[str, str], str | None],
    realm: str,
    body: bytes = b"",
    algorithms: Collection[str] = SUPPORTED_ALGORITHMS,
    require_qop: bool = True,
    accept: Callable[[Credentials], bool] | None = None,
) -> str | None:
    """``verify_authorization`` for a server that stores HA1 values, not passwords.

    Args:
        ha1_lookup: (username, base algorithm such as ``"MD5"``/``"SHA-256"``) → stored HA1
            hex, or None for an unknown user or an algorithm with no stored HA1.
        Others as ``verify_authorization``.

    Returns:
        The username, or None for anything else. Never raises for bad input from the network.
    """
    try:
        creds = parse_credentials(header_value)
    except DigestError:
        return None
    allowed = {_canonical_algorithm(a) for a in algorithms}
    if (
        creds.realm != realm
        or creds.algorithm not in allowed
        or creds.userhash
        or (require_qop and creds.qop is None)
    ):
        return None
    base = creds.algorithm.removesuffix("-sess")
    ha1 = ha1_lookup(creds.username, base)
    # Compute even for an unknown user so that timing does not tell which usernames exist.
    stand_in = _h(base, secrets.token_hex(16))
    try:
        expected = compute_response_from_ha1(
            algorithm=creds.algorithm,
            ha1=ha1.lower() if ha1 is not None else stand_in,
            nonce=creds.nonce, method=method, uri=creds.uri, qop=creds.qop, nc=creds.nc,
            cnonce=creds.cnonce, body=body,
        )
    except DigestError:  # pragma: no cover - parse_credentials already checked these
        return None
    matched = hmac.compare_digest(expected.encode(), creds.response.encode("utf-8"))
    if ha1 is None or not matched:
        return None
    if accept is not None and not accept(creds):
        return None
    return creds.username
