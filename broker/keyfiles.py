"""Where the broker's keyring lives and how commands read, rotate and export it."""

from __future__ import annotations

from pathlib import Path

from console_proxy import keyring
from console_proxy.command import CommandError
from console_proxy.keyring import Keyring

KEYRING_NAME = "keyring.json"


def keyring_path(keyring_file: str | None, state_dir: str | None) -> Path:
    """``--keyring FILE`` or ``--state-dir D`` (→ D/keyring.json), exactly one of them."""
    if keyring_file and state_dir:
        raise CommandError("give --keyring or --state-dir, not both")
    if keyring_file:
        return Path(keyring_file)
    return Path(state_dir or "./var") / KEYRING_NAME


def load_broker_keyring(path: Path) -> Keyring:
    """A keyring that can mint; a proxy's exported keyring is refused with a clear message."""
    ring = keyring.load(path)
    if not ring.can_mint:
        raise CommandError(f"{str(path)!r} is a proxy keyring (no private signing key): it cannot mint or rotate")
    return ring


def create_keyring(path: Path, now: float, *, max_ttl: int, force: bool = False) -> Keyring:
    """A new keyring file; never silently replaces one (that would orphan every live token)."""
    if path.exists() and not force:
        raise CommandError(f"{str(path)!r} exists; rotate it instead, or pass --force to replace it")
    if max_ttl <= 0:
        raise CommandError("--max-ttl must be a positive number of seconds")
    ring = Keyring.generate(now, max_ttl=max_ttl)
    keyring.save(ring, path)
    return ring


def rotate_keyring(path: Path, now: float) -> Keyring:
    ring = load_broker_keyring(path).rotate(now)
    keyring.save(ring, path)
    return ring
