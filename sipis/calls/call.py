"""One incoming call to a push instance — INVITE, push, device, outcome — as a state machine.

Sans-IO like the transactions: ``IncomingCall.handle(event, now)`` returns actions for the trio
driver to carry out in order; no clock, no socket, no store, no push client here. The driver
owns the upstream INVITE server transaction (it sends ``100 Trying`` itself when the INVITE
arrives and answers CANCEL with 200), the push dispatcher, and the client transaction of the
INVITE forwarded to the device.

Rules (SPEC.md "SIP behaviour" 1–7; table ``TRANSITIONS``):

- INVITE, no live device binding (step 1): ``SendPush(CALL)``, ``180`` with
  ``X-Sipis-Push-Status: Alerting-Device`` at once (the driver must not wait for the push
  before sending it), and the ring timer T1 → ALERTING.
- INVITE with a live binding (step 7): ``ForwardInvite`` at once, no push, no 180 of our own
  → FORWARDED.
- ``PushAccepted`` in ALERTING (step 2): ``180 Push-Notification-Sent``, once. Later (after
  progress or forwarding) it would only be a step back, so it is dropped.
- ``Progress`` in ALERTING (step 3): ``180 Device-Making-Progress``, T1 stops, the progress
  timer T2 starts → PROGRESS. Repeated progress does not extend T2.
- ``DeviceReady`` in ALERTING/PROGRESS (step 4): T1/T2 stop, ``ForwardInvite`` → FORWARDED.
  From then on no sipis ring timer runs: how long the device may ring is the caller's
  business (the provider's ``fr_inv_timer``, which ends in a CANCEL). Only RFC 3261 §16.8
  Timer C (default 180 s, restarted by every device provisional 101–199) guards against a
  provider that never gives up: it ends the call with ``408`` and a CANCEL to the device.
- Device responses (step 4): provisionals other than 100 are relayed (``RelayResponse``); a
  2xx is relayed and the call ends ``answered`` — the dialog (ACK, BYE, re-INVITE, further 2xx
  retransmissions) is the proxy driver's from there. A 300–699 is relayed too (the device's
  486/603 is the truth the caller should hear), except 503, which becomes 500 (§16.7 step 6:
  a proxy does not pass on 503). 486/600/603/607/608 end ``declined``, 408/480 ``missed``,
  others ``failed``.
- ``DeviceUnreachable`` in FORWARDED (the forwarded INVITE got no response at all: Timer B,
  transport error, closed flow): if no push was sent yet (step 7 path) fall back to step 1
  (push, 180 Alerting-Device, T1); if the device had been pushed, wait for it to register
  again under T2; after ``max_forward_attempts`` forwards, end with 480
  ``No-Response-From-Device``.
- T1 or T2 runs out (step 5): ``480`` with ``X-Sipis-Reason: No-Response-From-Device``, a
  ``call-ended`` push (reason ``timeout``), outcome ``missed``.
- ``PushFailed(dead_token=True)`` in ALERTING/PROGRESS (step 5): ``480`` with
  ``X-Sipis-Reason: Push-Token-Invalid``, ``WipeInstance``, outcome ``failed``. Once the call
  is forwarded the device evidently lives; the dead token is left to the next push.
- ``PushFailed(dead_token=False)`` (retries exhausted, provider credentials, configuration):
  nothing; keep waiting for T1, because the app may still register (opened by the user, or
  already woken by an earlier push). The reason is kept in ``push_error``.
- ``Decline`` (the app's fast channel): ``603 Decline``, plus ``ForwardCancel`` if forwarded;
  outcome ``declined``; no push (the declining device knows).
- ``Cancel`` from upstream (step 6; the driver has answered it 200): ``487``, plus
  ``ForwardCancel`` if forwarded, plus a ``call-ended`` push if a call push was sent (reason
  ``answered-elsewhere`` for ``Reason: SIP;cause=200`` — RFC 3326 — or ``Q.850;cause=26``,
  else ``cancelled``); the outcome is that reason.
- ``ForwardCancel`` means "cancel the forwarded INVITE": the driver sends the CANCEL when
  the client transaction allows it (``ClientInviteTransaction.cancel_allowed``: after a
  provisional, RFC 3261 §9.1) and drops it if a final comes first. A device 2xx that still
  arrives after our own non-2xx final is the driver's to ACK and BYE.
- Every action list that ends the call ends with ``Finished``; before it, every running timer
  is stopped and exactly one final (``SendFinal`` or a relayed final) has gone upstream.
- Anything else — events before the INVITE or after the end, duplicates, timers that are not
  armed, unknown timer names, device responses while nothing is forwarded — is ignored:
  ``handle`` returns ``[]`` and never raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias

import attrs

from sipis import fastenum
from sipis.calls.device import DeviceBinding
from sipis.push.base import PushKind
from sipis.sip.message import split_header_list
from sipis.sip.transaction import StartTimer, StopTimer

__all__ = [
    "PUSH_STATUS_HEADER",
    "REASON_HEADER",
    "TRANSITIONS",
    "CallAction",
    "CallConfig",
    "CallEvent",
    "CallInput",
    "CallOutcome",
    "CallState",
    "Cancel",
    "Decline",
    "DeviceReady",
    "DeviceResponse",
    "DeviceUnreachable",
    "Finished",
    "ForwardCancel",
    "ForwardInvite",
    "IncomingCall",
    "InviteReceived",
    "Progress",
    "PushAccepted",
    "PushFailed",
    "RelayResponse",
    "SendFinal",
    "SendProvisional",
    "SendPush",
    "StartTimer",
    "StopTimer",
    "TimerFired",
    "WipeInstance",
    "cancel_outcome",
]

PUSH_STATUS_HEADER = "X-Sipis-Push-Status"
REASON_HEADER = "X-Sipis-Reason"

#: Timer names (``StartTimer.name``/``TimerFired.name``).
RING_TIMER = "T1"
PROGRESS_TIMER = "T2"
TIMER_C = "C"


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen
class CallConfig:
    """Timer values in seconds, and how often a call is handed to the device."""

    ring_timeout: float = attrs.field(default=120.0, validator=_positive)  # T1
    progress_timeout: float = attrs.field(default=120.0, validator=_positive)  # T2
    timer_c: float = attrs.field(default=180.0, validator=_positive)  # RFC 3261 §16.8
    max_forward_attempts: int = attrs.field(default=3, validator=_positive)


class CallOutcome(fastenum.Enum):
    """How the call ended (``GET /v1/instances/{id}/calls`` shows the value)."""

    ANSWERED = "answered"
    MISSED = "missed"
    CANCELLED = "cancelled"
    ANSWERED_ELSEWHERE = "answered-elsewhere"
    DECLINED = "declined"
    FAILED = "failed"


class CallState(fastenum.Enum):
    """Where the call stands."""

    IDLE = "idle"  # created, no INVITE handled yet
    ALERTING = "alerting"  # push sent, T1 running
    PROGRESS = "progress"  # device waking up, T2 running
    FORWARDED = "forwarded"  # INVITE handed to a device binding, Timer C running
    ENDED = "ended"  # final response sent upstream (or 2xx relayed)


# --- events ---------------------------------------------------------------------------------


@attrs.frozen
class InviteReceived:
    """The INVITE arrived; ``binding`` is the newest live device binding, if any (step 7)."""

    binding: DeviceBinding | None = None


@attrs.frozen
class PushAccepted:
    """The push service accepted the call push."""


@attrs.frozen
class PushFailed:
    """The call push failed for good; ``dead_token``: the provider says the token is dead."""

    dead_token: bool
    reason: str = ""


@attrs.frozen
class Progress:
    """Fast channel ``POST …/progress``: the device is waking up."""


@attrs.frozen
class Decline:
    """Fast channel ``POST …/decline``: the user declined."""


@attrs.frozen
class DeviceReady:
    """A device binding is live now (the device just REGISTERed)."""

    binding: DeviceBinding


@attrs.frozen
class DeviceResponse:
    """A response to the forwarded INVITE (every one, 100 included); ``response`` is passed
    back in ``RelayResponse`` untouched."""

    status: int
    reason: str = ""
    response: object = None


@attrs.frozen
class DeviceUnreachable:
    """The forwarded INVITE got no response at all (Timer B, transport error, flow closed)."""

    reason: str = ""


@attrs.frozen
class Cancel:
    """CANCEL from upstream; ``reason_header``: its ``Reason`` values joined by ``, ``."""

    reason_header: str | None = None


@attrs.frozen
class TimerFired:
    """A timer started by a ``StartTimer`` reached its deadline."""

    name: str


CallEvent: TypeAlias = (
    InviteReceived | PushAccepted | PushFailed | Progress | Decline | DeviceReady
    | DeviceResponse | DeviceUnreachable | Cancel | TimerFired
)


# --- actions --------------------------------------------------------------------------------


@attrs.frozen
class SendProvisional:
    """Send a provisional of our own upstream (one To tag for all of the call's own
    responses)."""

    status: int = 180
    reason: str = "Ringing"
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class SendFinal:
    """Send this final response upstream."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class RelayResponse:
    """Forward the device's response upstream as a stateful proxy (RFC 3261 §16.7)."""

    status: int
    response: object = None


