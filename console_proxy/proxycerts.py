"""The proxy's own certificates, in its state directory (written by ``console-proxy enroll``).

``ca-cert.pem`` is the broker's CA: what a target whose token says ``tls: {"ca": "broker"}`` is
verified against. ``proxy-cert.pem``/``proxy-key.pem`` are the proxy's certificate, issued by
that CA: presented to such a target as the VeNCrypt X.509 client certificate, so a QEMU with
``verify-peer=on`` (its default) lets the proxy in. The files are read for each console, not
once: a renewal (which replaces them) applies from the next console on, with no restart, and a
file missing or unreadable leaves the console unverifiable, which refuses it (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from console_proxy.identity import CA_CERT, PROXY_CERT, PROXY_KEY  # the names enroll writes

#: A CA certificate file is a few KiB; more is not one.
MAX_CA_FILE = 64 * 1024


@dataclass(frozen=True)
class ProxyCertificates:
    """Where the proxy's certificates are (``console-proxy serve --state-dir D``)."""

    state_dir: Path

    @property
    def ca_path(self) -> Path:
        return self.state_dir / CA_CERT

    @property
    def cert_path(self) -> Path:
        return self.state_dir / PROXY_CERT

    @property
    def key_path(self) -> Path:
        return self.state_dir / PROXY_KEY

    def ca_pem(self) -> str | None:
        """The broker's CA as PEM text, or None when it cannot be read (the console is refused)."""
        try:
            with self.ca_path.open("rb") as file:
                data = file.read(MAX_CA_FILE + 1)
            return data.decode("ascii") if len(data) <= MAX_CA_FILE else None
        except (OSError, UnicodeDecodeError):
            return None

    def client_certificate(self) -> tuple[str, str] | None:
        """The proxy's certificate and key files, when both are there."""
        if self.cert_path.is_file() and self.key_path.is_file():
            return str(self.cert_path), str(self.key_path)
        return None
