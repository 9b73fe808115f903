"""Keyrings: JWK Set files, atomic 0600 saves, the proxy export, rotation and retirement."""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import pytest
from token_fixtures import NOW, make_claims, new_ring

from console_proxy import keyring, token
from console_proxy.keyring import DEFAULT_SKEW, Keyring, KeyringError
from console_proxy.token import TokenRefused

T1 = NOW + 86_400  # the first rotation, a day after the keyring was made


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _secrets(ring: Keyring) -> list[str]:
    """Every key-material string of a broker keyring's JSON (private, fleet and public parts)."""
    return [v for k, v in _walk(ring.to_jwks()) if k in ("d", "k", "x")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- generate, save, load -------------------------------------------------------------------------------------------


def test_generate_has_one_active_key_of_each_kind() -> None:
    ring = new_ring(max_ttl=900)
    assert len(ring.signing) == 1 and len(ring.fleet) == 1
    assert ring.active_signing in ring.signing and ring.active_fleet in ring.fleet
    assert ring.active_signing != ring.active_fleet
    assert ring.can_mint and ring.max_ttl == 900 and ring.version == 1
    sig, fleet = ring.minting_keys()
    assert len(sig.public) == 32 and sig.seed is not None and len(sig.seed) == 32 and len(fleet.key) == 32
    assert sig.created == NOW and sig.verify_until is None and fleet.verify_until is None
    assert new_ring().active_signing != ring.active_signing  # fresh kids


def test_save_load_roundtrip(tmp_path: Path) -> None:
    ring = new_ring(max_ttl=1200)
    path = tmp_path / "keyring.json"
    keyring.save(ring, path)
    loaded = keyring.load(path)
    assert loaded.to_jwks() == ring.to_jwks()
    assert (loaded.active_signing, loaded.active_fleet, loaded.max_ttl) == (
        ring.active_signing,
        ring.active_fleet,
        1200,
    )
    data = json.loads(path.read_text())
    assert {k["kty"] for k in data["keys"]} == {"OKP", "oct"}
    claims = make_claims()
    assert token.verify(token.mint(claims, loaded), ring, NOW) == claims
    assert token.verify(token.mint(claims, ring), loaded, NOW) == claims


def test_saved_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        keyring.save(new_ring(), path)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    keyring.save(new_ring(), tmp_path / "proxy.json", public_only=True)
    assert _mode(tmp_path / "proxy.json") == 0o600


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    for _ in range(3):
        keyring.save(new_ring(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]


def test_save_into_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    keyring.save(new_ring(), "keyring.json")
    assert keyring.load("keyring.json").can_mint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]


@pytest.mark.parametrize("victim", ["fsync", "replace", "fchmod"])
def test_a_failed_save_leaves_the_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    path = tmp_path / "keyring.json"
    old = new_ring()
    keyring.save(old, path)
    before = path.read_bytes()

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keyring.os, victim, fail)
    with pytest.raises(OSError):
        keyring.save(new_ring(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert keyring.load(path).to_jwks() == old.to_jwks()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]


def test_a_failed_write_midway_leaves_the_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keyring.json"
    keyring.save(new_ring(), path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: bytes) -> None:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(keyring.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        keyring.save(new_ring(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]


# --- the proxy export -----------------------------------------------------------------------------------------------


def test_proxy_export_holds_no_private_key(tmp_path: Path) -> None:
    ring = new_ring().rotate(T1)  # two signing keys, both must lose their private part
    path = tmp_path / "proxy.json"
    keyring.save(ring, path, public_only=True)
    text = path.read_text()
    data = json.loads(text)
    assert "d" not in [key for key, _ in _walk(data)]
    for key in ring.signing.values():
        assert key.seed is not None
        assert keyring.b64url.encode(key.seed) not in text
    assert "sig" not in data["active"] and data["active"]["enc"] == ring.active_fleet
    proxy = keyring.load(path)
    assert not proxy.can_mint
    assert all(key.seed is None for key in proxy.signing.values())
    assert set(proxy.signing) == set(ring.signing) and set(proxy.fleet) == set(ring.fleet)
    with pytest.raises(KeyringError):
        proxy.minting_keys()
    with pytest.raises(KeyringError):
        token.mint(make_claims(), proxy)
    claims = make_claims(now=T1)
    assert token.verify(token.mint(claims, ring), proxy, T1) == claims


def test_in_memory_proxy_keyring_cannot_sign() -> None:
    proxy = new_ring().for_proxy()
    assert "d" not in [key for key, _ in _walk(proxy.to_jwks())]
    for key in proxy.signing.values():
        with pytest.raises(KeyringError):
            key.sign(b"anything")
    with pytest.raises(KeyringError):
        token.mint(make_claims(), proxy)


def test_a_private_key_with_a_forced_active_kid_still_cannot_mint_from_a_proxy_file(tmp_path: Path) -> None:
    ring = new_ring()
    data = ring.for_proxy().to_jwks()
    data["active"]["sig"] = ring.active_signing  # someone edits the file
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(data))
    proxy = keyring.load(path)
    assert not proxy.can_mint
    with pytest.raises(KeyringError):
        token.mint(make_claims(), proxy)


# --- rotation -------------------------------------------------------------------------------------------------------


def test_rotation_lifecycle(tmp_path: Path) -> None:
    ring = new_ring()
    old_sig, old_fleet = ring.active_signing, ring.active_fleet
    old_claims = make_claims(now=T1 - 10, ttl=3600)
    old_token = token.mint(old_claims, ring)

    rotated = ring.rotate(T1)
    until = T1 + ring.max_ttl + DEFAULT_SKEW
    assert rotated.active_signing not in (None, old_sig) and rotated.active_fleet not in (None, old_fleet)
    assert rotated.version == ring.version + 1
    assert rotated.signing[old_sig].verify_until == until and rotated.fleet[old_fleet].verify_until == until
    assert rotated.signing[rotated.active_signing or ""].verify_until is None
    assert rotated.signing[old_sig].seed is not None  # still the broker's, just verify-only
    assert {r["kid"]: r["status"] for r in rotated.kids()} == {
        old_sig: "verify-only",
        old_fleet: "verify-only",
        rotated.active_signing: "active",
        rotated.active_fleet: "active",
    }

    # re-export and reload, as the broker and the proxies would
    keyring.save(rotated, tmp_path / "keyring.json")
    keyring.save(keyring.load(tmp_path / "keyring.json"), tmp_path / "proxy.json", public_only=True)
    proxy = keyring.load(tmp_path / "proxy.json")

    new_claims = make_claims(now=T1, ttl=3600)
    new_token = token.mint(new_claims, keyring.load(tmp_path / "keyring.json"))
    assert new_token.split(".")[0] != old_token.split(".")[0]  # other fleet kid in the header
    assert token.verify(old_token, proxy, T1) == old_claims
    assert token.verify(new_token, proxy, T1) == new_claims
    # the old key outlives the last token it minted: no gap at the edge
    assert token.verify(old_token, proxy, old_claims.exp + DEFAULT_SKEW - 1) == old_claims
    assert token.verify(old_token, proxy, until - 0.001, skew=120) == old_claims

    # retired but still listed: refused at verify_until, by the key check, not by expiry
    for late in (until, until + 1):
        assert token.verify(new_token, proxy, late, skew=100_000) == new_claims
        with pytest.raises(TokenRefused) as info:
            token.verify(old_token, proxy, late, skew=100_000)
        assert info.value.reason == "unknown_fleet_key"

    # a retired signing key alone also fails closed
    half = replace(proxy, fleet={**proxy.fleet, old_fleet: replace(proxy.fleet[old_fleet], verify_until=None)})
    with pytest.raises(TokenRefused) as info:
        token.verify(old_token, half, until, skew=100_000)
    assert info.value.reason == "unknown_signing_key"

    # pruning: kept just before, dropped from verify_until on
    assert old_fleet in rotated.pruned(until - 1).fleet and old_sig in rotated.pruned(until - 1).signing
    pruned = rotated.pruned(until)
    assert old_fleet not in pruned.fleet and old_sig not in pruned.signing
    assert pruned.active_signing == rotated.active_signing

    # the next rotation after that time drops them too; the old token is then unknown
    again = rotated.rotate(until)
    assert old_sig not in again.signing and old_fleet not in again.fleet
    assert set(again.signing) == {rotated.active_signing, again.active_signing}
    with pytest.raises(TokenRefused) as info:
        token.verify(old_token, again.for_proxy(), until, skew=100_000)
    assert info.value.reason == "unknown_fleet_key"
    assert token.verify(new_token, again.for_proxy(), until, skew=100_000) == new_claims


def test_rotating_twice_keeps_the_first_retirement_time() -> None:
    ring = new_ring()
    first = ring.rotate(T1)
    second = first.rotate(T1 + 100)
    assert second.signing[ring.active_signing or ""].verify_until == T1 + ring.max_ttl + DEFAULT_SKEW
    assert second.signing[first.active_signing or ""].verify_until == T1 + 100 + ring.max_ttl + DEFAULT_SKEW
    assert len(second.signing) == 3 and len(second.fleet) == 3 and second.version == 3


def test_rotation_uses_the_keyrings_max_ttl_and_integer_times() -> None:
    ring = new_ring(max_ttl=300)
    rotated = ring.rotate(T1 + 0.75, skew=10)
    assert rotated.fleet[ring.active_fleet or ""].verify_until == T1 + 300 + 10


def test_kids_never_show_key_material() -> None:
    ring = new_ring().rotate(T1)
    listing = json.dumps(ring.kids())
    for secret in _secrets(ring):
        assert secret not in listing
    assert {row["kind"] for row in ring.kids()} == {"signing", "fleet"}


# --- corrupt and unreadable files -----------------------------------------------------------------------------------


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    def sig(data: dict[str, Any]) -> dict[str, Any]:
        return next(k for k in data["keys"] if k["kty"] == "OKP")

    def fleet(data: dict[str, Any]) -> dict[str, Any]:
        return next(k for k in data["keys"] if k["kty"] == "oct")

    def setter(pick: Callable[[dict[str, Any]], dict[str, Any]], name: str, value: Any) -> Callable[..., Any]:
        def change(data: dict[str, Any]) -> dict[str, Any]:
            pick(data)[name] = value
            return data

        return change

    def deleter(pick: Callable[[dict[str, Any]], dict[str, Any]], name: str) -> Callable[..., Any]:
        def change(data: dict[str, Any]) -> dict[str, Any]:
            del pick(data)[name]
            return data

        return change

    def top(name: str, value: Any) -> Callable[..., Any]:
        return setter(lambda data: data, name, value)

    def other_public(data: dict[str, Any]) -> dict[str, Any]:
        sig(data)["x"] = keyring.b64url.encode(next(iter(new_ring().signing.values())).public)
        return data

    def duplicate_kid(data: dict[str, Any]) -> dict[str, Any]:
        fleet(data)["kid"] = sig(data)["kid"]
        return data

    return [
        ("array", lambda data: [data]),
        ("no keys", lambda data: {"active": data["active"]}),
        ("keys not a list", top("keys", {"a": 1})),
        ("key not an object", lambda data: {**data, "keys": ["x"]}),
        ("active not an object", top("active", ["x"])),
        ("active sig unknown", top("active", {"sig": "nope"})),
        ("active enc unknown", lambda data: {**data, "active": {**data["active"], "enc": "nope"}}),
        ("active kid a list", lambda data: {**data, "active": {"sig": ["x"]}}),
        ("max_ttl zero", top("max_ttl", 0)),
        ("max_ttl bool", top("max_ttl", True)),
        ("max_ttl text", top("max_ttl", "3600")),
        ("version negative", top("version", -1)),
        ("no kid", deleter(sig, "kid")),
        ("empty kid", setter(fleet, "kid", "")),
        ("int kid", setter(fleet, "kid", 3)),
        ("no kty", deleter(fleet, "kty")),
        ("rsa", setter(sig, "kty", "RSA")),
        ("x25519", setter(sig, "crv", "X25519")),
        ("short x", setter(sig, "x", "AAAA")),
        ("short d", setter(sig, "d", "AAAA")),
        ("padded k", lambda data: setter(fleet, "k", fleet(data)["k"] + "=")(data)),
        ("x not base64", setter(sig, "x", "!!!")),
        ("x int", setter(sig, "x", 5)),
        ("no k", deleter(fleet, "k")),
        ("short k", setter(fleet, "k", "AAAAAAAAAAAAAAAAAAAAAA")),
        ("mismatched public", other_public),
        ("iat text", setter(sig, "iat", "yesterday")),
        ("iat infinite", setter(sig, "iat", float("inf"))),
        ("verify_until nan", setter(fleet, "verify_until", float("nan"))),
        ("verify_until list", setter(fleet, "verify_until", [1])),
        ("duplicate kid", duplicate_kid),
    ]


MUTATIONS = _mutations()


@pytest.fixture(scope="module")
def base_ring() -> Keyring:
    return new_ring().rotate(T1)


@pytest.mark.parametrize(("name", "mutate"), MUTATIONS, ids=[name for name, _ in MUTATIONS])
def test_invalid_keyrings_are_one_line_errors_without_key_material(
    tmp_path: Path, base_ring: Keyring, name: str, mutate: Callable[[Any], Any]
) -> None:
    data = mutate(copy.deepcopy(base_ring.to_jwks()))
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeyringError) as info:
        keyring.load(path)
    _assert_clean(str(info.value), base_ring)


RAW_FILES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"keys: []"),
    ("truncated", b'{"keys": [{"kty": "oct", "k": "'),
    ("not utf-8", b'{"keys": [\xff\xfe]}'),
    ("nested", b"[" * 100_000),
    ("huge int", b'{"keys": ' + b"9" * 5000 + b"}"),
    ("null", b"null"),
    ("NaN", b"NaN"),
]


