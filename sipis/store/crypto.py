"""Encryption at rest (AES-256-GCM key ring from a key file) and instance-secret verifiers.

Key file
    Text, one key per line: ``<key_id> <base64 of 32 random bytes>``; blank lines and lines
    starting with ``#`` are ignored. Every key decrypts; the LAST key is the active one and
    encrypts. Rotation appends a key (:meth:`KeyRing.add_key_to_file`); an old key may be
    removed only once no stored value uses it any more (``SqliteStore.rekey`` re-encrypts).
    The file must not be accessible to other users, nor writable by the group: it is refused
    otherwise, because whoever reads it can decrypt every stored SIP password.

Ciphertexts
    ``encrypt`` returns ``(key_id, nonce || ciphertext || tag)`` with a fresh random 96-bit
    nonce. Random nonces are safe for far more than 2**32 values per key would allow, and the
    store writes a few values per instance. The associated data (AAD) names the instance and
    the field (``b"<id>:password"``), so a blob copied into another row or column fails to
    decrypt instead of yielding someone else's password.

Secret verifiers
    The instance secret (the API bearer token and device digest password) is 256 bits from
    the OS CSPRNG, so it cannot be guessed or brute-forced from its hash: a plain SHA-256
    (with a domain-separation prefix) is an adequate verifier and a slow password KDF (which
    exists to protect *low*-entropy passwords) would only cost CPU on every request. The
    verifier starts with a version byte so the scheme can change without ambiguity.
    Comparison is constant-time.

Errors are :class:`CryptoError` and never contain key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import glob
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sipis.store.errors import CryptoError

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_FILE_HEADER = """\
# sipis store keys: one "<key_id> <base64 of 32 random bytes>" per line.
# Every key decrypts; the LAST line is the active key that encrypts.
# Never remove a key that stored values may still use. Keep this file mode 0600.
"""


class KeyRing:
    """The AES-256-GCM keys of the store, by key id; the last one given is the active key.

    Immutable after construction, so one ring may be shared by threads.
    """

    __slots__ = ("_active", "_aeads", "_derive_root")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        """Args: keys: ``(key_id, 32-byte key)`` pairs, oldest first; the last one encrypts.

        Raises: CryptoError on no keys, a bad or duplicate key id, or a key of the wrong length.
        """
        if not keys:
            raise CryptoError("the key ring has no keys")
        aeads: dict[str, AESGCM] = {}
        for key_id, key in keys:
            _check_key_id(key_id)
            if key_id in aeads:
                raise CryptoError(f"key id {key_id!r} appears twice")
            if len(key) != KEY_LEN:
                raise CryptoError(f"key {key_id!r} is {len(key)} bytes, not {KEY_LEN}")
            aeads[key_id] = AESGCM(key)
        self._aeads = aeads
        self._active = keys[-1][0]
        # Sub-keys for other purposes (nonces, Record-Route tokens) come from the active key
        # through HMAC, so the AEAD key itself is never used for anything but AES-GCM.
        self._derive_root = hmac.new(keys[-1][1], b"sipis key derivation v1", "sha256").digest()

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self.key_ids!r}, active={self._active!r})"

    @property
    def active_key_id(self) -> str:
        """The id of the key that :meth:`encrypt` uses."""
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, oldest first (the active one last)."""
        return tuple(self._aeads)

    @classmethod
    def ephemeral(cls) -> KeyRing:
        """A ring with one random key that lives only in memory (tests, throw-away stores)."""
        return cls([(_new_key_id(()), secrets.token_bytes(KEY_LEN))])

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for ``purpose``, stable as long as the active key is the same.

        Keys that must outlive a restart but are not worth a file of their own (the device
        registrar's nonce key, the Record-Route signing key) are derived here: a restart keeps
        nonces and in-dialog routes valid; a key rotation changes them once.
        """
        return hmac.new(self._derive_root, purpose.encode("utf-8"), "sha256").digest()

    # -- key files ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read a key file.

        Raises: CryptoError if the file is missing, not a regular file, readable or writable
        by other users (or writable by the group), or malformed. The message names the file
        and line, never the key.
        """
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CryptoError(f"cannot read the key file {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise CryptoError(f"the key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise CryptoError(
                f"refusing the key file {path}: its mode {mode:04o} lets other users read or "
                f"change it; run: chmod 600 {path}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CryptoError(f"cannot read the key file {path}: not UTF-8 text or I/O error") \
                from exc
        return cls(_parse_key_file(text, path))

    @classmethod
    def generate_file(cls, path: Path) -> KeyRing:
        """Create a new key file with one random key (mode 0600) and return its ring.

        The file appears atomically, complete or not at all (written aside, fsynced, then
        hard-linked into place). Raises CryptoError if ``path`` already exists: an existing key
        file is never overwritten, since that would make every stored password unreadable.
        """
        key_id = _new_key_id(())
        content = _FILE_HEADER + _key_line(key_id, secrets.token_bytes(KEY_LEN))
        _create_exclusive(path, content.encode("ascii"))
        return cls.load(path)

    @classmethod
    def add_key_to_file(cls, path: Path) -> str:
        """Append a new random key to an existing key file, making it the active key.

        The file is rewritten atomically (written aside, fsynced, renamed over) with its mode
        and group kept. Returns the new key id. Raises CryptoError if the file is unusable.
        """
        ring = cls.load(path)
        try:
            st = os.stat(path)
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CryptoError(f"cannot read the key file {path}: {exc.strerror}") from exc
        key_id = _new_key_id(ring.key_ids)
        if text and not text.endswith("\n"):
            text += "\n"
        text += _key_line(key_id, secrets.token_bytes(KEY_LEN))
        _replace_atomically(path, text.encode("utf-8"), mode=stat.S_IMODE(st.st_mode),
                            gid=st.st_gid)
        return key_id

    @classmethod
    def drop_keys_from_file(cls, path: Path, *, keep: Collection[str]) -> tuple[str, ...]:
        """Remove from the key file every key that is not in ``keep`` and not the active key.

        The last step of a rotation, once no stored value uses the old keys (a key that leaked
        stops being useful only when it is gone from the file). Comment lines stay; the file is
        rewritten atomically like :meth:`add_key_to_file`, so a crash leaves the old or the new
        file, never a partial one. The active (last) key is always kept. Returns the dropped
        key ids (empty: the file was not touched). Raises CryptoError if the file is unusable.
        """
        ring = cls.load(path)
        dropped = tuple(k for k in ring.key_ids if k not in keep and k != ring.active_key_id)
        if not dropped:
            return ()
        try:
            st = os.stat(path)
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CryptoError(f"cannot read the key file {path}: {exc.strerror}") from exc
        lines = [line for line in text.splitlines(keepends=True)
                 if not (line.split() and line.split()[0] in dropped)]
        _replace_atomically(path, "".join(lines).encode("utf-8"),
                            mode=stat.S_IMODE(st.st_mode), gid=st.st_gid)
        return dropped

    @staticmethod
    def remove_stale_temp_files(path: Path) -> int:
        """Delete temporary copies of ``path`` left by a writer that was killed mid-way.

        Each holds key material, so none may linger. Only safe while no other writer of the
        same key file runs (``sipis rotate-key`` holds a lock). Returns how many were removed.
        """
        removed = 0
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
        return removed

    # -- AEAD ---------------------------------------------------------------------------------

    def encrypt(self, plaintext: str, *, aad: bytes) -> tuple[str, bytes]:
        """Encrypt under the active key.

        Args: aad: binds the ciphertext to its place, e.g. ``b"<instance id>:password"``.
        Returns: ``(key_id, nonce || ciphertext || tag)``.
        """
        nonce = secrets.token_bytes(NONCE_LEN)
        sealed = self._aeads[self._active].encrypt(nonce, plaintext.encode("utf-8"), aad)
        return self._active, nonce + sealed

    def decrypt(self, key_id: str, blob: bytes, *, aad: bytes) -> str:
        """Decrypt what :meth:`encrypt` returned, with the same ``aad``.

        Raises: CryptoError for an unknown key id, a truncated blob, or a failed
        authentication (wrong key, wrong AAD, or tampered bytes).
        """
        aead = self._aeads.get(key_id)
        if aead is None:
            raise CryptoError(
                f"no key {key_id!r} in the key ring (removed from the key file while in use?)"
            )
        if len(blob) < NONCE_LEN + TAG_LEN:
            raise CryptoError("the ciphertext is truncated")
        try:
            data = aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except InvalidTag as exc:
            raise CryptoError(
                "the ciphertext failed authentication (wrong key, moved or altered)"
            ) from exc
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CryptoError("the decrypted value is not UTF-8") from exc


# -- secrets and verifiers --------------------------------------------------------------------

VERIFIER_V1 = b"\x01"
_V1_DOMAIN = b"sipis instance secret v1\x00"
_V1_LEN = 1 + hashlib.sha256().digest_size


def new_secret() -> str:
    """A new instance secret: 32 random bytes, URL-safe base64 without padding (43 chars)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def make_verifier(secret: str) -> bytes:
    """What the store keeps instead of ``secret``: version byte 1 + SHA-256 (see module doc)."""
    data = secret.encode("utf-8", "surrogatepass")
    return VERIFIER_V1 + hashlib.sha256(_V1_DOMAIN + data).digest()


def check_verifier(secret: str, verifier: bytes) -> bool:
    """True if ``secret`` matches ``verifier``; constant time in the secret's content."""
    if len(verifier) != _V1_LEN or verifier[:1] != VERIFIER_V1:
        return False
    return hmac.compare_digest(make_verifier(secret), verifier)


# -- internals --------------------------------------------------------------------------------


def _check_key_id(key_id: str) -> None:
    if not KEY_ID_RE.fullmatch(key_id):
        raise CryptoError(
            "a key id must be 1-64 characters of A-Z a-z 0-9 . _ - (starting alphanumeric)"
        )


def _new_key_id(taken: Sequence[str]) -> str:
    while True:
        key_id = f"k-{secrets.token_hex(4)}"
        if key_id not in taken:
            return key_id


def _key_line(key_id: str, key: bytes) -> str:
    return f"{key_id} {base64.b64encode(key).decode('ascii')}\n"


def _parse_key_file(text: str, path: Path) -> list[tuple[str, bytes]]:
    keys: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"key file {path} line {number}"
        parts = line.split()
        if len(parts) != 2:
            raise CryptoError(f"{where}: expected '<key_id> <base64 key>'")
        key_id, encoded = parts
        if not KEY_ID_RE.fullmatch(key_id):
            raise CryptoError(f"{where}: bad key id (1-64 of A-Z a-z 0-9 . _ -)")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CryptoError(f"{where}: the key is not valid base64") from exc
        if len(key) != KEY_LEN:
            raise CryptoError(f"{where}: the key is {len(key)} bytes, not {KEY_LEN}")
        if any(key_id == seen for seen, _ in keys):
            raise CryptoError(f"{where}: key id {key_id!r} appears twice")
        keys.append((key_id, key))
    if not keys:
        raise CryptoError(f"the key file {path} holds no key")
    return keys


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (must not exist) with ``mode``, write ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _create_exclusive(path: Path, data: bytes) -> None:
    if os.path.lexists(path):
        raise CryptoError(f"refusing to overwrite the existing key file {path}")
    tmp = _temp_name(path)
    try:
        _write_private(tmp, data, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise CryptoError(f"refusing to overwrite the existing key file {path}") from exc
        except OSError:
            # No hard links here (some FUSE/vfat mounts): an exclusive create still never
            # overwrites, it just is not all-or-nothing on a crash.
            _write_private(path, data, 0o600)
    except FileExistsError as exc:
        raise CryptoError(f"refusing to overwrite the existing key file {path}") from exc
    except OSError as exc:
        raise CryptoError(f"cannot create the key file {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _replace_atomically(path: Path, data: bytes, *, mode: int, gid: int) -> None:
    tmp = _temp_name(path)
    try:
        _write_private(tmp, data, mode & 0o7777)
        with contextlib.suppress(OSError):  # keep the group (e.g. root:sipis 0640) if allowed
            os.chown(tmp, -1, gid)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CryptoError(f"cannot rewrite the key file {path}: {exc.strerror}") from exc
    _fsync_dir(path.parent)
