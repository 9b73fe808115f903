"""The clipboard policy a console is minted with: the target's (or hypervisor's) default,
narrowed by the request, never widened.

A target (or hypervisor) stores ``clip`` (``none``, ``in``, ``out``, ``both``; unset means
``both``, what consoles did before the setting existed). A mint request may ask for ``clip``
too: for the same or fewer directions it gets what it asked; for a direction the target does not
allow it is refused (403 ``clip_not_allowed``), rather than quietly given less, so a caller never
believes a console allows what it does not. The broker always writes the claim, so the proxy
enforces exactly what was decided here.
"""

from __future__ import annotations

from console_proxy.protocol.clipboard import CLIP_VALUES, parse_clip

__all__ = ["CLIP_VALUES", "ClipNotAllowed", "effective_clip"]


class ClipNotAllowed(ValueError):
    """The request asks for a clipboard direction the target's policy does not allow."""


def effective_clip(allowed: str | None, requested: str | None) -> str:
    """The ``clip`` claim for a console: ``requested`` if within ``allowed``, else ClipNotAllowed."""
    ceiling = parse_clip(allowed)
    if requested is None:
        return ceiling.name
    wanted = parse_clip(requested)
    if (wanted.allow_in and not ceiling.allow_in) or (wanted.allow_out and not ceiling.allow_out):
        raise ClipNotAllowed(
            f"clipboard {requested!r} asked for, but this console's target allows only {ceiling.name!r}"
        )
    return wanted.name
