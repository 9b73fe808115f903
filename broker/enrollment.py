"""Proxies and the broker's CA: join tokens, enrollment, renewal, revocation, and the client
certificate that authenticates a proxy's request.

* ``proxy add`` makes a join token (:mod:`console_proxy.jointoken`): valid
  :data:`JOIN_TOKEN_LIFETIME`, used once, stored as a keyed hash like every credential.
* ``POST /proxy/enroll`` trades it and a CSR for a certificate: CN the proxy id, SAN the host
  of its registered public URL (and nothing else), client and server authentication. The CSR is
  checked before the token is spent, so a bad CSR can be fixed and sent again.
* ``POST /proxy/renew``, authenticated by the proxy's current certificate, issues the next one.
* ``ca revoke SERIAL`` and ``proxy remove`` set ``revoked_at``; :meth:`Enrollment.authenticate`
  reads the row on every request, so every replica refuses the certificate from the next one.

Every issue, renewal and revocation is audited (``cert_issued``, ``cert_renewed``,
``cert_revoked``) in the transaction that makes it.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from broker import ca
from broker.auth import Hasher, Principal, new_secret
from broker.castore import CaStore
from broker.store import Store
from console_proxy.jointoken import JoinToken, JoinTokenError

JOIN_TOKEN_LIFETIME = 3600.0
DEFAULT_CERT_LIFETIME = 7 * 86400.0
MIN_CERT_LIFETIME = 60.0
CERT_AUDIT_TYPES = ("cert_issued", "cert_renewed", "cert_revoked")


class Refusal(Exception):
    """A refusal with the API's status, stable code and message (service turns it into ApiError)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    serial: str

    def answer(self, ca_cert: x509.Certificate, proxy_id: str) -> dict[str, Any]:
        return {
            "proxy_id": proxy_id,
            "certificate": ca.cert_pem(self.certificate),
            "ca": ca.cert_pem(ca_cert),
            "serial": self.serial,
            "not_after": ca.expiry(self.certificate),
        }


