"""Digest authentication: RFC example vectors, parsing, nc counting, and the server helpers."""

from __future__ import annotations

import contextlib
import hashlib
import re
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.sip.digest import (
    SUPPORTED_ALGORITHMS,
    Challenge,
    Credentials,
    DigestClient,
    choose_challenge,
    compute_response,
    make_challenge,
    parse_challenge,
    parse_credentials,
    verify_authorization,
)
from sipis.sip.errors import DigestError

# RFC 7616 §3.9.1
RFC7616 = {
    "username": "Mufasa",
    "password": "Circle of Life",
    "realm": "http-auth@example.org",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
    "method": "GET",
    "uri": "/dir/index.html",
}
RFC7616_MD5 = "8ca523f5e9506fed4657c9700eebdbec"
RFC7616_SHA256 = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


def params_of(header: str) -> dict[str, str]:
    """The auth-params of a header we produced, quotes stripped."""
    assert header.startswith("Digest ")
    return {
        m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', header[7:])
    }


# --- golden vectors -------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "expected"), [("MD5", RFC7616_MD5),
                                                      ("SHA-256", RFC7616_SHA256)])
def test_compute_response_matches_rfc7616_example(algorithm: str, expected: str) -> None:
    """The §3.9.1 example of RFC 7616 gives the published response for MD5 and SHA-256."""
    v = RFC7616
    assert compute_response(
        algorithm=algorithm, username=v["username"], password=v["password"], realm=v["realm"],
        nonce=v["nonce"], method=v["method"], uri=v["uri"], qop="auth", nc="00000001",
        cnonce=v["cnonce"],
    ) == expected


@pytest.mark.parametrize(("algorithm", "expected"), [("MD5", RFC7616_MD5),
                                                      ("SHA-256", RFC7616_SHA256)])
def test_client_answers_rfc7616_challenge_with_the_published_header(
    algorithm: str, expected: str
) -> None:
    """Parsing the RFC 7616 challenge and authorizing yields the RFC's Authorization fields."""
    v = RFC7616
    challenge = parse_challenge(
        f'Digest realm="{v["realm"]}", qop="auth, auth-int", algorithm={algorithm}, '
        f'nonce="{v["nonce"]}", opaque="{v["opaque"]}"'
    )
    header = DigestClient(v["username"], v["password"]).authorize(
        challenge, method="GET", uri=v["uri"], cnonce=v["cnonce"]
    )
    assert header == (
        f'Digest username="Mufasa", realm="{v["realm"]}", nonce="{v["nonce"]}", '
        f'uri="/dir/index.html", response="{expected}", algorithm={algorithm}, '
        f'cnonce="{v["cnonce"]}", qop=auth, nc=00000001, opaque="{v["opaque"]}"'
    )


def test_client_answers_rfc2617_example() -> None:
    """The RFC 2617 §3.5 example (MD5, qop=auth) gives response 6629fae4…."""
    challenge = parse_challenge(
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )
    header = DigestClient("Mufasa", "Circle Of Life").authorize(
        challenge, method="GET", uri="/dir/index.html", cnonce="0a4f113b"
    )
    p = params_of(header)
    assert p["response"] == "6629fae49393a05397450978507c4ef1"
    assert p["opaque"] == "5ccc069c403ebaf9f0171e9517f40e41"
    assert (p["qop"], p["nc"], p["algorithm"]) == ("auth", "00000001", "MD5")


def test_rfc2069_form_without_qop() -> None:
    """A challenge without qop is answered without cnonce/nc/qop, response = H(HA1:nonce:HA2)."""
    header = DigestClient("Mufasa", "Circle Of Life").authorize(
        parse_challenge('Digest realm="testrealm@host.com", nonce="abc"'),
        method="REGISTER", uri="sip:example.com",
    )
    p = params_of(header)
    assert "cnonce" not in p and "nc" not in p and "qop" not in p

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    ha1 = md5("Mufasa:testrealm@host.com:Circle Of Life")
    assert p["response"] == md5(f"{ha1}:abc:{md5('REGISTER:sip:example.com')}")


def test_auth_int_hashes_the_body_and_is_used_only_without_auth() -> None:
    """qop=auth-int is chosen only when auth is not offered, and the body changes the response."""
    challenge = parse_challenge('Digest realm="r", nonce="n", qop="auth-int"')
    client = DigestClient("u", "p")
    a = params_of(client.authorize(challenge, method="MESSAGE", uri="sip:x", body=b"a",
                                   cnonce="c"))
    b = params_of(client.authorize(challenge, method="MESSAGE", uri="sip:x", body=b"b",
                                   cnonce="c"))
    assert a["qop"] == "auth-int"
    assert a["response"] != b["response"]