@attrs.frozen
class SendPush:
    """Send a push of ``kind`` (the driver fills in the payload); ``reason`` for call-ended.

    For ``CALL`` the driver reports the result back as ``PushAccepted``/``PushFailed``.
    """

    kind: PushKind
    reason: str | None = None


@attrs.frozen
class ForwardInvite:
    """Forward the INVITE to this binding (its flow/source, Request-URI its Contact), with
    Record-Route, through a ``ClientInviteTransaction``; report responses as
    ``DeviceResponse`` and a transaction that ends without any as ``DeviceUnreachable``."""

    binding: DeviceBinding


@attrs.frozen
class ForwardCancel:
    """Cancel the forwarded INVITE (when ``cancel_allowed``; see the module rules)."""


@attrs.frozen
class WipeInstance:
    """Wipe the push instance (credentials, token, bindings)."""

    reason: str


@attrs.frozen
class Finished:
    """The call is over for this machine: record ``outcome``. Always last, emitted once."""

    outcome: CallOutcome


CallAction: TypeAlias = (
    SendProvisional | SendFinal | RelayResponse | SendPush | ForwardInvite | ForwardCancel
    | StartTimer | StopTimer | WipeInstance | Finished
)


# --- the table ------------------------------------------------------------------------------


class CallInput(fastenum.Enum):
    """Events after classification (the table's second key)."""

    INVITE = "invite"
    INVITE_TO_BINDING = "invite-to-binding"
    PUSH_ACCEPTED = "push-accepted"
    PUSH_DEAD = "push-dead"
    PUSH_FAILED = "push-failed"
    PROGRESS = "progress"
    DECLINE = "decline"
    DEVICE_READY = "device-ready"
    DEVICE_PROVISIONAL = "device-1xx"
    DEVICE_ANSWERED = "device-2xx"
    DEVICE_REJECTED = "device-3xx-6xx"
    UNREACHABLE_PUSH = "unreachable-push"  # never pushed: fall back to step 1
    UNREACHABLE_WAIT = "unreachable-wait"  # pushed before: wait for a new registration
    UNREACHABLE_GIVE_UP = "unreachable-give-up"  # forward attempts used up
    CANCEL = "cancel"
    TIMER_T1 = "T1"
    TIMER_T2 = "T2"
    TIMER_C = "C"


