"""consolegate's stateless console proxy: token codec, RFB security proxy, websocket relay.

This package depends on tornado and pycryptodome only and never imports ``broker``.
"""

__version__ = "0.1.0"
