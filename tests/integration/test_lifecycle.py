"""SIGHUP reload and graceful SIGTERM with calls in progress (issue 6, points 2 and 3).

Real signals: SIGHUP is sent to this process (the in-process daemon's signal watcher takes it,
as in production) and SIGTERM to a daemon subprocess.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
import yaml

from tests.integration.callkit import apns_instance, live_apns, woken_phone
from tests.integration.harness import (
    LOG_LINES,
    DaemonProcess,
    client_ssl_context,
    daemon_settings,
    instance_body,
    running_daemon,
)
from tests.peers.apns_server import ApnsServer, TestKey
from tests.peers.caller import Scenario

pytestmark = pytest.mark.kamailio


async def sighup_and_wait(marker: str, timeout: float = 5.0) -> str:
    """Send SIGHUP to ourselves and return the first new log line holding ``marker``."""
    seen = len(LOG_LINES)
    os.kill(os.getpid(), signal.SIGHUP)
    with trio.fail_after(timeout):
        while True:
            for line in LOG_LINES[seen:]:
                if marker in line:
                    return line
            await trio.sleep(0.02)


def rewrite(path: Path, change: dict[str, Any]) -> None:
    settings = yaml.safe_load(path.read_text())
    for dotted, value in change.items():
        node = settings
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(settings))


async def test_sighup_applies_a_new_allow_list_during_a_call_and_registrations_stay_up(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """A call is answered and in progress; SIGHUP with a narrower api.allowed_domains: new
    instances for the old domain get 403 at once, while the call goes on to its BYE and the
    instance stays registered at Kamailio. Then SIGHUP with a broken file: the old config
    stays (the allow-list still refuses) and the log says why."""

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with apns_instance(tmp_path, kamailio, calls={"ring_timeout": "10s"}) as (d, apns, body):
        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        run = caller.start(Scenario.CALL, to_user="alice", timeout=20, hold_ms=2500)
        with trio.fail_after(5):
            await apns.wait_received(1)
        phone = await woken_phone(phone_factory, body, auto_answer=[200])
        await phone.wait_incoming_call(timeout=10)
        await phone.wait_call_state("CONFIRMED", timeout=10)

        rewrite(d.config_path, {"api.allowed_domains": ["only.example.org"]})
        await sighup_and_wait("SIGHUP: configuration reloaded")
        refused = await d.client.post("/v1/instances", json=instance_body(
            kamailio, user="bob", transport="udp"))
        assert refused.status_code == 403, refused.text

        d.config_path.write_text("api: [this is: not a mapping\n")
        why = await sighup_and_wait("SIGHUP: keeping the old configuration")
        assert "sipis.yaml" in why or "line" in why
        again = await d.client.post("/v1/instances", json=instance_body(
            kamailio, user="bob", transport="udp"))
        assert again.status_code == 403, again.text

        trace = await trio.to_thread.run_sync(run.wait)
        assert trace.ok, trace.describe()
        state = await d.client.get(f"/v1/instances/{body['id']}",
                                   headers={"authorization": f"Bearer {body['secret']}"})
        assert state.json()["registration"]["state"] == "registered"
        assert len(kamailio.location("alice")) == 1
    assert trace.statuses("BYE") == [200]


async def test_sighup_serves_a_renewed_api_certificate_to_new_connections(
    tmp_path: Path,
) -> None:
    """The API certificate files are replaced and SIGHUP sent: a new TLS connection gets the
    new certificate (issued by another CA), without a restart."""
    async with running_daemon(tmp_path) as d:
        first = await d.client.get("/healthz")
        assert first.status_code == 200
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "api.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "api.key"))
        await sighup_and_wait("SIGHUP: configuration reloaded")
        ctx = client_ssl_context()
        ca.configure_trust(ctx)
        async with httpx.AsyncClient(verify=ctx) as fresh:
            got = await fresh.get(f"https://127.0.0.1:{d.daemon.api_port}/healthz")
        assert got.status_code == 200
        assert d.daemon.api is not None and str(d.daemon.api.cert_file).endswith("api.crt")
        old_only = client_ssl_context()  # trusts the first CA only: the new cert fails
        async with httpx.AsyncClient(verify=old_only) as stale:
            with pytest.raises(httpx.ConnectError):
                await stale.get(f"https://127.0.0.1:{d.daemon.api_port}/healthz")


async def test_sighup_with_an_unreadable_apns_key_keeps_the_old_push_clients(
    tmp_path: Path,
) -> None:
    """Push credentials are checked before anything changes: a key file that is not a key
    keeps the whole old configuration (and its working clients)."""
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        async with running_daemon(tmp_path, push=live_apns(apns, key, tmp_path)) as d:
            assert d.daemon.push is not None
            before = d.daemon.push._clients["apns"]
            broken = tmp_path / "broken.p8"
            broken.write_text("not a key\n")
            rewrite(d.config_path, {"push.apns.key_file": str(broken),
                                    "calls.ring_timeout": "7s"})
            line = await sighup_and_wait("SIGHUP: keeping the old configuration")
            assert "push.apns" in line
            assert d.daemon.push._clients["apns"] is before
            assert d.daemon.config.calls.ring_timeout != 7.0
            # A good file again: new clients replace the old ones.
            rewrite(d.config_path, {"push.apns.key_file": str(key.write(tmp_path))})
            await sighup_and_wait("SIGHUP: configuration reloaded")
            assert d.daemon.push._clients["apns"] is not before
            assert d.daemon.config.calls.ring_timeout == 7.0
        nursery.cancel_scope.cancel()


async def test_sigterm_during_a_call_lets_it_finish_then_exits_0_within_the_grace(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any, phone_factory: Any
) -> None:
    """SIGTERM while a call is up: the API stops, a new call gets 503, the call in progress
    goes on until the caller's BYE passes through sipis to the phone, then the process exits
    0 — after the BYE and well inside shutdown_grace."""
    from tests.peers.phone import AsyncPhone

    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        settings = daemon_settings(tmp_path, api_port=free_tcp_port(),
                                   push=live_apns(apns, key, tmp_path),
                                   calls={"ring_timeout": "10s"}, shutdown_grace="20s")
        daemon = DaemonProcess(tmp_path, settings)
        await trio.to_thread.run_sync(daemon.start)
        try:
            async with httpx.AsyncClient(base_url=daemon.api_url,
                                         verify=client_ssl_context()) as client:
                resp = await client.post("/v1/instances", json=instance_body(
                    kamailio, transport="udp", push={"token": os.urandom(32).hex()}))
            assert resp.status_code == 201, resp.text
            body = resp.json()
            caller = caller_factory(kamailio.address, domain=kamailio.domain)
            run = caller.start(Scenario.CALL, to_user="alice", timeout=25, hold_ms=3000)
            with trio.fail_after(10):
                await apns.wait_received(1)
            phone = AsyncPhone(phone_factory())
            device = body["device"]
            await phone.register(device["registrar"].replace(";transport=tcp", ""),
                                 device["username"], body["secret"], realm=device["realm"],
                                 transport="udp", auto_answer=[200])
            await phone.wait_incoming_call(timeout=10)
            await phone.wait_call_state("CONFIRMED", timeout=10)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            await trio.sleep(0.5)
            assert daemon.proc.poll() is None  # still serving the call
            second = await caller.run_async(Scenario.REJECTED, to_user="alice", timeout=10,
                                            final_statuses=[503, 500, 480])
            bye = await phone.wait_call_request("BYE", timeout=10)
            code = await trio.to_thread.run_sync(daemon.proc.wait, 20)
            took = time.monotonic() - sent
            trace = await trio.to_thread.run_sync(run.wait)
        finally:
            daemon.stop()
        nursery.cancel_scope.cancel()
    assert code == 0
    assert bye.method == "BYE"
    assert trace.ok, trace.describe()
    assert trace.statuses("BYE") == [200]
    assert took < 20
    assert second.ok, second.describe()
    log = daemon.log_path.read_text()
    assert "waiting up to 20s for" in log
    assert "stopped" in log


def free_tcp_port() -> int:
    from tests.peers.ports import free_port

    return free_port("tcp")
