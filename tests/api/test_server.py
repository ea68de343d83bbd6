"""api.server and api.tls: the API really served over TLS on loopback, and its certificate."""

from __future__ import annotations

import datetime
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sipis.api.server import ApiServer
from sipis.api.tls import ensure_self_signed, ssl_context_for
from tests.api.fakes import FakeInstanceService, api_config

TOKEN = "0123456789abcdef" * 4


def client_context(cert: Path) -> ssl.SSLContext:
    """Trust exactly our certificate (the machine's SSL_CERT_FILE is not involved)."""
    return ssl.create_default_context(cafile=str(cert))


def server_for(
    cert: Path | None,
    key: Path | None,
    *,
    max_body_bytes: int = 16384,
    service: FakeInstanceService | None = None,
) -> ApiServer:
    return ApiServer(
        service=service or FakeInstanceService(),
        config=api_config(max_body_bytes=max_body_bytes),
        ready=lambda: True,
        cert_file=cert,
        key_file=key,
    )


# --- the server -----------------------------------------------------------------------------


async def test_the_api_is_served_over_https_with_h2_and_http11_then_stops_gracefully(
    tmp_path: Path,
) -> None:
    """started() gives the bound port; ALPN picks h2 or http/1.1; request_shutdown() ends run."""
    cert, key = ensure_self_signed(tmp_path / "tls")
    server = server_for(cert, key)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            assert isinstance(port, int) and port > 0 and server.port == port
            url = f"https://127.0.0.1:{port}/healthz"
            ctx = client_context(cert)
            async with httpx.AsyncClient(http2=True, verify=ctx, trust_env=False) as client:
                h2 = await client.get(url)
            assert (h2.status_code, h2.http_version, h2.json()) == (200, "HTTP/2", {"status": "ok"})
            async with httpx.AsyncClient(http2=False, verify=ctx, trust_env=False) as client:
                h1 = await client.get(url)
            assert (h1.status_code, h1.http_version) == (200, "HTTP/1.1")
            assert "server" not in h1.headers
            server.request_shutdown()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=ctx, trust_env=False) as client:
            await client.get(url)


async def body_of(kib: int) -> AsyncIterator[bytes]:
    """A body sent in 1 KiB pieces, yielding in between so the server can answer early."""
    for _ in range(kib):
        yield b" " * 1024
        await trio.sleep(0)


async def test_create_works_over_real_http2(tmp_path: Path) -> None:
    """A create and a GET with its secret, over h2 through hypercorn."""
    cert, key = ensure_self_signed(tmp_path)
    server = server_for(cert, key)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            base = f"https://127.0.0.1:{port}"
            async with httpx.AsyncClient(
                http2=True, verify=client_context(cert), trust_env=False, base_url=base
            ) as client:
                created = await client.post("/v1/instances", json={
                    "app": "com.example.phone",
                    "sip": {"aor": "sip:alice@example.org", "password": "pw"},
                    "push": {"provider": "apns", "token": TOKEN},
                })
                assert created.status_code == 201, created.text
                secret = created.json()["secret"]
                state = await client.get(
                    created.headers["location"], headers={"Authorization": f"Bearer {secret}"}
                )
                assert state.status_code == 200
            server.request_shutdown()


@pytest.mark.parametrize("http2", [True, False])
async def test_early_answers_reach_clients_that_are_still_sending_a_body(
    tmp_path: Path, http2: bool
) -> None:
    """413 (body over the limit), 401 (PATCH without a secret) and even GET /healthz with a
    body are answered cleanly, the rest of the body being read and dropped first."""
    cert, key = ensure_self_signed(tmp_path)
    server = server_for(cert, key, max_body_bytes=2048)
    json_type = {"Content-Type": "application/json"}
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            async with httpx.AsyncClient(
                http2=http2, verify=client_context(cert), trust_env=False,
                base_url=f"https://127.0.0.1:{port}",
            ) as client:
                too_big = await client.post("/v1/instances", content=body_of(64),
                                            headers=json_type)
                assert too_big.status_code == 413
                assert too_big.headers["content-type"] == "application/problem+json"
                anonymous = await client.patch("/v1/instances/x", content=body_of(2),
                                               headers=json_type)
                assert anonymous.status_code == 401
                health = await client.request("GET", "/healthz", content=body_of(2))
                assert health.status_code == 200
                assert health.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            server.request_shutdown()


