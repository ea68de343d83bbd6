"""Shared set-up of the end-to-end call tests: a local APNs server, a daemon pushing to it,
one instance for a Kamailio user, and the woken pjsua2 phone registering to sipis."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from tests.integration.harness import RunningDaemon, instance_body, running_daemon
from tests.peers.apns_server import KEY_ID, TEAM_ID, ApnsServer, TestKey

if TYPE_CHECKING:
    from tests.peers.phone import AsyncPhone


def live_apns(apns: ApnsServer, key: TestKey, directory: Path) -> dict[str, Any]:
    """The ``push`` config section of a daemon that sends to the local APNs server."""
    return {
        "provider": "live",
        "apns": {"team_id": TEAM_ID, "key_id": KEY_ID, "key_file": str(key.write(directory)),
                 "production_url": apns.url, "sandbox_url": apns.url,
                 "ca_file": str(apns.write_ca(directory))},
    }


@asynccontextmanager
async def apns_instance(
    tmp_path: Path, kamailio: Any, *, transport: str = "udp", apns_options: Any = None,
    **daemon: Any,
) -> AsyncIterator[tuple[RunningDaemon, ApnsServer, dict[str, Any]]]:
    """A running local APNs server and daemon, and one instance created for ``alice`` (its
    201 body: id, secret, device) with a random APNs token. ``daemon``: running_daemon's
    keyword arguments (calls=…, lifetime=…)."""
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key, **(apns_options or {}))
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path),
                                  **daemon) as d:
            resp = await d.create(instance_body(kamailio, transport=transport,
                                                push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            yield d, apns, resp.json()
        nursery.cancel_scope.cancel()


async def woken_phone(phone_factory: Any, body: dict[str, Any], *, transport: str = "udp",
                      phone: AsyncPhone | None = None, **register: Any) -> AsyncPhone:
    """The app after the push: a pjsua2 account registering to sipis with the instance id and
    secret (``register``: auto_answer=…)."""
    from tests.peers.phone import AsyncPhone

    phone = phone or AsyncPhone(phone_factory())
    device = body["device"]
    await phone.register(device["registrar"].replace(";transport=tcp", ""),
                         device["username"], body["secret"], realm=device["realm"],
                         transport=transport, **register)
    return phone
