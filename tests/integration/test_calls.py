"""Incoming calls end to end: sipp caller → Kamailio → sipis → APNs (local), no phone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.callkit import apns_instance, live_apns, woken_phone
from tests.integration.harness import instance_body, running_daemon
from tests.peers.apns_server import ApnsServer, TestKey
from tests.peers.caller import Scenario
from tests.peers.fcm_server import FcmServer, ServiceAccountKey

pytestmark = pytest.mark.kamailio


def live_fcm(fcm: FcmServer, account: ServiceAccountKey, directory: Path) -> dict[str, Any]:
    sa_file = account.write(directory / "sa.json", token_uri=fcm.token_uri)
    return {
        "provider": "live",
        "fcm": {"service_account_file": str(sa_file), "url": fcm.url,
                "ca_file": str(fcm.write_ca(directory / "fcm-ca.pem"))},
    }


async def _call_a_dead_token(tmp_path: Path, kamailio: Any, caller_factory: Any, *,
                             push: dict[str, Any], token: dict[str, Any]) -> Any:
    """Create an instance whose push token the provider refuses, call it with no phone, and
    check the dead-token path: 480 Push-Token-Invalid after 180 Alerting-Device, the instance
    gone (404 with its old secret) and its binding removed at Kamailio. Returns the trace."""
    async with running_daemon(tmp_path, push=push, calls={"ring_timeout": "5s"}) as d:
        resp = await d.create(instance_body(kamailio, transport="udp", push=token))
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert len(kamailio.location("alice")) == 1
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        trace = await caller.run_async(Scenario.REJECTED, to_user="alice", timeout=15)
        assert trace.ok, trace.describe()
        got = await d.client.get(f"/v1/instances/{body['id']}",
                                 headers={"authorization": f"Bearer {body['secret']}"})
        assert got.status_code == 404, got.text
        with trio.fail_after(5):
            while kamailio.location("alice"):
                await trio.sleep(0.1)
    assert trace.header_values("X-Sipis-Reason", status=480) == ["Push-Token-Invalid"]
    assert trace.header_values("X-Sipis-Push-Status", status=180)[:1] == ["Alerting-Device"]
    return trace


async def test_call_without_a_phone_pushes_rings_and_ends_480_after_the_ring_timer(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """INVITE via Kamailio → voip push with the SPEC keys, 180 Alerting-Device then
    Push-Notification-Sent, and 480 No-Response-From-Device once T1 (2 s) runs out."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "2s"}) as d:
            token = os.urandom(32).hex()
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"token": token}))
            assert resp.status_code == 201, resp.text
            instance_id = resp.json()["id"]
            caller = caller_factory(kamailio.address, domain=kamailio.domain)
            trace = await caller.run_async(Scenario.REJECTED, to_user="alice", timeout=15)
            assert trace.ok, trace.describe()
            with trio.fail_after(5):
                await apns.wait_received(2)  # the call push and the call-ended push
            assert d.daemon.calls is not None
            assert d.daemon.calls.outcomes["missed"] == 1
        nursery.cancel_scope.cancel()

    statuses = trace.statuses()
    assert 180 in statuses and statuses[-1] == 480, trace.describe()
    assert trace.header_values("X-Sipis-Push-Status", status=180)[:2] == [
        "Alerting-Device", "Push-Notification-Sent"], trace.describe()
    assert trace.header_values("X-Sipis-Reason", status=480) == ["No-Response-From-Device"]
    delay = trace.delay(480)
    assert delay is not None and 1.5 < delay < 6, trace.describe()

    push, ended = apns.pushes
    assert push.push_type == "voip"
    assert push.topic == "com.example.phone.voip"
    keys = push.sipis
    assert keys["type"] == "call"
    assert keys["instance"] == instance_id
    assert keys["call"]
    assert keys["from_uri"].startswith("sip:caller@")
    assert keys["to_uri"] == f"sip:alice@{kamailio.domain}"
    assert keys["sip_call_id"]
    assert int(keys["sent_at"]) > 0
    assert ended.push_type == "alert"
    assert ended.sipis["type"] == "call-ended"
    assert ended.sipis["reason"] == "timeout"
    assert ended.sipis["call"] == keys["call"]


