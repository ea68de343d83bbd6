"""Route a push to its provider's client and retry what may be retried, within a deadline.

Why here and not in the clients: a client knows whether one request may be re-sent (it raises
``PushRetryable`` only then); the caller knows how long the push is still worth sending (the
call's ring timer). The dispatcher joins the two: capped exponential backoff with jitter, the
provider's ``Retry-After`` honoured, and never a wait or a send past the deadline.
"""

from __future__ import annotations

import logging
import random
import types
from collections import Counter
from collections.abc import Mapping
from typing import Final

import attrs
import trio

from sipis.push.base import (
    InvalidToken,
    PushAuthError,
    PushClient,
    PushConfigError,
    PushError,
    PushRequest,
    PushResult,
    PushRetryable,
)

logger = logging.getLogger(__name__)

#: The ``result`` label values of :class:`DispatcherStatistics` (and of
#: ``sipis_push_sent_total{provider,result}``).
RESULTS: Final = ("accepted", "invalid-token", "retryable", "auth-error", "config-error",
                  "error", "timeout", "retried")

# Full jitter would sometimes retry at once; keep at least half the computed backoff.
_JITTER_FLOOR: Final = 0.5


@attrs.frozen
class DispatcherStatistics:
    """Outcome counts: ``counts[(provider, result)]``; ``retried`` counts retry waits."""

    counts: Mapping[tuple[str, str], int]

    def get(self, provider: str, result: str) -> int:
        return self.counts.get((provider, result), 0)


class PushDispatcher:
    """Sends a ``PushRequest`` with the client of ``request.target.provider``.

    Args:
        clients: provider name (``"apns"``, ``"fcm"``) → client. The ``make run`` default
            maps both to one ``LogPushClient``.
        backoff_base: first retry delay in seconds (doubled per retry).
        backoff_cap: longest retry delay.
        rng: jitter source (tests pass a seeded ``random.Random``).
    """

    def __init__(self, clients: Mapping[str, PushClient], *, backoff_base: float = 0.5,
                 backoff_cap: float = 8.0, rng: random.Random | None = None) -> None:
        self._clients = dict(clients)
        self._base = backoff_base
        self._cap = backoff_cap
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._counts: Counter[tuple[str, str]] = Counter()

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Delay before retry number ``retry`` (1-based).

        ``min(cap, base * 2**(retry-1))`` jittered into its upper half; a provider's
        ``retry_after`` is a floor (never retry earlier than asked, and a ``Retry-After: 0``
        from a struggling service does not turn into a tight loop).
        """
        delay = min(self._cap, self._base * 2.0 ** (retry - 1))
        delay *= self._rng.uniform(_JITTER_FLOOR, 1.0)
        return max(delay, retry_after or 0.0)

    async def send(self, request: PushRequest, *, deadline: float) -> PushResult:
        """Send ``request``, retrying ``PushRetryable`` until ``deadline`` (trio time).

        Returns:
            the client's result, ``attempts`` counting every try of every retry.

        Raises:
            PushConfigError: no client for the provider.
            InvalidToken, PushAuthError, PushError: at once, never retried.
            PushRetryable: the last one, when the next try would start after ``deadline``.
            PushError("deadline reached"): the deadline passed while a try was in flight and
                no earlier try had failed retryably (else that error is raised).
        """
        provider = request.target.provider
        client = self._clients.get(provider)
        if client is None:
            self._count(provider, "config-error")
            raise PushConfigError(f"no push client for provider {provider!r}")
        attempts = 0
        last: PushRetryable | None = None
        while True:
            if trio.current_time() >= deadline:  # move_on_at would let a quick send through
                self._count(provider, "timeout")
                raise PushError("deadline reached")
            with trio.move_on_at(deadline) as scope:
                try:
                    result = await client.send(request)
                except PushRetryable as exc:
                    last = exc
                except PushError as exc:
                    self._count(provider, _result_of(exc))
                    raise
                else:
                    self._count(provider, "accepted")
                    return attrs.evolve(result, attempts=attempts + result.attempts)
            attempts += 1
            if scope.cancelled_caught:
                self._count(provider, "timeout" if last is None else "retryable")
                if last is not None:
                    raise last
                raise PushError("deadline reached")
            assert last is not None
            wake = trio.current_time() + self.backoff(attempts, last.retry_after)
            if wake >= deadline:
                self._count(provider, "retryable")
                raise last
            self._count(provider, "retried")
            logger.info("push retry provider=%s type=%s instance=%s reason=%s in=%.2fs",
                        provider, request.kind.value, request.instance, last.reason,
                        wake - trio.current_time())
            await trio.sleep_until(wake)

    def _count(self, provider: str, result: str) -> None:
        self._counts[(provider, result)] += 1

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(types.MappingProxyType(dict(self._counts)))

    async def aclose(self) -> None:
        """Close every distinct client once."""
        seen: set[int] = set()
        for client in self._clients.values():
            if id(client) not in seen:
                seen.add(id(client))
                await client.aclose()


def _result_of(exc: PushError) -> str:
    if isinstance(exc, InvalidToken):
        return "invalid-token"
    if isinstance(exc, PushAuthError):
        return "auth-error"
    if isinstance(exc, PushConfigError):
        return "config-error"
    return "error"
