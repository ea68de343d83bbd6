"""Requests that reach sipis's SIP listeners from outside.

Until the call layer lands (INVITE → push → device), an INVITE or MESSAGE to a live contact token
is answered ``480 Temporarily Unavailable``; the rules that keep sipis from being an open relay
already hold: nothing received here is ever forwarded anywhere.

Rules:
- OPTIONS (to us or to a contact token) → 200 with Allow.
- INVITE / MESSAGE to a known contact token → 480; to an unknown one → 404.
- A Request-URI whose host is not ours → 403 (we relay nothing).
- REGISTER → 403 for now (the device registrar comes with the call layer).
- ACK → absorbed; CANCEL/BYE outside a dialog → 481; anything else → 405 with Allow.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sipis.sip.message import SipRequest, SipResponse, make_response
from sipis.store.errors import NotFound, StoreError
from sipis.store.models import InstanceRecord

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE"


class ContactLookup(Protocol):
    async def get_by_contact_token(self, token: str) -> InstanceRecord: ...


class Source(Protocol):
    @property
    def host(self) -> str: ...


class IncomingHandler:
    """Answers requests sent to sipis's own addresses (``RequestHandler`` of the endpoint)."""

    def __init__(self, *, store: ContactLookup, local_hosts: frozenset[str]) -> None:
        self._store = store
        self.local_hosts = frozenset(h.lower() for h in local_hosts)

    async def handle_request(self, request: SipRequest, source: object) -> SipResponse | None:
        method = request.method
        if method == "ACK":
            return None
        if request.uri.host.lower() not in self.local_hosts:
            return make_response(request, 403, "Relaying Forbidden")
        if method == "OPTIONS":
            response = make_response(request, 200)
            response.headers.add("Allow", ALLOW)
            return response
        if method in ("CANCEL", "BYE"):
            return make_response(request, 481)
        if method == "REGISTER":
            return make_response(request, 403)
        if method not in ("INVITE", "MESSAGE"):
            response = make_response(request, 405)
            response.headers.add("Allow", ALLOW)
            return response
        token = request.uri.user
        if not token:
            return make_response(request, 404)
        try:
            record = await self._store.get_by_contact_token(token)
        except NotFound:
            return make_response(request, 404)
        except StoreError:
            log.exception("store lookup failed for an incoming %s", method)
            return make_response(request, 500)
        log.info("instance=%s %s answered 480 (calls not handled yet)", record.id[:8], method)
        return make_response(request, 480)
