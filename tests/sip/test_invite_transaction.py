"""INVITE transactions (RFC 3261 §17.1.1, §17.2.1, RFC 6026): schedules, ACK, ACCEPTED."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.sip.transaction import (
    INVITE_CLIENT_IGNORED,
    INVITE_CLIENT_TRANSITIONS,
    INVITE_SERVER_IGNORED,
    INVITE_SERVER_TRANSITIONS,
    Action,
    ClientInviteTransaction,
    Deliver,
    InviteServerInput,
    InviteTxState,
    Send,
    ServerInviteTransaction,
    StartTimer,
    StopTimer,
    Terminated,
    TimerConfig,
    TransactionUsageError,
    TxOutcome,
)

INVITE = b"INVITE sip:dev SIP/2.0\r\n\r\n"
TIMERS = TimerConfig()  # T1 0.5, T2 4, T4 5


def ack_for(response: object) -> bytes:
    return f"ACK for {response}".encode()


def state(tx: ClientInviteTransaction | ServerInviteTransaction) -> InviteTxState:
    """The state, read through a call so that mypy does not narrow it across actions."""
    return tx.state


def client(*, reliable: bool = False) -> ClientInviteTransaction:
    return ClientInviteTransaction(branch="z9hG4bKi", data=INVITE, reliable=reliable,
                                   timers=TIMERS, make_ack=ack_for)


def server(*, reliable: bool = False) -> ServerInviteTransaction:
    return ServerInviteTransaction(branch="z9hG4bKs", reliable=reliable, timers=TIMERS)


class Driver:
    """A stand-in for the endpoint: runs actions against a float clock and checks them."""

    def __init__(self, tx: ClientInviteTransaction | ServerInviteTransaction) -> None:
        self.tx = tx
        self.timers: dict[str, float] = {}
        self.sent: list[tuple[float, bytes]] = []
        self.delivered: list[object] = []
        self.outcome: TxOutcome | None = None
        self.now = 0.0

    def run(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            assert self.outcome is None, "action after Terminated"
            match action:
                case Send(data):
                    self.sent.append((self.now, data))
                case StartTimer(name, deadline):
                    assert deadline >= self.now
                    self.timers[name] = deadline
                case StopTimer(name):
                    del self.timers[name]
                case Deliver(response):
                    self.delivered.append(response)
                case Terminated(outcome):
                    assert not self.timers, "timers left running at termination"
                    self.outcome = outcome
        return actions

    def fire_next(self) -> list[Action]:
        name, deadline = min(self.timers.items(), key=lambda item: item[1])
        del self.timers[name]
        self.now = deadline
        return self.run(self.tx.timer_fired(name, deadline))


# --- client -----------------------------------------------------------------------------------


def test_client_udp_retransmits_at_doubling_intervals_without_t2_cap_until_timer_b() -> None:
    """Over UDP the INVITE goes at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 (A doubles, no T2 cap);
    Timer B (32 s) then ends the transaction with TIMEOUT."""
    d = Driver(tx := client())
    assert d.run(tx.start(0.0)) == [Send(INVITE), StartTimer("A", 0.5), StartTimer("B", 32.0)]
    assert tx.state is InviteTxState.CALLING
    while d.outcome is None:
        d.fire_next()
    assert [t for t, _ in d.sent] == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert d.outcome is TxOutcome.TIMEOUT
    assert state(tx) is InviteTxState.TERMINATED
    assert tx.outcome is TxOutcome.TIMEOUT


def test_client_tcp_sends_once_and_times_out_at_timer_b() -> None:
    """Over TCP there is no Timer A: one send, then Timer B."""
    d = Driver(tx := client(reliable=True))
    assert d.run(tx.start(1.0)) == [Send(INVITE), StartTimer("B", 33.0)]
    assert d.fire_next() == [Terminated(TxOutcome.TIMEOUT)]
    assert len(d.sent) == 1


def test_client_provisional_stops_a_and_b_and_allows_cancel() -> None:
    """A 1xx moves to PROCEEDING, is delivered, stops both timers (no timeout any more), and
    only now may a CANCEL be sent (§9.1)."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    assert not tx.cancel_allowed
    assert d.run(tx.receive_response(100, "100", 0.2)) == [
        StopTimer("A"), StopTimer("B"), Deliver("100")]
    assert tx.state is InviteTxState.PROCEEDING
    assert tx.cancel_allowed
    assert d.run(tx.receive_response(180, "180", 0.3)) == [Deliver("180")]
    assert d.timers == {}
    assert tx.timer_fired("B", 32.0) == []  # a stopped timer that fires anyway


