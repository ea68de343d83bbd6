"""RFC 3261 §17 transactions (non-INVITE; INVITE with RFC 6026) as sans-IO state machines.

Strategy: each machine takes inputs with an explicit ``now`` and returns a list of actions for
the driver (``sipis.sip.endpoint``) to carry out in order: ``Send`` bytes on the transaction's
flow, ``StartTimer``/``StopTimer`` by name (a started timer replaces a running one of the same
name), ``Deliver`` a response to the transaction user, and ``Terminated`` once, last. The
machines never read the clock, never touch a socket and never log.

Rules — client, §17.1.2 (``NonInviteClientTransaction``, table ``TRANSITIONS``):

- ``start`` sends the request, arms Timer F = 64·T1 and, over an unreliable transport only,
  Timer E = T1.
- Timer E in TRYING retransmits and re-arms at min(2·interval, T2); in PROCEEDING it
  retransmits and re-arms at T2. A provisional does not re-arm a running E.
- Timer F in TRYING/PROCEEDING ends the transaction with ``TxOutcome.TIMEOUT``.
- A provisional in TRYING/PROCEEDING is delivered (TRYING → PROCEEDING).
- The first final is delivered — exactly once — and stops E and F; COMPLETED then absorbs
  response retransmissions until Timer K (T4 unreliable, 0 reliable: terminate at once)
  ends it with ``TxOutcome.COMPLETED``.
- A transport error before the final ends it with ``TxOutcome.TRANSPORT_ERROR`` (§17.1.4).

Rules — server, §17.2.2 (``ServerNonInviteTransaction``, table ``SERVER_TRANSITIONS``):

- Created by the request (the driver hands that request to its TU itself); in TRYING
  retransmissions of the request are dropped.
- The TU's provisional is sent (→ PROCEEDING), its final is sent (→ COMPLETED); request
  retransmissions are answered with the last response sent.
- COMPLETED lasts Timer J (64·T1 unreliable, 0 reliable: terminate at once); further
  responses from the TU are discarded there (§17.2.2).

Rules — INVITE client and server (§17.1.1, §17.2.1, RFC 6026): see the block before
``ClientInviteTransaction``.

What happens to an input with no table entry:

- Harmless, ignored (no actions, no change), listed in ``IGNORED``/``SERVER_IGNORED``:
  retransmitted responses in COMPLETED (absorbed), late responses or transport errors after the
  final or after termination, TU responses after the server transaction completed.
- A timer that is not armed (stopped, or already fired) is ignored before the table is looked
  at: the driver may deliver a timer that raced with its ``StopTimer``.
- Anything else is caller misuse (responses or a transport error before ``start``, ``start``
  twice, an unknown timer name, a status outside 100–699): ``TransactionUsageError``, and the
  machine is left unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Generic, TypeAlias, TypeVar

import attrs

from sipis import fastenum

__all__ = [
    "IGNORED",
    "INVITE_CLIENT_IGNORED",
    "INVITE_CLIENT_TRANSITIONS",
    "INVITE_SERVER_IGNORED",
    "INVITE_SERVER_TRANSITIONS",
    "SERVER_IGNORED",
    "SERVER_TRANSITIONS",
    "TRANSITIONS",
    "Action",
    "ClientInviteTransaction",
    "Deliver",
    "InviteClientInput",
    "InviteServerInput",
    "InviteTxState",
    "NonInviteClientTransaction",
    "Send",
    "ServerInviteTransaction",
    "ServerNonInviteTransaction",
    "ServerTxInput",
    "StartTimer",
    "StopTimer",
    "Terminated",
    "TimerConfig",
    "TransactionUsageError",
    "TxInput",
    "TxOutcome",
    "TxState",
]

#: Timer F and Timer J are 64·T1 (RFC 3261 Table 4).
TIMER_F_MULTIPLIER = 64
TIMER_J_MULTIPLIER = 64


class TransactionUsageError(RuntimeError):
    """The caller drove a transaction in a way RFC 3261 does not allow (a bug, not a peer fault).

    Raised for an input the machine cannot take in its state; fix the caller. The machine is
    left as it was.
    """


_StateT = TypeVar("_StateT", bound=enum.Enum)
_InputT = TypeVar("_InputT", bound=enum.Enum)


def _next_state(state: _StateT, inp: _InputT,
                transitions: Mapping[tuple[_StateT, _InputT], _StateT],
                ignored: AbstractSet[tuple[_StateT, _InputT]], what: str) -> _StateT | None:
    """One table lookup for every machine here: the next state, or None if ``inp`` is ignored.

    Raises:
        TransactionUsageError: the pair is in neither table (the caller misused the machine).
    """
    key = (state, inp)
    if key in ignored:
        return None
    if key not in transitions:
        raise TransactionUsageError(f"{what} cannot take {inp.name} in {state.name}")
    return transitions[key]


class TxState(fastenum.Enum):
    """Transaction states of RFC 3261 §17, plus IDLE for a client not yet started."""

    IDLE = "idle"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    TERMINATED = "terminated"


class TxInput(fastenum.Enum):
    """Inputs of the non-INVITE client transaction (§17.1.2)."""

    START = "start"
    PROVISIONAL = "provisional"  # 1xx received
    FINAL = "final"  # 200–699 received
    TIMER_E = "E"
    TIMER_F = "F"
    TIMER_K = "K"
    TRANSPORT_ERROR = "transport-error"


class ServerTxInput(fastenum.Enum):
    """Inputs of the non-INVITE server transaction (§17.2.2)."""

    REQUEST = "request"  # a retransmission of the request that created the transaction
    SEND_PROVISIONAL = "send-provisional"  # the TU answers 1xx
    SEND_FINAL = "send-final"  # the TU answers 200–699
    TIMER_J = "J"
    TRANSPORT_ERROR = "transport-error"


class TxOutcome(fastenum.Enum):
    """How a transaction ended (``Terminated.outcome``)."""

    COMPLETED = "completed"  # a final response went through
    TIMEOUT = "timeout"  # Timer F: the driver raises TransactionTimeout
    TRANSPORT_ERROR = "transport-error"  # the flow failed: the driver raises TransportError


_S = TxState
_I = TxInput
_SI = ServerTxInput

TRANSITIONS: dict[tuple[TxState, TxInput], TxState] = {
    (_S.IDLE, _I.START): _S.TRYING,
    (_S.TRYING, _I.TIMER_E): _S.TRYING,
    (_S.TRYING, _I.TIMER_F): _S.TERMINATED,
    (_S.TRYING, _I.PROVISIONAL): _S.PROCEEDING,
    (_S.TRYING, _I.FINAL): _S.COMPLETED,
    (_S.TRYING, _I.TRANSPORT_ERROR): _S.TERMINATED,
    (_S.PROCEEDING, _I.TIMER_E): _S.PROCEEDING,
    (_S.PROCEEDING, _I.TIMER_F): _S.TERMINATED,
    (_S.PROCEEDING, _I.PROVISIONAL): _S.PROCEEDING,
    (_S.PROCEEDING, _I.FINAL): _S.COMPLETED,
    (_S.PROCEEDING, _I.TRANSPORT_ERROR): _S.TERMINATED,
    (_S.COMPLETED, _I.TIMER_K): _S.TERMINATED,
}

#: Client inputs with no transition that are dropped silently (see the module rules).
IGNORED: frozenset[tuple[TxState, TxInput]] = frozenset(
    {
        (_S.COMPLETED, _I.PROVISIONAL),  # absorbed retransmissions (§17.1.2.2)
        (_S.COMPLETED, _I.FINAL),
        (_S.COMPLETED, _I.TRANSPORT_ERROR),  # the final is in; nothing left to send
        (_S.TERMINATED, _I.PROVISIONAL),  # late: the driver should not route these any more
        (_S.TERMINATED, _I.FINAL),
        (_S.TERMINATED, _I.TRANSPORT_ERROR),
    }
)

SERVER_TRANSITIONS: dict[tuple[TxState, ServerTxInput], TxState] = {
    (_S.TRYING, _SI.SEND_PROVISIONAL): _S.PROCEEDING,
    (_S.TRYING, _SI.SEND_FINAL): _S.COMPLETED,
    (_S.TRYING, _SI.TRANSPORT_ERROR): _S.TERMINATED,
    (_S.PROCEEDING, _SI.REQUEST): _S.PROCEEDING,
    (_S.PROCEEDING, _SI.SEND_PROVISIONAL): _S.PROCEEDING,
    (_S.PROCEEDING, _SI.SEND_FINAL): _S.COMPLETED,
    (_S.PROCEEDING, _SI.TRANSPORT_ERROR): _S.TERMINATED,
    (_S.COMPLETED, _SI.REQUEST): _S.COMPLETED,
    (_S.COMPLETED, _SI.TIMER_J): _S.TERMINATED,
    (_S.COMPLETED, _SI.TRANSPORT_ERROR): _S.TERMINATED,
}

#: Server inputs with no transition that are dropped silently (see the module rules).
SERVER_IGNORED: frozenset[tuple[TxState, ServerTxInput]] = frozenset(
    {
        (_S.TRYING, _SI.REQUEST),  # nothing to resend yet (§17.2.2)
        (_S.COMPLETED, _SI.SEND_PROVISIONAL),  # "MUST be discarded" (§17.2.2)
        (_S.COMPLETED, _SI.SEND_FINAL),
        (_S.TERMINATED, _SI.REQUEST),
        (_S.TERMINATED, _SI.SEND_PROVISIONAL),  # the TU lost a race with a transport error
        (_S.TERMINATED, _SI.SEND_FINAL),
        (_S.TERMINATED, _SI.TRANSPORT_ERROR),
    }
)


@attrs.frozen
class TimerConfig:
    """RFC 3261 timer base values in seconds (§17.1.1.1, Table 4)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0


