"""The pjsua2 phone registers at Kamailio and takes calls from the sipp caller through it.

Kamailio routes each INVITE to the registered contact, so here the phone stands where
sipis's device binding will stand in the integration tests: the flows (answer, caller BYE,
phone BYE, CANCEL with RFC 3326 Reason, decline, two calls at once, MESSAGE) are the ones
those tests drive through sipis.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from tests.conftest import CallerFactory, PhoneFactory
from tests.peers.caller import ANSWERED_ELSEWHERE, Caller, Scenario, Transport
from tests.peers.kamailio import Kamailio
from tests.peers.phone import AsyncPhone, Phone, PhoneError

ALICE_PASSWORD = "alice-secret-pw"  # tests.conftest.DEFAULT_USERS


def registered_phone(
    phone_factory: PhoneFactory,
    kamailio: Kamailio,
    transport: Transport = "udp",
    auto_answer: tuple[int, ...] = (),
) -> Phone:
    phone = phone_factory(name=f"alice-{transport}")
    phone.register(
        kamailio.registrar_uri(),
        "alice",
        ALICE_PASSWORD,
        domain=kamailio.domain,
        transport=transport,
        auto_answer=auto_answer,
    )
    phone.wait_registered()
    return phone


def caller_for(
    caller_factory: CallerFactory, kamailio: Kamailio, transport: Transport = "udp"
) -> Caller:
    return caller_factory(
        kamailio.address, domain=kamailio.domain, from_user="bob", transport=transport
    )


# -- registration --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_phone_registers_with_digest_over_udp_and_tcp(
    kamailio: Kamailio, phone_factory: PhoneFactory, transport: Transport
) -> None:
    """The phone answers the 401 challenge; Kamailio binds its own port on that transport."""
    phone = phone_factory(name=f"alice-{transport}")
    account = phone.register(
        kamailio.registrar_uri(),
        "alice",
        ALICE_PASSWORD,
        domain=kamailio.domain,
        transport=transport,
        expires=120,
    )
    state = phone.wait_registered(account)

    assert state.code == 200 and state.expiration == 120
    (binding,) = kamailio.location("alice")
    log = kamailio.register_log()
    assert [(e.status, e.authorization) for e in log] == [(401, False), (200, True)]
    assert binding.transport == transport
    if transport == "udp":
        assert binding.contact == f"sip:alice@127.0.0.1:{phone.udp_port}"
    else:
        # pjsip puts the TCP connection's own local port in the Contact (not its listener),
        # so requests to the binding must reuse that connection.
        assert binding.contact == f"sip:alice@127.0.0.1:{log[-1].source[1]};transport=TCP"
    assert ALICE_PASSWORD not in phone.log_path.read_text()
    # pjlib's console output went to the log, never into the JSON event stream.
    assert [e for e in phone.events() if e["event"] == "noise"] == []


def test_wrong_password_is_reported_as_a_failed_registration(
    kamailio: Kamailio, phone_factory: PhoneFactory
) -> None:
    """wait_registered raises with the registrar's status when the digest is refused."""
    phone = phone_factory()
    phone.register(kamailio.registrar_uri(), "alice", "wrong", domain=kamailio.domain)

    with pytest.raises(PhoneError, match="registration failed: 401"):
        phone.wait_registered()
    assert kamailio.location("alice") == []


def test_unregister_removes_the_binding(kamailio: Kamailio, phone_factory: PhoneFactory) -> None:
    """unregister sends Expires 0; the next outcome has expiration 0 and no binding is left."""
    phone = registered_phone(phone_factory, kamailio)

    phone.unregister()
    state = phone.wait_unregistered()

    assert state.code == 200
    assert kamailio.location("alice") == []


def test_close_with_unregister_removes_the_binding_first(
    kamailio: Kamailio, phone_factory: PhoneFactory
) -> None:
    """close(unregister=True) de-REGISTERs before the process exits, and still exits fast."""
    phone = registered_phone(phone_factory, kamailio)
    assert len(kamailio.location("alice")) == 1

    started = time.monotonic()
    assert phone.close(unregister=True) == 0

    assert time.monotonic() - started < 2.0
    assert kamailio.location("alice") == []
    assert kamailio.register_log()[-1].is_deregister