_S = CallState
_I = CallInput

TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (_S.IDLE, _I.INVITE): _S.ALERTING,
    (_S.IDLE, _I.INVITE_TO_BINDING): _S.FORWARDED,
    (_S.ALERTING, _I.PUSH_ACCEPTED): _S.ALERTING,
    (_S.ALERTING, _I.PUSH_DEAD): _S.ENDED,
    (_S.ALERTING, _I.PUSH_FAILED): _S.ALERTING,
    (_S.ALERTING, _I.PROGRESS): _S.PROGRESS,
    (_S.ALERTING, _I.DECLINE): _S.ENDED,
    (_S.ALERTING, _I.DEVICE_READY): _S.FORWARDED,
    (_S.ALERTING, _I.CANCEL): _S.ENDED,
    (_S.ALERTING, _I.TIMER_T1): _S.ENDED,
    (_S.PROGRESS, _I.PUSH_DEAD): _S.ENDED,
    (_S.PROGRESS, _I.PUSH_FAILED): _S.PROGRESS,
    (_S.PROGRESS, _I.DECLINE): _S.ENDED,
    (_S.PROGRESS, _I.DEVICE_READY): _S.FORWARDED,
    (_S.PROGRESS, _I.CANCEL): _S.ENDED,
    (_S.PROGRESS, _I.TIMER_T2): _S.ENDED,
    (_S.FORWARDED, _I.DEVICE_PROVISIONAL): _S.FORWARDED,
    (_S.FORWARDED, _I.DEVICE_ANSWERED): _S.ENDED,
    (_S.FORWARDED, _I.DEVICE_REJECTED): _S.ENDED,
    (_S.FORWARDED, _I.UNREACHABLE_PUSH): _S.ALERTING,
    (_S.FORWARDED, _I.UNREACHABLE_WAIT): _S.PROGRESS,
    (_S.FORWARDED, _I.UNREACHABLE_GIVE_UP): _S.ENDED,
    (_S.FORWARDED, _I.PUSH_FAILED): _S.FORWARDED,  # only recorded
    (_S.FORWARDED, _I.DECLINE): _S.ENDED,
    (_S.FORWARDED, _I.CANCEL): _S.ENDED,
    (_S.FORWARDED, _I.TIMER_C): _S.ENDED,
}
"""Every (state, input) pair not listed here is ignored (late, duplicate or impossible)."""