def test_client_error_final_sends_ack_delivers_once_and_waits_timer_d() -> None:
    """A 486 is ACKed (ACK from make_ack), delivered, and Timer D (32 s) absorbs its
    retransmissions with the same ACK, delivering none of them."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    d.run(tx.receive_response(180, "180", 0.1))
    assert d.run(tx.receive_response(486, "486", 1.0)) == [
        Send(b"ACK for 486"), Deliver("486"), StartTimer("D", 33.0)]
    assert tx.state is InviteTxState.COMPLETED
    assert not tx.cancel_allowed
    assert tx.receive_response(486, "486 again", 2.0) == [Send(b"ACK for 486")]
    assert tx.receive_response(180, "late 180", 2.0) == []
    assert tx.receive_response(200, "odd 200", 2.0) == []
    assert d.fire_next() == [Terminated(TxOutcome.COMPLETED)]
    assert d.delivered == ["180", "486"]


def test_client_error_final_in_calling_stops_timer_a_too() -> None:
    """A final straight after the INVITE (no provisional) stops A and B."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    actions = d.run(tx.receive_response(603, "603", 0.4))
    assert actions[:2] == [StopTimer("A"), StopTimer("B")]
    assert d.timers == {"D": 32.4}


def test_client_error_final_over_tcp_acks_and_terminates_at_once() -> None:
    """Timer D is 0 over TCP: ACK, deliver, terminate."""
    tx = client(reliable=True)
    tx.start(0.0)
    assert tx.receive_response(404, "404", 0.1) == [
        StopTimer("B"), Send(b"ACK for 404"), Deliver("404"), Terminated(TxOutcome.COMPLETED)]
    assert tx.receive_response(404, "404", 0.2) == []


def test_client_2xx_goes_to_accepted_and_delivers_every_2xx_until_timer_m() -> None:
    """RFC 6026: a 2xx is delivered without an ACK (the TU's job); ACCEPTED delivers each
    further 2xx (a proxy forwards them) until Timer M = 64·T1, on UDP and TCP alike."""
    for reliable in (False, True):
        d = Driver(tx := client(reliable=reliable))
        d.run(tx.start(0.0))
        d.run(tx.receive_response(180, "180", 0.1))
        assert d.run(tx.receive_response(200, "200", 5.0)) == [
            Deliver("200"), StartTimer("M", 37.0)]
        assert tx.state is InviteTxState.ACCEPTED
        assert not tx.cancel_allowed
        assert d.run(tx.receive_response(200, "200 again", 5.5)) == [Deliver("200 again")]
        assert d.run(tx.receive_response(200, "200 fork", 6.0)) == [Deliver("200 fork")]
        assert tx.receive_response(183, "late", 6.0) == []
        assert tx.receive_response(500, "late", 6.0) == []
        assert tx.transport_error(6.0) == []
        assert d.fire_next() == [Terminated(TxOutcome.COMPLETED)]
        assert not any(data.startswith(b"ACK") for _, data in d.sent)


def test_client_transport_error_terminates_before_accepted() -> None:
    """A transport error in CALLING, PROCEEDING or COMPLETED ends with TRANSPORT_ERROR."""
    for responses in ([], [180], [180, 486]):
        d = Driver(tx := client())
        d.run(tx.start(0.0))
        for status in responses:
            d.run(tx.receive_response(status, str(status), 0.1))
        actions = d.run(tx.transport_error(0.2))
        assert actions[-1] == Terminated(TxOutcome.TRANSPORT_ERROR)
        assert tx.transport_error(0.3) == []


def test_client_misuse_raises_and_changes_nothing() -> None:
    """Responses before start, start twice, unknown timers, bad statuses: caller bugs."""
    tx = client()
    with pytest.raises(TransactionUsageError):
        tx.receive_response(180, "x", 0.0)
    with pytest.raises(TransactionUsageError):
        tx.transport_error(0.0)
    assert tx.state is InviteTxState.IDLE
    tx.start(0.0)
    with pytest.raises(TransactionUsageError):
        tx.start(0.1)
    with pytest.raises(TransactionUsageError):
        tx.timer_fired("E", 0.1)
    with pytest.raises(TransactionUsageError):
        tx.receive_response(700, "x", 0.1)
    assert state(tx) is InviteTxState.CALLING
    assert tx.timer_fired("D", 0.1) == []  # not armed


