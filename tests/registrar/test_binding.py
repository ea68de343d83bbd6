"""The sans-IO registration machine: what it sends and schedules for each provider answer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.registrar.binding import (
    Binding,
    BindingParams,
    BindingPolicy,
    FailureKind,
    Outcome,
    RegState,
    Schedule,
    SendRegister,
    StatusChanged,
    backoff_delay,
    contact_expires,
    refresh_interval,
)
from sipis.sip.digest import make_challenge, parse_challenge
from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI, Address
from sipis.sip.message import Headers, SipRequest, SipResponse

POLICY = BindingPolicy(refresh_ratio=0.8, backoff_base=30.0, backoff_cap=1800.0,
                       auth_failures_before_give_up=2, user_agent="sipis-test")
CONTACT_URI = URI(scheme="sip", user="tok123", host="127.0.0.1", port=5070,
                  params=(("transport", "udp"),))


def make_binding(seed: int = 1, **kw: object) -> Binding:
    params = BindingParams(
        aor=URI.parse("sip:alice@sip.test"),
        username="alice",
        password="alice-secret-pw",
        registrar=URI.parse("sip:sip.test"),
        contact=Address(uri=CONTACT_URI, params=(("+sip.instance", '"<urn:uuid:1234>"'),)),
        expires=600,
    )
    return Binding(params, POLICY, rng=random.Random(seed), **kw)  # type: ignore[arg-type]


def sends(actions: list[object]) -> list[SipRequest]:
    return [a.request for a in actions if isinstance(a, SendRegister)]


def only_send(actions: list[object]) -> SipRequest:
    found = sends(actions)
    assert len(found) == 1, actions
    return found[0]


def schedules(actions: list[object]) -> list[float | None]:
    return [a.at for a in actions if isinstance(a, Schedule)]


def outcomes(actions: list[object]) -> list[Outcome]:
    return [a for a in actions if isinstance(a, Outcome)]


def respond(request: SipRequest, status: int, reason: str = "",
            extra: list[tuple[str, str]] | None = None) -> SipResponse:
    headers = Headers()
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        assert value is not None
        headers.add(name, value)
    for name, value in extra or []:
        headers.add(name, value)
    return SipResponse(status=status, reason=reason or "X", headers=headers)


def challenge(request: SipRequest, *, nonce: str = "n1", algorithm: str = "MD5",
              stale: bool = False, status: int = 401) -> SipResponse:
    name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
    value = make_challenge("sip.test", nonce, algorithm=algorithm, stale=stale)
    return respond(request, status, "Unauthorized", [(name, value)])


def ok(request: SipRequest, expires: int | None = 120) -> SipResponse:
    contact = str(Address(uri=CONTACT_URI))
    if expires is not None:
        contact += f";expires={expires}"
    return respond(request, 200, "OK", [("Contact", contact)])


def register_fully(b: Binding, now: float = 0.0, expires: int = 120) -> list[object]:
    first = only_send(b.start(now))
    second = only_send(b.on_response(challenge(first), now))
    return b.on_response(ok(second, expires), now)


def test_first_register_carries_aor_contact_and_expires_without_credentials() -> None:
    """The first REGISTER names the AOR in From/To, our Contact with +sip.instance, Expires."""
    b = make_binding()
    req = only_send(b.start(0.0))
    assert req.method == "REGISTER"
    assert str(req.uri) == "sip:sip.test"
    assert req.from_.uri == URI.parse("sip:alice@sip.test")
    assert req.from_.tag
    assert req.to.tag is None
    assert req.headers.get("Expires") == "600"
    assert "+sip.instance" in (req.headers.get("Contact") or "")
    assert "tok123@127.0.0.1:5070" in (req.headers.get("Contact") or "")
    assert req.headers.get("Authorization") is None
    assert req.cseq.seq == 1
    assert b.state == RegState.REGISTERING


def test_401_is_answered_with_digest_credentials_in_the_same_call_id() -> None:
    """A 401 leads to one authenticated REGISTER, CSeq + 1, same Call-ID and From tag."""
    b = make_binding()
    first = only_send(b.start(0.0))
    second = only_send(b.on_response(challenge(first), 0.1))
    assert second.call_id == first.call_id
    assert second.from_.tag == first.from_.tag
    assert second.cseq.seq == first.cseq.seq + 1
    auth = second.headers.get("Authorization") or ""
    assert auth.startswith("Digest ") and 'username="alice"' in auth and "nc=00000001" in auth


def test_407_is_answered_with_proxy_authorization() -> None:
    """A proxy challenge is answered in Proxy-Authorization (RFC 3261 §22.3)."""
    b = make_binding()
    first = only_send(b.start(0.0))
    second = only_send(b.on_response(challenge(first, status=407), 0.1))
    assert second.headers.get("Proxy-Authorization")
    assert second.headers.get("Authorization") is None


def test_sha256_challenge_is_preferred_over_md5() -> None:
    """RFC 8760: with both offered, the SHA-256 challenge is answered."""
    b = make_binding()
    first = only_send(b.start(0.0))
    resp = respond(first, 401, "Unauthorized", [
        ("WWW-Authenticate", make_challenge("sip.test", "n-md5", algorithm="MD5")),
        ("WWW-Authenticate", make_challenge("sip.test", "n-sha", algorithm="SHA-256")),
    ])
    second = only_send(b.on_response(resp, 0.1))
    auth = second.headers.get("Authorization") or ""
    assert "algorithm=SHA-256" in auth and 'nonce="n-sha"' in auth


def test_200_uses_the_expires_granted_for_our_contact_and_schedules_refresh() -> None:
    """The granted expiry is our Contact's expires param; refresh at refresh_ratio of it."""
    b = make_binding()
    actions = register_fully(b, now=10.0, expires=100)
    assert b.state == RegState.REGISTERED
    assert b.granted_expires == 100
    assert schedules(actions)[-1] == pytest.approx(10.0 + 80.0)
    assert outcomes(actions) == [Outcome(True, 200, "OK")]
    assert any(isinstance(a, StatusChanged) and a.state == RegState.REGISTERED for a in actions)