_DECLINED = frozenset({486, 600, 603, 607, 608})
_MISSED = frozenset({408, 480})
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_CAUSE = re.compile(r";\s*cause\s*=\s*([0-9]+)", re.IGNORECASE)


def cancel_outcome(reason_header: str | None) -> CallOutcome:
    """``ANSWERED_ELSEWHERE`` for a CANCEL's ``Reason: SIP;cause=200`` (RFC 3326) or
    ``Reason: Q.850;cause=26`` (non-selected user clearing), else ``CANCELLED``."""
    if not reason_header:
        return CallOutcome.CANCELLED
    for item in split_header_list(reason_header):
        text = _QUOTED.sub('""', item)
        protocol = text.split(";", 1)[0].strip().upper()
        match = _CAUSE.search(text)
        if match is None:
            continue
        cause = int(match.group(1)[:6])
        if (protocol, cause) in (("SIP", 200), ("Q.850", 26)):
            return CallOutcome.ANSWERED_ELSEWHERE
    return CallOutcome.CANCELLED


def _rejected_outcome(status: int) -> CallOutcome:
    if status in _DECLINED:
        return CallOutcome.DECLINED
    if status in _MISSED:
        return CallOutcome.MISSED
    return CallOutcome.FAILED


_ALERTING_DEVICE = SendProvisional(headers=((PUSH_STATUS_HEADER, "Alerting-Device"),))
_PUSH_SENT = SendProvisional(headers=((PUSH_STATUS_HEADER, "Push-Notification-Sent"),))
_MAKING_PROGRESS = SendProvisional(headers=((PUSH_STATUS_HEADER, "Device-Making-Progress"),))
_NO_RESPONSE = SendFinal(480, "Temporarily Unavailable",
                         ((REASON_HEADER, "No-Response-From-Device"),))
_TOKEN_INVALID = SendFinal(480, "Temporarily Unavailable",
                           ((REASON_HEADER, "Push-Token-Invalid"),))


_Handler: TypeAlias = Callable[["IncomingCall", CallEvent, CallState, float], list[CallAction]]