# --- actions --------------------------------------------------------------------------------


@attrs.frozen
class Send:
    """Send these bytes on the transaction's flow (request, retransmission or response)."""

    data: bytes


@attrs.frozen
class StartTimer:
    """Arm timer ``name`` to fire at ``deadline`` (clock of ``now``); replaces a running one."""

    name: str
    deadline: float


@attrs.frozen
class StopTimer:
    """Disarm timer ``name``."""

    name: str


@attrs.frozen
class Deliver:
    """Hand this response to the transaction user."""

    response: object


@attrs.frozen
class Terminated:
    """The transaction is over: forget it. Always the last action, and emitted once."""

    outcome: TxOutcome


Action: TypeAlias = Send | StartTimer | StopTimer | Deliver | Terminated


def _response_kind(status: int) -> bool:
    """True for a final status, False for a provisional; misuse outside 100–699."""
    if not 100 <= status <= 699:
        raise TransactionUsageError(f"status {status} is not a SIP response code")
    return status >= 200


class _Timers:
    """The armed timers of one transaction, so that late firings can be recognised."""

    __slots__ = ("armed",)

    def __init__(self) -> None:
        self.armed: set[str] = set()

    def start(self, name: str, deadline: float) -> StartTimer:
        self.armed.add(name)
        return StartTimer(name, deadline)

    def stop(self, *names: str) -> list[Action]:
        stopped: list[Action] = [StopTimer(n) for n in names if n in self.armed]
        self.armed.difference_update(names)
        return stopped

    def stop_all(self) -> list[Action]:
        return self.stop(*sorted(self.armed))

    def fired(self, name: str) -> bool:
        """Whether ``name`` was armed; it is disarmed either way."""
        if name in self.armed:
            self.armed.discard(name)
            return True
        return False


