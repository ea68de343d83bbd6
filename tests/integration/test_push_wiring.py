"""The daemon builds its push clients from config: log sink by default, APNs/FCM when live."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio
import yaml

from sipis.push.base import PushKind, PushRequest, PushTarget
from tests.integration.harness import LOG_LINES, daemon_settings, running_daemon
from tests.peers.apns_server import KEY_ID, TEAM_ID, ApnsServer, TestKey
from tests.peers.fcm_server import FcmServer, ServiceAccountKey

APNS_TOKEN = "ab" * 32
FCM_TOKEN = "fcm-registration-token-for-wiring-test-0123456789"


def call_push(provider: str, token: str) -> PushRequest:
    return PushRequest(
        kind=PushKind.CALL,
        target=PushTarget(provider=provider, token=token, app="com.example.phone",
                          environment="production" if provider == "apns" else None),
        instance="inst-wiring", call="call-1", from_uri="sip:bob@sip.test",
        to_uri="sip:alice@sip.test", sip_call_id="c1@x", sent_at=1,
    )


async def test_default_config_writes_pushes_to_the_log(tmp_path: Path) -> None:
    """provider: log (make run) → every push is one log line, nothing is sent."""
    async with running_daemon(tmp_path) as d:
        assert d.daemon.push is not None
        result = await d.daemon.push.send(call_push("apns", APNS_TOKEN),
                                          deadline=trio.current_time() + 5)
        assert result.provider == "apns"
    line = next(ln for ln in LOG_LINES if "push type=call" in ln and "inst-wiring" in ln)
    assert APNS_TOKEN not in line


async def test_live_config_sends_to_apns_and_fcm(tmp_path: Path) -> None:
    """provider: live with both sections → the configured endpoints get the pushes."""
    key = TestKey.generate()
    apns = ApnsServer(public_key=key.public_key)
    account = ServiceAccountKey.generate()
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        fcm = FcmServer(account)
        await nursery.start(fcm.run)
        key_file = key.write(tmp_path)
        sa_file = account.write(tmp_path / "sa.json", token_uri=fcm.token_uri)
        push = {
            "provider": "live",
            "apns": {"team_id": TEAM_ID, "key_id": KEY_ID, "key_file": str(key_file),
                     "production_url": apns.url,
                     "ca_file": str(apns.write_ca(tmp_path))},
            "fcm": {"service_account_file": str(sa_file), "url": fcm.url,
                    "ca_file": str(fcm.write_ca(tmp_path / "fcm-ca.pem"))},
        }
        async with running_daemon(tmp_path, push=push) as d:
            assert d.daemon.push is not None
            deadline = trio.current_time() + 10
            await d.daemon.push.send(call_push("apns", APNS_TOKEN), deadline=deadline)
            await d.daemon.push.send(call_push("fcm", FCM_TOKEN), deadline=deadline)
        assert [p.token for p in apns.pushes] == [APNS_TOKEN]
        assert apns.pushes[0].headers["apns-push-type"] == "voip"
        assert [m.token for m in fcm.accepted] == [FCM_TOKEN]
        assert fcm.accepted[0].data["type"] == "call"
        nursery.cancel_scope.cancel()


def test_an_unusable_apns_key_stops_start_up_with_a_config_error(tmp_path: Path) -> None:
    """A key file that is not an EC P-256 key: exit 78 naming push.apns, before serving."""
    bad_key = tmp_path / "bad.p8"
    bad_key.write_text("not a key")
    settings = daemon_settings(tmp_path, push={
        "provider": "live",
        "apns": {"team_id": TEAM_ID, "key_id": KEY_ID, "key_file": str(bad_key)},
    })
    cfg = tmp_path / "sipis.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    done = subprocess.run([sys.executable, "-m", "sipis", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr[-2000:]
    assert "push.apns" in done.stderr


async def test_nonce_and_record_route_keys_survive_a_restart(tmp_path: Path) -> None:
    """Both keys come from the store's key file: a Record-Route token and a device nonce made
    before a restart are still good after it (a new key file would make new ones)."""
    from sipis.calls.device import NonceStatus
    from sipis.sip.headers import URI

    async with running_daemon(tmp_path) as d:
        assert d.daemon.calls is not None
        token = d.daemon.calls.signer.dialog_token("cid@x", "tag1", "contact-token")
        nonce = d.daemon.calls.registrar.nonce_issuer.issue("127.0.0.1", 1000.0)
    async with running_daemon(tmp_path) as d:
        assert d.daemon.calls is not None
        assert d.daemon.calls.signer.dialog_token("cid@x", "tag1", "contact-token") == token
        uri = URI.parse(f"sip:127.0.0.1:5060;lr;r={token};sipis")
        assert d.daemon.calls.signer.verify(uri, call_id="cid@x", tag="tag1") is not None
        issuer = d.daemon.calls.registrar.nonce_issuer
        assert issuer.status(nonce, "127.0.0.1", 1001.0) is NonceStatus.VALID
