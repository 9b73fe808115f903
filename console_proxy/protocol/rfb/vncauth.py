"""VNC Authentication's answer to a challenge: DES-ECB under the bit-reversed password.

The only use of pycryptodome in the proxy (cryptography dropped single DES).
"""

from __future__ import annotations

from collections.abc import Callable

from Crypto.Cipher import DES
from Crypto.Cipher._mode_ecb import EcbMode

__all__ = ["ChallengeCipher", "EcbMode", "vnc_auth_cipher", "vnc_auth_response"]

ChallengeCipher = Callable[[str, bytes], bytes]


#: VNC's DES key quirk: each key byte is used with its bit order reversed.
_REVERSED_BITS = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """Answer a VNC Authentication challenge: DES-ECB under the mangled password key.

    The key is the first 8 bytes of the UTF-8 password (what QEMU, libvirt and vncpasswd in a
    UTF-8 locale store), zero padded, each byte bit-reversed. Longer passwords are silently
    truncated, as every VNC server does.
    """
    if len(challenge) != 16:
        raise ValueError("VNC challenge must be 16 bytes")
    return vnc_auth_cipher(password).encrypt(challenge)


def vnc_auth_cipher(password: str) -> EcbMode:
    """The DES-ECB cipher of :func:`vnc_auth_response` (its key schedule built here)."""
    raw = password.encode("utf-8")[:8].ljust(8, b"\0")
    cipher = DES.new(raw.translate(_REVERSED_BITS), DES.MODE_ECB)
    assert isinstance(cipher, EcbMode)  # what MODE_ECB makes; DES.new is typed as any mode's cipher
    return cipher
