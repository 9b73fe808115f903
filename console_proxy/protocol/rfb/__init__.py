"""Sans-I/O RFB (VNC): the proxy's two handshakes and the client message framer.

The proxy speaks RFB twice: as a *client* towards the hypervisor (:mod:`.upstream`,
authenticating with the password from the token, or over VeNCrypt TLS) and as a *server* towards
the browser (:mod:`.downstream`, offering security type None only, because the browser never
learns the password). After the handshakes, :mod:`.messages` splits the browser's stream into
whole client messages so a view-only session can drop input. Both handshakes are h11-style
state machines (an enum of states, one step method per state in a table): feed bytes, get
actions back. :mod:`.wire` holds the shared vocabulary, :mod:`.errors` the one error type,
:mod:`.vncauth` the DES of VNC Authentication.

This package's public names are the ones below; the shells import them from here.
"""

from __future__ import annotations

from console_proxy.protocol.rfb.downstream import DownstreamHandshake
from console_proxy.protocol.rfb.errors import RfbError
from console_proxy.protocol.rfb.messages import DROPPED_CUT_TEXT, INPUT_MESSAGE_TYPES, ClientMessageFramer
from console_proxy.protocol.rfb.upstream import UpstreamHandshake
from console_proxy.protocol.rfb.vncauth import vnc_auth_response
from console_proxy.protocol.rfb.wire import (
    MAX_NAME_LENGTH,
    MAX_PENDING,
    Authenticated,
    ClientInitReceived,
    DownstreamAction,
    Offer,
    Redial,
    Send,
    ServerInit,
    ServerInitReady,
    StartTls,
    UpstreamAction,
)
from console_proxy.upstream_tls import TlsPolicy

__all__ = [
    "DROPPED_CUT_TEXT",
    "INPUT_MESSAGE_TYPES",
    "MAX_NAME_LENGTH",
    "MAX_PENDING",
    "Authenticated",
    "ClientInitReceived",
    "ClientMessageFramer",
    "DownstreamAction",
    "DownstreamHandshake",
    "Offer",
    "Redial",
    "RfbError",
    "Send",
    "ServerInit",
    "ServerInitReady",
    "StartTls",
    "TlsPolicy",
    "UpstreamAction",
    "UpstreamHandshake",
    "vnc_auth_response",
]