@pytest.mark.parametrize(("granted", "expected"), [
    (600, 480.0), (3600, 2880.0), (20, 15.0), (4, 2.0), (1, 1.0),
])
def test_refresh_keeps_a_margin_before_short_grants_lapse(granted: int, expected: float) -> None:
    """80 % of long grants; short ones keep min(5 s, half the grant) of margin."""
    assert refresh_interval(granted, 0.8) == pytest.approx(expected)


def test_granted_expiry_falls_back_to_the_expires_header() -> None:
    """Without an expires param on our Contact, the Expires header counts."""
    b = make_binding()
    first = only_send(b.start(0.0))
    b.on_response(respond(first, 200, "OK", [("Expires", "45")]), 0.0)
    assert b.granted_expires == 45


def test_refresh_reuses_the_nonce_with_a_growing_nonce_count() -> None:
    """A refresh answers the last challenge again, nc=00000002, before any new 401."""
    b = make_binding()
    register_fully(b, now=0.0, expires=100)
    refresh = only_send(b.on_timer(80.0))
    assert "nc=00000002" in (refresh.headers.get("Authorization") or "")
    assert refresh.cseq.seq == 3
    b.on_response(ok(refresh, 100), 80.1)
    assert b.state == RegState.REGISTERED


def test_423_retries_with_min_expires_and_keeps_the_binding() -> None:
    """423 Interval Too Brief → REGISTER again asking for Min-Expires."""
    b = make_binding()
    first = only_send(b.start(0.0))
    second = only_send(b.on_response(challenge(first), 0.0))
    third = only_send(b.on_response(
        respond(second, 423, "Interval Too Brief", [("Min-Expires", "1800")]), 0.0))
    assert third.headers.get("Expires") == "1800"
    assert third.headers.get("Authorization")
    b.on_response(ok(third, 1800), 0.0)
    assert b.state == RegState.REGISTERED and b.granted_expires == 1800


def test_wrong_password_on_the_first_attempt_is_a_rejection_outcome() -> None:
    """A 401 right after our credentials ends the first attempt: the API answers 422."""
    b = make_binding()
    first = only_send(b.start(0.0))
    second = only_send(b.on_response(challenge(first), 0.0))
    actions = b.on_response(challenge(second, nonce="n2"), 0.0)
    assert sends(actions) == []
    assert outcomes(actions) == [Outcome(False, 401, "401 Unauthorized")]
    assert b.state == RegState.AUTH_FAILED


def test_stale_nonce_is_not_an_auth_failure() -> None:
    """stale=true after our credentials means: the same password with the new nonce."""
    b = make_binding()
    register_fully(b, now=0.0)
    refresh = only_send(b.on_timer(96.0))
    again = only_send(b.on_response(challenge(refresh, nonce="fresh", stale=True), 96.0))
    assert 'nonce="fresh"' in (again.headers.get("Authorization") or "")
    assert b.state == RegState.REGISTERED