class _Transaction(Generic[_StateT, _InputT]):
    """What the four machines share: identity, state, outcome, armed timers, one table step.

    Subclasses give their tables and states to ``__init__`` and may override ``_release`` to
    drop the messages they keep for retransmission once they terminate.
    """

    _kind = "transaction"  # names the machine in TransactionUsageError messages

    def __init__(
        self, *, branch: str, reliable: bool, timers: TimerConfig, initial: _StateT,
        terminated: _StateT, transitions: Mapping[tuple[_StateT, _InputT], _StateT],
        ignored: AbstractSet[tuple[_StateT, _InputT]],
    ) -> None:
        self.branch = branch
        self.reliable = reliable
        self.timers = timers
        self._state = initial
        self._terminated_state = terminated
        self._transitions = transitions
        self._ignored = ignored
        self._outcome: TxOutcome | None = None
        self._armed = _Timers()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(branch={self.branch!r}, "
                f"state={self._state.name}, reliable={self.reliable})")

    @property
    def state(self) -> _StateT:
        """The current state."""
        return self._state

    @property
    def outcome(self) -> TxOutcome | None:
        """How it ended, once TERMINATED; None before."""
        return self._outcome

    def _step(self, inp: _InputT) -> _StateT | None:
        """Apply ``inp``: the previous state, or None if it is ignored (no change)."""
        new = _next_state(self._state, inp, self._transitions, self._ignored,
                          f"{self._kind} {self.branch!r}")
        if new is None:
            return None
        old, self._state = self._state, new
        return old

    def _release(self) -> None:
        """Forget what was kept for retransmissions (at termination)."""

    def _terminate(self, outcome: TxOutcome) -> list[Action]:
        self._state = self._terminated_state
        self._outcome = outcome
        self._release()
        return [*self._armed.stop_all(), Terminated(outcome)]


# --- client ---------------------------------------------------------------------------------


_CLIENT_TIMERS: dict[str, TxInput] = {
    "E": TxInput.TIMER_E,
    "F": TxInput.TIMER_F,
    "K": TxInput.TIMER_K,
}


class NonInviteClientTransaction(_Transaction[TxState, TxInput]):
    """RFC 3261 §17.1.2 non-INVITE client transaction (see the module rules).

    Args:
        branch: the Via branch of the request; the driver's key for matching responses.
        data: the serialised request, sent by ``start`` and by each retransmission.
        reliable: TCP/TLS (no retransmissions, Timer K = 0) versus UDP.
        timers: T1/T2/T4.
    """

    _kind = "client transaction"

    def __init__(self, *, branch: str, data: bytes, reliable: bool, timers: TimerConfig) -> None:
        super().__init__(branch=branch, reliable=reliable, timers=timers, initial=TxState.IDLE,
                         terminated=TxState.TERMINATED, transitions=TRANSITIONS,
                         ignored=IGNORED)
        self.data = data
        self._e_interval = timers.t1

    def start(self, now: float) -> list[Action]:
        """Send the request and arm the timers.

        Raises:
            TransactionUsageError: already started.
        """
        self._step(TxInput.START)
        actions: list[Action] = [Send(self.data)]
        if not self.reliable:
            self._e_interval = self.timers.t1
            actions.append(self._armed.start("E", now + self._e_interval))
        actions.append(self._armed.start("F", now + TIMER_F_MULTIPLIER * self.timers.t1))
        return actions

    def receive_response(self, status: int, response: object, now: float) -> list[Action]:
        """A response matched this transaction (§17.1.3); ``response`` is passed through.

        Returns:
            ``[Deliver]`` for a provisional; for the first final ``StopTimer``s, ``Deliver``
            and then ``StartTimer("K")`` (unreliable) or ``Terminated(COMPLETED)``
            (reliable); ``[]`` for a retransmission absorbed in COMPLETED.

        Raises:
            TransactionUsageError: before ``start``, or a status outside 100–699.
        """
        final = _response_kind(status)
        if self._step(TxInput.FINAL if final else TxInput.PROVISIONAL) is None:
            return []
        if not final:
            return [Deliver(response)]
        actions: list[Action] = [*self._armed.stop("E", "F"), Deliver(response)]
        if self.reliable:
            self._step(TxInput.TIMER_K)
            return actions + self._terminate(TxOutcome.COMPLETED)
        actions.append(self._armed.start("K", now + self.timers.t4))
        return actions

    def timer_fired(self, name: str, now: float) -> list[Action]:
        """Timer ``name`` ("E", "F" or "K") reached its deadline.

        A timer that is not armed (stopped or already fired) is ignored: ``[]``.

        Raises:
            TransactionUsageError: an unknown timer name.
        """
        inp = _CLIENT_TIMERS.get(name)
        if inp is None:
            raise TransactionUsageError(f"client transaction has no timer {name!r}")
        if not self._armed.fired(name):
            return []
        if self._step(inp) is None:  # pragma: no cover - armed timers always have an entry
            return []
        if inp is TxInput.TIMER_E:
            if self._state is TxState.PROCEEDING:
                self._e_interval = self.timers.t2
            else:
                self._e_interval = min(2 * self._e_interval, self.timers.t2)
            return [Send(self.data), self._armed.start("E", now + self._e_interval)]
        if inp is TxInput.TIMER_F:
            return self._terminate(TxOutcome.TIMEOUT)
        return self._terminate(TxOutcome.COMPLETED)

    def transport_error(self, now: float) -> list[Action]:
        """Sending failed (§17.1.4): ends the transaction unless the final is already in.

        Raises:
            TransactionUsageError: before ``start``.
        """
        if self._step(TxInput.TRANSPORT_ERROR) is None:
            return []
        return self._terminate(TxOutcome.TRANSPORT_ERROR)