def proxy_names(public_url: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) a proxy's certificate may carry: its public URL's host."""
    host = urlsplit(public_url).hostname or ""
    try:
        return [], [str(ipaddress.ip_address(host))]
    except ValueError:
        return [host.lower()], []


class Enrollment:
    """The CA's operations on proxies, on one store."""

    def __init__(self, store: Store, castore: CaStore, hasher: Hasher) -> None:
        self.store, self.castore, self.hasher = store, castore, hasher

    # --- join tokens --------------------------------------------------------------------

    def create_join_token(self, conn: Any, proxy_id: str, now: float) -> str:
        """A new join token for ``proxy_id`` inside the caller's transaction; returned once."""
        token = JoinToken(ca.fingerprint(self.castore.certificate()), proxy_id, secrets.token_hex(8), new_secret())
        conn.execute(
            "INSERT INTO join_tokens (id, proxy_id, hash, expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
            (token.token_id, proxy_id, self._digest(token), now + JOIN_TOKEN_LIFETIME, now),
        )
        return token.encode()

    def _digest(self, token: JoinToken) -> bytes:
        return self.hasher.digest("join", f"{token.proxy_id}\x00{token.token_id}", token.secret)

    def _spend(self, conn: Any, text: object, now: float) -> JoinToken:
        """The join token checked and marked used (in the caller's transaction), else Refusal."""
        try:
            token = JoinToken.parse(text)
        except JoinTokenError as exc:
            raise Refusal(400, exc.code, str(exc)) from None
        if not ca.fingerprint_matches(self.castore.certificate(), token.ca_fingerprint):
            raise Refusal(
                403, "join_token_other_broker", "this join token was made by another broker (its CA differs from mine)"
            )
        row = conn.execute(
            "SELECT proxy_id, hash, expires_at, used_at FROM join_tokens WHERE id = ?" + self.store.lock_update,
            (token.token_id,),
        ).fetchone()
        stored = row["hash"] if row is not None and row["proxy_id"] == token.proxy_id else None
        if not self.hasher.matches(bytes(stored) if stored is not None else None, "join", *self._ident(token)):
            raise Refusal(401, "join_token_invalid", "this join token is not known to the broker")
        if row["used_at"] is not None:
            raise Refusal(409, "join_token_used", "this join token was used already: make a new one (proxy join-token)")
        if row["expires_at"] <= now:
            raise Refusal(401, "join_token_expired", "this join token has expired: make a new one (proxy join-token)")
        return token

    @staticmethod
    def _ident(token: JoinToken) -> tuple[str, str]:
        return f"{token.proxy_id}\x00{token.token_id}", token.secret

    # --- issue, renew -------------------------------------------------------------------

    def enroll(self, text: object, csr_pem: str, *, lifetime: float, now: float) -> dict[str, Any]:
        """A join token and a CSR for the proxy's first certificate."""
        csr = _checked_csr(csr_pem)
        with self.store.transaction() as conn:
            token = self._spend(conn, text, now)
            public_url = _live_proxy_url(conn, token.proxy_id)
            _check_names(csr, token.proxy_id, public_url)
            conn.execute("UPDATE join_tokens SET used_at = ? WHERE id = ?", (now, token.token_id))
            issued = self._issue(conn, csr, token.proxy_id, public_url, lifetime, now)
            self._audit(conn, "cert_issued", f"proxy:{token.proxy_id}", issued, now, via="enroll")
        return issued.answer(self.castore.certificate(), token.proxy_id)

    def renew(self, who: Principal, csr_pem: str, *, lifetime: float, now: float) -> dict[str, Any]:
        """The next certificate of a proxy authenticated by its current one."""
        csr = _checked_csr(csr_pem)
        with self.store.transaction() as conn:
            public_url = _live_proxy_url(conn, who.id)
            _check_names(csr, who.id, public_url)
            issued = self._issue(conn, csr, who.id, public_url, lifetime, now)
            self._audit(conn, "cert_renewed", who.actor, issued, now, previous=who.certificate or "")
        return issued.answer(self.castore.certificate(), who.id)

    def _issue(
        self, conn: Any, csr: x509.CertificateSigningRequest, proxy_id: str, url: str, lifetime: float, now: float
    ) -> Issued:
        dns, ips = proxy_names(url)
        cert = ca.issue(
            *self.castore.current(),
            csr.public_key(),
            common_name=proxy_id,
            dns_names=dns,
            ip_addresses=ips,
            client_auth=True,
            server_auth=True,
            lifetime=lifetime,
            now=now,
        )
        return Issued(cert, self.castore.record(conn, cert, subject=proxy_id, purpose="proxy", proxy_id=proxy_id))

    def _audit(self, conn: Any, type_: str, actor: str, issued: Issued, now: float, **more: str) -> None:
        cert = issued.certificate
        detail = {"serial": issued.serial, "proxy_id": _cn(cert), "not_after": ca.expiry(cert), **more}
        self.store.append_audit(conn, at=now, type_=type_, actor=actor, detail=detail)

    # --- revoke -------------------------------------------------------------------------

    def revoke(self, serial: str, actor: str, now: float) -> dict[str, Any]:
        """``ca revoke SERIAL`` (hex, any case, an optional 0x or colons)."""
        wanted = _serial(serial)
        with self.store.transaction() as conn:
            row = conn.execute(
                "SELECT serial, subject, purpose, revoked_at FROM certificates WHERE serial = ?"
                + self.store.lock_update,
                (wanted,),
            ).fetchone()
            if row is None:
                raise Refusal(404, "certificate_not_found", f"the CA issued no certificate with serial {wanted}")
            if row["revoked_at"] is not None:
                raise Refusal(409, "certificate_revoked", f"the certificate {wanted} is revoked already")
            conn.execute("UPDATE certificates SET revoked_at = ? WHERE serial = ?", (now, wanted))
            detail = {"serial": wanted, "subject": row["subject"], "purpose": row["purpose"]}
            self.store.append_audit(conn, at=now, type_="cert_revoked", actor=actor, detail=detail)
        return {"serial": wanted, "subject": row["subject"], "purpose": row["purpose"]}

    def revoke_proxy(self, conn: Any, proxy_id: str, actor: str, now: float) -> None:
        """``proxy remove``: every live certificate of the proxy revoked and its unused join
        tokens spent, in the removal's transaction (each revocation audited)."""
        rows = conn.execute(
            "SELECT serial FROM certificates WHERE proxy_id = ? AND revoked_at IS NULL AND not_after > ?",
            (proxy_id, now),
        ).fetchall()
        for row in rows:
            conn.execute("UPDATE certificates SET revoked_at = ? WHERE serial = ?", (now, row["serial"]))
            detail = {"serial": row["serial"], "subject": proxy_id, "purpose": "proxy", "reason": "proxy_removed"}
            self.store.append_audit(conn, at=now, type_="cert_revoked", actor=actor, detail=detail)
        conn.execute("UPDATE join_tokens SET used_at = ? WHERE proxy_id = ? AND used_at IS NULL", (now, proxy_id))

    # --- authenticate -------------------------------------------------------------------

    def authenticate(self, der: bytes, now: float) -> Principal:
        """The proxy a verified client certificate names; Refusal (401) when the certificate is
        not this CA's, expired (a kept-alive connection outlives its handshake), unknown,
        revoked, or its proxy removed."""
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(self.castore.certificate())
        except (ValueError, TypeError, InvalidSignature):
            raise Refusal(401, "certificate_untrusted", "the client certificate is not from this broker's CA") from None
        if ca.expiry(cert) <= now:
            raise Refusal(401, "certificate_expired", "the client certificate has expired")
        serial = ca.serial_hex(cert.serial_number)
        row = self.store.one(
            "SELECT c.proxy_id, c.purpose, c.revoked_at, p.removed_at FROM certificates c "
            "LEFT JOIN proxies p ON p.id = c.proxy_id WHERE c.serial = ?",
            serial,
        )
        if row is None or row["purpose"] != "proxy" or row["proxy_id"] != _cn(cert):
            raise Refusal(401, "certificate_unknown", "the client certificate is not a proxy certificate of this CA")
        if row["revoked_at"] is not None or row["removed_at"] is not None:
            raise Refusal(401, "certificate_revoked", "the client certificate is revoked")
        return Principal(str(row["proxy_id"]), str(row["proxy_id"]), "proxy", certificate=serial)


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _serial(text: str) -> str:
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or len(cleaned) > 40 or any(c not in "0123456789abcdef" for c in cleaned):
        raise Refusal(400, "bad_serial", "a serial is written in hex (as ca show and the audit log print it)")
    return cleaned.lstrip("0") or "0"


