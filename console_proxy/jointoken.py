"""The one-time join token a proxy enrolls with: ``cgj1.<base64url JSON>``.

``console-broker proxy add`` prints it; ``console-proxy enroll`` reads it. It carries what the
proxy needs to trust the broker before it sends anything: the broker CA's ``sha256:``
fingerprint (the pin), the proxy id it was made for, and the one-time secret (the broker keeps
only a keyed hash of it, valid one hour, used once). Both sides parse it with this module, so
a malformed token is refused the same way everywhere.

Never imports ``broker``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from console_proxy import b64url

PREFIX = "cgj1."
MAX_LENGTH = 1024
"""Longest join token read; real ones are about 250 characters."""
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class JoinTokenError(ValueError):
    """The text is not a join token (``join_token_malformed``); the message never repeats it."""

    code = "join_token_malformed"


@dataclass(frozen=True)
class JoinToken:
    ca_fingerprint: str
    proxy_id: str
    token_id: str
    secret: str = field(repr=False)

    def encode(self) -> str:
        body = {"ca": self.ca_fingerprint, "proxy": self.proxy_id, "id": self.token_id, "secret": self.secret}
        return PREFIX + b64url.encode(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())

    @classmethod
    def parse(cls, text: object) -> JoinToken:
        """The token's parts, or JoinTokenError: wrong prefix, encoding, JSON or member."""
        if not isinstance(text, str) or len(text) > MAX_LENGTH or not text.startswith(PREFIX):
            raise JoinTokenError(f"not a join token (one starts with {PREFIX!r}, from console-broker proxy add)")
        try:
            body = json.loads(b64url.decode(text[len(PREFIX) :]))
        except (ValueError, UnicodeDecodeError):
            raise JoinTokenError("the join token is damaged (not base64url JSON): copy it again") from None
        if not isinstance(body, dict) or set(body) != {"ca", "proxy", "id", "secret"}:
            raise JoinTokenError("the join token is damaged (wrong members): copy it again")
        parts = body["ca"], body["proxy"], body["id"], body["secret"]
        if not all(isinstance(part, str) for part in parts):
            raise JoinTokenError("the join token is damaged (wrong member types): copy it again")
        if not _FINGERPRINT.match(parts[0]) or not _ID.match(parts[1]) or not _ID.match(parts[2]) or not parts[3]:
            raise JoinTokenError("the join token is damaged (bad values): copy it again")
        return cls(*parts)
