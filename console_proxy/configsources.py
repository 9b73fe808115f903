"""Every ``serve`` flag from a TOML file or the environment: flag > environment > file > default.

``--config FILE`` (or ``CONSOLEGATE_CONFIG``) names a TOML file whose top-level keys are the
flags' names without the leading dashes (``max-sessions = 500``; ``max_sessions`` is read the
same); ``CONSOLEGATE_<FLAG>`` (``CONSOLEGATE_MAX_SESSIONS=500``) sets one flag from the
environment. A repeatable flag takes a TOML array, or a comma-separated variable; an on/off flag
takes ``true``/``false`` (``1``/``0``, ``yes``/``no``, ``on``/``off`` in a variable).

Fail closed, one line each: an unknown key or variable (a typo must not silently fall back to a
default), a value of the wrong type, a table, and a secret written inline are refused, a file's
with ``FILE:LINE``. Secrets come only from files: a setting that names a file refuses what looks
like the file's content (a PEM block, JSON, several lines), and a key or variable whose name says
password, secret, token or API key is refused outright, since no setting takes one.

tomllib reports no line for a key, so the line is found by scanning the text for ``key =``:
exact for the flat files this reads.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from console_proxy.command import CommandError

ENV_PREFIX = "CONSOLEGATE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
#: Metavars of the options whose value is a path (their content may be secret; the path is not).
PATH_METAVARS = frozenset({"FILE", "F", "PEM", "DIR", "D"})
_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api[-_]?key|private[-_]?key|^key$)")
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off", ""})
_SECRETS_FROM_FILES = (
    "secrets come only from files (--proxy-credential, --keyring, --tls-key, "
    "--password-file name files; no setting takes the secret itself)"
)


class Sources:
    """Attached to a ``serve`` parser (``set_defaults(sources=…)``); ``command.run`` calls
    :meth:`apply` after parsing, so every command that has one gets the same rules."""

    def __init__(self, parser: argparse.ArgumentParser, prog: str) -> None:
        self.parser, self.prog = parser, prog
        parser.add_argument(
            "--config",
            metavar="FILE",
            help=f"TOML file of settings: keys are this command's flags without the dashes; "
            f"{ENV_PREFIX}<FLAG> variables override it, flags override both "
            f"(default: ${CONFIG_ENV}, else none)",
        )
        parser.set_defaults(sources=self)

    def options(self) -> dict[str, argparse.Action]:
        """Settable name (flag without dashes) -> its argparse action."""
        return {
            action.option_strings[-1][2:]: action
            for action in self.parser._actions
            if action.option_strings
            and action.option_strings[-1].startswith("--")
            and action.dest not in ("help", "config")
        }

    def apply(
        self,
        root: argparse.ArgumentParser,
        args: argparse.Namespace,
        argv: Sequence[str] | None,
        environ: Mapping[str, str],
    ) -> None:
        """Fill every flag not given on the command line from the environment, else the file."""
        given = self._given(root, argv)
        path = args.config if "config" in given else environ.get(CONFIG_ENV)
        layered: dict[str, Any] = {}
        if path:
            layered.update(self.from_file(path))
        layered.update(self.from_environment(environ))
        for dest, value in layered.items():
            if dest not in given:
                setattr(args, dest, value)

    def _given(self, root: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
        """The dests set on the command line: the same argv parsed again with no defaults."""
        saved = [(action, action.default) for action in self.parser._actions]
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            explicit = root.parse_args(argv)
        finally:
            for action, default in saved:
                action.default = default
        return {action.dest for action, _ in saved if hasattr(explicit, action.dest)}

    # --- the file --------------------------------------------------------------------------------

    def from_file(self, path: str) -> dict[str, Any]:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read the config file {path!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{path}: not UTF-8 text") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CommandError(f"{path}: not valid TOML: {exc}") from None
        options, values = self.options(), {}
        for key, value in data.items():
            where = f"{path}:{line_of(text, key)}"
            action = options.get(key.replace("_", "-"))
            if isinstance(value, dict):
                raise CommandError(f"{where}: [{key}] is a table; settings are top-level keys (flag = value)")
            if action is None:
                raise CommandError(f"{where}: {_unknown(key, self.prog)}")
            try:
                values[action.dest] = from_toml(action, value)
            except ValueError as exc:
                raise CommandError(f"{where}: {key}: {exc}") from None
        return values

    # --- the environment -------------------------------------------------------------------------

    def from_environment(self, environ: Mapping[str, str]) -> dict[str, Any]:
        options, values = self.options(), {}
        for name in sorted(environ):
            if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
                continue
            key = name[len(ENV_PREFIX) :].lower().replace("_", "-")
            action = options.get(key)
            if action is None:
                raise CommandError(f"environment variable {name}: {_unknown(key, self.prog)}")
            try:
                values[action.dest] = from_text(action, environ[name])
            except ValueError as exc:
                raise CommandError(f"environment variable {name}: {exc}") from None
        return values


def _unknown(key: str, prog: str) -> str:
    if _SECRET_NAME.search(key):
        return f"{key!r} would hold a secret inline; {_SECRETS_FROM_FILES}"
    return f"unknown setting {key!r} (not a flag of {prog}; see {prog} --help)"


def line_of(text: str, key: str) -> int | str:
    """The line where ``key`` is assigned (bare or quoted) or opens a table, or ``?``."""
    pattern = re.compile(r"^[ \t]*(?:\[[ \t]*)?([\"']?)" + re.escape(key) + r"\1[ \t]*[=\].]", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else "?"


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def from_toml(action: argparse.Action, value: Any) -> Any:
    """A TOML value checked against what the flag takes; ValueError says what was expected."""
    if _is_flag(action):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if _is_list(action):
        items = value if isinstance(value, list) else [value]
        return [_scalar_from_toml(action, item) for item in items]
    return _scalar_from_toml(action, value)


def _scalar_from_toml(action: argparse.Action, value: Any) -> Any:
    kind = action.type
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"expected {_kind_name(action)}, got {_toml_type(value)}")
    return _checked(action, value)


def from_text(action: argparse.Action, text: str) -> Any:
    """An environment variable's text converted as the flag would convert it."""
    if _is_flag(action):
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ValueError("expected true or false (1/0, yes/no, on/off)")
        return lowered in _TRUE
    if _is_list(action):
        return [_scalar_from_text(action, item.strip()) for item in text.split(",") if item.strip()]
    return _scalar_from_text(action, text)


def _scalar_from_text(action: argparse.Action, text: str) -> Any:
    kind = action.type
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"expected {_kind_name(action)}") from None
        return _checked(action, value)
    return _checked(action, text)


def _checked(action: argparse.Action, value: Any) -> Any:
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    if isinstance(value, str) and action.metavar in PATH_METAVARS and _looks_inline(value):
        raise ValueError(f"this names a file, and the value looks like a file's content; {_SECRETS_FROM_FILES}")
    return value


def _looks_inline(value: str) -> bool:
    return "\n" in value or "-----BEGIN" in value or value.lstrip().startswith("{")


def _kind_name(action: argparse.Action) -> str:
    names: dict[object, str] = {int: "an integer", float: "a number"}
    return names.get(action.type, "a string")


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), type(value).__name__)