def test_sess_algorithm_uses_cnonce_in_ha1() -> None:
    """MD5-sess: A1 = H(user:realm:pw):nonce:cnonce (RFC 7616 §3.4.2)."""

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    ha1 = md5(f"{md5('u:r:p')}:n:c")
    ha2 = md5("REGISTER:sip:x")
    expected = md5(f"{ha1}:n:00000001:c:auth:{ha2}")
    assert compute_response(algorithm="md5-sess", username="u", password="p", realm="r",
                            nonce="n", method="REGISTER", uri="sip:x", qop="auth",
                            nc="00000001", cnonce="c") == expected


def test_sha512_256_is_supported_when_available() -> None:
    """SHA-512-256 (RFC 8760) is answered when the local hashlib has it."""
    if "SHA-512-256" not in SUPPORTED_ALGORITHMS:
        pytest.skip("no sha512_256 in this OpenSSL")
    c = parse_challenge('Digest realm="r", nonce="n", qop="auth", algorithm=SHA-512-256')
    p = params_of(DigestClient("u", "p").authorize(c, method="REGISTER", uri="sip:x"))
    assert p["algorithm"] == "SHA-512-256"
    assert len(p["response"]) == 64


def test_userhash_sends_hashed_username() -> None:
    """userhash=true sends H(username:realm) and flags it (RFC 7616 §3.4.4)."""

    c = parse_challenge('Digest realm="r", nonce="n", qop="auth", algorithm=SHA-256, '
                        'userhash=true')
    p = params_of(DigestClient("alice", "pw").authorize(c, method="REGISTER", uri="sip:x"))
    assert p["username"] == hashlib.sha256(b"alice:r").hexdigest()
    assert p["userhash"] == "true"


# --- nonce counting and stale ---------------------------------------------------------------


def test_nc_increments_per_nonce_and_restarts_for_a_new_nonce() -> None:
    """Each Authorization for the same (realm, nonce) sends the next nc; a new nonce starts at 1."""
    client = DigestClient("alice", "pw")
    first = parse_challenge('Digest realm="r", nonce="n1", qop="auth"')
    ncs = [params_of(client.authorize(first, method="REGISTER", uri="sip:r"))["nc"]
           for _ in range(3)]
    assert ncs == ["00000001", "00000002", "00000003"]
    stale = parse_challenge('Digest realm="r", nonce="n2", qop="auth", stale=TRUE')
    assert stale.stale
    assert params_of(client.authorize(stale, method="REGISTER", uri="sip:r"))["nc"] == "00000001"
    # The old nonce keeps its own count.
    assert params_of(client.authorize(first, method="REGISTER", uri="sip:r"))["nc"] == "00000004"


def test_nc_is_kept_per_realm() -> None:
    """The same nonce value in two realms (registrar and proxy) counts separately."""
    client = DigestClient("alice", "pw")
    a = parse_challenge('Digest realm="a", nonce="n", qop="auth"')
    b = parse_challenge('Digest realm="b", nonce="n", qop="auth"', proxy=True)
    client.authorize(a, method="REGISTER", uri="sip:r")
    assert params_of(client.authorize(b, method="REGISTER", uri="sip:r"))["nc"] == "00000001"


def test_nc_is_hex() -> None:
    """nc is 8 lower-case hex digits: the 10th use is 0000000a."""
    client = DigestClient("alice", "pw")
    c = parse_challenge('Digest realm="r", nonce="n", qop="auth"')
    for _ in range(9):
        client.authorize(c, method="REGISTER", uri="sip:r")
    assert params_of(client.authorize(c, method="REGISTER", uri="sip:r"))["nc"] == "0000000a"


def test_fresh_cnonce_each_time_by_default() -> None:
    """Without a fixed cnonce, each Authorization has a new random one."""
    client = DigestClient("alice", "pw")
    c = parse_challenge('Digest realm="r", nonce="n", qop="auth"')
    one = params_of(client.authorize(c, method="REGISTER", uri="sip:r"))["cnonce"]
    two = params_of(client.authorize(c, method="REGISTER", uri="sip:r"))["cnonce"]
    assert one != two and len(one) >= 16


