"""Key ring (AES-256-GCM, key file, rotation) and instance-secret verifiers."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from sipis.store.crypto import (
    KeyRing,
    check_verifier,
    make_verifier,
    new_secret,
)
from sipis.store.errors import CryptoError, StoreError

AAD = b"inst-1:password"
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
B64_A = base64.b64encode(KEY_A).decode()


def write_key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- encryption -------------------------------------------------------------------------------


def test_encrypt_then_decrypt_returns_the_plaintext() -> None:
    """A value encrypted with some AAD decrypts with the same AAD."""
    ring = KeyRing([("a", KEY_A)])
    key_id, blob = ring.encrypt("pässword", aad=AAD)
    assert key_id == "a"
    assert b"p\xc3\xa4ssword" not in blob
    assert ring.decrypt(key_id, blob, aad=AAD) == "pässword"


def test_each_encryption_uses_a_fresh_nonce() -> None:
    """The same plaintext encrypts differently every time (random 96-bit nonce)."""
    ring = KeyRing.ephemeral()
    blobs = {ring.encrypt("same", aad=AAD)[1] for _ in range(20)}
    assert len(blobs) == 20
    assert len({b[:12] for b in blobs}) == 20


def test_wrong_aad_fails_to_decrypt() -> None:
    """A blob moved to another instance or field does not decrypt there."""
    ring = KeyRing.ephemeral()
    key_id, blob = ring.encrypt("secret-pw", aad=b"inst-1:password")
    for other in (b"inst-2:password", b"inst-1:push_token", b""):
        with pytest.raises(CryptoError, match="authentication"):
            ring.decrypt(key_id, blob, aad=other)


def test_tampered_ciphertext_fails_to_decrypt() -> None:
    """Any flipped bit (nonce, body or tag) is detected."""
    ring = KeyRing.ephemeral()
    key_id, blob = ring.encrypt("secret-pw", aad=AAD)
    for i in (0, 12, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises(CryptoError):
            ring.decrypt(key_id, bytes(bad), aad=AAD)
    with pytest.raises(CryptoError, match="truncated"):
        ring.decrypt(key_id, blob[:20], aad=AAD)


def test_unknown_key_id_is_a_crypto_error() -> None:
    """A blob under a key that is not in the ring names the key id, and is a StoreError."""
    key_id, blob = KeyRing([("gone", KEY_A)]).encrypt("pw", aad=AAD)
    with pytest.raises(CryptoError, match="'gone'") as info:
        KeyRing([("b", KEY_B)]).decrypt(key_id, blob, aad=AAD)
    assert isinstance(info.value, StoreError)


def test_same_key_id_with_another_key_fails_authentication() -> None:
    """A key file whose key was replaced under the same id cannot pass off garbage."""
    key_id, blob = KeyRing([("a", KEY_A)]).encrypt("pw", aad=AAD)
    with pytest.raises(CryptoError, match="authentication"):
        KeyRing([("a", KEY_B)]).decrypt(key_id, blob, aad=AAD)


def test_last_key_is_active_and_every_key_decrypts() -> None:
    """Encryption uses the last key; values under older keys still decrypt."""
    old = KeyRing([("a", KEY_A)])
    a_id, a_blob = old.encrypt("old-pw", aad=AAD)
    ring = KeyRing([("a", KEY_A), ("b", KEY_B)])
    assert ring.active_key_id == "b"
    assert ring.key_ids == ("a", "b")
    assert ring.encrypt("x", aad=AAD)[0] == "b"
    assert ring.decrypt(a_id, a_blob, aad=AAD) == "old-pw"


def test_keyring_repr_shows_ids_not_keys() -> None:
    """repr() of a ring names its key ids only."""
    text = repr(KeyRing([("a", KEY_A)]))
    assert "'a'" in text
    assert B64_A not in text
    assert repr(KEY_A) not in text


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ([], "no keys"),
        ([("a", b"short")], "5 bytes"),
        ([("a", KEY_A), ("a", KEY_B)], "twice"),
        ([("bad id", KEY_A)], "key id"),
    ],
)
def test_bad_key_ring_is_refused(keys: list[tuple[str, bytes]], match: str) -> None:
    """A ring needs at least one key, 32-byte keys and unique, simple ids."""
    with pytest.raises(CryptoError, match=match):
        KeyRing(keys)


# -- key files --------------------------------------------------------------------------------


def test_key_file_is_parsed_with_comments_and_blank_lines(tmp_path: Path) -> None:
    """Comments and blank lines are skipped; the last key line is the active key."""
    path = write_key_file(tmp_path / "keys", (
        "# sipis keys\n\n"
        f"old {B64_A}\n"
        "   # indented comment\n"
        f"new {base64.b64encode(KEY_B).decode()}\n"
    ))
    ring = KeyRing.load(path)
    assert ring.key_ids == ("old", "new")
    assert ring.active_key_id == "new"


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    """A key file other users could read is refused with the fix in the message."""
    path = write_key_file(tmp_path / "keys", f"a {B64_A}\n", mode=0o644)
    with pytest.raises(CryptoError, match="chmod 600") as info:
        KeyRing.load(path)
    assert "0644" in str(info.value)
    assert B64_A not in str(info.value)


@pytest.mark.parametrize("mode", [0o604, 0o602, 0o620, 0o666])
def test_key_file_open_to_others_or_group_writable_is_refused(tmp_path: Path, mode: int) -> None:
    """Any access for others, or group write, is refused."""
    path = write_key_file(tmp_path / "keys", f"a {B64_A}\n", mode=mode)
    with pytest.raises(CryptoError, match="refusing"):
        KeyRing.load(path)


def test_group_readable_key_file_is_accepted(tmp_path: Path) -> None:
    """Mode 0640 (root:sipis under systemd) is fine."""
    path = write_key_file(tmp_path / "keys", f"a {B64_A}\n", mode=0o640)
    assert KeyRing.load(path).key_ids == ("a",)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        (f"a {B64_A} extra\n", "line 1: expected"),
        ("a not*base64!\n", "line 1: the key is not valid base64"),
        (f"a {base64.b64encode(b'x' * 16).decode()}\n", "line 1: the key is 16 bytes"),
        (f"a {B64_A}\na {B64_A}\n", "line 2: key id 'a' appears twice"),
        (f"b@d {B64_A}\n", "line 1: bad key id"),
    ],
)
def test_malformed_key_file_is_refused_without_echoing_keys(
    tmp_path: Path, text: str, match: str
) -> None:
    """Errors name the file and line, never the key material."""
    path = write_key_file(tmp_path / "keys", text)
    with pytest.raises(CryptoError, match=match) as info:
        KeyRing.load(path)
    assert B64_A not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_key_file_is_a_crypto_error(tmp_path: Path) -> None:
    """A missing key file is reported as such."""
    with pytest.raises(CryptoError, match="cannot read"):
        KeyRing.load(tmp_path / "nope")


def test_generated_key_file_is_private_and_loads(tmp_path: Path) -> None:
    """generate_file writes one random 32-byte key, mode 0600, and no stray temp file."""
    old_umask = os.umask(0)  # even a permissive umask gives 0600
    try:
        ring = KeyRing.generate_file(tmp_path / "keys")
    finally:
        os.umask(old_umask)
    path = tmp_path / "keys"
    assert mode_of(path) == 0o600
    assert len(ring.key_ids) == 1
    assert KeyRing.load(path).key_ids == ring.key_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]
    key_id, blob = ring.encrypt("pw", aad=AAD)
    assert KeyRing.load(path).decrypt(key_id, blob, aad=AAD) == "pw"


def test_generate_file_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing key file is never replaced: that would orphan every stored password."""
    path = tmp_path / "keys"
    KeyRing.generate_file(path)
    before = path.read_bytes()
    with pytest.raises(CryptoError, match="refusing to overwrite"):
        KeyRing.generate_file(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_generated_keys_differ(tmp_path: Path) -> None:
    """Two generated files hold different keys and ids."""
    a = KeyRing.generate_file(tmp_path / "a")
    b = KeyRing.generate_file(tmp_path / "b")
    _, blob = a.encrypt("pw", aad=AAD)
    assert a.key_ids != b.key_ids
    with pytest.raises(CryptoError):
        b.decrypt(b.active_key_id, blob, aad=AAD)


def test_rotation_appends_an_active_key_and_old_values_still_decrypt(tmp_path: Path) -> None:
    """After add_key_to_file, the new key encrypts and values under key A still decrypt."""
    path = tmp_path / "keys"
    ring_a = KeyRing.generate_file(path)
    a_id, a_blob = ring_a.encrypt("under-a", aad=AAD)
    new_id = KeyRing.add_key_to_file(path)
    ring_ab = KeyRing.load(path)
    assert ring_ab.key_ids == (a_id, new_id)
    assert ring_ab.active_key_id == new_id
    assert ring_ab.decrypt(a_id, a_blob, aad=AAD) == "under-a"
    b_id, b_blob = ring_ab.encrypt("under-b", aad=AAD)
    assert b_id == new_id
    assert KeyRing.load(path).decrypt(b_id, b_blob, aad=AAD) == "under-b"
    assert mode_of(path) == 0o600
    assert path.read_text().startswith("# sipis store keys")  # comments kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_rotation_keeps_the_file_mode(tmp_path: Path) -> None:
    """A 0640 key file stays 0640 after a key is added."""
    path = write_key_file(tmp_path / "keys", f"a {B64_A}", mode=0o640)  # no final newline
    KeyRing.add_key_to_file(path)
    assert mode_of(path) == 0o640
    assert KeyRing.load(path).key_ids[0] == "a"
    assert len(KeyRing.load(path).key_ids) == 2


def test_rotation_refuses_an_unsafe_key_file(tmp_path: Path) -> None:
    """add_key_to_file validates the file first and leaves a bad one untouched."""
    path = write_key_file(tmp_path / "keys", f"a {B64_A}\n", mode=0o644)
    with pytest.raises(CryptoError):
        KeyRing.add_key_to_file(path)
    assert path.read_text() == f"a {B64_A}\n"


# -- secrets and verifiers --------------------------------------------------------------------


def test_new_secret_is_256_bits_urlsafe_without_padding() -> None:
    """A secret is 43 URL-safe base64 characters (32 random bytes), different each time."""
    secrets_ = {new_secret() for _ in range(50)}
    assert len(secrets_) == 50
    for s in secrets_:
        assert len(s) == 43
        assert "=" not in s
        assert len(base64.urlsafe_b64decode(s + "=")) == 32


def test_verifier_accepts_the_secret_and_rejects_others() -> None:
    """check_verifier is true only for the secret the verifier was made from."""
    secret = new_secret()
    verifier = make_verifier(secret)
    assert check_verifier(secret, verifier)
    assert not check_verifier(new_secret(), verifier)
    assert not check_verifier(secret[:-1], verifier)
    assert not check_verifier("", verifier)


def test_verifier_is_versioned_and_does_not_contain_the_secret() -> None:
    """A verifier is version byte 1 plus a 32-byte digest; the secret is not in it."""
    secret = new_secret()
    verifier = make_verifier(secret)
    assert verifier[0] == 1
    assert len(verifier) == 33
    assert secret.encode() not in verifier
    assert make_verifier(secret) == verifier  # deterministic


def test_malformed_verifier_never_matches() -> None:
    """An empty, short or unknown-version verifier is a mismatch, not an error."""
    secret = new_secret()
    verifier = make_verifier(secret)
    assert not check_verifier(secret, b"")
    assert not check_verifier(secret, verifier[:-1])
    assert not check_verifier(secret, b"\x02" + verifier[1:])


def test_verifier_check_of_odd_unicode_does_not_raise() -> None:
    """Whatever string a client sends as bearer secret, the check answers False."""
    verifier = make_verifier(new_secret())
    assert not check_verifier("\ud800 lone surrogate", verifier)
    assert not check_verifier("ünïcode", verifier)


def test_derived_keys_are_stable_per_active_key_and_distinct_per_purpose(tmp_path: Path) -> None:
    """Same key file → same sub-keys (they survive a restart); another purpose or another
    active key → another sub-key."""
    path = tmp_path / "keys"
    KeyRing.generate_file(path)
    first, again = KeyRing.load(path), KeyRing.load(path)
    assert first.derive("nonce") == again.derive("nonce")
    assert len(first.derive("nonce")) == 32
    assert first.derive("nonce") != first.derive("record-route")
    KeyRing.add_key_to_file(path)
    assert KeyRing.load(path).derive("nonce") != first.derive("nonce")
