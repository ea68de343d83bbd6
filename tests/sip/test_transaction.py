"""Non-INVITE transactions (RFC 3261 §17.1.2, §17.2.2): schedules, absorption, termination."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.sip.transaction import (
    IGNORED,
    SERVER_IGNORED,
    SERVER_TRANSITIONS,
    TRANSITIONS,
    Action,
    Deliver,
    NonInviteClientTransaction,
    Send,
    ServerNonInviteTransaction,
    StartTimer,
    StopTimer,
    Terminated,
    TimerConfig,
    TransactionUsageError,
    TxInput,
    TxOutcome,
    TxState,
)

REQUEST = b"REGISTER sip:r SIP/2.0\r\n\r\n"
TIMERS = TimerConfig()


def client(*, reliable: bool = False) -> NonInviteClientTransaction:
    return NonInviteClientTransaction(branch="z9hG4bK1", data=REQUEST, reliable=reliable,
                                      timers=TIMERS)


class Driver:
    """A tiny stand-in for the endpoint: executes actions against a float clock."""

    def __init__(self, tx: NonInviteClientTransaction | ServerNonInviteTransaction) -> None:
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

    def advance_to_next_timer(self) -> list[Action]:
        name, deadline = min(self.timers.items(), key=lambda item: item[1])
        del self.timers[name]
        self.now = deadline
        return self.run(self.tx.timer_fired(name, deadline))


# --- client over UDP --------------------------------------------------------------------------


def test_udp_retransmits_at_doubling_intervals_capped_at_t2_until_timer_f() -> None:
    """Over UDP the request goes at 0, +0.5, +1, +2, +4, +4, … and Timer F (32 s) times out."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    assert d.timers == {"E": 0.5, "F": 32.0}
    while d.outcome is None:
        d.advance_to_next_timer()
    times = [t for t, _ in d.sent]
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(data == REQUEST for _, data in d.sent)
    assert d.now == 32.0
    assert d.outcome is TxOutcome.TIMEOUT and tx.outcome is TxOutcome.TIMEOUT
    assert tx.state is TxState.TERMINATED
    assert d.delivered == []


def test_timer_f_stops_timer_e_and_terminates_with_timeout() -> None:
    """Timer F fires: StopTimer(E) then Terminated(TIMEOUT), nothing sent."""
    tx = client()
    tx.start(0.0)
    assert tx.timer_fired("F", 32.0) == [StopTimer("E"), Terminated(TxOutcome.TIMEOUT)]


def test_start_actions_over_udp() -> None:
    """start sends the request and arms E at T1 and F at 64·T1."""
    assert client().start(10.0) == [Send(REQUEST), StartTimer("E", 10.5), StartTimer("F", 42.0)]


def test_custom_timer_values_are_used() -> None:
    """T1/T2 from TimerConfig drive E and F."""
    tx = NonInviteClientTransaction(branch="b", data=REQUEST, reliable=False,
                                    timers=TimerConfig(t1=0.1, t2=0.3, t4=1.0))
    d = Driver(tx)
    d.run(tx.start(0.0))
    assert d.timers == {"E": 0.1, "F": pytest.approx(6.4)}
    for _ in range(4):
        d.advance_to_next_timer()
    assert [round(t, 6) for t, _ in d.sent] == [0.0, 0.1, 0.3, 0.6, 0.9]


def test_provisional_is_delivered_and_switches_timer_e_to_t2() -> None:
    """A 1xx is delivered; from then on each Timer E retransmits and re-arms at T2."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    d.advance_to_next_timer()  # 0.5: E → 1.5
    assert d.run(tx.receive_response(100, "trying", 0.7)) == [Deliver("trying")]
    assert tx.state is TxState.PROCEEDING
    assert d.timers["E"] == 1.5  # a provisional does not re-arm E
    d.advance_to_next_timer()
    assert d.timers["E"] == 1.5 + 4.0
    d.advance_to_next_timer()
    assert d.timers["E"] == 5.5 + 4.0
    assert d.run(tx.receive_response(180, "ringing", 6.0)) == [Deliver("ringing")]
    assert d.delivered == ["trying", "ringing"]


def test_provisional_then_timeout_in_proceeding() -> None:
    """Timer F also ends a transaction that only ever got provisionals."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    d.run(tx.receive_response(100, "trying", 0.1))
    while d.outcome is None:
        d.advance_to_next_timer()
    assert d.outcome is TxOutcome.TIMEOUT
    assert [t for t, _ in d.sent] == [0.0, 0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]