def test_client_custom_t1_scales_a_b_and_m() -> None:
    """Timer A, B and M follow T1; Timer D stays at 32 s."""
    tx = ClientInviteTransaction(branch="b", data=INVITE, reliable=False,
                                 timers=TimerConfig(t1=0.1), make_ack=ack_for)
    assert tx.start(0.0)[1:] == [StartTimer("A", 0.1), StartTimer("B", 6.4)]
    assert tx.receive_response(200, "ok", 1.0)[-1] == StartTimer("M", 7.4)
    tx2 = ClientInviteTransaction(branch="b", data=INVITE, reliable=False,
                                  timers=TimerConfig(t1=0.1), make_ack=ack_for)
    tx2.start(0.0)
    assert tx2.receive_response(500, "x", 1.0)[-1] == StartTimer("D", 33.0)


# --- server -----------------------------------------------------------------------------------

TRYING = b"SIP/2.0 100 Trying\r\n\r\n"
RINGING = b"SIP/2.0 180 Ringing\r\n\r\n"
OK = b"SIP/2.0 200 OK\r\n\r\n"
BUSY = b"SIP/2.0 486 Busy Here\r\n\r\n"


def test_server_starts_in_proceeding_and_resends_the_last_provisional() -> None:
    """The TU sends 100 itself; a retransmitted INVITE gets the newest provisional again
    (nothing before the first)."""
    tx = server()
    assert tx.state is InviteTxState.PROCEEDING
    assert tx.receive_request(0.0) == []
    assert tx.send_response(100, TRYING, 0.0) == [Send(TRYING)]
    assert tx.receive_request(0.5) == [Send(TRYING)]
    assert tx.send_response(180, RINGING, 0.6) == [Send(RINGING)]
    assert tx.receive_request(1.5) == [Send(RINGING)]
    assert tx.receive_ack(1.6) == []  # no final yet: not ours


def test_server_error_final_retransmits_with_timer_g_capped_at_t2_until_timer_h() -> None:
    """Over UDP a 486 goes at 0, then G at +0.5, +1, +2, +4, +4, … until H (32 s): TIMEOUT."""
    d = Driver(tx := server())
    assert d.run(tx.send_response(486, BUSY, 0.0)) == [
        Send(BUSY), StartTimer("G", 0.5), StartTimer("H", 32.0)]
    assert tx.state is InviteTxState.COMPLETED
    while d.outcome is None:
        d.fire_next()
    times = [t for t, _ in d.sent]
    assert times[:7] == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
    assert all(b - a <= 4.0 for a, b in itertools.pairwise(times))
    assert d.outcome is TxOutcome.TIMEOUT
    assert {data for _, data in d.sent} == {BUSY}


def test_server_ack_confirms_stops_g_and_h_and_timer_i_ends_it() -> None:
    """ACK in COMPLETED → CONFIRMED: no more retransmissions; Timer I = T4 over UDP."""
    d = Driver(tx := server())
    d.run(tx.send_response(180, RINGING, 0.0))
    d.run(tx.send_response(603, BUSY, 1.0))
    assert tx.receive_request(1.2) == [Send(BUSY)]  # INVITE retransmission: the final again
    assert d.run(tx.receive_ack(1.3)) == [StopTimer("G"), StopTimer("H"), StartTimer("I", 6.3)]
    assert tx.state is InviteTxState.CONFIRMED
    assert tx.receive_ack(1.4) == []
    assert tx.receive_request(1.5) == []
    assert tx.send_response(200, OK, 1.6) == []
    assert d.fire_next() == [Terminated(TxOutcome.COMPLETED)]


def test_server_over_tcp_has_no_timer_g_and_ack_terminates_at_once() -> None:
    """Reliable transport: no G, H still runs; the ACK ends the transaction (I = 0)."""
    tx = server(reliable=True)
    assert tx.send_response(480, BUSY, 0.0) == [Send(BUSY), StartTimer("H", 32.0)]
    assert tx.receive_ack(0.5) == [StopTimer("H"), Terminated(TxOutcome.COMPLETED)]
    assert tx.state is InviteTxState.TERMINATED