def _checked_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    try:
        return ca.check_csr(csr_pem)
    except ca.CsrError as exc:
        raise Refusal(400, exc.code, str(exc)) from None


def _live_proxy_url(conn: Any, proxy_id: str) -> str:
    row = conn.execute("SELECT public_url, removed_at FROM proxies WHERE id = ?", (proxy_id,)).fetchone()
    if row is None:
        raise Refusal(401, "join_token_invalid", "this join token names no registered proxy")
    if row["removed_at"] is not None:
        raise Refusal(403, "proxy_removed", f"the proxy {proxy_id!r} is removed")
    return str(row["public_url"])


def _check_names(csr: x509.CertificateSigningRequest, proxy_id: str, public_url: str) -> None:
    """The CSR may ask only for what the proxy is registered as: CN its id, SANs its URL's host."""
    try:
        cns, dns, ips = ca.csr_names(csr)
    except ca.CsrError as exc:
        raise Refusal(400, exc.code, str(exc)) from None
    allowed_dns, allowed_ips = proxy_names(public_url)
    if cns not in ([], [proxy_id]):
        raise Refusal(403, "csr_names", f"the CSR's common name must be the proxy id {proxy_id!r}")
    extra = sorted({d.lower() for d in dns} - set(allowed_dns)) + sorted(set(ips) - set(allowed_ips))
    if extra:
        raise Refusal(
            403,
            "csr_names",
            f"the CSR asks for names the proxy is not registered for ({', '.join(extra)}); "
            f"allowed: {', '.join(allowed_dns + allowed_ips)}",
        )
