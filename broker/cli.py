"""``console-broker``: the management side's command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from broker import keyfiles
from console_proxy import clock, keyring, token
from console_proxy.command import CommandError, Parser, read_secret_file, run
from console_proxy.keyring import DEFAULT_MAX_TTL, KeyringError


def _keyring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keyring", metavar="FILE", help="broker keyring file")
    parser.add_argument("--state-dir", metavar="D", help="broker state directory (its keyring.json)")


def _add_keys(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="token keys").add_subparsers(metavar="ACTION")
    init = keys.add_parser("init", help="create a new broker keyring file")
    init.add_argument("--keyring", metavar="FILE", required=True)
    init.add_argument("--max-ttl", type=int, default=DEFAULT_MAX_TTL, help="longest token lifetime, seconds")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(handler=keys_init)
    for name, handler, text in (("rotate", keys_rotate, "new active keys; old ones verify until their tokens expire"),
                                ("list", keys_list, "key ids and status (never key material)")):
        sub = keys.add_parser(name, help=text)
        _keyring_options(sub)
        sub.set_defaults(handler=handler)
    export = keys.add_parser("export-proxy", help="write the proxies' keyring (public + fleet keys only)")
    _keyring_options(export)
    export.add_argument("--out", metavar="FILE", required=True)
    export.set_defaults(handler=keys_export)


def _add_token(commands: argparse._SubParsersAction) -> None:
    mint = commands.add_parser("token", help="offline tokens").add_subparsers(metavar="ACTION").add_parser(
        "mint", help="print one access token (offline, for scripts and tests)")
    _keyring_options(mint)
    mint.add_argument("--host", required=True)
    mint.add_argument("--port", type=int, required=True)
    mint.add_argument("--password-file", metavar="F", help="file holding the VNC password")
    mint.add_argument("--ttl", type=int, default=60, help="lifetime in seconds (default 60)")
    mint.add_argument("--view-only", action="store_true")
    mint.add_argument("--client-ip", metavar="IP", help="bind the token to this client address")
    once = mint.add_mutually_exclusive_group()
    once.add_argument("--single-use", dest="single_use", action="store_true", help="redeemable once (needs a broker)")
    once.add_argument("--reusable", dest="single_use", action="store_false", help="the default offline")
    mint.add_argument("--vm", metavar="ID", help="target id")
    mint.add_argument("--user", help="the user the console is for")
    mint.add_argument("--desktop-name", metavar="N", help="desktop name shown to the user")
    mint.add_argument("--tls-ca", metavar="PEM", help="require VeNCrypt X.509 with this CA certificate file")
    mint.add_argument("--tls-anon", action="store_true", help="allow anonymous VeNCrypt TLS (interceptable)")
    mint.set_defaults(handler=token_mint, single_use=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="console-broker", description="consolegate's console broker")
    commands = parser.add_subparsers(metavar="COMMAND")
    _add_keys(commands)
    _add_token(commands)
    return parser


def keys_init(args: argparse.Namespace) -> int:
    ring = keyfiles.create_keyring(keyfiles.keyring_path(args.keyring, None), clock.now(),
                                   max_ttl=args.max_ttl, force=args.force)
    print(f"created keyring {args.keyring}: signing {ring.active_signing}, fleet {ring.active_fleet}")
    return 0


def keys_rotate(args: argparse.Namespace) -> int:
    ring = keyfiles.rotate_keyring(keyfiles.keyring_path(args.keyring, args.state_dir), clock.now())
    print(f"rotated (version {ring.version}): signing {ring.active_signing}, fleet {ring.active_fleet}")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    ring = keyring.load(keyfiles.keyring_path(args.keyring, args.state_dir))
    print(json.dumps({"version": ring.version, "max_ttl": ring.max_ttl, "keys": ring.kids()}, indent=2))
    return 0


def keys_export(args: argparse.Namespace) -> int:
    ring = keyfiles.load_broker_keyring(keyfiles.keyring_path(args.keyring, args.state_dir))
    keyring.save(ring.pruned(clock.now()), args.out, public_only=True)
    print(f"wrote proxy keyring {args.out} (version {ring.version})")
    return 0


def _tls_claim(args: argparse.Namespace) -> dict[str, object] | None:
    if not args.tls_ca and not args.tls_anon:
        return None
    claim: dict[str, object] = {"require": True}
    if args.tls_ca:
        claim["ca"] = read_secret_file(args.tls_ca)
    if args.tls_anon:
        claim["allow_anon"] = True
    return claim


def token_mint(args: argparse.Namespace) -> int:
    ring = keyfiles.load_broker_keyring(keyfiles.keyring_path(args.keyring, args.state_dir))
    if not 0 < args.ttl <= ring.max_ttl:
        raise CommandError(f"--ttl must be from 1 to the keyring's max_ttl ({ring.max_ttl}) seconds")
    password = read_secret_file(args.password_file) if args.password_file else None
    try:
        claims = token.new_claims(
            host=args.host, port=args.port, now=clock.now(), ttl=args.ttl, password=password,
            vm=args.vm, user=args.user, client_ip=args.client_ip, view_only=args.view_only,
            single_use=args.single_use, desktop_name=args.desktop_name, tls=_tls_claim(args))
    except ValueError as exc:
        raise CommandError(f"invalid token request: {exc}") from None
    print(token.mint(claims, ring))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run("console-broker", build_parser(), argv, (KeyringError, ValueError))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