def test_repeated_auth_failures_of_a_kept_binding_end_in_auth_failed() -> None:
    """A binding that worked and now keeps being refused goes to auth-failed after N refusals."""
    b = make_binding()
    register_fully(b, now=0.0)
    refresh = only_send(b.on_timer(96.0))
    actions = b.on_response(respond(refresh, 403, "Forbidden"), 96.0)
    assert b.state == RegState.BACKOFF and outcomes(actions) == []
    retry = only_send(b.on_timer(b.next_attempt_at or 0.0))
    b.on_response(respond(retry, 403, "Forbidden"), 200.0)
    assert b.state == RegState.AUTH_FAILED
    assert b.last_error == "403 Forbidden"


def test_timeouts_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    """RFC 5626 §4.5: each failure waits 50–100 % of min(cap, base·2^(n-1))."""
    b = make_binding(seed=7)
    now = 0.0
    only_send(b.start(now))
    delays = []
    for n in range(1, 10):
        actions = b.on_failure(FailureKind.TIMEOUT, "Timer F", now)
        at = schedules(actions)[-1]
        assert at is not None
        delay = at - now
        ceiling = min(1800.0, 30.0 * 2 ** (n - 1))
        assert ceiling * 0.5 <= delay <= ceiling
        delays.append(delay)
        now = at
        only_send(b.on_timer(now))
    assert b.failures == 9 and b.state == RegState.REGISTERING
    assert len(set(delays)) == len(delays)  # jittered


def test_backoff_delay_is_capped() -> None:
    """However many failures, the wait never exceeds the cap."""
    for failures in (1, 5, 20, 500):
        assert backoff_delay(failures, POLICY, lambda: 1.0) <= POLICY.backoff_cap


def test_success_after_backoff_resets_the_failure_count() -> None:
    """Once registered again, the next failure starts from the base delay."""
    b = make_binding()
    only_send(b.start(0.0))
    b.on_failure(FailureKind.TRANSPORT, "refused", 0.0)
    retry = only_send(b.on_timer(b.next_attempt_at or 0.0))
    second = only_send(b.on_response(challenge(retry), 40.0))
    b.on_response(ok(second), 40.0)
    assert b.failures == 0 and b.state == RegState.REGISTERED


def test_unregister_sends_expires_zero_and_ends_unregistered() -> None:
    """unregister() → REGISTER with Expires: 0 for our Contact; its 200 ends the binding."""
    b = make_binding()
    register_fully(b)
    req = only_send(b.unregister(50.0))
    assert req.headers.get("Expires") == "0"
    assert "tok123@" in (req.headers.get("Contact") or "")
    actions = b.on_response(ok(req, None), 50.0)
    assert b.state == RegState.UNREGISTERED
    assert schedules(actions) == [None]


def test_unregister_answers_a_challenge() -> None:
    """A provider that challenges the de-REGISTER gets credentials too."""
    b = make_binding()
    register_fully(b)
    req = only_send(b.unregister(50.0))
    req_with_nonce_gone = b.on_response(challenge(req, nonce="other"), 50.0)
    again = only_send(req_with_nonce_gone)
    assert again.headers.get("Expires") == "0"
    assert 'nonce="other"' in (again.headers.get("Authorization") or "")


def test_unregister_while_a_register_is_in_flight_waits_for_it_then_removes() -> None:
    """If a REGISTER is in flight, the Expires: 0 goes out as soon as it is answered."""
    b = make_binding()
    first = only_send(b.start(0.0))
    assert b.unregister(0.1) == []
    removal = only_send(b.on_response(challenge(first), 0.2))
    assert removal.headers.get("Expires") == "0"
    assert removal.headers.get("Authorization")
    b.on_response(ok(removal, None), 0.3)
    assert b.state == RegState.UNREGISTERED


def test_unregister_of_a_never_registered_binding_sends_nothing() -> None:
    """Nothing can be bound upstream: nothing to remove."""
    b = make_binding()
    only_send(b.start(0.0))
    b.on_failure(FailureKind.TIMEOUT, "Timer F", 32.0)
    assert sends(b.unregister(33.0)) == []
    assert b.state == RegState.UNREGISTERED


def test_flow_lost_registers_again_at_once() -> None:
    """A dropped TCP flow means the provider can't reach us: REGISTER again now."""
    b = make_binding()
    register_fully(b)
    req = only_send(b.on_flow_lost(5.0))
    assert req.headers.get("Expires") == "600"


def test_the_authorization_digest_verifies_for_the_registrar() -> None:
    """What we send is what a registrar checks (round trip through the server helper)."""
    from sipis.sip.digest import verify_authorization

    b = make_binding()
    first = only_send(b.start(0.0))
    second = only_send(b.on_response(challenge(first, algorithm="SHA-256"), 0.0))
    user = verify_authorization(
        second.headers.get("Authorization") or "",
        method="REGISTER",
        password_lookup=lambda u: "alice-secret-pw" if u == "alice" else None,
        realm="sip.test",
    )
    assert user == "alice"
    assert parse_challenge(make_challenge("sip.test", "x", algorithm="SHA-256")).algorithm == \
        "SHA-256"


