"""Claims speak the proxy's vocabulary outside the token codec (issue 15 point 4).

The JWT's wire names (``ro``, ``once``, ``cip``, ``pw``, ``tls``, ...) are the fields of
:class:`~console_proxy.token.Claims` for the codec's sake; every other module reads the typed
accessors (``view_only``, ``single_use``, ``client_ip``, ``password``, ``target_tls``, ...). The
scan below finds an attribute read whose object is named like a claims holder (``claims``,
``self.claims``, ``refusal.claims``) and whose attribute is a wire-only name.
"""

from __future__ import annotations

import ast
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from console_proxy import token
from console_proxy.keyring import Keyring
from console_proxy.protocol.clipboard import ClipPolicy
from console_proxy.token import Claims, TlsClaim

REPO = Path(__file__).resolve().parent.parent
CODEC = "console_proxy/token.py"
#: Fields whose wire name is also the proxy's word for them: standard JWT claims and the target.
SHARED_NAMES = frozenset({"iss", "iat", "nbf", "exp", "jti", "sid", "aud", "host", "port"})
WIRE_ONLY = frozenset(f.name for f in dataclasses.fields(Claims)) - SHARED_NAMES


def wire_reads(source: str) -> list[str]:
    """The ``holder.wire_name`` reads in ``source`` whose holder's name ends in ``claims``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in WIRE_ONLY:
            holder = node.value
            name = holder.id if isinstance(holder, ast.Name) else getattr(holder, "attr", "")
            if name.lower().endswith("claims"):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_wire_only_names_are_the_renamed_claims() -> None:
    assert {"ro", "once", "cip", "pw", "tls", "dn", "sub", "vm", "clip"} == WIRE_ONLY


def test_the_scan_finds_wire_names_and_spares_the_accessors() -> None:
    planted = "if claims.ro or self.claims.pw or refusal.claims.tls or claims.clip: pass"
    assert wire_reads(planted) == [
        "1: claims.ro",
        "1: self.claims.pw",
        "1: refusal.claims.tls",
        "1: claims.clip",
    ]
    assert wire_reads("claims.view_only, self.claims.password, args.clip, session.clip, _RE.sub, claims.exp") == []


def test_no_module_but_the_codec_reads_a_wire_name_of_claims() -> None:
    readers = {}
    for package in ("console_proxy", "broker", "scripts", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            if where != CODEC and (reads := wire_reads(path.read_text(encoding="utf-8"))):
                readers[where] = reads
    assert not readers, f"read the typed accessors of Claims, not the wire names: {readers}"


def _verified(**overrides: Any) -> Claims:
    now = time.time()
    keyring = Keyring.generate(now)
    minted = token.new_claims(host="hv.example", port=5900, now=now, ttl=60, **overrides)
    return token.verify(token.mint(minted, keyring), keyring, now, client_ip="10.0.0.7")


def test_the_accessors_read_what_the_broker_minted() -> None:
    claims = _verified(
        password="sesame",
        vm="vm-7",
        user="alice",
        client_ip="::ffff:10.0.0.7",
        view_only=True,
        single_use=True,
        desktop_name="Desk",
        tls={"ca": "broker", "sni": "hv.internal", "allow_anon": False, "require": True},
        clip="in",
    )
    assert (claims.view_only, claims.single_use, claims.client_ip) == (True, True, "10.0.0.7")
    assert (claims.password, claims.desktop_name, claims.user, claims.target) == ("sesame", "Desk", "alice", "vm-7")
    assert claims.target_tls == TlsClaim(ca="broker", sni="hv.internal", allow_anonymous=False, require=True)
    assert claims.clip_policy == ClipPolicy(allow_in=True, allow_out=False)


def test_absent_claims_read_as_their_defaults() -> None:
    claims = _verified()
    assert (claims.view_only, claims.single_use, claims.client_ip, claims.password) == (False, False, None, None)
    assert (claims.desktop_name, claims.user, claims.target, claims.target_tls) == (None, None, None, None)
    assert claims.clip_policy.name == "both"


@pytest.mark.parametrize("tls", [{"allow_anon": True}, {"ca": "PEM", "sni": "x"}, {"require": True}])
def test_a_tls_claim_keeps_every_member(tls: dict[str, object]) -> None:
    typed = _verified(tls=tls).target_tls
    assert typed is not None
    assert (typed.ca, typed.sni, typed.allow_anonymous, typed.require) == (
        tls.get("ca"),
        tls.get("sni"),
        tls.get("allow_anon", False),
        tls.get("require", False),
    )


def test_reading_an_accessor_leaves_equality_and_the_wire_form_alone() -> None:
    claims = _verified(tls={"require": True}, clip="none")
    twin = Claims(**{f.name: getattr(claims, f.name) for f in dataclasses.fields(Claims)})
    assert claims.target_tls is not None and claims.clip_policy.name == "none"
    assert claims == twin
    assert claims.to_json_dict() == twin.to_json_dict()
    assert "target_tls" not in claims.to_json_dict() and "clip_policy" not in claims.masked()