# -- calls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_phone_answers_and_the_callers_bye_reaches_it(
    kamailio: Kamailio,
    phone_factory: PhoneFactory,
    caller_factory: CallerFactory,
    transport: Transport,
) -> None:
    """INVITE → phone rings and answers with SDP → caller gets 200, ACKs, its BYE ends it."""
    phone = registered_phone(phone_factory, kamailio, transport)
    caller = caller_for(caller_factory, kamailio, transport)

    run = caller.start(
        Scenario.CALL, to_user="alice", hold_ms=300, invite_headers=["X-Test-Call: 1"]
    )
    call = phone.wait_incoming_call()
    assert call.header("X-Test-Call") == "1"
    assert (call.header("From") or "").startswith("<sip:bob@sip.test>")
    assert call.header("To") == "<sip:alice@sip.test>"
    assert call.header("Record-Route") is not None
    assert "m=audio" in call.body
    phone.ring()
    phone.answer()
    phone.wait_call_state("CONFIRMED")
    bye = phone.wait_call_request("BYE")
    ended = phone.wait_call_state("DISCONNECTED")
    trace = run.wait()

    assert trace.ok, trace.describe()
    assert trace.statuses() == [100, 180, 200]
    ok = trace.first(200)
    assert ok is not None and "m=audio" in ok.body and "RTP/AVP 0" in ok.body
    assert [m.method for m in trace.requests_sent] == ["INVITE", "ACK", "BYE"]
    assert trace.statuses("BYE") == [200]
    assert bye.header("Call-ID") == call.call_id
    assert ended.cause_method == "BYE"


def test_phone_hangs_up_and_the_caller_receives_bye(
    kamailio: Kamailio, phone_factory: PhoneFactory, caller_factory: CallerFactory
) -> None:
    """After the call is up the phone sends BYE; the caller receives it and answers 200."""
    phone = registered_phone(phone_factory, kamailio, auto_answer=(180, 200))
    caller = caller_for(caller_factory, kamailio)

    run = caller.start(Scenario.CALLEE_HANGS_UP, to_user="alice")
    phone.wait_incoming_call()
    phone.wait_call_state("CONFIRMED")
    time.sleep(0.1)  # let the ACK arrive (the BYE must not overtake it)
    phone.hangup()
    ended = phone.wait_call_state("DISCONNECTED")
    trace = run.wait()

    assert trace.ok, trace.describe()
    assert [m.method for m in trace.requests_received] == ["BYE"]
    assert ended.last_status == 200 and ended.cause_method is None


@pytest.mark.parametrize("reason", [None, ANSWERED_ELSEWHERE])
def test_caller_cancel_ends_the_ringing_call_with_487(
    kamailio: Kamailio,
    phone_factory: PhoneFactory,
    caller_factory: CallerFactory,
    reason: str | None,
) -> None:
    """CANCEL while ringing: 200 for the CANCEL, 487, ACK; the phone sees the CANCEL's Reason."""
    phone = registered_phone(phone_factory, kamailio, auto_answer=(180,))
    caller = caller_for(caller_factory, kamailio)

    headers = [f"Reason: {reason}"] if reason else []
    run = caller.start(
        Scenario.CANCEL, to_user="alice", cancel_after_ms=200, cancel_headers=headers
    )
    phone.wait_incoming_call()
    ended = phone.wait_call_state("DISCONNECTED")
    trace = run.wait()

    assert trace.ok, trace.describe()
    assert trace.statuses() == [100, 180, 487]
    assert trace.statuses("CANCEL") == [200]
    assert ended.last_status == 487 and ended.cause_method == "CANCEL"
    assert ended.cause_header("Reason") == reason


def test_phone_declines_and_the_caller_gets_the_status(
    kamailio: Kamailio, phone_factory: PhoneFactory, caller_factory: CallerFactory
) -> None:
    """decline(603) → the caller gets 603 (REJECTED expects it) and ACKs."""
    phone = registered_phone(phone_factory, kamailio)
    caller = caller_for(caller_factory, kamailio)

    run = caller.start(Scenario.REJECTED, to_user="alice", final_statuses=(480, 603))
    phone.wait_incoming_call()
    phone.decline(code=603)
    ended = phone.wait_call_state("DISCONNECTED")
    trace = run.wait()

    assert trace.ok, trace.describe()
    assert trace.statuses()[-1] == 603
    assert ended.last_status == 603


