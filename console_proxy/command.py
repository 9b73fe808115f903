"""What every consolegate command line shares: one-line errors, exit statuses, reading secrets.

A command that fails prints ``<prog>: error: <one line>`` on stderr and exits 1 (2 for usage,
as argparse does); it never shows a traceback and never echoes a secret it was given.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn


class CommandError(Exception):
    """A failure the user can act on; the message is shown as is."""


class Parser(argparse.ArgumentParser):
    """argparse that keeps usage errors to one line plus the usage hint.

    No abbreviated options: ``--password SECRET`` must be a usage error, not a silent
    ``--password-file SECRET`` that then echoes the secret as a file name.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def run(
    prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None, expected: tuple[type[Exception], ...]
) -> int:
    """Parse, dispatch to ``args.handler`` and turn expected failures into one-line errors."""
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    failures: tuple[type[Exception], ...] = (CommandError, OSError, *expected)
    try:
        sources = getattr(args, "sources", None)  # a serve command: --config file and CONSOLEGATE_* variables
        if sources is not None:
            sources.apply(parser, args, argv, os.environ)
        return handler(args)
    except failures as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


VNCPASSWD_SIZES = (8, 16)
"""``vncpasswd -f`` writes the password DES-"encrypted" with a fixed key: 8 bytes (16 with a
view-only password), no newline, mostly unprintable."""


def looks_like_vncpasswd(raw: bytes) -> bool:
    """An obfuscated ``vncpasswd`` file rather than the plain-text password we need."""
    return len(raw) in VNCPASSWD_SIZES and any(byte < 0x20 or byte >= 0x7F for byte in raw)


def read_secret_file(path: str) -> str:
    """A secret from a file (never from argv, which other users can read): one line, no newline.

    Password files hold the password as plain UTF-8 text on one line (a final newline is
    dropped); the obfuscated output of ``vncpasswd -f`` is refused with a message saying so."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path!r}: {exc.strerror}") from None
    if looks_like_vncpasswd(raw):
        raise CommandError(
            f"{path!r}: this looks like a vncpasswd file (obfuscated); give the password as plain text on one line"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"{path!r} is not UTF-8 text") from None
    return text.rstrip("\r\n")


def read_token_argument(value: str) -> str:
    """A token given on the command line, or ``-`` to read it from stdin (keeps it out of ps)."""
    return (sys.stdin.readline() if value == "-" else value).strip()
