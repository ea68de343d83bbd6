"""RFC 3261 §17 non-INVITE transactions as sans-IO state machines.

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
from typing import TypeAlias

import attrs

__all__ = [
    "IGNORED",
    "SERVER_IGNORED",
    "SERVER_TRANSITIONS",
    "TRANSITIONS",
    "Action",
    "Deliver",
    "NonInviteClientTransaction",
    "Send",
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


class TxState(enum.Enum):
    """Transaction states of RFC 3261 §17, plus IDLE for a client not yet started."""

    IDLE = "idle"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    TERMINATED = "terminated"


class TxInput(enum.Enum):
    """Inputs of the non-INVITE client transaction (§17.1.2)."""

    START = "start"
    PROVISIONAL = "provisional"  # 1xx received
    FINAL = "final"  # 200–699 received
    TIMER_E = "E"
    TIMER_F = "F"
    TIMER_K = "K"
    TRANSPORT_ERROR = "transport-error"


class ServerTxInput(enum.Enum):
    """Inputs of the non-INVITE server transaction (§17.2.2)."""

    REQUEST = "request"  # a retransmission of the request that created the transaction
    SEND_PROVISIONAL = "send-provisional"  # the TU answers 1xx
    SEND_FINAL = "send-final"  # the TU answers 200–699
    TIMER_J = "J"
    TRANSPORT_ERROR = "transport-error"


class TxOutcome(enum.Enum):
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


# --- client ---------------------------------------------------------------------------------


_CLIENT_TIMERS: dict[str, TxInput] = {
    "E": TxInput.TIMER_E,
    "F": TxInput.TIMER_F,
    "K": TxInput.TIMER_K,
}


class NonInviteClientTransaction:
    """RFC 3261 §17.1.2 non-INVITE client transaction (see the module rules).

    Args:
        branch: the Via branch of the request; the driver's key for matching responses.
        data: the serialised request, sent by ``start`` and by each retransmission.
        reliable: TCP/TLS (no retransmissions, Timer K = 0) versus UDP.
        timers: T1/T2/T4.
    """

    def __init__(self, *, branch: str, data: bytes, reliable: bool, timers: TimerConfig) -> None:
        self.branch = branch
        self.data = data
        self.reliable = reliable
        self.timers = timers
        self._state = TxState.IDLE
        self._outcome: TxOutcome | None = None
        self._armed = _Timers()
        self._e_interval = timers.t1

    def __repr__(self) -> str:
        return (f"NonInviteClientTransaction(branch={self.branch!r}, "
                f"state={self._state.name}, reliable={self.reliable})")

    @property
    def state(self) -> TxState:
        """The current state."""
        return self._state

    @property
    def outcome(self) -> TxOutcome | None:
        """How it ended, once TERMINATED; None before."""
        return self._outcome

    def _step(self, inp: TxInput) -> TxState | None:
        """Apply ``inp``: the previous state, or None if it is ignored (no change)."""
        key = (self._state, inp)
        if key in IGNORED:
            return None
        if key not in TRANSITIONS:
            raise TransactionUsageError(
                f"client transaction {self.branch!r} cannot take {inp.name} in "
                f"{self._state.name}"
            )
        old, self._state = self._state, TRANSITIONS[key]
        return old

    def _terminate(self, outcome: TxOutcome) -> list[Action]:
        self._state = TxState.TERMINATED
        self._outcome = outcome
        return [*self._armed.stop_all(), Terminated(outcome)]

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


class ServerNonInviteTransaction:
    """RFC 3261 §17.2.2 non-INVITE server transaction (see the module rules).

    Created in TRYING when the request arrives; the driver passes that request to the TU
    itself and routes retransmissions (same branch and method) to ``receive_request``.

    Args:
        branch: the top Via branch of the request.
        reliable: TCP/TLS (Timer J = 0) versus UDP.
        timers: T1 is used for Timer J.
    """

    def __init__(self, *, branch: str, reliable: bool, timers: TimerConfig) -> None:
        self.branch = branch
        self.reliable = reliable
        self.timers = timers
        self._state = TxState.TRYING
        self._outcome: TxOutcome | None = None
        self._armed = _Timers()
        self._last_response: bytes | None = None

    def __repr__(self) -> str:
        return (f"ServerNonInviteTransaction(branch={self.branch!r}, "
                f"state={self._state.name}, reliable={self.reliable})")

    @property
    def state(self) -> TxState:
        """The current state."""
        return self._state

    @property
    def outcome(self) -> TxOutcome | None:
        """How it ended, once TERMINATED; None before."""
        return self._outcome

    def _step(self, inp: ServerTxInput) -> TxState | None:
        key = (self._state, inp)
        if key in SERVER_IGNORED:
            return None
        if key not in SERVER_TRANSITIONS:
            raise TransactionUsageError(  # pragma: no cover - the tables cover every pair
                f"server transaction {self.branch!r} cannot take {inp.name} in "
                f"{self._state.name}"
            )
        old, self._state = self._state, SERVER_TRANSITIONS[key]
        return old

    def _terminate(self, outcome: TxOutcome) -> list[Action]:
        self._state = TxState.TERMINATED
        self._outcome = outcome
        self._last_response = None
        return [*self._armed.stop_all(), Terminated(outcome)]

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
