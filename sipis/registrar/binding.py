"""One upstream registration, sans-IO: REGISTER, authenticate, refresh, back off, unREGISTER.

Strategy: the machine owns everything RFC 3261 §10.2 and RFC 5626 §4.5 say about *what* to send
and *when*, and nothing about *how*: it takes events (``start``, ``on_response``, ``on_failure``,
``on_timer``, ``on_flow_lost``, ``unregister``) with an explicit ``now`` and returns actions
(``SendRegister``, ``Schedule``, ``StatusChanged``, ``Outcome``). The keeper (trio) executes them.

Rules:
- One Call-ID and From tag for the life of the binding; CSeq grows by one per REGISTER (§10.2.4).
- 401/407 → answer the best challenge (RFC 8760: SHA-256 before MD5). A second challenge right
  after we authenticated counts as an auth failure unless it says ``stale=true``.
- 423 → ask again with the registrar's Min-Expires (at most ``MAX_423_RETRIES`` times).
- 2xx → the granted expiry is our Contact's ``expires`` param, else the Expires header, else what
  we asked; refresh at ``refresh_ratio`` of it.
- timeout, transport error, 408/480/5xx/6xx (but 403/404), flow lost → backoff: wait a random
  time between 50 % and 100 % of min(cap, base · 2^failures) (RFC 5626 §4.5), then try again.
- 403, 404 and repeated auth failures → state ``auth-failed``; retried only at the backoff cap,
  since the provider's answer will not change by itself (the lifetime sweeper ends it later).
- ``unregister`` → one REGISTER with Expires: 0 (authenticated if the provider challenges),
  then ``unregistered``; a failure there is final too (best effort: we are forgetting it).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from sipis import fastenum
from sipis.sip.digest import Challenge, DigestClient, choose_challenge, parse_challenge
from sipis.sip.errors import DigestError, SipParseError
from sipis.sip.headers import URI, Address, param_value, parse_header_params
from sipis.sip.message import Headers, SipRequest, SipResponse, new_call_id, new_tag

#: How many 423s in a row we follow before treating the registrar as broken.
MAX_423_RETRIES = 3
#: Shortest refresh interval we schedule, whatever the registrar grants (seconds).
MIN_REFRESH_INTERVAL = 1.0
#: Least time (seconds) a refresh leaves before the binding would lapse (for short grants).
REFRESH_MIN_MARGIN = 5.0
#: Max-Forwards on every REGISTER (RFC 3261 §8.1.1.6 recommends 70).
MAX_FORWARDS = "70"


class RegState(fastenum.Enum):
    """What the API shows as ``registration.state``."""

    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    BACKOFF = "backoff"
    AUTH_FAILED = "auth-failed"
    UNREGISTERING = "unregistering"
    UNREGISTERED = "unregistered"


class FailureKind(fastenum.Enum):
    """Why a REGISTER got no response (the driver's view of the transaction)."""

    TIMEOUT = "timeout"
    TRANSPORT = "transport-error"
    RESOLVE = "resolve-error"


@attrs.frozen
class BindingPolicy:
    """Knobs from the ``registrar`` config section that shape every binding."""

    refresh_ratio: float = 0.8
    backoff_base: float = 30.0
    backoff_cap: float = 1800.0
    auth_failures_before_give_up: int = 2
    user_agent: str = "sipis"


@attrs.frozen
class BindingParams:
    """What one upstream registration registers: the instance's account and our Contact."""

    aor: URI
    username: str
    password: str = attrs.field(repr=False)
    registrar: URI  # Request-URI of the REGISTER (RFC 3261 §10.2: the domain of the AOR by default)
    contact: Address  # our Contact, with +sip.instance
    expires: int


# -- actions ---------------------------------------------------------------------------------


@attrs.frozen
class SendRegister:
    """Send this REGISTER in a new client transaction and report its outcome."""

    request: SipRequest


@attrs.frozen
class Schedule:
    """Call ``on_timer`` at ``at`` (replaces any earlier schedule); None cancels it."""

    at: float | None


@attrs.frozen
class StatusChanged:
    """The visible state changed: persist it and show it in the API."""

    state: RegState
    last_error: str | None
    next_attempt_at: float | None
    granted_expires: int | None
    last_registered_at: float | None


@attrs.frozen
class Outcome:
    """The first attempt's result, for the API's create call to wait on.

    ``status`` is the provider's final status (None for a timeout or transport error);
    ``registered`` says whether the binding is up.
    """

    registered: bool
    status: int | None
    reason: str
    failure: FailureKind | None = None


Action = SendRegister | Schedule | StatusChanged | Outcome


class Binding:
    """The registration state machine for one instance. See the module docstring for rules."""

    def __init__(
        self,
        params: BindingParams,
        policy: BindingPolicy,
        *,
        rng: random.Random | None = None,
        call_id: str | None = None,
        from_tag: str | None = None,
        report_outcome: bool = True,
    ) -> None:
        self.params = params
        self.policy = policy
        self._rng = rng or random.Random()  # noqa: S311 — jitter, not secrecy
        self.call_id = call_id or new_call_id()
        self.from_tag = from_tag or new_tag()
        self._cseq = 0
        self._digest = DigestClient(params.username, params.password)
        self._expires = params.expires
        self.state = RegState.IDLE
        self.failures = 0
        self._auth_failures = 0
        self._authenticated_attempt = False  # the last REGISTER carried credentials
        # The challenge the next REGISTER answers (kept parsed: a refresh reuses it).
        self._last_challenge: Challenge | None = None
        # The header lines every REGISTER of this binding shares, built once per params and
        # kept while a registration is under way (a challenge needs a second REGISTER).
        self._template: tuple[BindingParams, str, Headers, str] | None = None
        self._retries_423 = 0
        self._in_flight = False
        self._inflight_unregister = False
        self._unregister_rechallenged = False
        self._unregistering = False
        self._outcome_sent = not report_outcome  # nobody waits on an adopted binding
        self.last_error: str | None = None
        self.next_attempt_at: float | None = None
        self.granted_expires: int | None = None
        self.last_registered_at: float | None = None

    # -- inputs -----------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin (or resume after ``unregister``): send the first REGISTER now."""
        self._unregistering = False
        self._authenticated_attempt = False
        self._last_challenge = None
        return self._send(now, RegState.REGISTERING)

    def on_timer(self, now: float) -> list[Action]:
        """A refresh or retry is due."""
        if self._in_flight or self.state in (RegState.UNREGISTERED, RegState.IDLE):
            return []
        self._retries_423 = 0
        return self._send(now, RegState.REGISTERING if self.state != RegState.REGISTERED
                          else RegState.REGISTERED)

    def on_response(self, response: SipResponse, now: float) -> list[Action]:
        """The final response of the REGISTER in flight (provisionals never reach here)."""
        self._in_flight = False
        status = response.status
        if self._unregistering:
            if not self._inflight_unregister:
                # The answer to a REGISTER sent before unregister() was asked: whatever it
                # says, a binding may exist upstream now, so remove it (with credentials if
                # this was a challenge).
                if status in (401, 407):
                    self._remember_challenge(response)
                return self._send(now, RegState.UNREGISTERING)
            return self._unregister_response(response, now)
        if status in (401, 407):
            return self._challenged(response, now)
        if 200 <= status < 300:
            return self._registered(response, now)
        if status == 423:
            return self._interval_too_brief(response, now)
        reason = f"{status} {response.reason}"
        if status in (403, 404):
            return self._auth_failed(now, status, reason)
        return self._backoff(now, reason, status=status)

    def on_failure(self, kind: FailureKind, detail: str, now: float) -> list[Action]:
        """The REGISTER in flight got no response (Timer F, connection refused, DNS failed)."""
        self._in_flight = False
        if self._unregistering:
            if not self._inflight_unregister:
                return self._send(now, RegState.UNREGISTERING)
            return self._finish_unregister(now, f"{kind.value}: {detail}")
        return self._backoff(now, f"{kind.value}: {detail}", failure=kind)

    def on_flow_lost(self, now: float) -> list[Action]:
        """The connection our binding lives on dropped: the provider can no longer reach us."""
        if self.state != RegState.REGISTERED or self._in_flight:
            return []
        self.last_error = "flow lost"
        return self._send(now, RegState.REGISTERING)

    def unregister(self, now: float) -> list[Action]:
        """Remove the binding upstream (Expires: 0), e.g. on wipe or hand-off to the app."""
        self._unregistering = True
        self._unregister_rechallenged = False
        if self._in_flight:
            # The answer to the REGISTER in flight arrives first; unregister when it does.
            return []
        if (
            self.state in (RegState.IDLE, RegState.UNREGISTERED, RegState.AUTH_FAILED)
            or self.last_registered_at is None
        ):
            # Nothing of ours can be bound upstream (or our credentials no longer work).
            return self._finish_unregister(now, None)
        return self._send(now, RegState.UNREGISTERING)

    def set_contact(self, contact: Address) -> None:
        """Use another Contact (the transport chosen by RFC 3263 changed) from the next REGISTER.

        Only while nothing is bound upstream: a refresh or unREGISTER must name the Contact
        that was registered.
        """
        if self.state == RegState.REGISTERED or self._in_flight:
            return
        self.params = attrs.evolve(self.params, contact=contact)

    def update_password(self, password: str) -> None:
        """New credentials from the app: they apply to the next REGISTER."""
        self.params = attrs.evolve(self.params, password=password)
        self._digest = DigestClient(self.params.username, password)
        self._auth_failures = 0

    # -- internals --------------------------------------------------------------------------

    def _status(self) -> StatusChanged:
        return StatusChanged(
            state=self.state,
            last_error=self.last_error,
            next_attempt_at=self.next_attempt_at,
            granted_expires=self.granted_expires,
            last_registered_at=self.last_registered_at,
        )

    def _outcome(self, registered: bool, status: int | None, reason: str,
                 failure: FailureKind | None = None) -> list[Action]:
        """The first attempt's ``Outcome``, made only then: an adopted binding reports none,
        and its refreshes need not build one each."""
        if self._outcome_sent:
            return []
        self._outcome_sent = True
        return [Outcome(registered, status, reason, failure)]

    def _shared_lines(self) -> tuple[Headers, str]:
        """The lines every REGISTER of this binding carries, and the registrar URI's text:
        formatted once, again only when the params or the User-Agent change."""
        p = self.params
        template = self._template
        if (template is None or template[0] is not p
                or template[1] is not self.policy.user_agent):
            headers = Headers()
            headers.add("Max-Forwards", MAX_FORWARDS)
            headers.add("From", str(Address(uri=p.aor).with_tag(self.from_tag)))
            headers.add("To", str(Address(uri=p.aor)))
            headers.add("Call-ID", self.call_id)
            headers.add("Contact", str(p.contact))
            headers.add("Supported", "path")
            headers.add("User-Agent", self.policy.user_agent)
            template = (p, self.policy.user_agent, headers, str(p.registrar))
            self._template = template
        return template[2], template[3]

    def _build(self, authorization: tuple[str, str] | None) -> SipRequest:
        self._cseq += 1
        expires = 0 if self._unregistering else self._expires
        headers = self._shared_lines()[0].copy()
        headers.add("CSeq", f"{self._cseq} REGISTER")
        headers.add("Expires", str(expires))
        if authorization is not None:
            headers.add(*authorization)
        return SipRequest(method="REGISTER", uri=self.params.registrar, headers=headers)

    def _send(self, now: float, state: RegState) -> list[Action]:
        authorization = self._reauthorize()
        self._authenticated_attempt = authorization is not None
        self._in_flight = True
        self._inflight_unregister = self._unregistering
        self.next_attempt_at = None
        actions: list[Action] = [Schedule(None)]
        if state != self.state:
            self.state = state
            actions.append(self._status())
        actions.append(SendRegister(self._build(authorization)))
        return actions

    def _reauthorize(self) -> tuple[str, str] | None:
        """Credentials for the next REGISTER from the last challenge (nc counts up)."""
        challenge = self._last_challenge
        if challenge is None:
            return None
        header = "Proxy-Authorization" if challenge.proxy else "Authorization"
        return header, self._digest.authorize(
            challenge, method="REGISTER", uri=self._shared_lines()[1]
        )

    def _remember_challenge(self, response: SipResponse) -> Challenge:
        """Keep the best challenge of a 401/407 for the next REGISTER; DigestError if none."""
        proxy = response.status == 407
        header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        challenges = []
        for value in response.headers.get_all(header):
            try:
                challenges.append(parse_challenge(value, proxy=proxy))
            except DigestError:
                continue  # another challenge of the same response may be usable
        challenge = choose_challenge(challenges)
        self._last_challenge = challenge
        return challenge

    def _challenged(self, response: SipResponse, now: float) -> list[Action]:
        try:
            challenge = self._remember_challenge(response)
        except DigestError as exc:
            return self._give_up_or_backoff(now, response, f"unusable challenge: {exc}")
        if self._authenticated_attempt and not challenge.stale:
            # Our credentials were refused.
            return self._auth_failed(now, response.status, f"{response.status} {response.reason}")
        return self._send(now, RegState.UNREGISTERING if self._unregistering else self.state)

    def _give_up_or_backoff(self, now: float, response: SipResponse, why: str) -> list[Action]:
        if self._unregistering:
            return self._finish_unregister(now, why)
        return self._backoff(now, why, status=response.status)

    def _registered(self, response: SipResponse, now: float) -> list[Action]:
        granted = self._granted_expires(response)
        if granted == 0:
            # The registrar accepted but lists our contact as expired: treat as a failure.
            return self._backoff(now, "registrar granted expires=0", status=response.status)
        self.failures = 0
        self._auth_failures = 0
        self._retries_423 = 0
        self.granted_expires = granted
        self.last_registered_at = now
        self.last_error = None
        self.state = RegState.REGISTERED
        # Until the refresh, minutes away: 100k templates held ~100 MiB for nothing.
        self._template = None
        at = now + refresh_interval(granted, self.policy.refresh_ratio)
        self.next_attempt_at = at
        return [
            self._status(),
            Schedule(at),
            *self._outcome(True, response.status, response.reason),
        ]

    def _granted_expires(self, response: SipResponse) -> int:
        granted = contact_expires(response.headers.get_list("Contact"), self.params.contact.uri)
        if granted is not None:
            return granted
        header = response.headers.get("Expires")
        if header is not None and header.strip().isdigit():
            return int(header.strip())
        return self._expires

    def _interval_too_brief(self, response: SipResponse, now: float) -> list[Action]:
        min_expires = (response.headers.get("Min-Expires") or "").strip()
        self._retries_423 += 1
        if not min_expires.isdigit() or self._retries_423 > MAX_423_RETRIES:
            return self._backoff(now, f"423 without a usable Min-Expires ({min_expires!r})",
                                 status=423)
        self._expires = max(self._expires, int(min_expires))
        return self._send(now, self.state)

    def _auth_failed(self, now: float, status: int, reason: str) -> list[Action]:
        self._auth_failures += 1
        if self._auth_failures >= self.policy.auth_failures_before_give_up or not (
            self._outcome_sent
        ):
            # A first attempt refused is final for the API (422), and repeated refusals for us.
            self.failures += 1
            self.state = RegState.AUTH_FAILED
            self.last_error = reason
            self.granted_expires = None
            self.next_attempt_at = now + self.policy.backoff_cap
            self._last_challenge = None
            return [
                self._status(),
                Schedule(self.next_attempt_at),
                *self._outcome(False, status, reason),
            ]
        self._last_challenge = None
        return self._backoff(now, reason, status=status)

    def _backoff(
        self,
        now: float,
        reason: str,
        *,
        status: int | None = None,
        failure: FailureKind | None = None,
    ) -> list[Action]:
        self.failures += 1
        self.last_error = reason
        self.state = RegState.BACKOFF
        self.granted_expires = None
        self._last_challenge = None
        delay = backoff_delay(self.failures, self.policy, self._rng.random)
        self.next_attempt_at = now + delay
        return [
            self._status(),
            Schedule(self.next_attempt_at),
            *self._outcome(False, status, reason, failure),
        ]

    def _unregister_response(self, response: SipResponse, now: float) -> list[Action]:
        if response.status in (401, 407) and not self._unregister_rechallenged:
            # Our reused nonce may be gone by now: answer one fresh challenge.
            self._unregister_rechallenged = True
            try:
                self._remember_challenge(response)
            except DigestError as exc:
                return self._finish_unregister(now, f"unusable challenge: {exc}")
            return self._send(now, RegState.UNREGISTERING)
        if response.status == 423:
            # Expires: 0 is always allowed (RFC 3261 §10.3 step 7); a 423 here is the
            # registrar's bug, and we are done with this binding either way.
            pass
        error = None if 200 <= response.status < 300 else f"{response.status} {response.reason}"
        return self._finish_unregister(now, error)

    def _finish_unregister(self, now: float, error: str | None) -> list[Action]:
        self.state = RegState.UNREGISTERED
        self.last_error = error
        self.granted_expires = None
        self.next_attempt_at = None
        self._unregistering = False
        return [Schedule(None), self._status()]


def refresh_interval(granted: int, ratio: float) -> float:
    """When to refresh a binding granted for ``granted`` seconds.

    At ``ratio`` of the grant, but always leaving at least min(REFRESH_MIN_MARGIN, grant/2)
    before it lapses: a registrar granting a few seconds must not see the binding expire
    because one refresh was a little late.
    """
    margin = max(granted * (1.0 - ratio), min(REFRESH_MIN_MARGIN, granted / 2.0))
    return max(MIN_REFRESH_INTERVAL, granted - margin)


def backoff_delay(failures: int, policy: BindingPolicy, random01: Callable[[], float]) -> float:
    """RFC 5626 §4.5: min(cap, base · 2^(failures-1)), randomised to 50–100 % of it."""
    exponent = min(max(failures - 1, 0), 30)
    ceiling: float = min(policy.backoff_cap, policy.backoff_base * float(2**exponent))
    return ceiling * (0.5 + 0.5 * random01())


def contact_expires(contacts: list[str], ours: URI) -> int | None:
    """The ``expires`` a registrar's 200 lists for our Contact (RFC 3261 §10.2.4), if any.

    Registrars echo our Contact as we sent it, ``<our URI>`` then header parameters: such a
    value is read without parsing its URI again (that parse was ~5 % of a registration's
    CPU). Any other shape is parsed in full and compared as ``_same_contact`` says.
    """
    echoed = f"<{ours}>"
    for value in contacts:
        if ours.user and ours.user not in value and "%" not in value:
            continue  # not ours: spare parsing every other binding of the AOR
        text = value.strip(" \t")
        try:
            if text.startswith(echoed):
                expires = param_value(parse_header_params(text, len(echoed)), "expires")
            else:
                address = Address.parse(value)
                if not _same_contact(address.uri, ours):
                    continue
                expires = address.param("expires")
        except SipParseError:
            continue
        if expires is not None and expires.isdigit():
            return int(expires)
    return None


def _same_contact(a: URI, b: URI) -> bool:
    """Contact match for picking our granted expiry (user and host:port, RFC 3261 §19.1.4-ish)."""
    return (
        a.user == b.user
        and a.host.lower() == b.host.lower()
        and (a.port or 5060) == (b.port or 5060)
    )
