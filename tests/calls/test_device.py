"""The device registrar: digest from stored HA1s, stateless nonces, RFC 3261 §10.3 bindings."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.calls.device import (
    DIGEST_ALGORITHMS,
    BindingChange,
    BindingChangeKind,
    DeviceBinding,
    DeviceBindings,
    DeviceRegistrar,
    NonceIssuer,
    NonceStatus,
    RegisterResult,
    SourceInfo,
    device_ha1,
    device_ha1s,
    verify_authorization_ha1,
)
from sipis.sip.digest import (
    Challenge,
    DigestClient,
    choose_challenge,
    parse_challenge,
    verify_authorization,
)
from sipis.sip.headers import URI, Address
from sipis.sip.message import Headers, SipRequest, SipResponse

REALM = "sipis.test"
IID = "inst-7f3a"
SECRET = "0123456789abcdefghijABCDEFGHIJ_-klmnopqrs"
KEY = b"k" * 32
UDP = SourceInfo("udp", "203.0.113.5", 40000)
CONTACT = "<sip:dev@10.0.0.2:5060>"


def store(*secrets: tuple[str, str]) -> dict[str, dict[str, str]]:
    return {user: device_ha1s(secret, user, REALM) for user, secret in secrets}


HA1S = store((IID, SECRET), ("other", "other-secret"))


def lookup(user: str, algorithm: str) -> str | None:
    return HA1S.get(user, {}).get(algorithm)


def registrar(**kwargs: object) -> DeviceRegistrar:
    return DeviceRegistrar(REALM, nonce_issuer=NonceIssuer(KEY), ha1_lookup=lookup,
                           **kwargs)  # type: ignore[arg-type]


def register(
    *,
    contacts: tuple[str, ...] = (CONTACT,),
    expires: str | None = None,
    call_id: str = "reg-1",
    cseq: int = 1,
    to_user: str = IID,
    auth: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
    uri: str = "sip:sipis.test",
) -> SipRequest:
    headers = Headers([
        ("Via", "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKr;rport=40000;received=203.0.113.5"),
        ("From", f"<sip:{IID}@sipis.test>;tag=f1"),
        ("To", f"<sip:{to_user}@sipis.test>"),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} REGISTER"),
    ])
    for contact in contacts:
        headers.add("Contact", contact)
    if expires is not None:
        headers.add("Expires", expires)
    for name, value in extra:
        headers.add(name, value)
    if auth is not None:
        headers.add("Authorization", auth)
    return SipRequest("REGISTER", URI.parse(uri), headers)


def challenges(response: SipResponse) -> list[Challenge]:
    return [parse_challenge(v) for v in response.headers.get_all("WWW-Authenticate")]


class Device:
    """An app registering with its instance id and secret, answering 401s like a real UA."""

    def __init__(self, reg: DeviceRegistrar, *, user: str = IID, secret: str = SECRET,
                 source: SourceInfo = UDP) -> None:
        self.reg = reg
        self.client = DigestClient(user, secret)
        self.source = source
        self.challenge: Challenge | None = None
        self.cseq = 0

    def send(self, now: float = 1000.0, **kwargs: object) -> RegisterResult:
        """REGISTER; on 401 answer the challenge once (like a UA) and return that result."""
        for _ in range(2):
            self.cseq += 1
            auth = None
            if self.challenge is not None:
                auth = self.client.authorize(self.challenge, method="REGISTER",
                                             uri="sip:sipis.test")
            request = register(cseq=self.cseq, auth=auth, **kwargs)  # type: ignore[arg-type]
            result = self.reg.handle_register(request, self.source, now)
            if result.response.status != 401:
                return result
            self.challenge = choose_challenge(challenges(result.response))
        return result


# --- HA1 --------------------------------------------------------------------------------------


def test_device_ha1_is_the_hash_of_username_realm_secret() -> None:
    """HA1 = H(username:realm:secret) in lower-case hex, for MD5 and SHA-256."""
    a1 = f"{IID}:{REALM}:{SECRET}".encode()
    assert device_ha1(SECRET, IID, REALM, "MD5") == hashlib.md5(a1).hexdigest()
    assert device_ha1(SECRET, IID, REALM, "sha-256") == hashlib.sha256(a1).hexdigest()
    assert device_ha1s(SECRET, IID, REALM) == {
        "SHA-256": hashlib.sha256(a1).hexdigest(), "MD5": hashlib.md5(a1).hexdigest()}
    with pytest.raises(ValueError, match="unsupported"):
        device_ha1(SECRET, IID, REALM, "SHA-1")


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "MD5-sess", "SHA-256-sess"])
@pytest.mark.parametrize("qop", ["auth", "auth-int"])
def test_ha1_verification_agrees_with_password_verification(algorithm: str, qop: str) -> None:
    """What the client computes from the secret verifies from the stored HA1 alone, exactly
    as digest.verify_authorization does from the password."""
    challenge = Challenge(realm=REALM, nonce="n0nce", algorithm=algorithm, qop=(qop,))
    header = DigestClient(IID, SECRET).authorize(challenge, method="REGISTER",
                                                 uri="sip:sipis.test", body=b"body")
    algorithms = [algorithm]
    assert verify_authorization(header, method="REGISTER", realm=REALM, body=b"body",
                                password_lookup={IID: SECRET}.get,
                                algorithms=algorithms) == IID
    assert verify_authorization_ha1(header, method="REGISTER", realm=REALM, body=b"body",
                                    ha1_lookup=lookup, algorithms=algorithms) == IID
    assert verify_authorization_ha1(header, method="REGISTER", realm=REALM, body=b"other",
                                    ha1_lookup=lookup, algorithms=algorithms) == (
        None if qop == "auth-int" else IID)


def test_ha1_verification_refuses_wrong_secret_realm_algorithm_and_unknown_users() -> None:
    """Wrong secret, an algorithm we did not offer, another realm, an unknown user, userhash,
    or a refusing accept callback: None."""
    md5 = Challenge(realm=REALM, nonce="n", algorithm="MD5", qop=("auth",))

    def header(user: str = IID, secret: str = SECRET, challenge: Challenge = md5) -> str:
        return DigestClient(user, secret).authorize(challenge, method="REGISTER", uri="sip:x")

    def verify(value: str, **kwargs: object) -> str | None:
        return verify_authorization_ha1(value, method="REGISTER", realm=REALM,
                                        ha1_lookup=lookup, **kwargs)  # type: ignore[arg-type]

    assert verify(header()) == IID
    assert verify(header(secret="guess")) is None
    assert verify(header(user="nobody")) is None
    assert verify(header(), algorithms=["SHA-256"]) is None
    assert verify(header(challenge=Challenge(realm="elsewhere", nonce="n", qop=("auth",)))) is None
    assert verify(header(challenge=Challenge(realm=REALM, nonce="n", qop=("auth",),
                                             userhash=True))) is None
    assert verify(header(), accept=lambda creds: False) is None
    assert verify("Basic Zm9vOmJhcg==") is None
    assert verify("Digest username=") is None


@given(st.text(max_size=200))
def test_ha1_verification_never_raises_on_garbage(value: str) -> None:
    """Whatever the Authorization header holds, verification answers None, never raises."""
    assert verify_authorization_ha1(value, method="REGISTER", realm=REALM,
                                    ha1_lookup=lookup) is None


# --- nonces -----------------------------------------------------------------------------------


def test_nonces_are_unique_and_valid_for_their_realm_until_the_lifetime() -> None:
    """A fresh nonce is VALID; after ``lifetime`` STALE; for another realm, another key,
    or mangled: INVALID; two nonces of the same instant differ."""
    issuer = NonceIssuer(KEY, lifetime=300)
    nonce = issuer.issue(REALM, 100.0)
    assert nonce != issuer.issue(REALM, 100.0)
    assert issuer.status(nonce, REALM, 100.0) is NonceStatus.VALID
    assert issuer.status(nonce, REALM, 400.0) is NonceStatus.VALID
    assert issuer.status(nonce, REALM, 400.1) is NonceStatus.STALE
    assert issuer.status(nonce, "other.realm", 101.0) is NonceStatus.INVALID
    assert NonceIssuer(b"x" * 32).status(nonce, REALM, 101.0) is NonceStatus.INVALID
    assert issuer.status(nonce[:-2] + "AA", REALM, 101.0) is NonceStatus.INVALID
    for junk in ("", "!!!", "é", "A" * 43, "A" * 500):
        assert issuer.status(junk, REALM, 101.0) is NonceStatus.INVALID


def test_nonce_from_the_future_is_invalid() -> None:
    """A nonce dated more than ``max_skew`` ahead was not issued by this clock."""
    issuer = NonceIssuer(KEY, max_skew=5)
    nonce = issuer.issue(REALM, 1000.0)
    assert issuer.status(nonce, REALM, 996.0) is NonceStatus.VALID
    assert issuer.status(nonce, REALM, 994.0) is NonceStatus.INVALID


def test_nonce_issuer_rejects_weak_configuration() -> None:
    """A short key or a non-positive lifetime is a configuration error."""
    with pytest.raises(ValueError, match="16 bytes"):
        NonceIssuer(b"short")
    with pytest.raises(ValueError, match="positive"):
        NonceIssuer(KEY, lifetime=0)


def test_nc_must_grow_per_user_and_nonce() -> None:
    """nc 1, 2, 5 pass; a repeat or a step back fails; another user of the same nonce
    counts on its own."""
    issuer = NonceIssuer(KEY)
    nonce = issuer.issue(REALM, 0.0)
    assert [issuer.accept_nc(nonce, "u", nc, 1.0) for nc in (1, 2, 5)] == [True] * 3
    assert not issuer.accept_nc(nonce, "u", 5, 1.0)
    assert not issuer.accept_nc(nonce, "u", 3, 1.0)
    assert issuer.accept_nc(nonce, "v", 1, 1.0)
    assert not issuer.accept_nc(nonce, "v", 0, 1.0)
    assert not issuer.accept_nc("garbage", "v", 9, 1.0)


def test_replay_table_forgets_expired_nonces() -> None:
    """Entries of nonces past their lifetime leave the table."""
    issuer = NonceIssuer(KEY, lifetime=10)
    old = issuer.issue(REALM, 0.0)
    issuer.accept_nc(old, "u", 1, 1.0)
    assert issuer.tracked == 1
    fresh = issuer.issue(REALM, 20.0)
    issuer.accept_nc(fresh, "u", 1, 20.0)
    assert issuer.tracked == 1


def test_full_replay_table_refuses_nonces_it_may_have_forgotten() -> None:
    """When the table overflows, the oldest entry goes, and every nonce issued up to its time
    is refused from then on, so an evicted nonce cannot be replayed; newer ones still work."""
    issuer = NonceIssuer(KEY, max_tracked=2)
    n1, n2, n3 = (issuer.issue(REALM, t) for t in (1.0, 2.0, 3.0))
    assert issuer.accept_nc(n1, "u", 1, 4.0)
    assert issuer.accept_nc(n2, "u", 1, 4.0)
    assert issuer.accept_nc(n3, "u", 1, 4.0)  # evicts n1
    assert issuer.tracked == 2
    assert not issuer.accept_nc(n1, "u", 2, 4.0)  # forgotten: refused, not replayable
    assert issuer.accept_nc(n3, "u", 2, 4.0)
    n4 = issuer.issue(REALM, 5.0)
    assert issuer.accept_nc(n4, "u", 1, 5.0)


# --- authentication ---------------------------------------------------------------------------


def test_register_without_credentials_is_challenged_sha256_first_then_md5() -> None:
    """401 with two challenges (SHA-256, MD5; RFC 8760 order), qop=auth, one shared nonce,
    not stale, a To tag, and no binding."""
    reg = registrar()
    result = reg.handle_register(register(), UDP, 1000.0)
    assert result.response.status == 401
    assert result.changes == [] and result.instance_id is None
    found = challenges(result.response)
    assert [c.algorithm for c in found] == list(DIGEST_ALGORITHMS) == ["SHA-256", "MD5"]
    assert all(c.qop == ("auth",) and not c.stale and c.realm == REALM for c in found)
    assert len({c.nonce for c in found}) == 1
    assert result.response.to.tag
    assert len(reg.bindings) == 0


def test_authenticated_register_binds_the_source_address_and_flow_not_the_contact_host() -> None:
    """200 lists the contact with its expiry; the binding sends to where the REGISTER came
    from (NAT), keeps the Contact as Request-URI, and is reported ADDED."""
    reg = registrar()
    tcp = SourceInfo("TCP", "198.51.100.7", 51234, flow="flow-1")
    result = Device(reg, source=tcp).send(now=1000.0, expires="600")
    assert result.response.status == 200
    assert result.instance_id == IID
    assert result.response.headers.get_all("Contact") == ["<sip:dev@10.0.0.2:5060>;expires=600"]
    [change] = result.changes
    assert change.kind is BindingChangeKind.ADDED and change.kind.reachable
    binding = change.binding
    assert binding.source == ("198.51.100.7", 51234, "tcp")
    assert (binding.host, binding.port, binding.transport) == ("198.51.100.7", 51234, "tcp")
    assert binding.flow == "flow-1"
    assert binding.contact == URI.parse("sip:dev@10.0.0.2:5060")
    assert binding.expires_at == 1600.0
    assert (binding.call_id, binding.cseq, binding.instance_id) == ("reg-1", 2, IID)
    assert reg.bindings.live(IID, 1000.0) == [binding]


def test_md5_credentials_are_accepted_too() -> None:
    """A client that only does MD5 answers the MD5 challenge and is registered."""
    reg = registrar()
    first = reg.handle_register(register(), UDP, 0.0)
    md5 = next(c for c in challenges(first.response) if c.algorithm == "MD5")
    auth = DigestClient(IID, SECRET).authorize(md5, method="REGISTER", uri="sip:sipis.test")
    result = reg.handle_register(register(cseq=2, auth=auth), UDP, 1.0)
    assert result.response.status == 200


def test_wrong_secret_or_unknown_instance_is_challenged_again_not_stale() -> None:
    """Bad credentials get a new 401 without stale, and no binding."""
    for user, secret in ((IID, "wrong"), ("ghost", SECRET)):
        reg = registrar()
        result = Device(reg, user=user, secret=secret).send(to_user=user)
        assert result.response.status == 401
        assert not any(c.stale for c in challenges(result.response))
        assert len(reg.bindings) == 0


def test_to_must_name_the_authenticated_instance() -> None:
    """Credentials of one instance cannot register another AOR: 403 (§10.3 step 4)."""
    reg = registrar()
    result = Device(reg).send(to_user="other")
    assert result.response.status == 403
    assert result.instance_id == IID
    assert len(reg.bindings) == 0


def test_expired_nonce_with_right_credentials_is_answered_stale() -> None:
    """After the nonce lifetime the right credentials get 401 stale=true with a new nonce,
    and the client gets through with it at once."""
    reg = registrar()
    device = Device(reg)
    assert device.send(now=0.0).response.status == 200
    assert device.challenge is not None
    old_nonce = device.challenge.nonce
    device.cseq += 1
    auth = device.client.authorize(device.challenge, method="REGISTER", uri="sip:sipis.test")
    result = reg.handle_register(register(cseq=device.cseq, auth=auth), UDP, 1000.0)
    assert result.response.status == 401
    found = challenges(result.response)
    assert all(c.stale for c in found) and found[0].nonce != old_nonce
    device.challenge = choose_challenge(found)
    assert device.send(now=1000.0).response.status == 200


def test_forged_nonce_gets_a_plain_challenge() -> None:
    """A nonce we never issued (another key) is not stale: plain 401."""
    reg = registrar()
    foreign = NonceIssuer(b"z" * 32).issue(REALM, 0.0)
    challenge = Challenge(realm=REALM, nonce=foreign, algorithm="SHA-256", qop=("auth",))
    auth = DigestClient(IID, SECRET).authorize(challenge, method="REGISTER",
                                               uri="sip:sipis.test")
    result = reg.handle_register(register(auth=auth), UDP, 1.0)
    assert result.response.status == 401
    assert not any(c.stale for c in challenges(result.response))


def test_replayed_request_is_refused_and_nonce_reuse_with_growing_nc_is_not() -> None:
    """The same Authorization twice: the second is refused (stale, so an honest client just
    retries). A refresh on the same nonce with the next nc passes without a new 401."""
    reg = registrar()
    device = Device(reg)
    assert device.send(now=10.0).response.status == 200
    assert device.challenge is not None
    auth = device.client.authorize(device.challenge, method="REGISTER", uri="sip:sipis.test")
    fresh = reg.handle_register(register(cseq=10, auth=auth), UDP, 11.0)
    assert fresh.response.status == 200  # nc 2 on the same nonce
    replay = reg.handle_register(register(cseq=11, auth=auth), UDP, 12.0)
    assert replay.response.status == 401
    assert all(c.stale for c in challenges(replay.response))


def test_credentials_for_another_request_uri_are_refused() -> None:
    """The digest uri must name the Request-URI (parameters aside)."""
    reg = registrar()
    nonce_response = reg.handle_register(register(), UDP, 0.0)
    challenge = challenges(nonce_response.response)[0]
    client = DigestClient(IID, SECRET)
    good = client.authorize(challenge, method="REGISTER", uri="sip:SIPIS.test")
    assert reg.handle_register(register(cseq=2, auth=good, uri="sip:sipis.test;transport=tcp"),
                               UDP, 1.0).response.status == 200
    for digest_uri in ("sip:elsewhere.test", "not a uri"):
        bad = client.authorize(challenge, method="REGISTER", uri=digest_uri)
        assert reg.handle_register(register(cseq=3, auth=bad), UDP, 1.0).response.status == 401


def test_unsupported_require_is_420_before_authentication() -> None:
    """Require: outbound is fine; anything else → 420 with Unsupported (§8.2.2.3)."""
    reg = registrar()
    result = reg.handle_register(register(extra=(("Require", "outbound, 100rel, path"),)),
                                 UDP, 0.0)
    assert result.response.status == 420
    assert result.response.headers.get("Unsupported") == "100rel, path"
    result = reg.handle_register(register(extra=(("Require", "outbound"),)), UDP, 0.0)
    assert result.response.status == 401


def test_non_register_is_a_caller_bug() -> None:
    """handle_register takes REGISTERs only."""
    request = register()
    request.method = "OPTIONS"
    with pytest.raises(ValueError, match="REGISTER"):
        registrar().handle_register(request, UDP, 0.0)


# --- contacts and expiry ----------------------------------------------------------------------


def test_expiry_comes_from_param_then_header_then_default_capped_at_max() -> None:
    """expires param beats the Expires header; with neither the default applies; values above
    max_expires are capped; a malformed value counts as absent."""
    cases: list[tuple[dict[str, object], int]] = [
        ({"contacts": ("<sip:a@h>;expires=120",), "expires": "900"}, 120),
        ({"contacts": ("<sip:a@h>",), "expires": "900"}, 900),
        ({"contacts": ("<sip:a@h>",)}, 3600),
        ({"contacts": ("<sip:a@h>",), "expires": "999999999"}, 3600),
        ({"contacts": ("<sip:a@h>;expires=soon",), "expires": "bad"}, 3600),
    ]
    for kwargs, granted in cases:
        result = Device(registrar()).send(now=0.0, **kwargs)
        assert result.response.status == 200, kwargs
        assert result.changes[0].binding.expires_at == granted, kwargs
        assert result.response.headers.get("Contact") == f"<sip:a@h>;expires={granted}"


def test_too_short_expiry_is_423_with_min_expires() -> None:
    """0 < expires < min_expires → 423 Interval Too Brief naming Min-Expires; no binding."""
    reg = registrar(min_expires=60)
    result = Device(reg).send(expires="30")
    assert result.response.status == 423
    assert result.response.headers.get("Min-Expires") == "60"
    assert len(reg.bindings) == 0


def test_expires_zero_removes_that_contact_only() -> None:
    """Expires 0 on one contact removes it (REMOVED) and leaves the others."""
    reg = registrar()
    device = Device(reg)
    device.send(now=0.0, contacts=("<sip:a@h>", "<sip:b@h>"))
    result = device.send(now=5.0, contacts=("<sip:a@h>;expires=0",))
    assert result.response.status == 200
    assert [(c.kind, str(c.binding.contact)) for c in result.changes] == [
        (BindingChangeKind.REMOVED, "sip:a@h")]
    assert result.response.headers.get_all("Contact") == ["<sip:b@h>;expires=3595"]
    assert not result.changes[0].kind.reachable


def test_wildcard_with_expires_zero_removes_every_binding() -> None:
    """Contact: * with Expires: 0 removes all bindings of the instance."""
    reg = registrar()
    device = Device(reg)
    device.send(now=0.0, contacts=("<sip:a@h>", "<sip:b@h>"))
    result = device.send(now=1.0, contacts=("*",), expires="0")
    assert result.response.status == 200
    assert {c.kind for c in result.changes} == {BindingChangeKind.REMOVED}
    assert len(result.changes) == 2
    assert result.response.headers.get_all("Contact") == []
    assert reg.bindings.live(IID, 1.0) == []


@pytest.mark.parametrize(("contacts", "expires"), [
    (("*",), "60"),
    (("*",), None),
    (("*", "<sip:a@h>"), "0"),
    (("<sip:a@h", ), None),
    (("<tel:+4930123>",), None),
    (("<sip:a@h>;+sip.instance=\"<urn:uuid:1>\";reg-id=0",), None),
    (("<sip:a@h>;+sip.instance=\"<urn:uuid:1>\";reg-id=1",
      "<sip:b@h>;+sip.instance=\"<urn:uuid:1>\";reg-id=2"), None),
])
def test_malformed_contacts_are_400_and_change_nothing(
    contacts: tuple[str, ...], expires: str | None
) -> None:
    """Wildcard misuse, unparsable or non-SIP Contacts, bad or repeated reg-id: 400."""
    reg = registrar()
    result = Device(reg).send(contacts=contacts, expires=expires)
    assert result.response.status == 400
    assert result.changes == [] and len(reg.bindings) == 0


def test_register_without_contact_lists_the_bindings() -> None:
    """A query (no Contact) changes nothing and lists what is bound."""
    reg = registrar()
    device = Device(reg)
    device.send(now=0.0)
    result = device.send(now=100.0, contacts=())
    assert result.response.status == 200
    assert result.changes == []
    assert result.response.headers.get_all("Contact") == [f"{CONTACT};expires=3500"]


def test_lower_or_equal_cseq_in_the_same_call_id_fails_and_commits_nothing() -> None:
    """§10.3 step 7: an out-of-order REGISTER of the same Call-ID is refused with 500 and none
    of its contacts is applied; another Call-ID may update."""
    reg = registrar()
    device = Device(reg)
    device.send(now=0.0, contacts=("<sip:a@h>",))  # written with CSeq 2
    assert device.challenge is not None
    auth = device.client.authorize(device.challenge, method="REGISTER", uri="sip:sipis.test")
    stale = register(cseq=2, auth=auth, contacts=("<sip:new@h>", "<sip:a@h>"))
    result = reg.handle_register(stale, UDP, 1.0)
    assert result.response.status == 500
    assert [str(b.contact) for b in reg.bindings.live(IID, 1.0)] == ["sip:a@h"]
    auth = device.client.authorize(device.challenge, method="REGISTER", uri="sip:sipis.test")
    other = register(cseq=1, call_id="reg-2", auth=auth, contacts=("<sip:a@h>",))
    result = reg.handle_register(other, UDP, 2.0)
    assert result.response.status == 200
    assert [c.kind for c in result.changes] == [BindingChangeKind.REFRESHED]
    assert result.changes[0].binding.call_id == "reg-2"


def test_wildcard_with_out_of_order_cseq_fails() -> None:
    """Contact: * checks the CSeq order against every binding of the same Call-ID."""
    reg = registrar()
    device = Device(reg)
    device.send(now=0.0)
    assert device.challenge is not None
    auth = device.client.authorize(device.challenge, method="REGISTER", uri="sip:sipis.test")
    result = reg.handle_register(register(cseq=1, auth=auth, contacts=("*",), expires="0"),
                                 UDP, 1.0)
    assert result.response.status == 500
    assert len(reg.bindings) == 1


def test_same_contact_reregistering_is_a_refresh_from_the_new_source() -> None:
    """A contact registering again is REFRESHED (reachable) and moves to the new source."""
    reg = registrar()
    Device(reg).send(now=0.0)
    moved = SourceInfo("udp", "192.0.2.99", 5999)
    result = Device(reg, source=moved).send(now=50.0, call_id="reg-new")
    [change] = result.changes
    assert change.kind is BindingChangeKind.REFRESHED and change.kind.reachable
    assert change.binding.source == ("192.0.2.99", 5999, "udp")
    assert len(reg.bindings) == 1


def test_outbound_instance_and_reg_id_replace_the_binding_from_a_new_contact() -> None:
    """RFC 5626: with +sip.instance and reg-id the binding is keyed by them, so a new
    Contact on a new flow replaces the old one; the 200 requires outbound and echoes both."""
    reg = registrar()
    urn = "urn:uuid:00000000-0000-1000-8000-000A95A0E128"
    first = f'<sip:dev@10.0.0.2:5060;transport=tcp>;+sip.instance="<{urn}>";reg-id=1'
    second = f'<sip:dev@10.9.9.9:6000;transport=tcp>;+sip.instance="<{urn}>";reg-id=1'
    Device(reg, source=SourceInfo("tcp", "198.51.100.1", 1111, flow="f1")).send(
        now=0.0, contacts=(first,))
    result = Device(reg, source=SourceInfo("tcp", "198.51.100.1", 2222, flow="f2")).send(
        now=1.0, contacts=(second,), call_id="reg-b")
    [change] = result.changes
    assert change.kind is BindingChangeKind.REFRESHED
    assert (change.binding.instance_urn, change.binding.reg_id) == (urn, 1)
    assert change.binding.flow == "f2"
    [binding] = reg.bindings.live(IID, 1.0)
    assert binding.contact.host == "10.9.9.9"
    assert result.response.headers.get("Require") == "outbound"
    contact = Address.parse(result.response.headers.get_all("Contact")[0])
    assert contact.param("+sip.instance") == f'"<{urn}>"'
    assert contact.param("reg-id") == "1"


def test_more_contacts_than_allowed_is_403_and_commits_nothing() -> None:
    """max_contacts live bindings per instance; one more → 403, nothing changes."""
    reg = registrar(max_contacts=2)
    device = Device(reg)
    assert device.send(contacts=("<sip:a@h>", "<sip:b@h>")).response.status == 200
    result = device.send(contacts=("<sip:c@h>",))
    assert result.response.status == 403
    assert len(reg.bindings) == 2


def test_lapsed_bindings_are_reported_expired_by_the_next_register() -> None:
    """A binding past its expiry does not count, and the next REGISTER reports it EXPIRED."""
    reg = registrar()
    device = Device(reg)
    device.send(now=0.0, contacts=("<sip:a@h>;expires=60",))
    result = device.send(now=100.0, contacts=("<sip:b@h>",))
    assert [(c.kind, str(c.binding.contact)) for c in result.changes] == [
        (BindingChangeKind.EXPIRED, "sip:a@h"), (BindingChangeKind.ADDED, "sip:b@h")]
    assert result.response.headers.get_all("Contact") == ["<sip:b@h>;expires=3600"]


# --- the binding table ------------------------------------------------------------------------


def binding(contact: str, *, iid: str = IID, at: float = 0.0, expires: float = 100.0,
            flow: object | None = None) -> DeviceBinding:
    return DeviceBinding(instance_id=iid, contact=URI.parse(contact),
                         source=("192.0.2.1", 5060, "udp" if flow is None else "tcp"),
                         flow=flow, expires_at=at + expires, call_id="c", cseq=1,
                         registered_at=at)


def table(*bindings: DeviceBinding) -> DeviceBindings:
    t = DeviceBindings()
    by_instance: dict[str, dict[tuple[str, ...], DeviceBinding]] = {}
    for b in bindings:
        by_instance.setdefault(b.instance_id, {})[b.key] = b
    for iid, entries in by_instance.items():
        t.replace(iid, entries)
    return t


def test_live_lists_unexpired_bindings_newest_first() -> None:
    """live() skips lapsed bindings and puts the latest registration first."""
    old, new = binding("sip:a@h", at=0.0), binding("sip:b@h", at=50.0)
    t = table(old, new, binding("sip:c@h", iid="x"))
    assert t.live(IID, 60.0) == [new, old]
    assert t.live(IID, 120.0) == [new]
    assert t.live("nobody", 0.0) == []
    assert t.next_expiry() == 100.0


def test_expire_removes_lapsed_bindings_and_reports_them() -> None:
    """expire(now) drops bindings whose time is up, as EXPIRED changes."""
    old, new = binding("sip:a@h", at=0.0), binding("sip:b@h", at=50.0)
    t = table(old, new)
    assert t.expire(99.0) == []
    assert t.expire(100.0) == [BindingChange(BindingChangeKind.EXPIRED, old)]
    assert t.expire(200.0) == [BindingChange(BindingChangeKind.EXPIRED, new)]
    assert len(t) == 0 and t.next_expiry() is None


def test_closed_flow_and_wiped_instance_drop_their_bindings() -> None:
    """remove_flow drops only bindings on that flow; remove_instance drops the rest."""
    on_flow = binding("sip:a@h", flow="f1")
    other_flow = binding("sip:b@h", flow="f2")
    udp = binding("sip:c@h")
    t = table(on_flow, other_flow, udp)
    assert t.remove_flow("f1") == [BindingChange(BindingChangeKind.DROPPED, on_flow)]
    assert t.remove_flow("f1") == []
    assert {c.binding for c in t.remove_instance(IID)} == {other_flow, udp}
    assert len(t) == 0
    assert t.remove_instance(IID) == []


def test_binding_remaining_seconds_round_up() -> None:
    """The 200's expires is the whole seconds left, never negative."""
    b = binding("sip:a@h", expires=100.0)
    assert b.remaining(0.0) == 100
    assert b.remaining(0.5) == 100
    assert b.remaining(99.9) == 1
    assert b.remaining(150.0) == 0