class IncomingCall:
    """The state machine of one incoming call (see the module rules).

    Args:
        config: timer values and the forward-attempt limit.
    """

    def __init__(self, config: CallConfig | None = None) -> None:
        self.config = config if config is not None else CallConfig()
        self._state = CallState.IDLE
        self._armed: set[str] = set()
        self._pushed = False
        self._push_sent_reported = False
        self._forward_attempts = 0
        self._outcome: CallOutcome | None = None
        self._push_error: str | None = None

    def __repr__(self) -> str:
        return (f"IncomingCall(state={self._state.name}, pushed={self._pushed}, "
                f"forwards={self._forward_attempts})")

    @property
    def state(self) -> CallState:
        """The current state."""
        return self._state

    @property
    def outcome(self) -> CallOutcome | None:
        """How it ended, once ENDED; None before."""
        return self._outcome

    @property
    def pushed(self) -> bool:
        """Whether a call push was sent (then a call-ended push may follow)."""
        return self._pushed

    @property
    def forward_attempts(self) -> int:
        """How often the INVITE was handed to a device binding."""
        return self._forward_attempts

    @property
    def push_error(self) -> str | None:
        """The reason of the last failed call push, for the call record."""
        return self._push_error

    # -- input ----------------------------------------------------------------------------

    def handle(self, event: CallEvent, now: float) -> list[CallAction]:
        """Apply ``event`` at time ``now``; return the actions to carry out, in order.

        Never raises for any event in any state: whatever is late, duplicated or impossible
        returns ``[]`` (see the module rules).
        """
        inp = self._classify(event)
        if inp is None:
            return []
        key = (self._state, inp)
        if key not in TRANSITIONS:
            return []
        old, self._state = self._state, TRANSITIONS[key]
        return self._HANDLERS[inp](self, event, old, now)

    def _classify(self, event: CallEvent) -> CallInput | None:
        match event:
            case InviteReceived(binding):
                return _I.INVITE if binding is None else _I.INVITE_TO_BINDING
            case PushAccepted():
                return _I.PUSH_ACCEPTED
            case PushFailed(dead_token):
                return _I.PUSH_DEAD if dead_token else _I.PUSH_FAILED
            case Progress():
                return _I.PROGRESS
            case Decline():
                return _I.DECLINE
            case DeviceReady():
                return _I.DEVICE_READY
            case DeviceResponse(status):
                if not 100 <= status <= 699:
                    return None
                if status < 200:
                    return _I.DEVICE_PROVISIONAL
                return _I.DEVICE_ANSWERED if status < 300 else _I.DEVICE_REJECTED
            case DeviceUnreachable():
                if self._forward_attempts >= self.config.max_forward_attempts:
                    return _I.UNREACHABLE_GIVE_UP
                return _I.UNREACHABLE_WAIT if self._pushed else _I.UNREACHABLE_PUSH
            case Cancel():
                return _I.CANCEL
            case TimerFired(name):
                timer_input = {RING_TIMER: _I.TIMER_T1, PROGRESS_TIMER: _I.TIMER_T2,
                               TIMER_C: _I.TIMER_C}.get(name)
                if timer_input is None or name not in self._armed:
                    return None
                self._armed.discard(name)
                return timer_input
        return None  # pragma: no cover - every CallEvent is matched above

    # -- helpers --------------------------------------------------------------------------

    def _start(self, name: str, deadline: float) -> StartTimer:
        self._armed.add(name)
        return StartTimer(name, deadline)

    def _stop(self, *names: str) -> list[CallAction]:
        stopped: list[CallAction] = [StopTimer(n) for n in names if n in self._armed]
        self._armed.difference_update(names)
        return stopped

    def _stop_all(self) -> list[CallAction]:
        return self._stop(*sorted(self._armed))

    def _push_call(self, now: float) -> list[CallAction]:
        self._pushed = True
        return [SendPush(PushKind.CALL), _ALERTING_DEVICE,
                self._start(RING_TIMER, now + self.config.ring_timeout)]

    def _forward(self, binding: DeviceBinding, now: float) -> list[CallAction]:
        self._forward_attempts += 1
        return [ForwardInvite(binding), self._start(TIMER_C, now + self.config.timer_c)]

    def _end(self, outcome: CallOutcome, *middle: CallAction,
             call_ended: str | None = None) -> list[CallAction]:
        """Stop timers, then ``middle`` (the final first), a call-ended push if asked and a
        call push went out, and ``Finished``."""
        self._outcome = outcome
        actions: list[CallAction] = [*self._stop_all(), *middle]
        if call_ended is not None and self._pushed:
            actions.append(SendPush(PushKind.CALL_ENDED, call_ended))
        actions.append(Finished(outcome))
        return actions

    @staticmethod
    def _cancel_forwarded(old: CallState) -> tuple[CallAction, ...]:
        return (ForwardCancel(),) if old is CallState.FORWARDED else ()

    # -- handlers (one per input; the table has already moved the state) --------------------

    def _on_invite(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        return self._push_call(now)

    def _on_invite_to_binding(self, event: CallEvent, old: CallState,
                              now: float) -> list[CallAction]:
        assert isinstance(event, InviteReceived) and event.binding is not None
        return self._forward(event.binding, now)

    def _on_push_accepted(self, event: CallEvent, old: CallState,
                          now: float) -> list[CallAction]:
        if self._push_sent_reported:
            return []
        self._push_sent_reported = True
        return [_PUSH_SENT]

    def _on_push_dead(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        assert isinstance(event, PushFailed)
        self._push_error = event.reason or "push token invalid"
        return self._end(CallOutcome.FAILED, _TOKEN_INVALID,
                         WipeInstance(f"push token invalid: {self._push_error}"))

    def _on_push_failed(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        assert isinstance(event, PushFailed)
        self._push_error = event.reason or "push failed"
        return []

    def _on_progress(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        return [*self._stop(RING_TIMER), _MAKING_PROGRESS,
                self._start(PROGRESS_TIMER, now + self.config.progress_timeout)]

    def _on_decline(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        return self._end(CallOutcome.DECLINED, SendFinal(603, "Decline"),
                         *self._cancel_forwarded(old))

    def _on_device_ready(self, event: CallEvent, old: CallState,
                         now: float) -> list[CallAction]:
        assert isinstance(event, DeviceReady)
        return [*self._stop(RING_TIMER, PROGRESS_TIMER), *self._forward(event.binding, now)]

    def _on_device_provisional(self, event: CallEvent, old: CallState,
                               now: float) -> list[CallAction]:
        assert isinstance(event, DeviceResponse)
        if event.status == 100:  # hop-by-hop; a proxy does not forward it (§16.7 step 5)
            return []
        return [RelayResponse(event.status, event.response),
                self._start(TIMER_C, now + self.config.timer_c)]

    def _on_device_answered(self, event: CallEvent, old: CallState,
                            now: float) -> list[CallAction]:
        assert isinstance(event, DeviceResponse)
        return self._end(CallOutcome.ANSWERED, RelayResponse(event.status, event.response))

    def _on_device_rejected(self, event: CallEvent, old: CallState,
                            now: float) -> list[CallAction]:
        assert isinstance(event, DeviceResponse)
        final: CallAction = (SendFinal(500, "Server Internal Error") if event.status == 503
                             else RelayResponse(event.status, event.response))
        return self._end(_rejected_outcome(event.status), final)

    def _on_unreachable_push(self, event: CallEvent, old: CallState,
                             now: float) -> list[CallAction]:
        return [*self._stop(TIMER_C), *self._push_call(now)]

    def _on_unreachable_wait(self, event: CallEvent, old: CallState,
                             now: float) -> list[CallAction]:
        return [*self._stop(TIMER_C),
                self._start(PROGRESS_TIMER, now + self.config.progress_timeout)]

    def _on_unreachable_give_up(self, event: CallEvent, old: CallState,
                                now: float) -> list[CallAction]:
        return self._end(CallOutcome.MISSED, _NO_RESPONSE, call_ended="timeout")

    def _on_cancel(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        assert isinstance(event, Cancel)
        outcome = cancel_outcome(event.reason_header)
        return self._end(outcome, SendFinal(487, "Request Terminated"),
                         *self._cancel_forwarded(old), call_ended=outcome.value)

    def _on_ring_timeout(self, event: CallEvent, old: CallState,
                         now: float) -> list[CallAction]:
        return self._end(CallOutcome.MISSED, _NO_RESPONSE, call_ended="timeout")

    def _on_timer_c(self, event: CallEvent, old: CallState, now: float) -> list[CallAction]:
        return self._end(CallOutcome.MISSED, SendFinal(408, "Request Timeout"), ForwardCancel(),
                         call_ended="timeout")

    _HANDLERS: ClassVar[Mapping[CallInput, _Handler]] = {
        _I.INVITE: _on_invite,
        _I.INVITE_TO_BINDING: _on_invite_to_binding,
        _I.PUSH_ACCEPTED: _on_push_accepted,
        _I.PUSH_DEAD: _on_push_dead,
        _I.PUSH_FAILED: _on_push_failed,
        _I.PROGRESS: _on_progress,
        _I.DECLINE: _on_decline,
        _I.DEVICE_READY: _on_device_ready,
        _I.DEVICE_PROVISIONAL: _on_device_provisional,
        _I.DEVICE_ANSWERED: _on_device_answered,
        _I.DEVICE_REJECTED: _on_device_rejected,
        _I.UNREACHABLE_PUSH: _on_unreachable_push,
        _I.UNREACHABLE_WAIT: _on_unreachable_wait,
        _I.UNREACHABLE_GIVE_UP: _on_unreachable_give_up,
        _I.CANCEL: _on_cancel,
        _I.TIMER_T1: _on_ring_timeout,
        _I.TIMER_T2: _on_ring_timeout,
        _I.TIMER_C: _on_timer_c,
    }
