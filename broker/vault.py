"""``master.key`` and the keys derived from it: one purpose per key (itsdangerous's lesson).

The master key never encrypts or hashes anything itself. :func:`Vault.derive` gives a separate
key per purpose (HMAC-SHA256 of the purpose name under the master key), so the key that seals
target passwords cannot be used to forge an API-key hash, and the other way round.

Target passwords are sealed with AES-256-GCM, a fresh 96-bit nonce each time, and the target id
as associated data: a sealed password copied onto another target's row does not open.

The keyring, stored in the database so that every replica reads the same keys, is sealed with
its own key: HKDF-SHA256 over the master key with the info ``consolegate/v1/keyring-seal``
(cryptography's HKDF and AESGCM). The master key never enters the database, so a dump of it
opens nothing; a replica given another master.key fails at start (the keyring does not open).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from console_proxy.keyring import write_private_file

MASTER_KEY_NAME = "master.key"
_SEAL_VERSION = b"\x01"
KEYRING_SEAL_INFO = b"consolegate/v1/keyring-seal"
_KEYRING_AAD = b"consolegate keyring v1"
CA_KEY_SEAL_INFO = b"consolegate/v1/ca-key-seal"
_CA_KEY_AAD = b"consolegate ca key v1"


class VaultError(Exception):
    """master.key is missing or malformed, or a sealed value does not open. Never holds a secret."""


class Vault:
    """The derived keys of one master key."""

    def __init__(self, master: bytes) -> None:
        if len(master) != 32:
            raise VaultError("master.key must hold 32 bytes")
        self._master = master
        self._sealer = AESGCM(self.derive("target-password-seal"))  # built once, reused per value
        self._keyring_seal = _keyring_cipher(master)
        self._ca_key_seal = _keyring_cipher(master, CA_KEY_SEAL_INFO)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Vault:
        """A new random master key, written 0600; never replaces an existing one."""
        if Path(path).exists():
            raise VaultError(f"{str(path)!r} exists: refusing to replace the master key")
        master = secrets.token_bytes(32)
        write_private_file(path, base64.b64encode(master) + b"\n")
        return cls(master)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vault:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise VaultError(f"cannot read {str(path)!r}: {exc.strerror}") from None
        try:
            master = base64.b64decode(raw.strip(), validate=True)
        except ValueError:
            raise VaultError(f"{str(path)!r} is not a base64 master key") from None
        return cls(master)

    def derive(self, purpose: str) -> bytes:
        """The 256-bit key for one purpose."""
        return hmac.new(self._master, b"consolegate/v1/" + purpose.encode("ascii"), hashlib.sha256).digest()

    def seal(self, plaintext: str, *, context: str) -> bytes:
        """AES-GCM: version byte, nonce, ciphertext, tag; ``context`` is bound as associated data."""
        nonce = secrets.token_bytes(12)
        sealed = self._sealer.encrypt(nonce, plaintext.encode("utf-8"), _SEAL_VERSION + context.encode("utf-8"))
        return _SEAL_VERSION + nonce + sealed  # sealed = ciphertext + 16-byte tag

    def open(self, sealed: bytes, *, context: str) -> str:
        if len(sealed) < 29 or sealed[:1] != _SEAL_VERSION:
            raise VaultError("sealed value has an unknown format")
        try:
            opened = self._sealer.decrypt(sealed[1:13], sealed[13:], _SEAL_VERSION + context.encode("utf-8"))
            return opened.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise VaultError("sealed value does not open under this master key") from None

    def seal_keyring(self, plaintext: bytes) -> bytes:
        """The keyring's JSON for the database: version byte, nonce, AES-GCM ciphertext and tag."""
        nonce = secrets.token_bytes(12)
        return _SEAL_VERSION + nonce + self._keyring_seal.encrypt(nonce, plaintext, _SEAL_VERSION + _KEYRING_AAD)

    def open_keyring(self, sealed: bytes) -> bytes:
        sealed = bytes(sealed)
        if len(sealed) < 29 or sealed[:1] != _SEAL_VERSION:
            raise VaultError("the database's keyring has an unknown format")
        try:
            return self._keyring_seal.decrypt(sealed[1:13], sealed[13:], _SEAL_VERSION + _KEYRING_AAD)
        except InvalidTag:
            raise VaultError(
                "the database's keyring does not open under this master.key: "
                "every replica needs the master.key of the state dir that created it"
            ) from None

    def seal_ca_key(self, plaintext: bytes) -> bytes:
        """The CA's private key (PEM) for the database, sealed as the keyring is, under its own
        derived key (``consolegate/v1/ca-key-seal``): one key per purpose."""
        nonce = secrets.token_bytes(12)
        return _SEAL_VERSION + nonce + self._ca_key_seal.encrypt(nonce, plaintext, _SEAL_VERSION + _CA_KEY_AAD)

    def open_ca_key(self, sealed: bytes) -> bytes:
        sealed = bytes(sealed)
        if len(sealed) < 29 or sealed[:1] != _SEAL_VERSION:
            raise VaultError("the database's CA key has an unknown format")
        try:
            return self._ca_key_seal.decrypt(sealed[1:13], sealed[13:], _SEAL_VERSION + _CA_KEY_AAD)
        except InvalidTag:
            raise VaultError("the database's CA key does not open under this master.key") from None


def _keyring_cipher(master: bytes, info: bytes = KEYRING_SEAL_INFO) -> AESGCM:
    """AES-GCM under HKDF-SHA256(master.key, info=``info``), built once per vault."""
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master))