# --- server ---------------------------------------------------------------------------------


class ServerNonInviteTransaction(_Transaction[TxState, ServerTxInput]):
    """RFC 3261 §17.2.2 non-INVITE server transaction (see the module rules).

    Created in TRYING when the request arrives; the driver passes that request to the TU
    itself and routes retransmissions (same branch and method) to ``receive_request``.

    Args:
        branch: the top Via branch of the request.
        reliable: TCP/TLS (Timer J = 0) versus UDP.
        timers: T1 is used for Timer J.
    """

    _kind = "server transaction"

    def __init__(self, *, branch: str, reliable: bool, timers: TimerConfig) -> None:
        super().__init__(branch=branch, reliable=reliable, timers=timers,
                         initial=TxState.TRYING, terminated=TxState.TERMINATED,
                         transitions=SERVER_TRANSITIONS, ignored=SERVER_IGNORED)
        self._last_response: bytes | None = None

    def _release(self) -> None:
        self._last_response = None

    def receive_request(self, now: float) -> list[Action]:
        """A retransmission of the request arrived: resend the last response, if any."""
        if self._step(ServerTxInput.REQUEST) is None or self._last_response is None:
            return []
        return [Send(self._last_response)]

    def send_response(self, status: int, data: bytes, now: float) -> list[Action]:
        """The TU answers with ``status``; ``data`` is the serialised response.

        Returns:
            ``[Send]`` for a provisional; for the final ``Send`` and then ``StartTimer("J")``
            (unreliable) or ``Terminated(COMPLETED)`` (reliable); ``[]`` once completed.

        Raises:
            TransactionUsageError: a status outside 100–699.
        """
        final = _response_kind(status)
        inp = ServerTxInput.SEND_FINAL if final else ServerTxInput.SEND_PROVISIONAL
        if self._step(inp) is None:
            return []
        self._last_response = data
        actions: list[Action] = [Send(data)]
        if not final:
            return actions
        if self.reliable:
            self._step(ServerTxInput.TIMER_J)
            return actions + self._terminate(TxOutcome.COMPLETED)
        actions.append(
            self._armed.start("J", now + TIMER_J_MULTIPLIER * self.timers.t1)
        )
        return actions

    def timer_fired(self, name: str, now: float) -> list[Action]:
        """Timer ``name`` ("J") reached its deadline; a timer not armed is ignored.

        Raises:
            TransactionUsageError: an unknown timer name.
        """
        if name != "J":
            raise TransactionUsageError(f"server transaction has no timer {name!r}")
        if not self._armed.fired(name) or self._step(ServerTxInput.TIMER_J) is None:
            return []
        return self._terminate(TxOutcome.COMPLETED)

    def transport_error(self, now: float) -> list[Action]:
        """Sending a response failed (§17.2.4): the transaction ends."""
        if self._step(ServerTxInput.TRANSPORT_ERROR) is None:
            return []
        return self._terminate(TxOutcome.TRANSPORT_ERROR)