async def test_a_connection_that_fails_inside_hypercorn_does_not_take_the_server_down(
    tmp_path: Path,
) -> None:
    """Past the discard limit the h2 stream gets more DATA after its answer, which raises
    KeyError inside hypercorn: that connection ends, the listener serves on."""
    cert, key = ensure_self_signed(tmp_path)
    server = server_for(cert, key, max_body_bytes=2048)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            base = f"https://127.0.0.1:{port}"
            ctx = client_context(cert)
            for _ in range(2):
                async with httpx.AsyncClient(
                    http2=True, verify=ctx, trust_env=False, base_url=base
                ) as client:
                    try:
                        response = await client.post(
                            "/v1/instances", content=body_of(1100),
                            headers={"Content-Type": "application/json"},
                        )
                    except httpx.TransportError:
                        pass  # the connection was dropped while the client still sent
                    else:
                        assert response.status_code == 413
            async with httpx.AsyncClient(http2=True, verify=ctx, trust_env=False) as client:
                assert (await client.get(base + "/healthz")).status_code == 200
            server.request_shutdown()


@pytest.mark.parametrize("http2", [True, False])
async def test_request_shutdown_lets_an_in_flight_create_finish(
    tmp_path: Path, http2: bool
) -> None:
    """Graceful stop: no new connections, but the create being served gets its 201."""
    cert, key = ensure_self_signed(tmp_path)
    server = server_for(cert, key, service=FakeInstanceService(create_delay=0.5))
    results: list[int] = []
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            started = trio.Event()

            async def create() -> None:
                async with httpx.AsyncClient(
                    http2=http2, verify=client_context(cert), trust_env=False
                ) as client:
                    started.set()
                    response = await client.post(f"https://127.0.0.1:{port}/v1/instances", json={
                        "app": "com.example.phone",
                        "sip": {"aor": "sip:alice@example.org", "password": "pw"},
                        "push": {"provider": "apns", "token": TOKEN},
                    })
                    results.append(response.status_code)

            nursery.start_soon(create)
            await started.wait()
            await trio.sleep(0.1)  # the request is now inside the (slow) service
            server.request_shutdown()
    assert results == [201]


async def test_plain_http_when_tls_is_disabled() -> None:
    """No cert and key: the same app over cleartext HTTP/1.1 (tests, local proxies)."""
    server = server_for(None, None)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            async with httpx.AsyncClient(trust_env=False) as client:
                response = await client.get(f"http://127.0.0.1:{port}/readyz")
            assert response.json() == {"status": "ready"}
            server.request_shutdown()


async def test_cancelling_the_nursery_stops_the_server(tmp_path: Path) -> None:
    """The daemon may also just cancel; run() must not hang."""
    cert, key = ensure_self_signed(tmp_path)
    server = server_for(cert, key)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            nursery.cancel_scope.cancel()


def test_cert_without_key_is_refused() -> None:
    """cert_file and key_file come as a pair."""
    with pytest.raises(ValueError, match="together"):
        server_for(Path("cert.pem"), None)


# --- the self-signed certificate ------------------------------------------------------------


def test_a_self_signed_p256_cert_is_made_with_a_private_key_file(tmp_path: Path) -> None:
    """ECDSA P-256, SAN localhost + 127.0.0.1, key readable by the owner only."""
    cert_path, key_path = ensure_self_signed(tmp_path / "new", ["localhost", "127.0.0.1"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_valid_cert_is_reused(tmp_path: Path) -> None:
    """The second start serves the same certificate."""
    cert_path, key_path = ensure_self_signed(tmp_path)
    before = cert_path.read_bytes(), key_path.read_bytes()
    assert ensure_self_signed(tmp_path) == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_an_expired_cert_is_replaced(tmp_path: Path) -> None:
    """Close to or past notAfter, a new pair is made."""
    cert_path, _ = ensure_self_signed(tmp_path)
    before = cert_path.read_bytes()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    ensure_self_signed(tmp_path, now=later)
    after = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert_path.read_bytes() != before
    assert after.not_valid_after_utc > later


def test_a_cert_for_other_names_or_a_broken_pair_is_replaced(tmp_path: Path) -> None:
    """New hostnames, a corrupt key or a loosened key mode are all dealt with."""
    cert_path, key_path = ensure_self_signed(tmp_path)
    first = cert_path.read_bytes()
    ensure_self_signed(tmp_path, ["sipis.test"])
    assert cert_path.read_bytes() != first
    key_path.write_bytes(b"garbage")
    ensure_self_signed(tmp_path, ["sipis.test"])
    ssl_context_for(cert_path, key_path)  # a matching pair again
    key_path.chmod(0o644)
    ensure_self_signed(tmp_path, ["sipis.test"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_the_server_context_requires_tls_12_and_offers_h2(tmp_path: Path) -> None:
    """TLS 1.0/1.1 are off."""
    context = ssl_context_for(*ensure_self_signed(tmp_path))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