EVENTS = st.lists(
    st.sampled_from(["200", "401", "401stale", "403", "423", "500", "timeout", "transport",
                     "timer", "flow", "unregister", "start"]),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_any_sequence_of_events_keeps_the_machine_consistent(events: list[str]) -> None:
    """Whatever the provider does, the machine never raises, CSeq only grows, one outcome."""
    b = make_binding()
    now = 0.0
    pending: SipRequest | None = None
    last_cseq = 0
    outcome_count = 0
    for event in events:
        now += 1.0
        actions: list[object]
        if event == "start":
            if b.state != RegState.IDLE:
                continue
            actions = list(b.start(now))
        elif event == "timer":
            actions = list(b.on_timer(now))
        elif event == "flow":
            actions = list(b.on_flow_lost(now))
        elif event == "unregister":
            actions = list(b.unregister(now))
        elif pending is None:
            continue
        elif event in ("timeout", "transport"):
            kind = FailureKind.TIMEOUT if event == "timeout" else FailureKind.TRANSPORT
            pending, actions = None, list(b.on_failure(kind, event, now))
        else:
            req = pending
            pending = None
            if event == "200":
                resp = ok(req)
            elif event == "401":
                resp = challenge(req, nonce=f"n{now}")
            elif event == "401stale":
                resp = challenge(req, nonce=f"n{now}", stale=True)
            elif event == "423":
                resp = respond(req, 423, "Too Brief", [("Min-Expires", "900")])
            else:
                resp = respond(req, int(event), "X")
            actions = list(b.on_response(resp, now))
        new = sends(actions)
        assert len(new) <= 1
        if new:
            assert pending is None, "a second REGISTER while one is in flight"
            pending = new[0]
            assert pending.cseq.seq > last_cseq
            last_cseq = pending.cseq.seq
        outcome_count += len(outcomes(actions))
        assert outcome_count <= 1


# --- the granted expires: the echoed Contact read without parsing its URI -------------------

def _contact_expires_by_parsing(contacts: list[str], ours: URI) -> int | None:
    """The reference: every Contact parsed in full (what contact_expires did before)."""
    for value in contacts:
        try:
            address = Address.parse(value)
        except SipParseError:
            continue
        same = (address.uri.user == ours.user and address.uri.host.lower() == ours.host.lower()
                and (address.uri.port or 5060) == (ours.port or 5060))
        if same:
            expires = address.param("expires")
            if expires is not None and expires.isdigit():
                return int(expires)
    return None


_USERS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.!~*'-]{0,11}", fullmatch=True)
_HOSTS = st.sampled_from(["127.0.0.1", "sipis.example", "SIPIS.example", "[::1]", "10.0.0.7"])
_PARAM_TAILS = st.lists(st.sampled_from([
    ";expires=600", ";Expires=30", ";EXPIRES=0", ";expires", ";expires=abc", ";expires=-1",
    ";expires=0600", ' ; expires = 45', ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-0>"',
    ";reg-id=1", ";q=0.5", ";expires=7;expires=9", ";x=\"a;expires=5\"", ";", ";=1", "junk",
    ">", " ", ";expires=١٢", ";expires=99999999999999999999",
]), max_size=4).map("".join)


@settings(max_examples=400, deadline=None)
@given(user=_USERS, host=_HOSTS, port=st.sampled_from([None, 5060, 5070]),
       uri_params=st.sampled_from(["", ";transport=udp", ";transport=TCP;ob"]),
       data=st.data())
def test_contact_expires_reads_the_echoed_contact_as_parsing_it_would(
        user: str, host: str, port: int | None, uri_params: str, data: st.DataObject) -> None:
    """The fast path (our Contact echoed as ``<our URI>`` then parameters) gives what parsing
    every Contact in full gives, for echoed, re-spelled, foreign and malformed values."""
    ours = URI.parse(f"sip:{user}@{host}{'' if port is None else f':{port}'}{uri_params}")
    shapes = st.sampled_from([
        f"<{ours}>", f" <{ours}>", f"<{ours}> ", f"<sip:{user}@{host.lower()}:{port or 5060}>",
        f"<sip:{user}@{host}>", f"<sip:other@{host}>", f'"Phone" <{ours}>', f"{ours}",
        f"<{ours}", f"<sip:{user}x@{host}>",
    ])
    contacts = data.draw(st.lists(st.tuples(shapes, _PARAM_TAILS).map("".join), max_size=3))
    assert contact_expires(contacts, ours) == _contact_expires_by_parsing(contacts, ours)
