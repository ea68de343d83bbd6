"""The per-call machine: SPEC.md "SIP behaviour" steps 1–7 and its safety under any order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.calls.call import (
    PUSH_STATUS_HEADER,
    REASON_HEADER,
    TRANSITIONS,
    CallAction,
    CallConfig,
    CallEvent,
    CallOutcome,
    CallState,
    Cancel,
    Decline,
    DeviceReady,
    DeviceResponse,
    DeviceUnreachable,
    Finished,
    ForwardCancel,
    ForwardInvite,
    IncomingCall,
    InviteReceived,
    Progress,
    PushAccepted,
    PushFailed,
    RelayResponse,
    SendFinal,
    SendProvisional,
    SendPush,
    StartTimer,
    StopTimer,
    TimerFired,
    WipeInstance,
    cancel_outcome,
)
from sipis.calls.device import DeviceBinding
from sipis.push.base import PushKind
from sipis.sip.headers import URI

CONFIG = CallConfig(ring_timeout=120.0, progress_timeout=90.0, timer_c=180.0,
                    max_forward_attempts=3)
BINDING = DeviceBinding(instance_id="inst", contact=URI.parse("sip:dev@10.0.0.2"),
                        source=("203.0.113.5", 40000, "udp"), flow=None, expires_at=1e9,
                        call_id="r", cseq=1)
OTHER_BINDING = DeviceBinding(instance_id="inst", contact=URI.parse("sip:dev@10.0.0.3"),
                              source=("203.0.113.6", 40001, "tcp"), flow="f", expires_at=1e9,
                              call_id="r2", cseq=1)


def status(value: str) -> SendProvisional:
    return SendProvisional(180, "Ringing", ((PUSH_STATUS_HEADER, value),))


ALERTING = status("Alerting-Device")
PUSH_SENT = status("Push-Notification-Sent")
PROGRESSING = status("Device-Making-Progress")
NO_RESPONSE = SendFinal(480, "Temporarily Unavailable",
                        ((REASON_HEADER, "No-Response-From-Device"),))
TOKEN_INVALID = SendFinal(480, "Temporarily Unavailable", ((REASON_HEADER, "Push-Token-Invalid"),))


def pushed_call(now: float = 0.0) -> IncomingCall:
    call = IncomingCall(CONFIG)
    call.handle(InviteReceived(), now)
    return call


def forwarded_call(*, via_push: bool) -> IncomingCall:
    if via_push:
        call = pushed_call()
        call.handle(DeviceReady(BINDING), 10.0)
    else:
        call = IncomingCall(CONFIG)
        call.handle(InviteReceived(BINDING), 0.0)
    return call


# --- SPEC steps -------------------------------------------------------------------------------


def test_step1_invite_without_binding_pushes_and_rings_alerting_device_at_once() -> None:
    """Step 1: the call push, then at once 180 Alerting-Device, and the ring timer T1."""
    call = IncomingCall(CONFIG)
    assert call.handle(InviteReceived(), 5.0) == [
        SendPush(PushKind.CALL), ALERTING, StartTimer("T1", 125.0)]
    assert call.state is CallState.ALERTING
    assert call.pushed


def test_step2_push_accepted_sends_push_notification_sent_once() -> None:
    """Step 2: the push service accepted it → 180 Push-Notification-Sent, only once."""
    call = pushed_call()
    assert call.handle(PushAccepted(), 0.3) == [PUSH_SENT]
    assert call.handle(PushAccepted(), 0.4) == []


def test_step3_progress_stops_t1_starts_t2_and_sends_device_making_progress() -> None:
    """Step 3: fast-channel progress → 180 Device-Making-Progress, T1 stops, T2 starts;
    repeated progress does not extend T2, and a late PushAccepted is dropped."""
    call = pushed_call()
    assert call.handle(Progress(), 8.0) == [StopTimer("T1"), PROGRESSING, StartTimer("T2", 98.0)]
    assert call.state is CallState.PROGRESS
    assert call.handle(Progress(), 9.0) == []
    assert call.handle(PushAccepted(), 9.5) == []
    assert call.handle(TimerFired("T1"), 120.0) == []  # stopped: a late firing is ignored


@pytest.mark.parametrize("progressed", [False, True])
def test_step4_device_registers_and_gets_the_held_invite(progressed: bool) -> None:
    """Step 4: the device's registration hands it the INVITE; T1/T2 stop; Timer C guards."""
    call = pushed_call()
    if progressed:
        call.handle(Progress(), 3.0)
    actions = call.handle(DeviceReady(BINDING), 12.0)
    assert actions == [StopTimer("T2" if progressed else "T1"), ForwardInvite(BINDING),
                       StartTimer("C", 192.0)]
    assert call.state is CallState.FORWARDED
    assert call.handle(DeviceReady(OTHER_BINDING), 13.0) == []  # one device is enough