async def test_call_to_a_dead_push_token_is_480_and_wipes_the_instance(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """APNs refuses the token (BadDeviceToken) → 480 Push-Token-Invalid, instance gone."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        await _call_a_dead_token(tmp_path, kamailio, caller_factory,
                                 push=live_apns(apns, key, tmp_path),
                                 token={"token": "not-a-hex-token"})
        nursery.cancel_scope.cancel()


async def test_woken_phone_registers_and_the_call_is_answered_through_sipis(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """Push → the phone REGISTERs to sipis → INVITE forwarded, 200 relayed, ACK and BYE
    routed through sipis's Record-Route."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=300)
        with trio.fail_after(5):
            await apns.wait_received(1)
        await woken_phone(phone_factory, body, auto_answer=[200])
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["answered"] == 1
    assert 200 in trace.statuses()
    assert trace.statuses("BYE") == [200]


async def test_caller_cancels_while_ringing_487_and_call_ended_push(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """CANCEL with Reason SIP;cause=200 → 487 upstream and a call-ended push
    (answered-elsewhere)."""
    from tests.peers.caller import ANSWERED_ELSEWHERE

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        trace = await caller.run_async(
            Scenario.CANCEL, to_user="alice", timeout=15, cancel_after_ms=500,
            cancel_headers=[f"Reason: {ANSWERED_ELSEWHERE}"])
        assert trace.ok, trace.describe()
        with trio.fail_after(5):
            await apns.wait_received(2)
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["answered-elsewhere"] == 1
    assert trace.statuses()[-1] == 487, trace.describe()
    call, ended = apns.pushes
    assert call.push_type == "voip"
    assert ended.sipis["type"] == "call-ended"
    assert ended.sipis["reason"] == "answered-elsewhere"


async def _ringing_call_ref(apns: ApnsServer) -> str:
    """The call ref of the first call push (its ``sipis.call``), once APNs has it."""
    with trio.fail_after(5):
        await apns.wait_received(1)
        while not apns.pushes:
            await trio.sleep(0.01)
    ref = apns.pushes[0].sipis["call"]
    assert isinstance(ref, str) and ref
    return ref


async def test_progress_sends_180_making_progress_and_swaps_the_ring_timer_for_t2(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """POST …/progress → 204 and 180 Device-Making-Progress; T1 (2 s) no longer ends the
    call, T2 (6 s) does: 480 No-Response-From-Device after ~6 s; then the call is gone (404)."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    timers = {"ring_timeout": "2s", "progress_timeout": "6s"}
    async with apns_instance(tmp_path, kamailio, calls=timers) as (d, apns, body):
        auth = {"authorization": f"Bearer {body['secret']}"}
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.REJECTED, to_user="alice", timeout=20)
        ref = await _ringing_call_ref(apns)
        url = f"/v1/instances/{body['id']}/calls/{ref}/progress"
        progressed = await d.client.post(url, headers=auth)
        assert progressed.status_code == 204, progressed.text
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["missed"] == 1
        ended = await d.client.post(url, headers=auth)
        assert ended.status_code == 404, ended.text

    assert trace.statuses()[-1] == 480, trace.describe()
    push_statuses = trace.header_values("X-Sipis-Push-Status", status=180)
    assert push_statuses[0] == "Alerting-Device", trace.describe()
    assert push_statuses[-1] == "Device-Making-Progress", trace.describe()
    assert trace.header_values("X-Sipis-Reason", status=480) == ["No-Response-From-Device"]
    delay = trace.delay(480)
    # T1 alone would end it at ~2 s; progress came within ~1 s, so T2 ends it at ~6-7 s.
    assert delay is not None and 5.5 < delay < 10, trace.describe()


async def test_decline_answers_603_upstream_at_once(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """POST …/decline → 204, the caller gets 603 Decline long before T1, outcome declined,
    no call-ended push (the declining device knows); a second decline is 404."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        auth = {"authorization": f"Bearer {body['secret']}"}
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.REJECTED, to_user="alice", timeout=15,
                           final_statuses=[603])
        ref = await _ringing_call_ref(apns)
        url = f"/v1/instances/{body['id']}/calls/{ref}/decline"
        declined = await d.client.post(url, headers=auth)
        assert declined.status_code == 204, declined.text
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["declined"] == 1
        again = await d.client.post(url, headers=auth)
        assert again.status_code == 404, again.text
        await trio.sleep(0.3)
        assert len(apns.pushes) == 1, [p.sipis for p in apns.pushes]

    assert trace.statuses()[-1] == 603, trace.describe()
    delay = trace.delay(603)
    assert delay is not None and delay < 5, trace.describe()


async def test_woken_android_phone_gets_an_fcm_data_push_and_answers(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """An FCM instance: a high-priority data message with the SPEC keys as strings, then the
    phone REGISTERs, answers, and the caller's BYE passes through sipis."""
    from tests.peers.phone import AsyncPhone

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    account = ServiceAccountKey.generate()
    fcm = FcmServer(account)
    async with trio.open_nursery() as nursery:
        await nursery.start(fcm.run)
        async with running_daemon(tmp_path, push=live_fcm(fcm, account, tmp_path),
                                  calls={"ring_timeout": "10s"}) as d:
            token = "fcm-token-" + os.urandom(16).hex()
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"provider": "fcm", "token": token}))
            assert resp.status_code == 201, resp.text
            body = resp.json()
            caller = caller_factory(kamailio.address, domain=kamailio.domain)
            run = caller.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=300)
            with trio.fail_after(5):
                while not fcm.accepted:
                    await trio.sleep(0.01)
            phone = AsyncPhone(phone_factory())
            device = body["device"]
            await phone.register(device["registrar"].replace(";transport=tcp", ""),
                                 device["username"], body["secret"], realm=device["realm"],
                                 transport="udp", auto_answer=[200])
            trace = await trio.to_thread.run_sync(run.wait)
            assert trace.ok, trace.describe()
            assert d.daemon.calls is not None
            assert d.daemon.calls.outcomes["answered"] == 1
        nursery.cancel_scope.cancel()
    assert 200 in trace.statuses()
    assert trace.statuses("BYE") == [200]
    message = fcm.accepted[0]
    assert message.token == token
    assert message.android["priority"].lower() == "high"
    data = message.data
    assert all(isinstance(v, str) for v in data.values())
    assert data["type"] == "call"
    assert data["instance"] == body["id"]
    assert data["call"]
    assert data["from_uri"].startswith("sip:caller@")
    assert data["to_uri"] == f"sip:alice@{kamailio.domain}"
    assert data["sip_call_id"]
    assert int(data["sent_at"]) > 0