def test_server_2xx_goes_to_accepted_sends_tu_2xx_absorbs_invites_until_timer_l() -> None:
    """RFC 6026: after a 2xx the transaction never retransmits it; the TU's further 2xx go out
    as given; retransmitted INVITEs and ACKs are absorbed; Timer L (64·T1) ends it."""
    for reliable in (False, True):
        d = Driver(tx := server(reliable=reliable))
        d.run(tx.send_response(180, RINGING, 0.0))
        assert d.run(tx.send_response(200, OK, 2.0)) == [Send(OK), StartTimer("L", 34.0)]
        assert tx.state is InviteTxState.ACCEPTED
        assert tx.receive_request(2.5) == []
        assert tx.receive_ack(2.6) == []
        assert tx.send_response(200, OK, 3.0) == [Send(OK)]
        assert tx.send_response(180, RINGING, 3.0) == []
        assert tx.send_response(500, BUSY, 3.0) == []
        assert tx.transport_error(3.1) == []
        assert d.fire_next() == [Terminated(TxOutcome.COMPLETED)]
        assert tx.send_response(200, OK, 40.0) == []


def test_server_transport_error_keeps_the_state() -> None:
    """RFC 6026 §8.8: a failed send leaves the transaction where it was."""
    tx = server()
    tx.send_response(100, TRYING, 0.0)
    assert tx.transport_error(0.1) == []
    assert tx.state is InviteTxState.PROCEEDING
    d = Driver(tx)
    d.run(tx.send_response(500, BUSY, 0.2))
    assert tx.transport_error(0.3) == []
    assert state(tx) is InviteTxState.COMPLETED


def test_server_misuse_raises() -> None:
    """Unknown timer names and impossible statuses are caller bugs; unarmed timers are not."""
    tx = server()
    with pytest.raises(TransactionUsageError):
        tx.timer_fired("J", 0.0)
    with pytest.raises(TransactionUsageError):
        tx.send_response(99, b"x", 0.0)
    assert tx.timer_fired("H", 0.0) == []
    assert tx.state is InviteTxState.PROCEEDING


def test_invite_tables_are_disjoint_and_the_server_covers_every_pair() -> None:
    """No pair is both a transition and ignored; TERMINATED has no exit; every server
    (state, non-timer input) pair is in one table, so the server never raises on order."""
    assert not set(INVITE_CLIENT_TRANSITIONS) & INVITE_CLIENT_IGNORED
    assert not set(INVITE_SERVER_TRANSITIONS) & INVITE_SERVER_IGNORED
    assert all(s is not InviteTxState.TERMINATED for s, _ in INVITE_CLIENT_TRANSITIONS)
    assert all(s is not InviteTxState.TERMINATED for s, _ in INVITE_SERVER_TRANSITIONS)
    server_states = [InviteTxState.PROCEEDING, InviteTxState.COMPLETED,
                     InviteTxState.CONFIRMED, InviteTxState.ACCEPTED, InviteTxState.TERMINATED]
    timers = {InviteServerInput.TIMER_G, InviteServerInput.TIMER_H, InviteServerInput.TIMER_I,
              InviteServerInput.TIMER_L}
    for state in server_states:
        for inp in InviteServerInput:
            if inp in timers:
                continue
            key = (state, inp)
            assert (key in INVITE_SERVER_TRANSITIONS) != (key in INVITE_SERVER_IGNORED), key


# --- random sequences -------------------------------------------------------------------------

CLIENT_EVENTS = st.lists(
    st.one_of(
        st.just(("start",)),
        st.tuples(st.just("response"),
                  st.sampled_from([100, 180, 183, 200, 202, 300, 404, 486, 487, 503, 603])),
        st.tuples(st.just("timer"), st.sampled_from(["A", "B", "D", "M"])),
        st.just(("transport",)),
        st.just(("armed-timer",)),
    ),
    max_size=40,
)


