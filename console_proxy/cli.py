"""``console-proxy``: run the proxy, or inspect a token the way the proxy would judge it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from console_proxy import clock, enroll, keyring, serve, token
from console_proxy.command import Parser, read_token_argument, run
from console_proxy.identity import IdentityError
from console_proxy.keyring import DEFAULT_SKEW, KeyringError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="console-proxy", description="consolegate's stateless VNC console proxy")
    commands = parser.add_subparsers(metavar="COMMAND")
    _add_token_commands(commands)
    serve.add_parser(commands)
    _add_enroll(commands)
    return parser


def _add_enroll(commands: argparse._SubParsersAction[Parser]) -> None:
    enroll = commands.add_parser(
        "enroll",
        help="get this proxy's certificate from the broker with a one-time join token",
        description="Pins the broker's CA by the join token's fingerprint (nothing is sent to a broker "
        "whose CA differs), makes a P-256 key and a CSR, and writes ca-cert.pem, proxy-cert.pem, "
        "proxy-key.pem and proxy.json (0600) into --state-dir. Then: console-proxy serve --state-dir D.",
    )
    enroll.add_argument("--broker", required=True, metavar="URL", help="the broker (https://, or http:// to this host)")
    enroll.add_argument("--join-token", required=True, metavar="T", help="from console-broker proxy add; - reads stdin")
    enroll.add_argument("--state-dir", required=True, metavar="D", help="where the proxy's identity is written")
    enroll.add_argument(
        "--broker-ca", metavar="PEM", help="also trust this bundle for the broker's HTTPS certificate (default: its CA)"
    )
    enroll.set_defaults(handler=enroll_proxy)


def enroll_proxy(args: argparse.Namespace) -> int:
    done = enroll.enroll(args.broker, read_token_argument(args.join_token), args.state_dir, extra_ca=args.broker_ca)
    until = f"{done.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}"
    print(f"enrolled proxy {done.proxy_id}: certificate valid until {until} UTC")
    print(f"wrote {done.directory}/{{ca-cert.pem,proxy-cert.pem,proxy-key.pem,proxy.json}}")
    print(f"next: console-proxy serve --state-dir {done.directory} --listen HOST:PORT")
    return 0


def _add_token_commands(commands: argparse._SubParsersAction[Parser]) -> None:
    tokens = commands.add_parser("token", help="token tools").add_subparsers(metavar="ACTION")
    inspect = tokens.add_parser("inspect", help="verdict and claims (password masked) of a token")
    inspect.add_argument("--keyring", required=True, help="proxy (or broker) keyring file")
    inspect.add_argument("--client-ip", help="judge a client-IP-bound token as if from this address")
    inspect.add_argument("--skew", type=int, default=DEFAULT_SKEW, help="clock-skew allowance, seconds")
    inspect.add_argument("--max-ttl", type=int, help="longest accepted lifetime (default: the keyring's)")
    inspect.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    inspect.set_defaults(handler=inspect_token)


def inspect_token(args: argparse.Namespace) -> int:
    """Exit 0 only when the proxy would accept the token now; else 1, refusal code last."""
    ring = keyring.load(args.keyring)
    raw = read_token_argument(args.token)
    try:
        claims = token.verify(raw, ring, clock.now(), skew=args.skew, max_ttl=args.max_ttl, client_ip=args.client_ip)
    except token.TokenRefused as refused:
        print("verdict: refused")
        print(f"reason: {refused.reason}" + (f" ({refused.detail})" if refused.detail else ""))
        if refused.claims is not None:
            print("claims: " + json.dumps(refused.claims.masked(), sort_keys=True))
        print(refused.code)
        return 1
    print("verdict: accepted" + (" (single use: the proxy redeems it at the broker)" if claims.single_use else ""))
    print("claims: " + json.dumps(claims.masked(), sort_keys=True))
    print("accepted")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run("console-proxy", build_parser(), argv, (KeyringError, ValueError, IdentityError))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
