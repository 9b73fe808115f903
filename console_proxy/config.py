"""The proxy's settings, one frozen object built by the command line and read by the shells."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from console_proxy.keyring import DEFAULT_SKEW
from console_proxy.origin import Network, OriginPolicy
from console_proxy.proxycerts import ProxyCertificates

REPO_STATIC = Path(__file__).resolve().parent.parent / "static"
"""The viewer in a checkout (noVNC under node_modules/ after ``npm ci``)."""
PACKAGED_VIEWER = Path(__file__).resolve().parent / "viewer"
"""The viewer a wheel or sdist carries (made at build time by setup.py, same layout)."""


def default_static_dir() -> Path:
    """The checkout's ``static/`` when run from one, else the viewer installed with the package."""
    return REPO_STATIC if (REPO_STATIC / "console.html").is_file() else PACKAGED_VIEWER


@dataclass(frozen=True)
class ProxyConfig:
    """Limits and policies. Defaults are what an operator gets without flags."""

    origin_policy: OriginPolicy = field(default_factory=OriginPolicy)
    trusted_proxies: tuple[Network, ...] = ()
    public_url: str | None = None
    proxy_protocol: bool = False
    """Connections from trusted proxies must begin with a PROXY protocol (v1/v2) header."""
    max_sessions: int = 2000
    idle_timeout: float = 900.0
    """No input from the browser for this long closes the session with 4408 (0 disables)."""
    connect_timeout: float = 10.0
    handshake_timeout: float = 15.0
    """Upstream connect + RFB handshake with the hypervisor + the browser's side, in all."""
    max_message_size: int = 1 << 20
    max_cut_text: int = 256 * 1024
    """Longest clipboard text the browser may send to the VM; longer ones are dropped and counted.
    A cut text above ``max_message_size`` is dropped too; but a websocket frame above that closes
    the connection (1009) before any RFB parsing. 256 KiB is Xvnc's own default."""
    read_chunk: int = 256 * 1024
    shared: bool = True
    """Force ClientInit's shared flag, so several viewers can watch one VM without kicking others."""
    pipeline_upstream: bool = True
    """Pipeline the RFB version and security choice to hypervisors whose offer is known from an
    earlier handshake (:mod:`console_proxy.offers`): two round trips fewer per console open."""
    end_at_expiry: bool = False
    expiry_grace: float = 0.0
    """With end_at_expiry, sessions close with 4410 at the token's ``exp`` + this grace."""
    skew: int = DEFAULT_SKEW
    max_ttl: int | None = None
    drain_grace: float = 30.0
    upstream_ca_pem: str | None = None
    """CA that verifies VeNCrypt X.509 upstreams when the token's ``tls`` claim has none; not a
    demand for TLS (see :mod:`console_proxy.upstream_tls`)."""
    allow_anonymous_tls: bool = False
    """Anonymous VeNCrypt TLS for tokens that pin nothing (no ``tls.ca``, no ``tls.require``)."""
    own_certificates: ProxyCertificates | None = None
    """The broker's CA and the proxy's certificate (``--state-dir``), for ``tls.ca == "broker"``."""
    static_dir: Path = field(default_factory=default_static_dir)
    frame_ancestors: str = "'none'"
    ping_interval: float = 20.0
    """Seconds between keepalive Pings to every browser (0: none); below nginx's 60 s default."""
    sweep_interval: float = 1.0
    """How often idle, expired and revoked sessions are looked for."""
