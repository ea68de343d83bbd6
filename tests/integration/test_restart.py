"""A SIGKILLed sipis loses nothing: every stored instance is registered again, under the limit."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sipis.store.crypto import KeyRing, make_verifier, new_secret
from sipis.store.models import InstanceRecord, RegistrationStatus
from sipis.store.sqlite import SqliteStore
from tests.conftest import DEFAULT_USERS
from tests.integration.harness import (
    SENSITIVE,
    DaemonProcess,
    client_ssl_context,
    daemon_settings,
    instance_body,
)
from tests.peers.ports import free_port

pytestmark = [pytest.mark.kamailio, pytest.mark.slow]

SEEDED = 1000
RATE = 150
BURST = 10


def user(n: int) -> str:
    return f"user{n:04d}"


def password(n: int) -> str:
    return f"seeded-pw-{n:04d}"


async def seed(directory: Path, registrar: str, count: int) -> None:
    """Write instances straight into the store, as a previous run of sipis would have."""
    key_file = directory / "sipis.key"
    keyring = KeyRing.generate_file(key_file)
    store = SqliteStore(directory / "sipis.db", keyring)
    await store.open()
    now = time.time()
    try:
        for n in range(count):
            await store.insert(InstanceRecord(
                id=f"seeded{n:05d}xxxxxxxxxxx", secret_verifier=make_verifier(new_secret()),
                app="com.example.phone", aor=f"sip:{user(n)}@sip.test", username=user(n),
                password=password(n), registrar=registrar, outbound_proxy=None,
                expires=3600, push_provider="apns", push_token=f"seeded-token-{n:05d}",
                push_environment="production", contact_token=f"seedtok{n:05d}",
                instance_urn=f"urn:uuid:00000000-0000-4000-8000-{n:012d}", lifetime=86400,
                created_at=now, last_heard_at=now, expires_at=now + 86400,
                registration=RegistrationStatus(state="registered"),
            ))
    finally:
        await store.close()


def contact_count(kamailio: Any) -> int:
    """Contacts in the location table (a statistic: ul.dump of 1,000 contacts is too big)."""
    out = kamailio.rpc("stats.get_statistics", "usrloc:")
    match = re.search(r"usrloc:location_contacts\s*=\s*(\d+)", out)
    assert match, out
    return int(match.group(1))


def max_per_second(times: list[float], window: float = 1.0) -> int:
    """The most REGISTERs seen in any ``window``-second window."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_sigkill_under_load_then_restart_reregisters_every_instance(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """1,000 stored instances; SIGKILL while registering; restart → all back, rate kept."""
    # One AOR per instance, as with real users: a 200 to a REGISTER lists every contact of
    # the AOR, and a thousand of them would not fit in a UDP datagram.
    users = {**DEFAULT_USERS, **{user(n): password(n) for n in range(SEEDED)}}
    SENSITIVE.update(users.values())
    kamailio = kamailio_factory(nonce_expire=300, users=users)
    registrar = kamailio.registrar_uri()
    await seed(tmp_path, registrar, SEEDED)
    settings = daemon_settings(
        tmp_path, api_port=free_port("tcp"),
        registrar={"register_rate": RATE, "register_burst": BURST},
        log={"level": "info"},
    )
    daemon = DaemonProcess(tmp_path, settings)
    try:
        daemon.start()
        # Under load: let it register part of the instances, then kill it hard.
        with httpx.Client(base_url=daemon.api_url, verify=client_ssl_context()) as client:
            created = client.post("/v1/instances", json=instance_body(kamailio))
            assert created.status_code == 201, created.text
        with trio.fail_after(20):  # under load: some registered, far from all
            while contact_count(kamailio) < 50:
                await trio.sleep(0.1)
        assert contact_count(kamailio) < SEEDED
        assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL

        kamailio.restart()  # the provider forgot every binding meanwhile
        mark = time.time()
        daemon.start()
        deadline = time.monotonic() + 2 * SEEDED * 2 / RATE + 30
        while time.monotonic() < deadline:
            if contact_count(kamailio) >= SEEDED + 1:
                break
            await trio.sleep(0.5)
        assert contact_count(kamailio) == SEEDED + 1  # the API-created one too
        log = [e for e in kamailio.register_log() if e.time >= mark]
        # Every stored instance sent its authenticated REGISTER after the restart, and
        # Kamailio holds a contact for each (counted above).
        sent = {c.split("@")[0] for e in log if e.authorization for c in e.contacts}
        missing = [n for n in range(SEEDED) if f"<sip:seedtok{n:05d}" not in sent]
        assert not missing, f"{len(missing)} instances not registered again"
        assert "registration=backoff" not in daemon.log_path.read_text()
        times = [e.time for e in log]
        assert len(times) >= 2 * (SEEDED + 1)
        # Over 3 s windows, so that a scheduling stall of the provider on this shared machine
        # (packets queued, then logged together) cannot pass for a burst; a storm would be
        # thousands per second.
        assert max_per_second(times, window=3.0) <= 3 * RATE + BURST
    finally:
        daemon.stop()