@pytest.mark.parametrize(("text", "expected"), [("stale=true", True), ("stale=FALSE", False),
                                                 ('stale="TRUE"', True), ("stale=yes", False),
                                                 ("", False)])
def test_stale_flag_is_true_only_for_case_insensitive_true(text: str, expected: bool) -> None:
    """RFC 7616 §3.3: only "true" (any case) means stale."""
    header = 'Digest realm="r", nonce="n"' + (", " + text if text else "")
    assert parse_challenge(header).stale is expected


def test_password_is_not_in_repr() -> None:
    """The client's repr/str show the username, never the password."""
    client = DigestClient("alice", "s3cret-pw")
    assert "s3cret-pw" not in repr(client) and "s3cret-pw" not in str(client)
    assert "alice" in repr(client)


# --- parsing --------------------------------------------------------------------------------


def test_parse_full_challenge() -> None:
    """Names are case-insensitive, escapes are undone, unknown params are ignored."""
    c = parse_challenge(
        'DIGEST Realm="sip.\\"ex\\\\ample\\".net",\r\n  NONCE="a,b=c", domain="sip:x",'
        ' ALGORITHM=sha-256, qop="AUTH , auth-int", opaque="op", charset=UTF-8,,',
        proxy=True,
    )
    assert c == Challenge(realm='sip."ex\\ample".net', nonce="a,b=c", algorithm="SHA-256",
                          qop=("auth", "auth-int"), opaque="op", stale=False, proxy=True)


def test_parse_defaults_to_md5_and_accepts_unquoted_values() -> None:
    """No algorithm means MD5; a bare (unquoted) nonce token is tolerated."""
    c = parse_challenge("Digest realm=r, nonce=YWJj==")
    assert (c.algorithm, c.nonce, c.qop, c.opaque) == ("MD5", "YWJj==", (), None)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ('Basic realm="r"', "not Digest"),
        ("", "no auth scheme"),
        ('Digest nonce="n"', "no realm"),
        ('Digest realm="r"', "no nonce"),
        ('Digest realm="r", nonce="n", algorithm=AKAv1-MD5', "unsupported digest algorithm"),
        ('Digest realm="r", nonce="n", algorithm=SHA1', "unsupported digest algorithm"),
        ('Digest realm="r", nonce="n", qop="auth-conf"', "no qop we know"),
        ('Digest realm="r", nonce="n", algorithm=MD5-sess', "without qop"),
        ('Digest realm="r", nonce="n', "unterminated"),
        ('Digest realm="r" nonce="n"', "expected ','"),
        ('Digest realm="r", nonce', "no '='"),
        ('Digest realm="r", nonce=', "empty value"),
        ('Digest realm="r", realm="s", nonce="n"', "twice"),
        ('Digest realm="r\x00", nonce="n"', "control character"),
        ('Digest realm="r", nonce="n", =x', "parameter name"),
        ('Digestrealm="r"', "not Digest"),
    ],
)
def test_parse_errors_are_digest_errors_with_a_clear_message(header: str, needle: str) -> None:
    """Malformed or unanswerable challenges raise DigestError saying what is wrong."""
    with pytest.raises(DigestError, match=re.escape(needle)):
        parse_challenge(header)


@given(st.text(max_size=200))
def test_parse_challenge_raises_only_digest_error(text: str) -> None:
    """Arbitrary text either parses or raises DigestError, nothing else."""
    with contextlib.suppress(DigestError):
        parse_challenge(text)


@given(st.lists(st.tuples(st.sampled_from(["realm", "nonce", "qop", "algorithm", "stale",
                                           "opaque", "x"]),
                          st.text(alphabet='ab,="\\ -5DMSsha', max_size=12)),
                max_size=6))
def test_parse_challenge_raises_only_digest_error_on_near_valid_input(
    pairs: list[tuple[str, str]],
) -> None:
    """Near-valid parameter lists either parse or raise DigestError, nothing else."""
    text = "Digest " + ", ".join(f"{k}={v}" for k, v in pairs)
    with contextlib.suppress(DigestError):
        parse_challenge(text)


@given(st.text(max_size=200))
def test_verify_authorization_never_raises(text: str) -> None:
    """Garbage credentials are refused (None), never an exception."""
    assert verify_authorization("Digest " + text, method="REGISTER",
                                password_lookup=lambda u: "pw", realm="r") is None


