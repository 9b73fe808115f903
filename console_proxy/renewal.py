"""Renewal of the proxy's certificate at two thirds of its life, with no restart.

A new key and CSR go to ``POST /api/v1/proxy/renew`` over the current mutual TLS; the answer is
checked (the pinned CA's, our key, our id), the two files are replaced as a set, and the link's
client context is swapped: the next call to the broker presents the new certificate. Nothing a
browser uses is touched, so no session notices. Subscribers of :attr:`Renewal.hooks` (the
proxy's own TLS listener, its VeNCrypt client certificate) get the new :class:`Identity`.

A failure leaves the old files and context in use and is logged as a warning with when the next
try comes; tries back off from :data:`RETRY` [0] to [1] seconds, doubling. The schedule, the
retries and the sleep that :meth:`Renewal.trigger` and :meth:`Renewal.stop` end early are
:class:`console_proxy.renewloop.RenewLoop`'s, the loop the broker's ``--tls-auto`` runs too.

Never imports ``broker``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from console_proxy import clock, identity, renewloop
from console_proxy.identity import PROXY_CERT, PROXY_KEY, Identity, IdentityError

if TYPE_CHECKING:
    from console_proxy.brokerlink import BrokerLink

log = logging.getLogger("consolegate.proxy.broker")

RETRY = renewloop.RETRY
"""First and longest pause between failed renewals (doubling in between)."""


class Renewal:
    """The renewal loop of one :class:`BrokerLink` that authenticates with a certificate."""

    def __init__(self, link: BrokerLink, current: Identity, *, retry: tuple[float, float] = RETRY) -> None:
        self.link, self.identity, self.retry = link, current, retry
        self.hooks: list[Callable[[Identity], None]] = []
        """Called (on the event loop) with the new identity after each renewal."""
        self.renewed = 0
        self.renewloop = renewloop.RenewLoop(self.renew, lambda: self.identity.renew_at, self._warn, retry=retry)

    def trigger(self) -> None:
        """Renew now rather than at two thirds of the life (an operator's signal, a test)."""
        self.renewloop.wake()

    def stop(self) -> None:
        """End :meth:`run` now, asleep or awake (the link's shutdown)."""
        self.renewloop.stop()

    async def renew(self) -> Identity:
        """One renewal; raises (old identity kept) on any failure."""
        current = self.identity
        key = identity.new_key()
        csr = identity.make_csr(key, current.proxy_id).decode("ascii")
        answer = await self.link._post("/proxy/renew", {"csr": csr})
        try:
            cert_pem, ca_pem = answer["certificate"].encode("ascii"), answer["ca"].encode("ascii")
        except (KeyError, TypeError, AttributeError, UnicodeEncodeError):
            raise IdentityError("the broker's renewal answer holds no certificate") from None
        if ca_pem != current.ca_pem:
            raise IdentityError("the broker renewed with another CA than the pinned one")
        identity.check_issued(cert_pem, key, current.ca, current.proxy_id)
        new = dataclasses.replace(current, cert_pem=cert_pem, key_pem=identity.key_pem(key))
        context = new.client_context(self.link.ca_file)  # before the files: a failure changes nothing
        identity.write_files(current.directory, {PROXY_KEY: new.key_pem, PROXY_CERT: new.cert_pem})
        self.link.ssl_context, self.link.credential, self.identity = context, new, new
        self.renewed += 1
        cert = new.certificate
        log.info(
            "certificate renewed: serial %x, valid until %s UTC; next renewal in %.0f s",
            cert.serial_number,
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
            max(0.0, new.renew_at - clock.now()),
        )
        for hook in list(self.hooks):
            try:
                hook(new)
            except Exception:
                log.exception("a certificate renewal subscriber failed")
        return new

    async def run(self) -> None:
        """Renew at two thirds of each certificate's life, retrying failures, until stopped."""
        await self.renewloop.run()

    def _warn(self, exc: BaseException, pause: float) -> None:
        from console_proxy.brokerlink import describe_failure

        left = self.identity.not_after - clock.now()
        log.warning(
            "certificate renewal failed (%s); next try in %.0f s, then doubling up to every %.0f s; "
            "the current certificate %s",
            describe_failure(exc),
            pause,
            self.retry[1],
            f"expires in {left:.0f} s" if left > 0 else "has EXPIRED: the broker refuses this proxy until renewed",
        )