def test_step4_device_responses_are_relayed_and_2xx_ends_answered() -> None:
    """Step 4: provisionals (not 100) are relayed and restart Timer C; the 2xx is relayed
    and the call ends answered; the dialog is the proxy's from there."""
    call = forwarded_call(via_push=True)
    assert call.handle(DeviceResponse(100, "Trying", "r100"), 12.1) == []
    assert call.handle(DeviceResponse(180, "Ringing", "r180"), 12.5) == [
        RelayResponse(180, "r180"), StartTimer("C", 192.5)]
    assert call.handle(DeviceResponse(200, "OK", "r200"), 20.0) == [
        StopTimer("C"), RelayResponse(200, "r200"), Finished(CallOutcome.ANSWERED)]
    assert call.state is CallState.ENDED
    assert call.outcome is CallOutcome.ANSWERED
    assert call.handle(DeviceResponse(200, "OK", "again"), 20.5) == []
    assert call.handle(Cancel(), 21.0) == []


@pytest.mark.parametrize(("code", "outcome"), [
    (486, CallOutcome.DECLINED), (603, CallOutcome.DECLINED), (600, CallOutcome.DECLINED),
    (480, CallOutcome.MISSED), (408, CallOutcome.MISSED), (404, CallOutcome.FAILED),
    (487, CallOutcome.FAILED)])
def test_step4_device_rejection_is_relayed_upstream(code: int, outcome: CallOutcome) -> None:
    """The device's own final (busy, decline, …) is what the caller hears."""
    call = forwarded_call(via_push=False)
    assert call.handle(DeviceResponse(code, "x", "resp"), 5.0) == [
        StopTimer("C"), RelayResponse(code, "resp"), Finished(outcome)]


def test_step4_device_503_becomes_500() -> None:
    """RFC 3261 §16.7 step 6: a proxy does not pass a 503 upstream."""
    call = forwarded_call(via_push=False)
    assert call.handle(DeviceResponse(503, "Service Unavailable"), 5.0) == [
        StopTimer("C"), SendFinal(500, "Server Internal Error"), Finished(CallOutcome.FAILED)]


@pytest.mark.parametrize(("timer", "prepare"), [("T1", False), ("T2", True)])
def test_step5_ring_or_progress_timer_runs_out(timer: str, prepare: bool) -> None:
    """Step 5: T1 or T2 expiry → 480 No-Response-From-Device, call-ended push (timeout),
    outcome missed."""
    call = pushed_call()
    if prepare:
        call.handle(Progress(), 1.0)
    assert call.handle(TimerFired(timer), 130.0) == [
        NO_RESPONSE, SendPush(PushKind.CALL_ENDED, "timeout"), Finished(CallOutcome.MISSED)]
    assert call.outcome is CallOutcome.MISSED


@pytest.mark.parametrize("progressed", [False, True])
def test_step5_dead_token_answers_push_token_invalid_and_wipes(progressed: bool) -> None:
    """Step 5: the push service says the token is dead → 480 Push-Token-Invalid and the
    instance is wiped; no call-ended push to a dead token."""
    call = pushed_call()
    if progressed:
        call.handle(Progress(), 1.0)
    actions = call.handle(PushFailed(dead_token=True, reason="Unregistered"), 2.0)
    assert actions == [StopTimer("T2" if progressed else "T1"), TOKEN_INVALID,
                       WipeInstance("push token invalid: Unregistered"),
                       Finished(CallOutcome.FAILED)]
    assert call.push_error == "Unregistered"