def test_final_over_udp_is_delivered_once_then_timer_k() -> None:
    """A final stops E and F, is delivered, and COMPLETED lasts T4; then Terminated(COMPLETED)."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    assert d.run(tx.receive_response(200, "ok", 0.2)) == [
        StopTimer("E"), StopTimer("F"), Deliver("ok"), StartTimer("K", 5.2)]
    assert tx.state is TxState.COMPLETED
    assert d.run(tx.receive_response(200, "ok-again", 1.0)) == []
    assert d.run(tx.receive_response(180, "late-1xx", 1.1)) == []
    assert d.run(tx.transport_error(1.2)) == []
    assert tx.state is TxState.COMPLETED
    assert d.advance_to_next_timer() == [Terminated(TxOutcome.COMPLETED)]
    assert d.now == 5.2
    assert d.delivered == ["ok"]
    assert [t for t, _ in d.sent] == [0.0]


def test_error_final_is_a_final_too() -> None:
    """A 401 ends the transaction like a 200: delivered once, COMPLETED outcome."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    d.run(tx.receive_response(401, "challenge", 0.1))
    d.run(tx.receive_response(401, "challenge-again", 0.6))
    d.advance_to_next_timer()
    assert d.delivered == ["challenge"] and d.outcome is TxOutcome.COMPLETED