@given(reliable=st.booleans(), events=CLIENT_EVENTS, dt=st.floats(0.01, 5.0))
def test_any_client_invite_sequence_is_safe(
    reliable: bool, events: list[tuple[object, ...]], dt: float
) -> None:
    """Any input order: only documented misuse raises; at most one non-2xx final is delivered
    and never together with a 2xx; the INVITE is never sent after a response; an ACK is sent
    only after a non-2xx final; Terminated comes once and last, with no timer left armed."""
    tx = client(reliable=reliable)
    armed: dict[str, float] = {}
    delivered: list[int] = []
    terminated = 0
    got_response = False
    now = 0.0
    for event in events:
        now += dt
        before = tx.state
        try:
            match event:
                case ("start",):
                    actions = tx.start(now)
                case ("response", int(status)):
                    actions = tx.receive_response(status, status, now)
                case ("timer", str(name)):
                    actions = tx.timer_fired(name, now)
                case ("transport",):
                    actions = tx.transport_error(now)
                case _:
                    if not armed:
                        continue
                    name = min(armed, key=armed.__getitem__)
                    now = max(now, armed.pop(name))
                    actions = tx.timer_fired(name, now)
        except TransactionUsageError:
            documented = (before is InviteTxState.IDLE and event[0] in ("response", "transport")
                          ) or (before is not InviteTxState.IDLE and event[0] == "start")
            assert documented, f"unexpected misuse error for {event} in {before}"
            assert tx.state is before
            continue
        if event[0] == "response":
            got_response = True
        for i, action in enumerate(actions):
            assert terminated == 0, "action after Terminated"
            match action:
                case Deliver(int(status)):
                    delivered.append(status)
                case Send(data):
                    if data == INVITE:
                        assert not got_response, "INVITE retransmitted after a response"
                    else:
                        assert data.startswith(b"ACK for ")
                        assert int(data.split()[-1]) >= 300
                case StartTimer(name, deadline):
                    assert deadline >= now
                    armed[name] = deadline
                case StopTimer(name):
                    armed.pop(name, None)
                case Terminated():
                    terminated += 1
                    assert i == len(actions) - 1
                    armed.clear()
        errors = [s for s in delivered if s >= 300]
        successes = [s for s in delivered if 200 <= s < 300]
        assert len(errors) <= 1
        assert not (errors and successes)
        assert (tx.state is InviteTxState.TERMINATED) == (terminated == 1)
        assert tx.cancel_allowed == (tx.state is InviteTxState.PROCEEDING)


SERVER_EVENTS = st.lists(
    st.one_of(
        st.just(("request",)),
        st.just(("ack",)),
        st.tuples(st.just("respond"), st.sampled_from([100, 180, 183, 200, 486, 500, 603])),
        st.tuples(st.just("timer"), st.sampled_from(["G", "H", "I", "L"])),
        st.just(("armed-timer",)),
        st.just(("transport",)),
    ),
    max_size=40,
)


@given(reliable=st.booleans(), events=SERVER_EVENTS)
def test_any_server_invite_sequence_is_safe(
    reliable: bool, events: list[tuple[object, ...]]
) -> None:
    """Any input order: nothing raises; one kind of final only (all 2xx, or one non-2xx);
    a retransmitted INVITE echoes the last provisional or the non-2xx final; nothing is sent
    after CONFIRMED; Terminated once and last."""
    tx = server(reliable=reliable)
    armed: dict[str, float] = {}
    sent_finals: set[int] = set()
    last_provisional: bytes | None = None
    error_final: bytes | None = None
    terminated = 0
    now = 0.0
    for n, event in enumerate(events):
        now += 0.3
        before = tx.state
        match event:
            case ("request",):
                actions = tx.receive_request(now)
                if before is InviteTxState.PROCEEDING:
                    assert actions == ([] if last_provisional is None
                                       else [Send(last_provisional)])
                elif before is InviteTxState.COMPLETED:
                    assert actions == ([Send(error_final)] if error_final else [])
                else:
                    assert actions == []
            case ("ack",):
                actions = tx.receive_ack(now)
                if before is not InviteTxState.COMPLETED:
                    assert actions == []
            case ("respond", int(status)):
                data = f"SIP/2.0 {status} X {n}".encode()
                actions = tx.send_response(status, data, now)
                if actions:
                    if status < 200:
                        last_provisional = data
                    else:
                        sent_finals.add(status)
                        if status >= 300:
                            error_final = data
            case ("timer", str(name)):
                actions = tx.timer_fired(name, now)
            case ("transport",):
                actions = tx.transport_error(now)
                assert actions == []
                assert tx.state is before
            case _:
                if not armed:
                    continue
                name = min(armed, key=armed.__getitem__)
                now = max(now, armed.pop(name))
                actions = tx.timer_fired(name, now)
        for i, action in enumerate(actions):
            assert terminated == 0
            match action:
                case Send():
                    assert before not in (InviteTxState.CONFIRMED, InviteTxState.TERMINATED)
                case StartTimer(name, deadline):
                    armed[name] = deadline
                case StopTimer(name):
                    armed.pop(name, None)
                case Terminated():
                    terminated += 1
                    assert i == len(actions) - 1
                    armed.clear()
        non_2xx = {s for s in sent_finals if s >= 300}
        assert len(non_2xx) <= 1
        assert not (non_2xx and sent_finals - non_2xx)
        assert (tx.state is InviteTxState.TERMINATED) == (terminated == 1)