def test_step5_other_push_failures_keep_waiting_for_the_device() -> None:
    """A push that failed for another reason changes nothing: T1 still decides, and a device
    that registers anyway gets the call."""
    call = pushed_call()
    assert call.handle(PushFailed(dead_token=False, reason="auth error"), 1.0) == []
    assert call.state is CallState.ALERTING
    assert call.push_error == "auth error"
    assert ForwardInvite(BINDING) in call.handle(DeviceReady(BINDING), 30.0)


def test_dead_token_after_forwarding_is_left_alone() -> None:
    """Once the device has the INVITE it evidently lives: no 480, no wipe."""
    call = forwarded_call(via_push=True)
    assert call.handle(PushFailed(dead_token=True, reason="late"), 12.0) == []
    assert call.state is CallState.FORWARDED


@pytest.mark.parametrize(("reason", "outcome"), [
    (None, CallOutcome.CANCELLED),
    ('SIP;cause=200;text="Call completed elsewhere"', CallOutcome.ANSWERED_ELSEWHERE),
    ("SIP ;cause=487", CallOutcome.CANCELLED),
])
def test_step6_cancel_while_waiting_answers_487_and_pushes_call_ended(
    reason: str | None, outcome: CallOutcome
) -> None:
    """Step 6: 487 to the INVITE and a call-ended push naming why; no CANCEL downstream,
    nothing was handed on."""
    call = pushed_call()
    assert call.handle(Cancel(reason), 4.0) == [
        StopTimer("T1"), SendFinal(487, "Request Terminated"),
        SendPush(PushKind.CALL_ENDED, outcome.value), Finished(outcome)]


def test_step6_cancel_after_handing_on_forwards_the_cancel() -> None:
    """Step 6: a forwarded call also gets a CANCEL to the device."""
    call = forwarded_call(via_push=True)
    assert call.handle(Cancel("SIP;cause=200"), 14.0) == [
        StopTimer("C"), SendFinal(487, "Request Terminated"), ForwardCancel(),
        SendPush(PushKind.CALL_ENDED, "answered-elsewhere"),
        Finished(CallOutcome.ANSWERED_ELSEWHERE)]
    assert call.handle(DeviceResponse(487, "Request Terminated"), 14.1) == []


def test_step6_cancel_of_a_call_that_never_pushed_sends_no_call_ended_push() -> None:
    """Step 7 calls never woke the device by push, so no call-ended push either."""
    call = forwarded_call(via_push=False)
    actions = call.handle(Cancel(), 3.0)
    assert not any(isinstance(a, SendPush) for a in actions)
    assert ForwardCancel() in actions


def test_step7_live_binding_gets_the_invite_at_once_without_push() -> None:
    """Step 7: a binding already live → ForwardInvite at once, no push, no own 180."""
    call = IncomingCall(CONFIG)
    assert call.handle(InviteReceived(BINDING), 2.0) == [
        ForwardInvite(BINDING), StartTimer("C", 182.0)]
    assert not call.pushed
    assert call.handle(Progress(), 3.0) == []
    assert call.handle(PushAccepted(), 3.0) == []


# --- beyond the steps -------------------------------------------------------------------------


@pytest.mark.parametrize("forwarded", [False, True])
def test_decline_answers_603_and_cancels_a_forwarded_invite(forwarded: bool) -> None:
    """Fast-channel decline → 603 Decline (+ CANCEL downstream if handed on), no push."""
    call = forwarded_call(via_push=True) if forwarded else pushed_call()
    actions = call.handle(Decline(), 15.0)
    expected: list[CallAction] = [StopTimer("C" if forwarded else "T1"), SendFinal(603, "Decline")]
    if forwarded:
        expected.append(ForwardCancel())
    assert actions == [*expected, Finished(CallOutcome.DECLINED)]
    assert call.handle(Decline(), 16.0) == []


def test_unreachable_step7_binding_falls_back_to_a_push() -> None:
    """A live binding that never answers (Timer B, dead flow): push as in step 1."""
    call = forwarded_call(via_push=False)
    assert call.handle(DeviceUnreachable("timer B"), 32.0) == [
        StopTimer("C"), SendPush(PushKind.CALL), ALERTING, StartTimer("T1", 152.0)]
    assert call.state is CallState.ALERTING
    assert call.handle(DeviceReady(OTHER_BINDING), 40.0)[1] == ForwardInvite(OTHER_BINDING)


