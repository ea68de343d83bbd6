"""TLS for the HTTPS API: a self-signed certificate for the embedded default, and the context.

Why: SPEC.md has TLS on by default and `make run` must need nothing installed, so the first
start generates an ECDSA P-256 certificate (cheap, and what every TLS 1.2/1.3 client accepts)
and logs where it is, so a developer can trust it or pin its fingerprint. Later starts reuse it
while it is valid; an expired, unreadable or mismatched pair is replaced. The key file is
created 0600 before a single byte of key is written, and both files are written to temporary
names and renamed, so a crash never leaves a half-written key in place.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

CERT_NAME: Final = "sipis-selfsigned.crt"
KEY_NAME: Final = "sipis-selfsigned.key"
DEFAULT_HOSTNAMES: Final = ("localhost", "127.0.0.1", "::1")
# One year: long enough not to annoy a developer, short enough to be replaced now and then.
VALIDITY: Final = datetime.timedelta(days=365)
# Replace the certificate this long before it expires, so a running daemon never serves an
# expired one right after a restart.
RENEW_BEFORE: Final = datetime.timedelta(days=7)
# Backdate notBefore a little: clients with a slightly slow clock would refuse a cert "from
# the future".
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
# Hypercorn's choice, which RFC 9113 §9.2.2 requires for HTTP/2 over TLS 1.2.
TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
ALPN_PROTOCOLS: Final = ("h2", "http/1.1")


def _general_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _usable(
    cert_path: Path, key_path: Path, hostnames: Sequence[str], now: datetime.datetime
) -> bool:
    """Whether the pair on disk can be served as is: readable, matching, valid, right names."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if cert.public_key() != key.public_key():
        return False
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc - RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(_general_names(hostnames)) <= set(san)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically; the file has ``mode`` from its creation on."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def generate_self_signed(
    hostnames: Sequence[str], now: datetime.datetime
) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 self-signed certificate and its key, both PEM.

    Args:
        hostnames: DNS names and IP addresses for the subjectAltName (the first is the CN).
        now: the issue time (aware, UTC).
    Returns:
        (certificate PEM, PKCS#8 private key PEM).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sipis (self-signed)"),
            x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "localhost"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_general_names(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(
    directory: Path,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    *,
    now: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """The self-signed certificate and key in ``directory``, made on first use.

    Reuses the pair when it is readable, matches, covers ``hostnames`` and is valid for at
    least RENEW_BEFORE more; otherwise writes a new one (the key file 0600, the directory
    created 0700 if missing) and logs the path and SHA-256 fingerprint.

    Args:
        directory: where the pair lives.
        hostnames: names and addresses the certificate must cover.
        now: the current time (aware); the real clock when None (tests pass one).
    Returns:
        (certificate path, key path).
    Raises:
        OSError: the directory or files cannot be created or written.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = directory / CERT_NAME
    key_path = directory / KEY_NAME
    if _usable(cert_path, key_path, hostnames, now):
        if key_path.stat().st_mode & 0o077:
            key_path.chmod(0o600)  # someone loosened it; a private key is nobody else's
        log.info("TLS: using the self-signed certificate %s", cert_path)
        return cert_path, key_path
    cert_pem, key_pem = generate_self_signed(hostnames, now)
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert_pem, 0o644)
    fingerprint = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex(":")
    log.warning(
        "TLS: generated a self-signed certificate %s (key %s, SHA-256 %s) for %s; "
        "configure api.tls.cert_file/key_file for production",
        cert_path,
        key_path,
        fingerprint,
        ", ".join(hostnames),
    )
    return cert_path, key_path


def ssl_context_for(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """A server-side context for the API: TLS ≥ 1.2, ALPN h2 then http/1.1, no compression.

    Raises:
        OSError / ssl.SSLError: the files are missing or do not hold a matching pair.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context