async def test_call_over_a_tcp_registration_flow_is_answered(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """sipis registers to Kamailio over TCP; Kamailio (fix_nated_register) sends the INVITE
    over that flow; the woken phone answers and the BYE passes."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio,
                             transport="tcp", calls={"ring_timeout": "10s"}) as (d, apns, body):
        assert [b.transport for b in kamailio.location("alice")] == ["tcp"]
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=300)
        with trio.fail_after(5):
            await apns.wait_received(1)
        phone = await woken_phone(phone_factory, body, auto_answer=[200])
        incoming = await phone.wait_incoming_call(timeout=10)
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["answered"] == 1
    assert 200 in trace.statuses()
    assert trace.statuses("BYE") == [200]
    # Kamailio's Via (below sipis's) says the INVITE reached sipis over TCP.
    vias = [v for value in incoming.header_values("Via") for v in value.split(",")]
    assert any(v.strip().upper().startswith("SIP/2.0/TCP") for v in vias), vias


async def test_phone_hangs_up_and_its_bye_reaches_the_caller_through_sipis(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """The answered phone sends the BYE: routed by sipis's Record-Route to Kamailio and on to
    the caller, whose 200 comes back to the phone."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.CALLEE_HANGS_UP, to_user="alice", timeout=20)
        with trio.fail_after(5):
            await apns.wait_received(1)
        phone = await woken_phone(phone_factory, body, auto_answer=[200])
        await phone.wait_incoming_call(timeout=10)
        await phone.wait_call_state("CONFIRMED", timeout=5)
        await phone.hangup()
        ended = await phone.wait_call_state("DISCONNECTED", timeout=5)
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["answered"] == 1
    assert 200 in trace.statuses()
    assert [m.method for m in trace.messages if m.direction == "received"
            and not m.is_response] == ["BYE"], trace.describe()
    assert ended.last_status == 200, ended


async def test_phone_already_registered_gets_the_invite_at_once_without_a_push(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """A live device binding before the call: the INVITE goes straight to the phone, which
    answers; APNs hears nothing."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        phone = await woken_phone(phone_factory, body, auto_answer=[200])
        await phone.wait_registered(timeout=5)
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=300)
        incoming = await phone.wait_incoming_call(timeout=5)
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["answered"] == 1
        await trio.sleep(0.3)
    assert trace.statuses("BYE") == [200]
    assert incoming.request_uri.startswith("sip:"), incoming
    assert "Push-Notification-Sent" not in trace.header_values("X-Sipis-Push-Status")
    delay = trace.delay(200)
    assert delay is not None and delay < 2, trace.describe()
    assert apns.pushes == [] and apns.answers == [], apns.answers


async def test_two_calls_to_one_instance_at_once_are_both_delivered_and_answered(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """Two INVITEs ring the same instance together: two call pushes; the phone's one
    REGISTER wakes both, both reach it and both are answered."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        first = caller_factory(kamailio.address, domain=kamailio.domain)
        second = caller_factory(kamailio.address, domain=kamailio.domain, from_user="bob")
        runs = [first.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=500),
                second.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=500)]
        with trio.fail_after(5):
            await apns.wait_received(2)
        phone = await woken_phone(phone_factory, body, auto_answer=[200])
        calls = [await phone.wait_incoming_call(timeout=10) for _ in runs]
        traces = [await trio.to_thread.run_sync(run.wait) for run in runs]
        for trace in traces:
            assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["answered"] == 2
    assert len({c.call_id for c in calls}) == 2
    assert {(c.header("From") or "").split(">")[0] for c in calls} == {
        f"<sip:caller@{kamailio.domain}", f"<sip:bob@{kamailio.domain}"}
    for trace in traces:
        assert trace.statuses("BYE") == [200], trace.describe()
    assert [p.sipis["type"] for p in apns.pushes] == ["call", "call"]
    assert len({p.sipis["call"] for p in apns.pushes}) == 2