# --- INVITE transactions ----------------------------------------------------------------------
#
# Rules — INVITE client, §17.1.1 as corrected by RFC 6026 §8.4 (``ClientInviteTransaction``,
# table ``INVITE_CLIENT_TRANSITIONS``):
#
# - ``start`` sends the INVITE, arms Timer B = 64·T1 and, over an unreliable transport only,
#   Timer A = T1. Timer A in CALLING retransmits and re-arms at twice its last interval (no T2
#   cap for INVITE, §17.1.1.2). Timer B in CALLING ends with ``TxOutcome.TIMEOUT``.
# - A provisional in CALLING/PROCEEDING is delivered (→ PROCEEDING) and stops A and B: once
#   anything came back the transaction no longer times out; the TU's Timer C (§16.8, a proxy)
#   or its own ring timer decides how long to wait. ``cancel_allowed`` is true only here
#   (§9.1: no CANCEL before a provisional, none after a final).
# - A 300–699 in CALLING/PROCEEDING: the ACK built by ``make_ack(response)`` is sent, the
#   response delivered (→ COMPLETED), and Timer D armed (32 s unreliable; reliable: terminate
#   at once). Retransmissions of the final in COMPLETED re-send that same ACK and are not
#   delivered. Timer D ends with ``TxOutcome.COMPLETED``.
# - A 2xx in CALLING/PROCEEDING is delivered (→ ACCEPTED, RFC 6026) and arms Timer M = 64·T1
#   on every transport; no ACK (the 2xx ACK is the TU's, its own transaction). Every further
#   2xx in ACCEPTED — retransmissions, or 2xx from other forks downstream — is delivered too,
#   because a proxy must forward each of them upstream (RFC 3261 §16.7 step 5). Timer M ends
#   with ``TxOutcome.COMPLETED``.
# - A transport error in CALLING/PROCEEDING/COMPLETED ends with ``TxOutcome.TRANSPORT_ERROR``
#   (RFC 3261 Figure 5; for PROCEEDING: over TCP/TLS the responses could only come back on the
#   failed flow). In ACCEPTED it is ignored: nothing is left to send.
#
# Rules — INVITE server, §17.2.1 as corrected by RFC 6026 §7.1/§8.5–8.8
# (``ServerInviteTransaction``, table ``INVITE_SERVER_TRANSITIONS``):
#
# - Created in PROCEEDING by the INVITE. The machine builds no messages, so it does not make
#   the ``100 Trying`` itself: the TU (driver) passes one to ``send_response`` at once, like
#   any provisional (SPEC.md step 1 sends it first anyway). A retransmitted INVITE gets the
#   last provisional again (nothing before the first one).
# - A 300–699 from the TU is sent (→ COMPLETED); Timer G (unreliable only) retransmits it at
#   T1, 2·T1, … capped at T2; Timer H = 64·T1 (every transport) ends with
#   ``TxOutcome.TIMEOUT`` (the ACK never came). A retransmitted INVITE gets the final again.
#   The ACK → CONFIRMED, stops G and H; Timer I (T4 unreliable; reliable: terminate at once)
#   ends with ``TxOutcome.COMPLETED``. CONFIRMED absorbs INVITEs and ACKs.
# - A 2xx from the TU is sent (→ ACCEPTED) and arms Timer L = 64·T1 (every transport). The
#   transaction never retransmits a 2xx: further 2xx the TU passes (a UAS core's
#   retransmissions, or a proxy forwarding the downstream ones) are sent as they come.
#   Retransmitted INVITEs are absorbed; an ACK for the 2xx is its own transaction and
#   ignored here (the driver hands it to the TU). Timer L ends with ``TxOutcome.COMPLETED``.
# - TU responses after a final (other than 2xx in ACCEPTED) are discarded.
# - A transport error never ends the server transaction (RFC 6026 §8.8: "MUST remain in the
#   current state"; ending it would make a retransmitted INVITE look new). ``transport_error``
#   returns ``[]``; the driver, which saw the failure, tells the TU.
#
# As for non-INVITE: timers that are not armed are ignored; pairs listed in
# ``INVITE_CLIENT_IGNORED``/``INVITE_SERVER_IGNORED`` are dropped silently; anything else
# (responses before ``start``, ``start`` twice, unknown timer names, statuses outside
# 100–699) is ``TransactionUsageError`` and leaves the machine unchanged.

#: Timer B, H, L and M are 64·T1 (RFC 3261 Table 4, RFC 6026 §8.4/§8.7).
TIMER_B_MULTIPLIER = 64
TIMER_H_MULTIPLIER = 64
TIMER_L_MULTIPLIER = 64
TIMER_M_MULTIPLIER = 64
#: Timer D over an unreliable transport: "at least 32 seconds" (§17.1.1.2).
TIMER_D_UNRELIABLE = 32.0


class InviteTxState(fastenum.Enum):
    """INVITE transaction states (RFC 3261 §17.1.1/§17.2.1 plus ACCEPTED of RFC 6026).

    IDLE is a client not yet started; CALLING is client only, CONFIRMED server only.
    """

    IDLE = "idle"
    CALLING = "calling"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


class InviteClientInput(fastenum.Enum):
    """Inputs of the INVITE client transaction."""

    START = "start"
    PROVISIONAL = "provisional"  # 1xx received
    FINAL_2XX = "2xx"  # 200–299 received
    FINAL_ERROR = "300-699"  # 300–699 received
    TIMER_A = "A"
    TIMER_B = "B"
    TIMER_D = "D"
    TIMER_M = "M"
    TRANSPORT_ERROR = "transport-error"


class InviteServerInput(fastenum.Enum):
    """Inputs of the INVITE server transaction."""

    REQUEST = "request"  # a retransmission of the INVITE
    ACK = "ack"  # an ACK matching the transaction (§17.2.3)
    SEND_PROVISIONAL = "send-provisional"  # the TU answers 1xx
    SEND_2XX = "send-2xx"  # the TU answers 200–299
    SEND_ERROR = "send-300-699"  # the TU answers 300–699
    TIMER_G = "G"
    TIMER_H = "H"
    TIMER_I = "I"
    TIMER_L = "L"
    TRANSPORT_ERROR = "transport-error"


_IS = InviteTxState
_IC = InviteClientInput
_ISI = InviteServerInput

