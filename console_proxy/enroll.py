"""``console-proxy enroll``: trade a one-time join token for the proxy's certificate.

The order is the point: the broker's CA is fetched (``GET /api/v1/ca``, nothing secret sent)
and its fingerprint compared, in constant time, with the one the join token pins; only a
broker whose CA matches ever sees the join token, and over https the request that carries it
verifies the broker's certificate against that CA (or ``--broker-ca``). The key is made here
and never leaves the machine: the broker gets a CSR. Nothing is written unless the whole
exchange succeeded, and then the four files together (:mod:`console_proxy.identity`).

Never imports ``broker``.
"""

from __future__ import annotations

import hmac
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509

from console_proxy import identity
from console_proxy.brokerlink import API, BrokerLinkError, check_broker_url
from console_proxy.command import CommandError
from console_proxy.identity import Identity, IdentityError
from console_proxy.jointoken import JoinToken, JoinTokenError

MAX_ANSWER = 64 * 1024
"""Longest answer read from the broker."""


def fetch(url: str, context: ssl.SSLContext | None, *, body: dict[str, Any] | None = None, timeout: float) -> Any:
    """One JSON request without redirects; CommandError naming the broker's refusal code."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        raise CommandError(f"the broker refused: HTTP {exc.code} {_refusal(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"cannot reach the broker at {url}: {reason}") from None
    if len(raw) > MAX_ANSWER:
        raise CommandError(f"the broker's answer is over {MAX_ANSWER} bytes")
    try:
        return json.loads(raw)
    except ValueError:
        raise CommandError("the broker's answer is not JSON") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect must not carry the token
        return None


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        answer = json.loads(exc.read(MAX_ANSWER))
        return f"{answer['error']}: {answer['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "(no explanation)"


def broker_ca(base: str, pin: str, *, timeout: float) -> x509.Certificate:
    """The broker's CA, refused unless its fingerprint is the pinned one. The request carries
    nothing secret, so it need not (and, before the pin is checked, cannot) verify TLS."""
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    answer = fetch(base + API + "/ca", unverified if base.startswith("https") else None, timeout=timeout)
    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode("ascii"))
    except (ValueError, KeyError, TypeError, UnicodeEncodeError):
        raise CommandError(f"the broker at {base} did not send a CA certificate: is it a consolegate broker?") from None
    if not hmac.compare_digest(identity.fingerprint(cert).encode(), pin.encode()):
        raise CommandError(
            f"refusing the broker at {base}: its CA is {identity.fingerprint(cert)}, the join token pins {pin} "
            "(another broker, or someone in between); nothing was sent"
        )
    return cert


def enroll(base: str, text: str, state_dir: str, *, extra_ca: str | None = None, timeout: float = 10.0) -> Identity:
    """The whole exchange; the state dir's files written only at the end."""
    try:
        token = JoinToken.parse(text.strip())
    except JoinTokenError as exc:
        raise CommandError(f"{exc.code}: {exc}") from None
    try:
        check_broker_url(base)
    except BrokerLinkError as exc:
        raise CommandError(str(exc)) from None
    base = base.rstrip("/")
    ca_cert = broker_ca(base, token.ca_fingerprint, timeout=timeout)
    ca_pem = identity.cert_pem(ca_cert)
    context = None
    if base.startswith("https"):
        context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        if extra_ca:
            context.load_verify_locations(cafile=extra_ca)
    key = identity.new_key()
    answer = fetch(
        base + API + "/proxy/enroll",
        context,
        body={"join_token": text.strip(), "csr": identity.make_csr(key, token.proxy_id).decode("ascii")},
        timeout=timeout,
    )
    try:
        if answer["ca"].encode("ascii") != ca_pem:
            raise CommandError("the broker answered with another CA than the pinned one; nothing was written")
        identity.check_issued(answer["certificate"].encode("ascii"), key, ca_cert, token.proxy_id)
    except (KeyError, TypeError, AttributeError, UnicodeEncodeError):
        raise CommandError("the broker's answer holds no certificate; nothing was written") from None
    except IdentityError as exc:
        raise CommandError(f"{exc}; nothing was written") from None
    enrolled = Identity(
        Path(state_dir), token.proxy_id, (base,), ca_pem, answer["certificate"].encode("ascii"), identity.key_pem(key)
    )
    try:
        enrolled.save()
    except OSError as exc:
        raise CommandError(f"cannot write into {state_dir!r} ({exc.strerror}); nothing was written") from None
    return enrolled
