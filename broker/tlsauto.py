"""``console-broker serve --tls-auto --tls-san NAME…``: the broker's HTTPS certificate from its
own CA, issued at start and renewed at two thirds of ``--cert-lifetime``, with no restart.

Each replica issues its own certificate (recorded and audited like any other, purpose
``broker``) and keeps it as two files in its state directory, ``https-cert.pem`` and
``https-key.pem`` (0600), written as a set. The listener serves them through
:class:`console_proxy.certfiles.CertificateFiles`, so a renewal is a reload: new connections get
the new certificate, open ones (a proxy's held watch) keep theirs. A renewal that fails leaves
the current certificate in service and logs one warning with the retry schedule; tries back
off from :data:`RETRY` [0] to [1] seconds, doubling. The schedule and the retries are the proxy's
own renewal loop (:class:`console_proxy.renewloop.RenewLoop`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from broker import ca, hostcerts
from broker.service import Broker
from console_proxy import clock, renewloop
from console_proxy.certfiles import CertificateFiles, Prepare
from console_proxy.renewloop import RETRY, renew_at
from console_proxy.renewloop import pauses as retry_pauses

log = logging.getLogger("consolegate.broker")

CERT_FILE, KEY_FILE = "https-cert.pem", "https-key.pem"


class TlsAuto:
    """The broker's HTTPS certificate from its CA: issued by :meth:`start`, renewed by :meth:`run`."""

    def __init__(
        self,
        broker: Broker,
        names: Sequence[str],
        lifetime: float,
        *,
        prepare: Prepare | None = None,
        retry: tuple[float, float] = RETRY,
    ) -> None:
        hostcerts.split_names(names)  # ValueError for a name that is neither
        self.broker, self.names, self.lifetime, self.retry = broker, list(names), lifetime, retry
        self.directory = Path(broker.root)
        self.prepare = prepare
        self.files: CertificateFiles | None = None
        self._issued_at = 0.0
        self.renewloop = renewloop.RenewLoop(self._renew, self._next, self._warn, retry=retry)

    def start(self) -> CertificateFiles:
        """Issue the first certificate and load it; raises (no listener) when that fails."""
        self._issue()
        self.files = CertificateFiles(
            str(self.directory / CERT_FILE), str(self.directory / KEY_FILE), "https", prepare=self.prepare
        )
        log.info(
            "HTTPS certificate from the broker's CA (--tls-auto) for %s: SHA256 %s; renewed in %.0f s",
            ", ".join(self.names),
            self.files.current.fingerprint,
            self._next() - clock.now(),
        )
        return self.files

    def renew(self) -> None:
        """Issue and put into service a new certificate; raises, the current one kept, on failure."""
        assert self.files is not None
        self._issue()
        if not self.files.reload():  # logged by the reload
            raise RuntimeError("the new certificate files did not load")
        log.info("HTTPS certificate renewed (--tls-auto); next renewal in %.0f s", self._next() - clock.now())

    async def run(self) -> None:
        """Renew at two thirds of each certificate's life until cancelled."""
        await self.renewloop.run()

    async def _renew(self) -> None:
        self.renew()

    def _next(self) -> float:
        return renew_at(self._issued_at, self._issued_at + self.lifetime)

    def _issue(self) -> None:
        now = clock.now()
        cert, key = hostcerts.new_leaf(
            self.broker,
            common_name=self.names[0],
            names=self.names,
            client_auth=False,
            server_auth=True,
            lifetime=self.lifetime,
            now=now,
        )
        files = {CERT_FILE: ca.cert_pem(cert).encode(), KEY_FILE: ca.key_pem(key)}
        with hostcerts.AsideFiles(self.directory, files) as aside:
            hostcerts.record(self.broker, [(cert, "broker")], actor="broker", via="tls-auto", now=now)
            aside.commit()
        self._issued_at = now

    def _warn(self, exc: BaseException, pause: float) -> None:
        assert self.files is not None
        left = self.files.not_after - clock.now()
        pauses = ", ".join(f"{p:.0f}" for p in retry_pauses(pause, self.retry[1]))
        log.warning(
            "HTTPS certificate renewal failed (%s: %s); retrying in %s s, then every %.0f s; the "
            "current certificate %s",
            type(exc).__name__,
            exc,
            pauses,
            self.retry[1],
            f"expires in {left:.0f} s" if left > 0 else "has EXPIRED",
        )