INVITE_CLIENT_TRANSITIONS: dict[tuple[InviteTxState, InviteClientInput], InviteTxState] = {
    (_IS.IDLE, _IC.START): _IS.CALLING,
    (_IS.CALLING, _IC.TIMER_A): _IS.CALLING,
    (_IS.CALLING, _IC.TIMER_B): _IS.TERMINATED,
    (_IS.CALLING, _IC.PROVISIONAL): _IS.PROCEEDING,
    (_IS.CALLING, _IC.FINAL_2XX): _IS.ACCEPTED,
    (_IS.CALLING, _IC.FINAL_ERROR): _IS.COMPLETED,
    (_IS.CALLING, _IC.TRANSPORT_ERROR): _IS.TERMINATED,
    (_IS.PROCEEDING, _IC.PROVISIONAL): _IS.PROCEEDING,
    (_IS.PROCEEDING, _IC.FINAL_2XX): _IS.ACCEPTED,
    (_IS.PROCEEDING, _IC.FINAL_ERROR): _IS.COMPLETED,
    (_IS.PROCEEDING, _IC.TRANSPORT_ERROR): _IS.TERMINATED,
    (_IS.COMPLETED, _IC.FINAL_ERROR): _IS.COMPLETED,  # retransmission: ACK again
    (_IS.COMPLETED, _IC.TIMER_D): _IS.TERMINATED,
    (_IS.COMPLETED, _IC.TRANSPORT_ERROR): _IS.TERMINATED,
    (_IS.ACCEPTED, _IC.FINAL_2XX): _IS.ACCEPTED,  # delivered again (RFC 6026 §8.4)
    (_IS.ACCEPTED, _IC.TIMER_M): _IS.TERMINATED,
}

#: INVITE client inputs with no transition that are dropped silently.
INVITE_CLIENT_IGNORED: frozenset[tuple[InviteTxState, InviteClientInput]] = frozenset(
    {
        (_IS.COMPLETED, _IC.PROVISIONAL),
        (_IS.COMPLETED, _IC.FINAL_2XX),  # cannot follow a non-2xx on the same transaction
        (_IS.ACCEPTED, _IC.PROVISIONAL),
        (_IS.ACCEPTED, _IC.FINAL_ERROR),
        (_IS.ACCEPTED, _IC.TRANSPORT_ERROR),  # nothing left to send
        (_IS.TERMINATED, _IC.PROVISIONAL),
        (_IS.TERMINATED, _IC.FINAL_2XX),
        (_IS.TERMINATED, _IC.FINAL_ERROR),
        (_IS.TERMINATED, _IC.TRANSPORT_ERROR),
    }
)

INVITE_SERVER_TRANSITIONS: dict[tuple[InviteTxState, InviteServerInput], InviteTxState] = {
    (_IS.PROCEEDING, _ISI.REQUEST): _IS.PROCEEDING,  # resend the last provisional
    (_IS.PROCEEDING, _ISI.SEND_PROVISIONAL): _IS.PROCEEDING,
    (_IS.PROCEEDING, _ISI.SEND_2XX): _IS.ACCEPTED,
    (_IS.PROCEEDING, _ISI.SEND_ERROR): _IS.COMPLETED,
    (_IS.COMPLETED, _ISI.REQUEST): _IS.COMPLETED,  # resend the final
    (_IS.COMPLETED, _ISI.ACK): _IS.CONFIRMED,
    (_IS.COMPLETED, _ISI.TIMER_G): _IS.COMPLETED,
    (_IS.COMPLETED, _ISI.TIMER_H): _IS.TERMINATED,
    (_IS.CONFIRMED, _ISI.TIMER_I): _IS.TERMINATED,
    (_IS.ACCEPTED, _ISI.SEND_2XX): _IS.ACCEPTED,  # the TU's 2xx retransmissions, sent as given
    (_IS.ACCEPTED, _ISI.TIMER_L): _IS.TERMINATED,
}

#: INVITE server inputs with no transition that are dropped silently: with the table above they
#: cover every (state, non-timer input) pair, so the server never raises for peer or TU order.
INVITE_SERVER_IGNORED: frozenset[tuple[InviteTxState, InviteServerInput]] = frozenset(
    {
        (_IS.PROCEEDING, _ISI.ACK),  # no final sent yet: not ours
        (_IS.PROCEEDING, _ISI.TRANSPORT_ERROR),  # RFC 6026 §8.8: stay
        (_IS.COMPLETED, _ISI.SEND_PROVISIONAL),
        (_IS.COMPLETED, _ISI.SEND_2XX),
        (_IS.COMPLETED, _ISI.SEND_ERROR),
        (_IS.COMPLETED, _ISI.TRANSPORT_ERROR),
        (_IS.CONFIRMED, _ISI.REQUEST),
        (_IS.CONFIRMED, _ISI.ACK),
        (_IS.CONFIRMED, _ISI.SEND_PROVISIONAL),
        (_IS.CONFIRMED, _ISI.SEND_2XX),
        (_IS.CONFIRMED, _ISI.SEND_ERROR),
        (_IS.CONFIRMED, _ISI.TRANSPORT_ERROR),
        (_IS.ACCEPTED, _ISI.REQUEST),  # absorbed (RFC 6026 §7.1)
        (_IS.ACCEPTED, _ISI.ACK),  # the 2xx ACK is its own transaction
        (_IS.ACCEPTED, _ISI.SEND_PROVISIONAL),
        (_IS.ACCEPTED, _ISI.SEND_ERROR),
        (_IS.ACCEPTED, _ISI.TRANSPORT_ERROR),
        (_IS.TERMINATED, _ISI.REQUEST),
        (_IS.TERMINATED, _ISI.ACK),
        (_IS.TERMINATED, _ISI.SEND_PROVISIONAL),
        (_IS.TERMINATED, _ISI.SEND_2XX),
        (_IS.TERMINATED, _ISI.SEND_ERROR),
        (_IS.TERMINATED, _ISI.TRANSPORT_ERROR),
    }
)