async def test_apns_410_unregistered_is_480_and_the_wipe_unregisters_at_kamailio(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """APNs 410 Unregistered → 480 Push-Token-Invalid; the instance is gone (404 with its
    old secret) and its binding is removed from Kamailio (the wipe unREGISTERs)."""
    from tests.peers.apns_server import Reply

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    apns.reply_next(Reply(410, "Unregistered"))
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        await _call_a_dead_token(tmp_path, kamailio, caller_factory,
                                 push=live_apns(apns, key, tmp_path),
                                 token={"token": os.urandom(32).hex()})
        nursery.cancel_scope.cancel()
    assert [a.status for a in apns.answers] == [410]
    assert apns.pushes == []


async def test_apns_429_then_200_still_rings_with_one_accepted_call_push(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """APNs answers 429 TooManyRequests (Retry-After 1) and then 200: the push is retried,
    the caller gets Push-Notification-Sent, and exactly one call push was accepted."""
    from tests.peers.apns_server import Reply

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "3s"}) as (d, apns, body):
        apns.reply_next(Reply(429, "TooManyRequests", retry_after=1))
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        trace = await caller.run_async(Scenario.REJECTED, to_user="alice", timeout=15)
        assert trace.ok, trace.describe()
        with trio.fail_after(5):
            await apns.wait_received(3)  # 429, the retried call push, call-ended
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["missed"] == 1
    assert trace.header_values("X-Sipis-Push-Status", status=180)[:2] == [
        "Alerting-Device", "Push-Notification-Sent"], trace.describe()
    assert trace.header_values("X-Sipis-Reason", status=480) == ["No-Response-From-Device"]
    sent = next(m for m in trace.responses if m.status == 180
                and m.header("X-Sipis-Push-Status") == "Push-Notification-Sent")
    assert 0.9 < sent.time - trace.messages[0].time < 3, trace.describe()  # Retry-After 1
    assert [a.status for a in apns.answers] == [429, 200, 200]
    assert [p.sipis["type"] for p in apns.pushes] == ["call", "call-ended"]


