"""Incoming calls end to end: sipp caller → Kamailio → sipis → APNs (local), no phone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.harness import instance_body, running_daemon
from tests.peers.apns_server import KEY_ID, TEAM_ID, ApnsServer, TestKey
from tests.peers.caller import Scenario

pytestmark = pytest.mark.kamailio


def live_apns(apns: ApnsServer, key: TestKey, directory: Path) -> dict[str, Any]:
    return {
        "provider": "live",
        "apns": {"team_id": TEAM_ID, "key_id": KEY_ID, "key_file": str(key.write(directory)),
                 "production_url": apns.url, "sandbox_url": apns.url,
                 "ca_file": str(apns.write_ca(directory))},
    }


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
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "5s"}) as d:
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"token": "not-a-hex-token"}))
            assert resp.status_code == 201, resp.text
            body = resp.json()
            caller = caller_factory(kamailio.address, domain=kamailio.domain)
            trace = await caller.run_async(Scenario.REJECTED, to_user="alice", timeout=15)
            assert trace.ok, trace.describe()
            got = await d.client.get(f"/v1/instances/{body['id']}",
                                     headers={"authorization": f"Bearer {body['secret']}"})
            assert got.status_code in (401, 404), got.text
        nursery.cancel_scope.cancel()
    assert trace.header_values("X-Sipis-Reason", status=480) == ["Push-Token-Invalid"]
    assert trace.header_values("X-Sipis-Push-Status", status=180)[:1] == ["Alerting-Device"]


async def test_woken_phone_registers_and_the_call_is_answered_through_sipis(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """Push → the phone REGISTERs to sipis → INVITE forwarded, 200 relayed, ACK and BYE
    routed through sipis's Record-Route."""
    from tests.peers.phone import AsyncPhone

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "10s"}) as d:
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            body = resp.json()
            caller = caller_factory(kamailio.address, domain=kamailio.domain)
            run = caller.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=300)
            with trio.fail_after(5):
                await apns.wait_received(1)
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


async def test_caller_cancels_while_ringing_487_and_call_ended_push(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """CANCEL with Reason SIP;cause=200 → 487 upstream and a call-ended push
    (answered-elsewhere)."""
    from tests.peers.caller import ANSWERED_ELSEWHERE

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "10s"}) as d:
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            caller = caller_factory(kamailio.address, domain=kamailio.domain)
            trace = await caller.run_async(
                Scenario.CANCEL, to_user="alice", timeout=15, cancel_after_ms=500,
                cancel_headers=[f"Reason: {ANSWERED_ELSEWHERE}"])
            assert trace.ok, trace.describe()
            with trio.fail_after(5):
                await apns.wait_received(2)
            assert d.daemon.calls is not None
            assert d.daemon.calls.outcomes["answered-elsewhere"] == 1
        nursery.cancel_scope.cancel()
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
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "2s", "progress_timeout": "6s"}) as d:
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            body = resp.json()
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
        nursery.cancel_scope.cancel()

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
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  calls={"ring_timeout": "10s"}) as d:
            resp = await d.create(instance_body(kamailio, transport="udp",
                                                push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            body = resp.json()
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
        nursery.cancel_scope.cancel()

    assert trace.statuses()[-1] == 603, trace.describe()
    delay = trace.delay(603)
    assert delay is not None and delay < 5, trace.describe()
