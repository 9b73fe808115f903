"""The proxy's sans-I/O protocol codecs: bytes in, events and bytes out, no socket, clock or loop.

* :mod:`console_proxy.protocol.rfb` — RFB (VNC): the upstream client handshake, the downstream
  None-only server handshake, VNC Authentication's DES, and the client message framer.
* :mod:`console_proxy.protocol.wsframes` — RFC 6455 for the server side: upgrade checks, frames.
* :mod:`console_proxy.protocol.httphead` — a strict, partial HTTP/1.1 request-head parser.
* :mod:`console_proxy.protocol.buffer` — the one receive buffer the incremental parsers share.

Everything here is tested with byte strings alone; the shells that own sockets live one level up.
"""