async def test_caller_cancels_after_the_invite_reached_the_phone_487_and_the_phone_stops(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """The woken phone rings (180); the caller's CANCEL is passed on by sipis: the phone's
    call ends (487 to its INVITE) and the caller gets 487."""
    from tests.peers.phone import AsyncPhone

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    phone = AsyncPhone(phone_factory())
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.CANCEL, to_user="alice", timeout=15,
                           cancel_after_ms=2000)
        with trio.fail_after(5):
            await apns.wait_received(1)
        device = body["device"]
        await phone.register(device["registrar"].replace(";transport=tcp", ""),
                             device["username"], body["secret"], realm=device["realm"],
                             transport="udp", auto_answer=[180])
        await phone.wait_incoming_call(timeout=5)
        await phone.wait_call_state("EARLY", timeout=5)
        ended = await phone.wait_call_state("DISCONNECTED", timeout=8)
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
    assert trace.statuses()[-1] == 487, trace.describe()
    assert trace.statuses("CANCEL") == [200], trace.describe()
    assert ended.last_status == 487, ended
    assert ended.cause_method == "CANCEL", ended
    # The phone's own 180 (its tag, sipis's Record-Route) reached the caller before the CANCEL.
    ringing = [m for m in trace.responses if m.status == 180 and m.header("Record-Route")]
    cancel = next(m for m in trace.requests_sent if m.method == "CANCEL")
    assert ringing and ringing[0].time < cancel.time, trace.describe()


async def test_fcm_unregistered_token_is_480_and_the_wipe_unregisters_at_kamailio(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """FCM answers UNREGISTERED for the instance's token → 480 Push-Token-Invalid; the
    instance is gone (404 with its old secret) and its binding is removed from Kamailio."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    account = ServiceAccountKey.generate()
    fcm = FcmServer(account)
    token = "fcm-token-" + os.urandom(16).hex()
    fcm.dead_tokens.add(token)
    async with trio.open_nursery() as nursery:
        await nursery.start(fcm.run)
        await _call_a_dead_token(tmp_path, kamailio, caller_factory,
                                 push=live_fcm(fcm, account, tmp_path),
                                 token={"provider": "fcm", "token": token})
        nursery.cancel_scope.cancel()
    assert fcm.accepted == []
    assert fcm.send_requests >= 1


async def test_caller_cancel_without_reason_before_the_phone_is_487_and_a_cancelled_push(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """A CANCEL with no Reason header while only the push is out → 487 upstream, outcome
    cancelled, and an alert call-ended push with reason "cancelled" for the same call."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        trace = await caller.run_async(Scenario.CANCEL, to_user="alice", timeout=15,
                                       cancel_after_ms=500)
        assert trace.ok, trace.describe()
        with trio.fail_after(5):
            await apns.wait_received(2)
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["cancelled"] == 1
    assert trace.statuses()[-1] == 487, trace.describe()
    assert trace.statuses("CANCEL")[:1] == [200], trace.describe()
    cancel = next(m for m in trace.requests_sent if m.method == "CANCEL")
    assert cancel.header("Reason") is None, cancel.text
    call, ended = apns.pushes
    assert call.push_type == "voip"
    assert call.sipis["type"] == "call"
    assert ended.push_type == "alert"
    assert ended.sipis["type"] == "call-ended"
    assert ended.sipis["reason"] == "cancelled"
    assert ended.sipis["call"] == call.sipis["call"]


