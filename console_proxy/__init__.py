"""consolegate's stateless console proxy: token codec, RFB security proxy, websocket relay.

This package depends on tornado, cryptography (tokens: Ed25519 and AES-GCM on OpenSSL) and
pycryptodome (the VNC authentication's DES only), and never imports ``broker``.
"""

__version__ = "0.1.0"