def _check_status(status: int) -> int:
    if not 100 <= status <= 699:
        raise TransactionUsageError(f"status {status} is not a SIP response code")
    return status


class ClientInviteTransaction(_Transaction[InviteTxState, InviteClientInput]):
    """RFC 3261 §17.1.1 INVITE client transaction with RFC 6026's ACCEPTED state.

    See the INVITE rules above. Used by the call layer to forward an INVITE to a device.

    Args:
        branch: the Via branch of the INVITE; the driver's key for matching responses.
        data: the serialised INVITE, sent by ``start`` and by each Timer A retransmission.
        reliable: TCP/TLS (no retransmissions, Timer D = 0) versus UDP.
        timers: T1 (Timer A, B, M).
        make_ack: builds the serialised ACK for a 300–699 response (§17.1.1.3); called once,
            with the response object given to ``receive_response``.
    """

    _kind = "INVITE client transaction"

    def __init__(
        self,
        *,
        branch: str,
        data: bytes,
        reliable: bool,
        timers: TimerConfig,
        make_ack: Callable[[object], bytes],
    ) -> None:
        super().__init__(branch=branch, reliable=reliable, timers=timers,
                         initial=InviteTxState.IDLE, terminated=InviteTxState.TERMINATED,
                         transitions=INVITE_CLIENT_TRANSITIONS, ignored=INVITE_CLIENT_IGNORED)
        self.data = data
        self._make_ack = make_ack
        self._a_interval = timers.t1
        self._ack: bytes | None = None

    @property
    def cancel_allowed(self) -> bool:
        """Whether a CANCEL may be sent now: after a provisional and before any final (§9.1).

        A TU that wants to cancel earlier waits for the first provisional; if a final comes
        first, no CANCEL is sent at all.
        """
        return self._state is InviteTxState.PROCEEDING

    def _release(self) -> None:
        self._ack = None

    def start(self, now: float) -> list[Action]:
        """Send the INVITE and arm Timer A (unreliable only) and Timer B.

        Raises:
            TransactionUsageError: already started.
        """
        self._step(InviteClientInput.START)
        actions: list[Action] = [Send(self.data)]
        if not self.reliable:
            self._a_interval = self.timers.t1
            actions.append(self._armed.start("A", now + self._a_interval))
        actions.append(self._armed.start("B", now + TIMER_B_MULTIPLIER * self.timers.t1))
        return actions

    def receive_response(self, status: int, response: object, now: float) -> list[Action]:
        """A response matched this transaction; ``response`` is passed through to the TU.

        Returns:
            1xx: ``StopTimer``s (first one) and ``Deliver``. 300–699: ``StopTimer``s,
            ``Send(ack)``, ``Deliver``, then ``StartTimer("D")`` or (reliable)
            ``Terminated``; a retransmission in COMPLETED: ``[Send(ack)]``. 2xx:
            ``StopTimer``s, ``Deliver``, ``StartTimer("M")``; in ACCEPTED: ``[Deliver]``.
            ``[]`` for anything ignored.

        Raises:
            TransactionUsageError: before ``start``, or a status outside 100–699.
        """
        _check_status(status)
        if status < 200:
            inp = InviteClientInput.PROVISIONAL
        elif status < 300:
            inp = InviteClientInput.FINAL_2XX
        else:
            inp = InviteClientInput.FINAL_ERROR
        old = self._step(inp)
        if old is None:
            return []
        if inp is InviteClientInput.PROVISIONAL:
            return [*self._armed.stop("A", "B"), Deliver(response)]
        if inp is InviteClientInput.FINAL_2XX:
            if old is InviteTxState.ACCEPTED:
                return [Deliver(response)]
            return [*self._armed.stop("A", "B"), Deliver(response),
                    self._armed.start("M", now + TIMER_M_MULTIPLIER * self.timers.t1)]
        if old is InviteTxState.COMPLETED:
            return [] if self._ack is None else [Send(self._ack)]
        self._ack = self._make_ack(response)
        actions: list[Action] = [*self._armed.stop("A", "B"), Send(self._ack), Deliver(response)]
        if self.reliable:
            self._step(InviteClientInput.TIMER_D)
            return actions + self._terminate(TxOutcome.COMPLETED)
        actions.append(self._armed.start("D", now + TIMER_D_UNRELIABLE))
        return actions

    def timer_fired(self, name: str, now: float) -> list[Action]:
        """Timer ``name`` ("A", "B", "D" or "M") reached its deadline; unarmed ones: ``[]``.

        Raises:
            TransactionUsageError: an unknown timer name.
        """
        inputs = {"A": InviteClientInput.TIMER_A, "B": InviteClientInput.TIMER_B,
                  "D": InviteClientInput.TIMER_D, "M": InviteClientInput.TIMER_M}
        inp = inputs.get(name)
        if inp is None:
            raise TransactionUsageError(f"INVITE client transaction has no timer {name!r}")
        if not self._armed.fired(name):
            return []
        if self._step(inp) is None:  # pragma: no cover - armed timers always have an entry
            return []
        if inp is InviteClientInput.TIMER_A:
            self._a_interval *= 2
            return [Send(self.data), self._armed.start("A", now + self._a_interval)]
        if inp is InviteClientInput.TIMER_B:
            return self._terminate(TxOutcome.TIMEOUT)
        return self._terminate(TxOutcome.COMPLETED)

    def transport_error(self, now: float) -> list[Action]:
        """Sending failed or the flow closed: ends the transaction unless it is ACCEPTED.

        Raises:
            TransactionUsageError: before ``start``.
        """
        if self._step(InviteClientInput.TRANSPORT_ERROR) is None:
            return []
        return self._terminate(TxOutcome.TRANSPORT_ERROR)