async def test_apns_goaway_mid_burst_every_call_push_is_delivered_exactly_once(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """Five instances called at once; APNs sends GOAWAY after the second stream. The streams
    it did not process are retried on a new connection: each call ref is accepted exactly
    once as a call push, and every caller hears Push-Notification-Sent before its 480."""
    users = {f"user{i}": f"user{i}-secret-pw" for i in range(5)}
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000, users=users)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    apns.goaway_after(2)
    # Answers come 0.2 s late so the GOAWAY leaves first: with instant answers the peer
    # closes the connection before its GOAWAY is written (see tests/peers/apns_server.py).
    apns.delay = 0.2
    tokens: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "2s"}) as d:
            for user, password in users.items():
                token = os.urandom(32).hex()
                resp = await d.create(instance_body(kamailio, user=user, password=password,
                                                    transport="udp", push={"token": token}))
                assert resp.status_code == 201, resp.text
                tokens[resp.json()["id"]] = token
            runs = [caller_factory(kamailio.address, domain=kamailio.domain).start(
                        Scenario.REJECTED, to_user=user, timeout=15) for user in users]
            traces = [await trio.to_thread.run_sync(run.wait) for run in runs]
            for trace in traces:
                assert trace.ok, trace.describe()
            with trio.fail_after(5):
                while sum(p.sipis["type"] == "call-ended" for p in apns.pushes) < len(users):
                    await trio.sleep(0.05)
            assert d.daemon.calls is not None
            assert d.daemon.calls.outcomes["missed"] == len(users)
        nursery.cancel_scope.cancel()
    assert apns.connections_opened >= 2  # the GOAWAY forced a second connection
    assert [a.stream_id for a in apns.answers if a.connection_id == 1] in ([1, 3], [3, 1])
    calls = [p for p in apns.pushes if p.sipis["type"] == "call"]
    refs = [p.sipis["call"] for p in calls]
    assert len(refs) == len(users) and len(set(refs)) == len(users), refs
    assert sorted(p.token for p in calls) == sorted(tokens.values())
    assert all(tokens[p.sipis["instance"]] == p.token for p in calls)
    ended = [p.sipis["call"] for p in apns.pushes if p.sipis["type"] == "call-ended"]
    assert sorted(ended) == sorted(refs)
    for trace in traces:
        assert "Push-Notification-Sent" in trace.header_values(
            "X-Sipis-Push-Status", status=180), trace.describe()
        assert trace.statuses()[-1] == 480, trace.describe()