def test_unreachable_after_push_waits_t2_for_a_new_registration_then_gives_up() -> None:
    """A pushed device that registered but cannot be reached gets T2 to register again; after
    max_forward_attempts forwards the call ends 480 No-Response-From-Device."""
    call = forwarded_call(via_push=True)  # attempt 1
    assert call.handle(DeviceUnreachable(), 40.0) == [StopTimer("C"), StartTimer("T2", 130.0)]
    assert call.state is CallState.PROGRESS
    call.handle(DeviceReady(BINDING), 50.0)  # attempt 2
    call.handle(DeviceUnreachable(), 60.0)
    call.handle(DeviceReady(BINDING), 70.0)  # attempt 3
    assert call.forward_attempts == 3
    assert call.handle(DeviceUnreachable(), 80.0) == [
        StopTimer("C"), NO_RESPONSE, SendPush(PushKind.CALL_ENDED, "timeout"),
        Finished(CallOutcome.MISSED)]


def test_timer_c_ends_a_call_the_provider_never_gives_up_on() -> None:
    """RFC 3261 §16.8: Timer C → CANCEL downstream and 408 upstream."""
    call = forwarded_call(via_push=True)
    call.handle(DeviceResponse(180, "Ringing"), 11.0)
    assert call.handle(TimerFired("C"), 191.0) == [
        SendFinal(408, "Request Timeout"), ForwardCancel(),
        SendPush(PushKind.CALL_ENDED, "timeout"), Finished(CallOutcome.MISSED)]


def test_events_before_the_invite_and_bogus_input_are_ignored() -> None:
    """Nothing happens before the INVITE; unknown timers and impossible statuses are dropped."""
    call = IncomingCall()
    for event in (PushAccepted(), Progress(), Decline(), Cancel(), DeviceReady(BINDING),
                  DeviceResponse(200), DeviceUnreachable(), TimerFired("T1"),
                  PushFailed(dead_token=True)):
        assert call.handle(event, 0.0) == []
    assert call.state is CallState.IDLE
    call.handle(InviteReceived(), 1.0)
    assert call.handle(TimerFired("bogus"), 2.0) == []
    assert call.handle(TimerFired("C"), 2.0) == []
    assert call.handle(DeviceResponse(99), 2.0) == []
    assert call.handle(DeviceResponse(200), 2.0) == []  # nothing forwarded
    assert call.handle(InviteReceived(), 3.0) == []


def test_call_config_rejects_non_positive_values() -> None:
    """Zero or negative timers, or no forward attempt at all, are configuration errors."""
    for bad in ({"ring_timeout": 0.0}, {"progress_timeout": -1.0}, {"timer_c": 0.0},
                {"max_forward_attempts": 0}):
        with pytest.raises(ValueError, match="positive"):
            CallConfig(**bad)
    assert IncomingCall().config == CallConfig()


def test_cancel_reason_parsing() -> None:
    """RFC 3326 SIP;cause=200 (and Q.850 cause 26) mean answered elsewhere, in any list
    position and spelling; quoted text cannot fake it."""
    assert cancel_outcome("sip;CAUSE=200") is CallOutcome.ANSWERED_ELSEWHERE
    assert cancel_outcome('Q.850;cause=16, SIP;cause=200;text="x"') is (
        CallOutcome.ANSWERED_ELSEWHERE)
    assert cancel_outcome("Q.850;cause=26") is CallOutcome.ANSWERED_ELSEWHERE
    assert cancel_outcome('SIP;text="a;cause=200";cause=480') is CallOutcome.CANCELLED
    assert cancel_outcome("Q.850;cause=200") is CallOutcome.CANCELLED
    assert cancel_outcome("SIP") is CallOutcome.CANCELLED
    assert cancel_outcome("SIP;cause=99999999999999") is CallOutcome.CANCELLED
    assert cancel_outcome("") is CallOutcome.CANCELLED