class ServerInviteTransaction(_Transaction[InviteTxState, InviteServerInput]):
    """RFC 3261 §17.2.1 INVITE server transaction with RFC 6026's ACCEPTED state.

    Created in PROCEEDING when the INVITE arrives; the driver hands that INVITE to the TU
    itself, sends ``100 Trying`` through ``send_response`` at once, and routes retransmitted
    INVITEs to ``receive_request`` and matching ACKs (§17.2.3) to ``receive_ack``.

    Args:
        branch: the top Via branch of the INVITE.
        reliable: TCP/TLS (no Timer G, Timer I = 0) versus UDP.
        timers: T1 (G, H, L), T2 (cap of G), T4 (I).
    """

    _kind = "INVITE server transaction"

    def __init__(self, *, branch: str, reliable: bool, timers: TimerConfig) -> None:
        super().__init__(branch=branch, reliable=reliable, timers=timers,
                         initial=InviteTxState.PROCEEDING, terminated=InviteTxState.TERMINATED,
                         transitions=INVITE_SERVER_TRANSITIONS, ignored=INVITE_SERVER_IGNORED)
        self._last_provisional: bytes | None = None
        self._final: bytes | None = None
        self._g_interval = timers.t1

    def _release(self) -> None:
        self._last_provisional = self._final = None

    def receive_request(self, now: float) -> list[Action]:
        """A retransmitted INVITE: the last provisional (PROCEEDING) or the final (COMPLETED)
        goes out again; absorbed otherwise."""
        old = self._step(InviteServerInput.REQUEST)
        if old is InviteTxState.PROCEEDING and self._last_provisional is not None:
            return [Send(self._last_provisional)]
        if old is InviteTxState.COMPLETED and self._final is not None:
            return [Send(self._final)]
        return []

    def receive_ack(self, now: float) -> list[Action]:
        """The ACK for our 300–699: stop retransmitting; Timer I (or, reliable, terminate)."""
        if self._step(InviteServerInput.ACK) is None:
            return []
        actions = self._armed.stop("G", "H")
        if self.reliable:
            self._step(InviteServerInput.TIMER_I)
            return actions + self._terminate(TxOutcome.COMPLETED)
        actions.append(self._armed.start("I", now + self.timers.t4))
        return actions

    def send_response(self, status: int, data: bytes, now: float) -> list[Action]:
        """The TU answers with ``status``; ``data`` is the serialised response.

        Returns:
            1xx: ``[Send]``. 2xx: ``Send`` and ``StartTimer("L")`` (in ACCEPTED just
            ``[Send]``). 300–699: ``Send``, ``StartTimer("G")`` (unreliable) and
            ``StartTimer("H")``. ``[]`` for a response the state discards.

        Raises:
            TransactionUsageError: a status outside 100–699.
        """
        _check_status(status)
        if status < 200:
            inp = InviteServerInput.SEND_PROVISIONAL
        elif status < 300:
            inp = InviteServerInput.SEND_2XX
        else:
            inp = InviteServerInput.SEND_ERROR
        old = self._step(inp)
        if old is None:
            return []
        actions: list[Action] = [Send(data)]
        if inp is InviteServerInput.SEND_PROVISIONAL:
            self._last_provisional = data
        elif inp is InviteServerInput.SEND_2XX:
            if old is InviteTxState.PROCEEDING:
                self._last_provisional = None
                actions.append(self._armed.start("L", now + TIMER_L_MULTIPLIER * self.timers.t1))
        else:
            self._last_provisional = None
            self._final = data
            if not self.reliable:
                self._g_interval = self.timers.t1
                actions.append(self._armed.start("G", now + self._g_interval))
            actions.append(self._armed.start("H", now + TIMER_H_MULTIPLIER * self.timers.t1))
        return actions

    def timer_fired(self, name: str, now: float) -> list[Action]:
        """Timer ``name`` ("G", "H", "I" or "L") reached its deadline; unarmed ones: ``[]``.

        Raises:
            TransactionUsageError: an unknown timer name.
        """
        inputs = {"G": InviteServerInput.TIMER_G, "H": InviteServerInput.TIMER_H,
                  "I": InviteServerInput.TIMER_I, "L": InviteServerInput.TIMER_L}
        inp = inputs.get(name)
        if inp is None:
            raise TransactionUsageError(f"INVITE server transaction has no timer {name!r}")
        if not self._armed.fired(name):
            return []
        if self._step(inp) is None:  # pragma: no cover - armed timers always have an entry
            return []
        if inp is InviteServerInput.TIMER_G:
            self._g_interval = min(2 * self._g_interval, self.timers.t2)
            assert self._final is not None
            return [Send(self._final), self._armed.start("G", now + self._g_interval)]
        if inp is InviteServerInput.TIMER_H:
            return self._terminate(TxOutcome.TIMEOUT)
        return self._terminate(TxOutcome.COMPLETED)

    def transport_error(self, now: float) -> list[Action]:
        """Sending a response failed: RFC 6026 §8.8 keeps the state, so always ``[]``.

        The driver, which saw the failure, informs the TU; Timer H or L still ends the
        transaction (in PROCEEDING the TU's own final does).
        """
        self._step(InviteServerInput.TRANSPORT_ERROR)
        return []