@pytest.mark.parametrize(("name", "raw"), RAW_FILES, ids=[name for name, _ in RAW_FILES])
def test_corrupt_files(tmp_path: Path, base_ring: Keyring, name: str, raw: bytes) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(raw)
    with pytest.raises(KeyringError) as info:
        keyring.load(path)
    _assert_clean(str(info.value), base_ring)


def test_truncated_real_keyring_names_the_file_and_no_key(tmp_path: Path, base_ring: Keyring) -> None:
    path = tmp_path / "keyring.json"
    keyring.save(base_ring, path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(KeyringError) as info:
        keyring.load(path)
    assert str(path) in str(info.value)
    _assert_clean(str(info.value), base_ring)


def test_missing_and_unreadable_files(tmp_path: Path, base_ring: Keyring) -> None:
    for path in (tmp_path / "absent.json", tmp_path):
        with pytest.raises(KeyringError) as info:
            keyring.load(path)
        assert str(path) in str(info.value)
        _assert_clean(str(info.value), base_ring)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.json"
        keyring.save(base_ring, locked)
        locked.chmod(0)
        with pytest.raises(KeyringError, match="Permission denied"):
            keyring.load(locked)


def _assert_clean(message: str, ring: Keyring) -> None:
    assert message and "\n" not in message
    for secret in _secrets(ring):
        assert secret not in message
        assert secret[:12] not in message


def test_the_previous_generation_mints_with_the_keys_active_before_the_last_rotation() -> None:
    ring = Keyring.generate(NOW)
    assert ring.previous_generation(NOW) is None  # nothing before the first keys
    rotated = ring.rotate(NOW + 10)
    previous = rotated.previous_generation(NOW + 10)
    assert previous is not None
    assert (previous.active_signing, previous.active_fleet) == (ring.active_signing, ring.active_fleet)
    assert previous.version == rotated.version  # still the whole new keyring, only minting differs
    until = rotated.signing[ring.active_signing or ""].verify_until
    assert until is not None and rotated.previous_generation(until) is None  # retired by then