async def test_message_through_kamailio_is_200_and_an_alert_push_naming_the_sender(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """A MESSAGE to the AOR, relayed by Kamailio to sipis → 200 at the sender and one alert
    push of type message with the sender's URI and, push.message_body being off, no body."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio) as (d, apns, body):
        instance_id = body["id"]
        caller = caller_factory(kamailio.address, domain=kamailio.domain, from_user="bob")
        trace = await caller.run_async(Scenario.MESSAGE, to_user="alice", timeout=10,
                                       body="Lunch at noon?")
        assert trace.ok, trace.describe()
        with trio.fail_after(5):
            await apns.wait_received(1)
    assert trace.statuses("MESSAGE")[-1] == 200, trace.describe()
    (push,) = apns.pushes
    assert push.push_type == "alert"
    keys = push.sipis
    assert keys["type"] == "message"
    assert keys["instance"] == instance_id
    assert keys["from_uri"] == f"sip:bob@{kamailio.domain}"
    assert keys["to_uri"] == f"sip:alice@{kamailio.domain}"
    assert "body" not in keys
    assert "Lunch" not in str(push.payload)


def _raw_request(method: str, uri: str, *, transport: str = "UDP", call_id: str | None = None,
                 extra: str = "") -> bytes:
    """A minimal out-of-dialog request from 127.0.0.1 (rport: answered to the source)."""
    branch = "z9hG4bK-raw-" + os.urandom(6).hex()
    call_id = call_id or os.urandom(8).hex()
    return (f"{method} {uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@127.0.0.1>;tag={os.urandom(4).hex()}\r\n"
            f"To: <{uri}>\r\n"
            f"Call-ID: {call_id}\r\n"
            f"CSeq: 1 {method}\r\n"
            "Contact: <sip:probe@127.0.0.1:5999>\r\n"
            f"{extra}"
            "Content-Length: 0\r\n\r\n").encode()


def _final_statuses(replies: list[bytes]) -> list[int]:
    """Status codes of the final responses among raw replies (a TCP chunk may hold several)."""
    statuses = []
    for reply in replies:
        for line in reply.decode("utf-8", "replace").split("\r\n"):
            if line.startswith("SIP/2.0 "):
                status = int(line.split(" ", 2)[1])
                if status >= 200:
                    statuses.append(status)
    return statuses


async def test_direct_requests_to_sipis_unknown_token_404_relay_403_and_garbage_survived(
    tmp_path: Path,
) -> None:
    """Straight to sipis's SIP port: an INVITE for an unknown contact token → 404; one whose
    Request-URI names another host → 403 (no open relay); garbage and a truncated request
    over UDP and TCP get no answer or 400; afterwards OPTIONS still gets 200 on both."""
    from tests.peers.caller import Transport, raw_sip_send_async

    transports: tuple[Transport, ...] = ("udp", "tcp")
    async with running_daemon(tmp_path) as d:
        addr = ("127.0.0.1", d.sip_port)
        unknown = _raw_request("INVITE", f"sip:{os.urandom(12).hex()}@127.0.0.1:{d.sip_port}")
        replies = await raw_sip_send_async(unknown, "udp", addr, wait=1.0)
        assert _final_statuses(replies)[:1] == [404], replies

        relay = _raw_request("INVITE", "sip:bob@127.0.0.2:5099")
        replies = await raw_sip_send_async(relay, "udp", addr, wait=1.0)
        assert _final_statuses(replies)[:1] == [403], replies

        garbage = b"\x00\xff\x13 this is not SIP at all \xfe\r\n\r\n"
        for transport in transports:
            wire = transport.upper()
            truncated = _raw_request("INVITE", f"sip:x@127.0.0.1:{d.sip_port}",
                                     transport=wire)[:90]
            for junk in (garbage, truncated):
                replies = await raw_sip_send_async(junk, transport, addr, wait=0.5,
                                                   half_close=True)
                assert set(_final_statuses(replies)) <= {400}, (transport, junk, replies)
                assert all(r.startswith(b"SIP/2.0 400") for r in replies), replies

        for transport in transports:
            options = _raw_request("OPTIONS", f"sip:127.0.0.1:{d.sip_port}",
                                   transport=transport.upper())
            replies = await raw_sip_send_async(options, transport, addr, wait=0.5)
            assert _final_statuses(replies)[:1] == [200], (transport, replies)


async def test_re_invite_update_and_info_pass_through_sipis_and_the_call_is_recorded(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """After the answer, the caller's re-INVITE (→ 200 → ACK), UPDATE, INFO and BYE all reach
    the phone along sipis's Record-Route and their 200s come back; GET …/calls then shows the
    call as answered, with the caller and the call ref of its push."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain, from_user="bob")
        run = caller.start(Scenario.CALL_MID_DIALOG, to_user="alice", timeout=20,
                           hold_ms=200)
        with trio.fail_after(5):
            await apns.wait_received(1)
        phone = await woken_phone(phone_factory, body, auto_answer=[200])
        incoming = await phone.wait_incoming_call(timeout=10)
        seen = [(await phone.wait_call_request(method, timeout=10)).method
                for method in ("INVITE", "UPDATE", "INFO", "BYE")]
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        calls = await d.client.get(f"/v1/instances/{body['id']}/calls",
                                   headers={"authorization": f"Bearer {body['secret']}"})
    assert seen == ["INVITE", "UPDATE", "INFO", "BYE"]
    for method in ("UPDATE", "INFO", "BYE"):
        assert trace.statuses(method) == [200], trace.describe()
    assert trace.statuses("INVITE")[-1] == 200
    assert incoming.header("Record-Route") is not None
    assert calls.status_code == 200, calls.text
    [record] = calls.json()["calls"]
    assert record["outcome"] == "answered"
    assert record["from_uri"] == f"sip:bob@{kamailio.domain}"
    assert record["call"] == apns.pushes[0].sipis["call"]


async def test_message_is_held_and_delivered_to_the_phone_when_it_registers(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """A MESSAGE with no phone registered is held (alert push sent); when the woken phone
    registers to sipis it receives the MESSAGE with the sender and the text; a DELETE of the
    instance then drops the phone's binding at sipis too."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio) as (d, apns, body):
        auth = {"authorization": f"Bearer {body['secret']}"}
        caller = caller_factory(kamailio.address, domain=kamailio.domain, from_user="bob")
        trace = await caller.run_async(Scenario.MESSAGE, to_user="alice", timeout=10,
                                       body="See you at eight")
        assert trace.ok, trace.describe()
        with trio.fail_after(5):
            await apns.wait_received(1)
        phone = await woken_phone(phone_factory, body)
        got = await phone.wait_message(timeout=10)
        assert d.daemon.calls is not None and d.daemon.store is not None
        with trio.fail_after(5):
            while await d.daemon.store.held_messages(body["id"]):
                await trio.sleep(0.05)
        assert d.daemon.calls.registrar.bindings.live(body["id"], trio.current_time())
        deleted = await d.client.delete(f"/v1/instances/{body['id']}", headers=auth)
        assert deleted.status_code == 204
        assert not d.daemon.calls.registrar.bindings.live(body["id"], trio.current_time())
    assert got.body.rstrip() == "See you at eight"
    assert f"sip:bob@{kamailio.domain}" in got.from_uri
    assert got.content_type.startswith("text/plain")
    assert got.header("Date") is not None
    assert [p.sipis["type"] for p in apns.pushes] == ["message"]


async def test_instance_expiring_alert_push_reaches_apns_before_the_expiry(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """With a warning 7,199 s before a 2 h lifetime, the sweeper sends one alert push of type
    instance-expiring (bundle topic, the AOR as to_uri) about a second after creation."""
    kamailio = kamailio_factory()
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  lifetime={"sweep_interval": "200ms",
                                            "expiry_warnings": ["7199s"]}) as d:
            resp = await d.create(instance_body(kamailio, transport="udp", lifetime="2h",
                                                push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            with trio.fail_after(10):
                await apns.wait_received(1)
            await trio.sleep(1.0)  # no second one for the same expiry
        nursery.cancel_scope.cancel()
    (push,) = apns.pushes
    assert push.push_type == "alert"
    assert push.sipis["type"] == "instance-expiring"
    assert push.sipis["instance"] == resp.json()["id"]
    assert push.sipis["to_uri"] == f"sip:alice@{kamailio.domain}"


async def test_a_phone_that_rings_past_timer_c_is_cancelled_and_the_caller_gets_408(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """RFC 3261 §16.8: the phone answers 180 and nothing more, the caller never gives up:
    when Timer C (2 s here) runs out, sipis CANCELs the phone and answers the caller 408;
    the call is recorded as missed."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio,
                             calls={"ring_timeout": "10s", "timer_c": "2s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.REJECTED, to_user="alice", timeout=20,
                           final_statuses=[408])
        with trio.fail_after(5):
            await apns.wait_received(1)
        phone = await woken_phone(phone_factory, body, auto_answer=[180])
        await phone.wait_incoming_call(timeout=10)
        ended = await phone.wait_call_state("DISCONNECTED", timeout=10)
        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        assert d.daemon.calls is not None
        assert d.daemon.calls.outcomes["missed"] == 1
    assert trace.statuses()[-1] == 408
    assert 180 in trace.statuses()
    assert ended.last_status == 487, ended