def test_every_non_final_state_has_a_timer_so_every_call_ends() -> None:
    """The table leaves ENDED never, and each waiting state has its own timer input."""
    assert all(state is not CallState.ENDED for state, _ in TRANSITIONS)
    timed = {state for (state, inp), target in TRANSITIONS.items()
             if inp.name.startswith("TIMER") and target is CallState.ENDED}
    assert timed == {CallState.ALERTING, CallState.PROGRESS, CallState.FORWARDED}


# --- any order ----------------------------------------------------------------------------

EVENTS: st.SearchStrategy[CallEvent | str] = st.one_of(
    st.sampled_from([InviteReceived(), InviteReceived(BINDING)]),
    st.just(PushAccepted()),
    st.builds(PushFailed, st.booleans(), st.sampled_from(["", "x"])),
    st.just(Progress()),
    st.just(Decline()),
    st.sampled_from([DeviceReady(BINDING), DeviceReady(OTHER_BINDING)]),
    st.builds(DeviceResponse, st.sampled_from([100, 180, 183, 200, 486, 487, 503, 603, 42])),
    st.just(DeviceUnreachable()),
    st.builds(Cancel, st.sampled_from([None, "SIP;cause=200", "SIP;cause=487"])),
    st.builds(TimerFired, st.sampled_from(["T1", "T2", "C", "nope"])),
    st.just("armed-timer"),
)


@settings(max_examples=300)
@given(events=st.lists(EVENTS, max_size=30), dt=st.floats(0.0, 60.0))
def test_any_event_order_gives_one_final_one_finished_and_no_late_actions(
    events: list[CallEvent | str], dt: float
) -> None:
    """Whatever arrives in whatever order, and once every armed timer has run: an INVITE'd
    call sent exactly one final upstream and one Finished (last); nothing is forwarded or
    pushed after the final; at most one call push, and a call-ended push only after one;
    relays and CANCELs only after a forward; timers are consistent; nothing raises."""
    call = IncomingCall(CONFIG)
    armed: dict[str, float] = {}
    finals = finished = call_pushes = ended_pushes = forwards = 0
    now = 0.0
    invited = False

    def run(event: CallEvent) -> None:
        nonlocal finals, finished, call_pushes, ended_pushes, forwards, invited
        actions = call.handle(event, now)
        if isinstance(event, InviteReceived) and actions:
            invited = True
        for i, action in enumerate(actions):
            assert finished == 0, f"{action} after Finished"
            match action:
                case SendFinal() | RelayResponse(status=200 | 486 | 487 | 603):
                    finals += 1
                case RelayResponse(status=code):
                    assert code < 200
                    assert forwards > 0
                case SendProvisional():
                    assert finals == 0
                case SendPush(kind=PushKind.CALL):
                    assert finals == 0
                    call_pushes += 1
                case SendPush(kind=PushKind.CALL_ENDED):
                    assert call_pushes == 1
                    ended_pushes += 1
                case ForwardInvite():
                    assert finals == 0, "ForwardInvite after a final"
                    forwards += 1
                case ForwardCancel():
                    assert forwards > 0
                case StartTimer(name, deadline):
                    assert deadline >= now
                    armed[name] = deadline
                case StopTimer(name):
                    assert name in armed, f"stopping {name}, which is not running"
                    del armed[name]
                case WipeInstance():
                    assert finals == 1
                case Finished():
                    finished += 1
                    assert i == len(actions) - 1
                    assert finals == 1
                    assert not armed, "timers left running at the end"
        assert finals <= 1 and finished <= 1
        assert call_pushes <= 1 and ended_pushes <= 1

    for event in events:
        now += dt
        if isinstance(event, str):
            if not armed:
                continue
            name = min(armed, key=armed.__getitem__)
            now = max(now, armed.pop(name))
            run(TimerFired(name))
        else:
            if isinstance(event, TimerFired):
                armed.pop(event.name, None)
            run(event)
    while armed:  # the driver lets every timer run: every call ends
        name = min(armed, key=armed.__getitem__)
        now = max(now, armed.pop(name))
        run(TimerFired(name))
    if invited:
        assert finals == 1 and finished == 1
        assert call.state is CallState.ENDED and call.outcome is not None
    else:
        assert finals == 0 and finished == 0 and call.state is CallState.IDLE