def test_parse_error_for_credentials_does_not_echo_them() -> None:
    """A malformed Authorization is reported without quoting its text (it holds a hash)."""
    with pytest.raises(DigestError) as info:
        parse_credentials('Digest username="alice", response="deadbeefcafe" junk')
    assert "deadbeef" not in str(info.value)


def test_authorize_refuses_values_that_would_inject_header_lines() -> None:
    """A username with CR/LF cannot be put on the wire."""
    c = parse_challenge('Digest realm="r", nonce="n", qop="auth"')
    with pytest.raises(DigestError):
        DigestClient("alice\r\nVia: x", "pw").authorize(c, method="REGISTER", uri="sip:r")


def test_authorize_refuses_an_unanswerable_hand_made_challenge() -> None:
    """A Challenge built by hand with an unknown algorithm raises DigestError."""
    with pytest.raises(DigestError):
        DigestClient("a", "p").authorize(Challenge(realm="r", nonce="n", algorithm="SHA1"),
                                         method="REGISTER", uri="sip:r")


# --- choosing -------------------------------------------------------------------------------


def test_choose_prefers_sha256_over_md5_whatever_the_order() -> None:
    """RFC 8760: SHA-256 is answered before MD5, even if MD5 came first."""
    md5 = parse_challenge('Digest realm="r", nonce="1", qop="auth", algorithm=MD5')
    sha = parse_challenge('Digest realm="r", nonce="2", qop="auth", algorithm=SHA-256')
    assert choose_challenge([md5, sha]) is sha
    assert choose_challenge([sha, md5]) is sha


def test_choose_keeps_server_order_among_equals() -> None:
    """Two challenges of the same strength: the first (server's preference) wins."""
    a = parse_challenge('Digest realm="r", nonce="1", qop="auth", algorithm=SHA-256')
    b = parse_challenge('Digest realm="r", nonce="2", qop="auth", algorithm=SHA-256-sess')
    assert choose_challenge([a, b]) is a
    assert choose_challenge([b, a]) is b


def test_choose_skips_unsupported_and_fails_when_none_left() -> None:
    """Only answerable challenges are chosen; none at all is a DigestError."""
    bad = Challenge(realm="r", nonce="n", algorithm="AKAv1-MD5")
    md5 = Challenge(realm="r", nonce="n")
    assert choose_challenge([bad, md5]) is md5
    with pytest.raises(DigestError):
        choose_challenge([bad])
    with pytest.raises(DigestError):
        choose_challenge([])


# --- server helpers -------------------------------------------------------------------------


def lookup(user: str) -> str | None:
    return "right-pw" if user == "alice" else None


@pytest.mark.parametrize("algorithm", sorted(SUPPORTED_ALGORITHMS))
def test_round_trip_make_challenge_authorize_verify(algorithm: str) -> None:
    """What make_challenge offers, DigestClient answers and verify_authorization accepts."""
    challenge_value = make_challenge("sip.test", "nonce-1", algorithm=algorithm, opaque="o")
    challenge = parse_challenge(challenge_value)
    assert challenge.algorithm == algorithm and challenge.qop == ("auth",)
    header = DigestClient("alice", "right-pw").authorize(
        challenge, method="REGISTER", uri="sip:sip.test")
    assert verify_authorization(header, method="REGISTER", password_lookup=lookup,
                                realm="sip.test") == "alice"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_verify_refuses_a_wrong_password(algorithm: str) -> None:
    """A response made with another password is refused."""
    challenge = parse_challenge(make_challenge("sip.test", "n", algorithm=algorithm))
    header = DigestClient("alice", "wrong-pw").authorize(
        challenge, method="REGISTER", uri="sip:sip.test")
    assert verify_authorization(header, method="REGISTER", password_lookup=lookup,
                                realm="sip.test") is None


def test_verify_refuses_unknown_user_wrong_realm_method_and_algorithm() -> None:
    """Unknown user, another realm, another method or an algorithm we did not offer: None."""
    challenge = parse_challenge(make_challenge("sip.test", "n", algorithm="MD5"))
    good = DigestClient("alice", "right-pw").authorize(challenge, method="REGISTER",
                                                       uri="sip:sip.test")
    bob = DigestClient("bob", "right-pw").authorize(challenge, method="REGISTER",
                                                    uri="sip:sip.test")
    verify = partial(verify_authorization, password_lookup=lookup)
    assert verify(bob, method="REGISTER", realm="sip.test") is None
    assert verify(good, method="REGISTER", realm="other") is None
    assert verify(good, method="INVITE", realm="sip.test") is None
    assert verify(good, method="REGISTER", realm="sip.test", algorithms={"SHA-256"}) is None
    assert verify(good, method="REGISTER", realm="sip.test") == "alice"