def test_two_concurrent_calls_to_the_same_phone_both_arrive(
    kamailio: Kamailio, phone_factory: PhoneFactory, caller_factory: CallerFactory
) -> None:
    """One pjsua2 phone takes two calls at once; each is answered and ended on its own."""
    phone = registered_phone(phone_factory, kamailio)
    caller = caller_for(caller_factory, kamailio)

    runs = [caller.start(Scenario.CALL, to_user="alice", hold_ms=300) for _ in range(2)]
    first = phone.wait_incoming_call()
    second = phone.wait_incoming_call()
    assert first.call_id != second.call_id
    for call in (first, second):
        phone.answer(call.call_id)
    for call in (first, second):
        phone.wait_call_state("CONFIRMED", call.call_id)
        phone.wait_call_state("DISCONNECTED", call.call_id)
    traces = [run.wait() for run in runs]

    assert all(t.ok for t in traces), [t.describe() for t in traces]
    assert all(t.statuses()[-1] == 200 for t in traces)


def test_message_is_delivered_to_the_phone(
    kamailio: Kamailio, phone_factory: PhoneFactory, caller_factory: CallerFactory
) -> None:
    """MESSAGE to the AoR → Kamailio → phone (body, sender); the phone answers 200."""
    phone = registered_phone(phone_factory, kamailio)
    caller = caller_for(caller_factory, kamailio)

    trace = caller.run(Scenario.MESSAGE, to_user="alice", body="see you at 5")
    message = phone.wait_message()

    assert trace.ok, trace.describe()
    assert trace.statuses("MESSAGE") == [200]
    assert message.body.strip() == "see you at 5"
    assert message.content_type == "text/plain"
    assert "sip:bob@sip.test" in message.from_uri


# -- process handling ----------------------------------------------------------------------


def test_close_reaps_the_worker_and_a_dead_worker_fails_waits_fast(
    phone_factory: PhoneFactory,
) -> None:
    """close() exits cleanly (code 0); a killed worker makes a pending wait fail at once."""
    phone = phone_factory()
    pid = phone.pid
    assert pid is not None and phone.close() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    doomed = phone_factory()
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(PhoneError, match="exited"):
        doomed.wait_incoming_call(timeout=5)
    assert time.monotonic() - started < 1.0


def test_a_ninth_account_is_refused_instead_of_aborting_the_worker(
    phone_factory: PhoneFactory,
) -> None:
    """pjsua2 aborts the process on a ninth account: the worker refuses it and lives on."""
    phone = phone_factory()
    for index in range(8):
        # Nobody listens on port 9: these registrations just fail, which is fine here.
        assert phone.register("sip:127.0.0.1:9", f"user{index}", "pw") == index

    with pytest.raises(PhoneError, match="ninth account"):
        phone.register("sip:127.0.0.1:9", "user8", "pw")
    assert phone.running and phone.live_calls() == []


async def test_async_phone_takes_a_call_inside_trio(
    kamailio: Kamailio, phone_factory: PhoneFactory, caller_factory: CallerFactory
) -> None:
    """AsyncPhone and run_async share one trio loop: register, ring, answer, caller BYE."""
    phone = AsyncPhone(phone_factory(start=False))
    await phone.start()
    await phone.register(kamailio.registrar_uri(), "alice", ALICE_PASSWORD, domain=kamailio.domain)
    await phone.wait_registered()
    caller = caller_for(caller_factory, kamailio)
    traces = []

    async def call() -> None:
        traces.append(await caller.run_async(Scenario.CALL, to_user="alice", hold_ms=100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await phone.wait_incoming_call()
        await phone.ring()
        await phone.answer()
        await phone.wait_call_state("CONFIRMED")
        ended = await phone.wait_call_state("DISCONNECTED")

    assert traces[0].ok, traces[0].describe()
    assert ended.cause_method == "BYE"
    assert await phone.close() == 0