def test_late_responses_and_timers_after_termination_are_ignored() -> None:
    """Once terminated, responses, transport errors and stale timers produce nothing."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    d.run(tx.receive_response(200, "ok", 0.1))
    d.advance_to_next_timer()
    assert tx.receive_response(200, "ok", 6.0) == []
    assert tx.receive_response(100, "trying", 6.0) == []
    assert tx.transport_error(6.0) == []
    for name in ("E", "F", "K"):
        assert tx.timer_fired(name, 40.0) == []
    assert tx.state is TxState.TERMINATED


def test_stopped_timer_that_fires_anyway_is_ignored() -> None:
    """A Timer E or F delivered after the final stopped it (driver race) does nothing."""
    tx = client()
    tx.start(0.0)
    tx.receive_response(200, "ok", 0.1)
    assert tx.timer_fired("E", 0.5) == []
    assert tx.timer_fired("F", 32.0) == []
    assert tx.state is TxState.COMPLETED


# --- client over TCP --------------------------------------------------------------------------


def test_tcp_never_retransmits_and_times_out_at_timer_f() -> None:
    """Over a reliable transport there is no Timer E: one send, then TIMEOUT at 64·T1."""
    d = Driver(tx := client(reliable=True))
    assert d.run(tx.start(0.0)) == [Send(REQUEST), StartTimer("F", 32.0)]
    while d.outcome is None:
        d.advance_to_next_timer()
    assert [t for t, _ in d.sent] == [0.0]
    assert d.outcome is TxOutcome.TIMEOUT


def test_tcp_final_terminates_at_once() -> None:
    """Over TCP Timer K is 0: the final is delivered and the transaction ends in the same step."""
    tx = client(reliable=True)
    tx.start(0.0)
    assert tx.receive_response(100, "trying", 0.1) == [Deliver("trying")]
    assert tx.receive_response(200, "ok", 0.2) == [
        StopTimer("F"), Deliver("ok"), Terminated(TxOutcome.COMPLETED)]
    assert tx.state is TxState.TERMINATED and tx.outcome is TxOutcome.COMPLETED
    assert tx.receive_response(200, "ok", 0.3) == []


# --- transport errors and misuse ----------------------------------------------------------


@pytest.mark.parametrize("provisional_first", [False, True])
def test_transport_error_before_final_terminates(provisional_first: bool) -> None:
    """A transport error in TRYING or PROCEEDING stops the timers and ends with TRANSPORT_ERROR."""
    d = Driver(tx := client())
    d.run(tx.start(0.0))
    if provisional_first:
        d.run(tx.receive_response(100, "trying", 0.1))
    assert d.run(tx.transport_error(0.2)) == [
        StopTimer("E"), StopTimer("F"), Terminated(TxOutcome.TRANSPORT_ERROR)]
    assert tx.outcome is TxOutcome.TRANSPORT_ERROR
    assert tx.transport_error(0.3) == []


def test_misuse_raises_a_typed_error_and_changes_nothing() -> None:
    """Responses or transport errors before start, a second start, a bad timer or status raise."""
    tx = client()
    with pytest.raises(TransactionUsageError, match="cannot take FINAL in IDLE"):
        tx.receive_response(200, "ok", 0.0)
    with pytest.raises(TransactionUsageError):
        tx.transport_error(0.0)
    assert tx.state is TxState.IDLE
    assert tx.timer_fired("E", 0.0) == []  # no timer armed yet: ignored
    tx.start(0.0)
    with pytest.raises(TransactionUsageError):
        tx.start(0.1)
    with pytest.raises(TransactionUsageError):
        tx.timer_fired("A", 0.1)
    with pytest.raises(TransactionUsageError):
        tx.receive_response(99, "bad", 0.1)
    with pytest.raises(TransactionUsageError):
        tx.receive_response(700, "bad", 0.1)
    assert tx.state.name == "TRYING"  # unchanged by the misuse


def test_transition_tables_are_disjoint_and_cover_terminal_states() -> None:
    """No (state, input) is both a transition and ignored; TERMINATED has no way out."""
    assert not set(TRANSITIONS) & IGNORED
    assert not set(SERVER_TRANSITIONS) & SERVER_IGNORED
    assert all(state is not TxState.TERMINATED for state, _ in TRANSITIONS)
    assert all(state is not TxState.TERMINATED for state, _ in SERVER_TRANSITIONS)
    assert (TxState.IDLE, TxInput.START) in TRANSITIONS


# --- random sequences ---------------------------------------------------------------------

CLIENT_EVENTS = st.lists(
    st.one_of(
        st.just(("start",)),
        st.tuples(st.just("response"), st.sampled_from([100, 180, 183, 200, 202, 401, 407,
                                                         486, 503, 699])),
        st.tuples(st.just("timer"), st.sampled_from(["E", "F", "K"])),
        st.just(("transport",)),
        st.just(("armed-timer",)),
    ),
    max_size=40,
)


@given(reliable=st.booleans(), events=CLIENT_EVENTS)
def test_any_client_input_sequence_is_safe(
    reliable: bool, events: list[tuple[object, ...]]
) -> None:
    """Whatever the order of inputs: only documented misuse raises, at most one final is
    delivered, Terminated comes once and last, and nothing is sent after a final."""
    tx = client(reliable=reliable)
    armed: dict[str, float] = {}
    finals_delivered = 0
    terminated = 0
    got_final = False
    now = 0.0
    for event in events:
        now += 0.25
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
                case _:  # fire the earliest armed timer, as a real driver would
                    if not armed:
                        continue
                    name = min(armed, key=armed.__getitem__)
                    now = max(now, armed.pop(name))
                    actions = tx.timer_fired(name, now)
        except TransactionUsageError:
            documented = (before is TxState.IDLE and event[0] in ("response", "transport")) or (
                before is not TxState.IDLE and event[0] == "start")
            assert documented, f"unexpected misuse error for {event} in {before}"
            assert tx.state is before
            continue
        for i, action in enumerate(actions):
            assert terminated == 0, "action after Terminated"
            match action:
                case Deliver(response):
                    if isinstance(response, int) and response >= 200:
                        finals_delivered += 1
                        got_final = True
                case Send():
                    assert not got_final, "sent after the final response"
                case StartTimer(name, deadline):
                    armed[name] = deadline
                case StopTimer(name):
                    armed.pop(name, None)
                case Terminated():
                    terminated += 1
                    assert i == len(actions) - 1
                    armed.clear()
        assert finals_delivered <= 1
        assert (tx.state is TxState.TERMINATED) == (terminated == 1)
    assert terminated <= 1


# --- server -------------------------------------------------------------------------------

OK = b"SIP/2.0 200 OK\r\n\r\n"
TRYING = b"SIP/2.0 100 Trying\r\n\r\n"


def server(*, reliable: bool = False) -> ServerNonInviteTransaction:
    return ServerNonInviteTransaction(branch="z9hG4bKs", reliable=reliable, timers=TIMERS)


def test_server_drops_retransmissions_before_any_response() -> None:
    """In TRYING a retransmitted request is absorbed silently (§17.2.2)."""
    tx = server()
    assert tx.state is TxState.TRYING
    assert tx.receive_request(0.5) == []


def test_server_resends_last_response_for_retransmissions() -> None:
    """Retransmissions get the last provisional, then the final, until Timer J (64·T1)."""
    d = Driver(tx := server())
    assert d.run(tx.send_response(100, TRYING, 0.1)) == [Send(TRYING)]
    assert tx.state is TxState.PROCEEDING
    assert tx.receive_request(0.5) == [Send(TRYING)]
    assert d.run(tx.send_response(200, OK, 1.0)) == [Send(OK), StartTimer("J", 33.0)]
    assert tx.receive_request(1.5) == [Send(OK)]
    assert tx.receive_request(3.5) == [Send(OK)]
    assert tx.send_response(500, b"other", 4.0) == []  # discarded in COMPLETED
    assert d.advance_to_next_timer() == [Terminated(TxOutcome.COMPLETED)]
    assert tx.receive_request(40.0) == []
    assert tx.outcome is TxOutcome.COMPLETED


def test_server_over_tcp_terminates_after_the_final() -> None:
    """Over a reliable transport Timer J is 0: send the final and end at once."""
    tx = server(reliable=True)
    assert tx.send_response(200, OK, 0.0) == [Send(OK), Terminated(TxOutcome.COMPLETED)]
    assert tx.state is TxState.TERMINATED
    assert tx.receive_request(0.1) == []


def test_server_transport_error_terminates() -> None:
    """A send failure ends the server transaction with TRANSPORT_ERROR, stopping Timer J."""
    tx = server()
    tx.send_response(200, OK, 0.0)
    assert tx.transport_error(0.1) == [StopTimer("J"), Terminated(TxOutcome.TRANSPORT_ERROR)]
    assert tx.send_response(200, OK, 0.2) == []
    assert tx.transport_error(0.3) == []


def test_server_misuse_raises() -> None:
    """Unknown timer names and impossible statuses are caller bugs."""
    tx = server()
    with pytest.raises(TransactionUsageError):
        tx.timer_fired("K", 0.0)
    with pytest.raises(TransactionUsageError):
        tx.send_response(42, b"x", 0.0)
    assert tx.timer_fired("J", 0.0) == []  # not armed: ignored


SERVER_EVENTS = st.lists(
    st.one_of(
        st.just(("request",)),
        st.tuples(st.just("respond"), st.sampled_from([100, 180, 200, 404, 500])),
        st.just(("timer",)),
        st.just(("transport",)),
    ),
    max_size=30,
)


@given(reliable=st.booleans(), events=SERVER_EVENTS)
def test_any_server_input_sequence_is_safe(
    reliable: bool, events: list[tuple[object, ...]]
) -> None:
    """Any input order: no exception, one final sent at most (plus its retransmissions),
    retransmissions echo the last response, Terminated once and last."""
    tx = server(reliable=reliable)
    finals: set[bytes] = set()
    last: bytes | None = None
    terminated = 0
    for n, event in enumerate(events):
        now = n * 0.5
        match event:
            case ("request",):
                before = tx.state
                actions = tx.receive_request(now)
                if before in (TxState.PROCEEDING, TxState.COMPLETED):
                    assert last is not None and actions == [Send(last)]
                else:
                    assert actions == []
            case ("respond", int(status)):
                data = f"SIP/2.0 {status} X {n}".encode()
                actions = tx.send_response(status, data, now)
                if actions:
                    last = data
                    if status >= 200:
                        finals.add(data)
            case ("timer",):
                actions = tx.timer_fired("J", now)
            case _:
                actions = tx.transport_error(now)
        for i, action in enumerate(actions):
            assert terminated == 0
            if isinstance(action, Terminated):
                terminated += 1
                assert i == len(actions) - 1
        assert len(finals) <= 1
        assert (tx.state is TxState.TERMINATED) == (terminated == 1)