def test_verify_refuses_rfc2069_form_unless_allowed() -> None:
    """Credentials without qop are refused by default (we always offer qop)."""
    challenge = parse_challenge(make_challenge("sip.test", "n", algorithm="MD5", qop=()))
    header = DigestClient("alice", "right-pw").authorize(challenge, method="REGISTER",
                                                         uri="sip:sip.test")
    assert "qop" not in params_of(header)
    assert verify_authorization(header, method="REGISTER", password_lookup=lookup,
                                realm="sip.test") is None
    assert verify_authorization(header, method="REGISTER", password_lookup=lookup,
                                realm="sip.test", require_qop=False) == "alice"


def test_verify_hands_valid_credentials_to_accept_for_nonce_and_replay_checks() -> None:
    """accept sees the parsed nonce/nc only for a matching response, and can refuse."""
    seen: list[Credentials] = []
    challenge = parse_challenge(make_challenge("sip.test", "n-42", algorithm="SHA-256"))
    client = DigestClient("alice", "right-pw")
    first = client.authorize(challenge, method="REGISTER", uri="sip:sip.test")
    second = client.authorize(challenge, method="REGISTER", uri="sip:sip.test")
    highest: dict[str, int] = {}

    def accept(creds: Credentials) -> bool:
        seen.append(creds)
        nc = creds.nonce_count or 0
        if nc <= highest.get(creds.nonce, 0):
            return False  # replay
        highest[creds.nonce] = nc
        return True

    def verify(header: str) -> str | None:
        return verify_authorization(header, method="REGISTER", password_lookup=lookup,
                                    realm="sip.test", accept=accept)

    assert verify(first) == "alice"
    assert verify(second) == "alice"
    assert verify(first) is None  # replayed nc
    assert [(c.nonce, c.nc, c.uri) for c in seen] == [
        ("n-42", "00000001", "sip:sip.test"), ("n-42", "00000002", "sip:sip.test"),
        ("n-42", "00000001", "sip:sip.test")]
    assert "response=" not in repr(seen[0])  # no hash in the repr
    wrong = DigestClient("alice", "bad").authorize(challenge, method="REGISTER",
                                                   uri="sip:sip.test")
    assert verify(wrong) is None and len(seen) == 3


def test_make_challenge_formats_a_sip_style_header() -> None:
    """Quoted realm/nonce/opaque/qop, bare algorithm and stale, per RFC 3261 §25.1."""
    assert make_challenge("sip.test", "abc", algorithm="sha-256", opaque="o", stale=True) == (
        'Digest realm="sip.test", nonce="abc", opaque="o", stale=TRUE, algorithm=SHA-256, '
        'qop="auth"'
    )
    with pytest.raises(DigestError):
        make_challenge("r", "n", algorithm="SHA1")


def test_parse_credentials_requires_nc_and_cnonce_with_qop() -> None:
    """qop without a valid 8-hex nc or without cnonce is malformed."""
    base = 'Digest username="a", realm="r", nonce="n", uri="sip:r", response="00", qop=auth'
    with pytest.raises(DigestError):
        parse_credentials(base + ', cnonce="c"')
    with pytest.raises(DigestError):
        parse_credentials(base + ', cnonce="c", nc=1')
    with pytest.raises(DigestError):
        parse_credentials(base + ", nc=00000001")
    creds = parse_credentials(base + ', cnonce="c", nc=0000000A, algorithm=md5')
    assert (creds.nonce_count, creds.algorithm) == (10, "MD5")


@given(st.text(alphabet=st.sampled_from('ab\\"\x00\x09\x0a\x1f\x7f é'), max_size=12))
def test_quoting_takes_plain_values_as_they_are_and_escapes_or_refuses_the_rest(
    value: str,
) -> None:
    """``_quote``'s fast path gives what the escaping path gives, and refuses the same."""
    from sipis.sip import digest

    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
        with pytest.raises(DigestError, match="control character"):
            digest._quote(value, "nonce")
        return
    expected = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert digest._quote(value, "nonce") == expected
