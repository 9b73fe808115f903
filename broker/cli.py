"""``console-broker``: the management side's command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from broker import ca, hostcerts, keyfiles, schemas, serve
from broker.client import BrokerClient, BrokerError
from broker.clippolicy import CLIP_VALUES
from broker.engines import parse_database_url
from broker.service import AUDIT_TYPES, ApiError, Broker, init_state_dir
from broker.store import IntegrityError, Store, StoreError
from broker.vault import MASTER_KEY_NAME, VaultError
from console_proxy import clock, keyring, token
from console_proxy.command import CommandError, Parser, read_secret_file, run
from console_proxy.hostside import write_private_file
from console_proxy.keyring import DEFAULT_MAX_TTL, KeyringError
from console_proxy.upstream_tls import BROKER_CA

PASSWORD_FILE_HELP = (
    "file holding the VNC password as plain text on one line (not the obfuscated output of vncpasswd -f)"
)


def _keyring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keyring", metavar="FILE", help="broker keyring file")
    parser.add_argument("--state-dir", metavar="D", help="broker state directory (the keyring in its database)")
    serve.add_database_option(parser)


def _add_keys(commands: argparse._SubParsersAction[Parser]) -> None:
    keys = commands.add_parser("keys", help="token keys").add_subparsers(metavar="ACTION")
    init = keys.add_parser("init", help="create a new broker keyring file")
    init.add_argument("--keyring", metavar="FILE", required=True)
    init.add_argument("--max-ttl", type=int, default=DEFAULT_MAX_TTL, help="longest token lifetime, seconds")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(handler=keys_init)
    for name, handler, text in (
        ("rotate", keys_rotate, "new active keys; old ones verify until their tokens expire"),
        ("list", keys_list, "key ids and status (never key material)"),
    ):
        sub = keys.add_parser(name, help=text)
        _keyring_options(sub)
        sub.set_defaults(handler=handler)
    export = keys.add_parser("export-proxy", help="write the proxies' keyring (public + fleet keys only)")
    _keyring_options(export)
    export.add_argument("--out", metavar="FILE", required=True)
    export.set_defaults(handler=keys_export)


def _add_token(commands: argparse._SubParsersAction[Parser]) -> None:
    mint = (
        commands.add_parser("token", help="offline tokens")
        .add_subparsers(metavar="ACTION")
        .add_parser("mint", help="print one access token (offline, for scripts and tests)")
    )
    _keyring_options(mint)
    mint.add_argument("--host", required=True)
    mint.add_argument("--port", type=int, required=True)
    mint.add_argument("--password-file", metavar="F", help=PASSWORD_FILE_HELP)
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
    _add_clip_option(mint, "this console's clipboard (default: the claim is left out, which means both)")
    mint.set_defaults(handler=token_mint, single_use=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="console-broker", description="consolegate's console broker")
    commands = parser.add_subparsers(metavar="COMMAND")
    init = commands.add_parser("init", help="create a broker state directory")
    serve.add_state_options(init)
    init.add_argument("--max-ttl", type=int, default=DEFAULT_MAX_TTL, help="longest token lifetime, seconds")
    init.set_defaults(handler=state_init)
    migrate = commands.add_parser("migrate", help="apply the database's schema migrations (under a database lock)")
    _state_dir(migrate)
    migrate.set_defaults(handler=database_migrate)
    serve.add_parser(commands)
    _add_keys(commands)
    _add_token(commands)
    _add_apikeys(commands)
    _add_proxies(commands)
    _add_targets(commands)
    _add_hypervisors(commands)
    _add_audit(commands)
    _add_ca(commands)
    return parser


def _add_ca(commands: argparse._SubParsersAction[Parser]) -> None:
    group = commands.add_parser("ca", help="the broker's certificate authority").add_subparsers(metavar="ACTION")
    _action(group, "show", ca_show, "print the CA certificate (PEM) and its sha256: fingerprint")
    _action(
        group,
        "revoke",
        ca_revoke,
        "revoke a certificate by its serial (hex): refused from its next request on (audited)",
        "serial",
    )

    issue = _action(group, "issue-host", ca_issue_host, "a hypervisor's VNC certificate, in QEMU/libvirt's layout")
    issue.add_argument("--host", required=True, help="the name or address proxies reach the hypervisor by")
    issue.add_argument("--san", action="append", default=[], metavar="NAME", help="another DNS name or IP (repeatable)")
    issue.add_argument("--client", action="store_true", help="also client-cert.pem/client-key.pem (libvirt)")
    issue.add_argument("--out", required=True, metavar="DIR", help="directory for ca-cert.pem, server-cert.pem, …")
    issue.add_argument(
        "--lifetime", type=float, default=hostcerts.HOST_LIFETIME, metavar="SECONDS", help="default: 365 days"
    )


def ca_revoke(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        revoked = broker.revoke_certificate(args.serial, "cli")
    print(f"revoked certificate {revoked['serial']} ({revoked['purpose']} {revoked['subject']})")
    return 0


def ca_show(args: argparse.Namespace) -> int:
    """The CA certificate, then its fingerprint: what a join token pins and an operator compares."""
    with _broker(args) as broker:
        cert = broker.ca.certificate()
    print(ca.cert_pem(cert), end="")
    print(ca.fingerprint(cert))
    return 0


def ca_issue_host(args: argparse.Namespace) -> int:
    """Issue, write (all files or none), record and audit; print what was written."""
    if not args.lifetime >= 60:  # NaN included
        raise CommandError("--lifetime must be at least 60 seconds")
    try:
        hostcerts.split_names([args.host, *args.san])
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    with _broker(args) as broker:
        try:
            out, now = Path(args.out), clock.now()
            issued = hostcerts.issue_host(
                broker, args.host, args.san, client=args.client, lifetime=args.lifetime, out=out, actor="cli", now=now
            )
        except OSError as exc:
            raise CommandError(f"cannot write into {args.out}: {exc.strerror or exc}; nothing was issued") from None
    for item, files in zip(
        issued, ("server-cert.pem, server-key.pem", "client-cert.pem, client-key.pem"), strict=False
    ):
        print(f"{files}: serial {item.serial}, expires {item.certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    print(f"wrote {args.out}/ (ca-cert.pem and the above; keys 0600)")
    return 0


def _state_dir(parser: argparse.ArgumentParser) -> None:
    serve.add_state_options(parser)


_REMOVE_HELP = """\
The proxy's credential stops authenticating at once (heartbeats, keyring fetches, redeems and
events get 401) and the broker no longer sends consoles to it. By default the broker's keys are
rotated in the same transaction: the removed proxy holds the fleet keys, which decrypt every
token minted under them (VNC passwords included). After the rotation new tokens use keys it never
received, and consoles go only to proxies that have fetched them; the old keys stay accepted only
until their verify_until (the longest token lifetime plus the clock skew), then they are dropped.
Use --no-rotate only for a proxy decommissioned in good order, never for one that may be
compromised. The name stays in the records and is not reused."""


def _action(
    group: argparse._SubParsersAction[Parser],
    name: str,
    handler: Any,
    help: str,
    *positionals: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """One subcommand on the state dir: its positional arguments, ``--state-dir``, its handler
    (options particular to it are added by the caller)."""
    parser = group.add_parser(name, help=help, description=description)
    for positional in positionals:
        parser.add_argument(positional)
    _state_dir(parser)
    parser.set_defaults(handler=handler)
    return parser


def _listing(read: Callable[[Broker], dict[str, Any]]) -> Any:
    return functools.partial(print_listing, read=read)


def _add_apikeys(commands: argparse._SubParsersAction[Parser]) -> None:
    apikeys = commands.add_parser("apikey", help="API keys").add_subparsers(metavar="ACTION")
    create = _action(apikeys, "create", apikey_create, "create an API key and print it (once)", "name")
    create.add_argument("--role", required=True, choices=["admin", "issuer"])
    _action(
        apikeys,
        "list",
        _listing(Broker.list_apikeys),
        "API keys as JSON: name, key id, role, created, revoked (no secret)",
    )
    _action(
        apikeys,
        "revoke",
        apikey_revoke,
        "revoke an API key: refused from its next request on (audited)",
        "name",
        description="Revoke the API key NAME. A running broker refuses it from its next request on. "
        "The key stays listed as revoked and its name is not reused.",
    )


def _add_proxies(commands: argparse._SubParsersAction[Parser]) -> None:
    proxies = commands.add_parser("proxy", help="the proxy fleet").add_subparsers(metavar="ACTION")
    add = _action(
        proxies,
        "add",
        proxy_add,
        "register a proxy; print its one-time join token (console-proxy enroll)",
        "name",
        description="Register a proxy and print a one-time join token (valid 1 hour) for "
        "`console-proxy enroll --broker URL --join-token T --state-dir D` on the proxy's machine. "
        "With --out, also write a bearer credential file {proxy_id, secret} (upgrades, small sites).",
    )
    add.add_argument("--public-url", required=True, metavar="URL", help="the URL browsers use to reach it")
    add.add_argument("--out", metavar="FILE", help="also write a bearer credential file (0600)")
    _action(
        proxies,
        "join-token",
        proxy_join_token,
        "print a new one-time join token for a registered proxy (valid 1 hour)",
        "name",
    )
    _action(
        proxies,
        "list",
        _listing(Broker.list_proxy_records),
        "registered proxies as JSON, removed ones included (no secret)",
    )
    _action(
        proxies,
        "set-url",
        proxy_set_url,
        "change the URL browsers use to reach a proxy (audited)",
        "name",
        "url",
        description="Consoles use the registered URL only: a proxy's heartbeat cannot "
        "change it, so a stolen proxy credential cannot steer browsers.",
    )
    remove = _action(
        proxies,
        "remove",
        proxy_remove,
        "revoke a proxy's credential and rotate the keys (audited)",
        "name",
        description=_REMOVE_HELP,
    )
    remove.add_argument(
        "--no-rotate",
        dest="rotate",
        action="store_false",
        help="keep the keys (only for a proxy decommissioned, not compromised)",
    )


def _add_targets(commands: argparse._SubParsersAction[Parser]) -> None:
    targets = commands.add_parser("targets", help="VM consoles").add_subparsers(metavar="ACTION")
    add = _action(targets, "add", targets_add, "add a target (its VNC password is sealed at rest)")
    add.add_argument("--id", help="target id (default: generated)")
    add.add_argument("--name", required=True)
    add.add_argument("--host", required=True)
    add.add_argument("--port", type=int, required=True)
    add.add_argument("--password-file", metavar="F", help=PASSWORD_FILE_HELP)
    _add_tls_options(add)
    _add_clip_option(add, "clipboard directions its consoles may allow (default both; a mint may narrow it)")
    _action(targets, "list", _listing(Broker.list_targets), "targets as JSON (never the password)")
    _action(targets, "remove", targets_remove, "delete a target", "id")


_HYPERVISOR_HELP = (
    "A libvirt connection: consoles for its domains are looked up at mint time "
    '(POST /consoles {"hypervisor": NAME, "domain": NAME-or-UUID}). Credentials are '
    "libvirt's own: TLS client certificates under the URI's pkipath, SSH keys, socket "
    "permissions; the broker stores none. It reads the domain's state and XML, and writes nothing "
    "unless --console-passwords."
)


def _add_hypervisors(commands: argparse._SubParsersAction[Parser]) -> None:
    group = commands.add_parser("hypervisors", help="libvirt hypervisors").add_subparsers(metavar="ACTION")
    add = _action(group, "add", hypervisors_add, "register a libvirt connection", "name", description=_HYPERVISOR_HELP)
    add.add_argument(
        "--uri",
        required=True,
        help="libvirt URI: qemu:///system, qemu+tls://HOST/system, qemu+ssh://USER@HOST/system, "
        "qemu+tcp://HOST/system, test:///default",
    )
    add.add_argument(
        "--address",
        metavar="HOST",
        help="where proxies reach VNC servers that listen on 0.0.0.0 or :: (default: the URI's host)",
    )
    _add_tls_options(add)
    add.add_argument(
        "--console-passwords",
        action="store_true",
        help="each mint sets the domain's VNC password (live), valid until the last outstanding "
        "console's expiry: a password from an expired token opens nothing",
    )
    _add_clip_option(add, "clipboard directions its domains' consoles may allow (default both; a mint may narrow it)")
    _action(group, "list", _listing(Broker.list_hypervisors), "hypervisors as JSON")
    _action(group, "remove", hypervisors_remove, "forget a hypervisor", "name")


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    """The upstream TLS policy of a target or a hypervisor: the same flags, the same token claim."""
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA certificate the VNC servers' VeNCrypt certificates verify with (then only "
        "verified X.509 VeNCrypt is accepted); the word broker: the broker's own CA (console-broker "
        "ca issue-host), the proxies then present their own certificates",
    )
    parser.add_argument("--tls-require", action="store_true", help="refuse consoles whose VNC server offers no TLS")


def _add_clip_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--clip", choices=CLIP_VALUES, help=f"{text}: in = paste into the VM, out = copy out of it")


def _tls_body(args: argparse.Namespace, body: dict[str, object]) -> None:
    """Put ``--tls-ca``/``--tls-require`` into a create request's ``tls`` member."""
    tls: dict[str, object] = {}
    if args.tls_ca == BROKER_CA:
        tls["ca"] = BROKER_CA
    elif args.tls_ca:
        try:
            tls["ca"] = Path(args.tls_ca).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read the CA certificate {args.tls_ca!r} ({exc})") from None
    if args.tls_require:
        tls["require"] = True
    if tls:
        body["tls"] = tls


def hypervisors_add(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"name": args.name, "uri": args.uri}
    if args.address:
        body["address"] = args.address
    _tls_body(args, body)
    if args.console_passwords:
        body["console_passwords"] = True
    if args.clip:
        body["clip"] = args.clip
    return _create(args, body, schemas.HYPERVISOR_CREATE, Broker.add_hypervisor)


def hypervisors_remove(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        broker.delete_hypervisor(args.name, "cli")
    print(f"removed hypervisor {args.name}")
    return 0


def _add_audit(commands: argparse._SubParsersAction[Parser]) -> None:
    tail = (
        commands.add_parser("audit", help="the audit log")
        .add_subparsers(metavar="ACTION")
        .add_parser("tail", help="print audit events as JSON lines (from the state dir, or a broker's API)")
    )
    _state_dir(tail)
    tail.add_argument("--broker", metavar="URL", help="read through the API of this broker instead")
    tail.add_argument("--api-key-file", metavar="F", help="admin API key, with --broker")
    tail.add_argument("--after", type=int, default=0, metavar="SEQ")
    tail.add_argument("--type", choices=AUDIT_TYPES)
    tail.add_argument("--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    tail.set_defaults(handler=audit_tail)


def _open(args: argparse.Namespace) -> Broker:
    return Broker(args.state_dir, database=args.database)


@contextlib.contextmanager
def _broker(args: argparse.Namespace) -> Iterator[Broker]:
    """The state dir's broker for one command, closed however the command ends. A database
    failure becomes one line: every change is one transaction, rolled back before this runs."""
    broker = _open(args)
    try:
        yield broker
    except (IntegrityError, *broker.store.engine.errors) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CommandError(f"the broker database failed ({first}); nothing was changed") from None
    finally:
        broker.close()


def _initialised(args: argparse.Namespace) -> bool:
    """A state dir with master.key: its keyring is the one in its database."""
    return bool(args.state_dir) and not args.keyring and (Path(args.state_dir) / MASTER_KEY_NAME).exists()


def state_init(args: argparse.Namespace) -> int:
    root = init_state_dir(args.state_dir, max_ttl=args.max_ttl, database=args.database)
    where = "broker.db" if args.database is None else "the database"
    print(f"initialised broker state in {root} (master.key; schema and sealed keyring in {where})")
    return 0


def database_migrate(args: argparse.Namespace) -> int:
    """The schema brought up to this release's, each migration once however many replicas run
    this at the same moment; then a keyring.json in the state dir is imported (once)."""
    store = Store(parse_database_url(args.database, args.state_dir), migrate=True)
    try:
        version, where = store.version, store.description
    finally:
        store.close()
    if (Path(args.state_dir) / MASTER_KEY_NAME).exists():
        _open(args).close()
    print(f"database {where} is at schema {version}")
    return 0


def apikey_create(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        key = broker.create_apikey(args.name, args.role, "cli")
    print(key)
    return 0


def apikey_revoke(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        key_ids = broker.revoke_apikey(args.name, "cli")
    print(f"revoked API key {args.name} (key id {', '.join(key_ids)})")
    return 0


def proxy_set_url(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        broker.set_proxy_url(args.name, args.url, "cli")
    print(f"proxy {args.name} is reached at {args.url.rstrip('/')}")
    return 0


def proxy_remove(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        rotation = broker.remove_proxy(args.name, "cli", rotate=args.rotate)["rotation"]
    if rotation is None:
        print(f"removed proxy {args.name}; keys not rotated (--no-rotate)")
    else:
        print(
            f"removed proxy {args.name}; keys rotated (version {rotation['version']}): "
            "new consoles use keys it never received"
        )
    return 0


def print_listing(args: argparse.Namespace, read: Callable[[Broker], dict[str, Any]]) -> int:
    """``apikey list``, ``proxy list``, ``targets list``: one JSON document, never a secret."""
    with _broker(args) as broker:
        print(json.dumps(read(broker), indent=2))
    return 0


def proxy_add(args: argparse.Namespace) -> int:
    def deliver(credential: dict[str, str]) -> None:
        try:
            write_private_file(args.out, json.dumps(credential).encode() + b"\n")
        except OSError as exc:
            raise CommandError(
                f"cannot write the credential to {args.out!r} ({exc.strerror}); proxy {args.name!r} was not registered"
            ) from None

    with _broker(args) as broker:
        added = broker.add_proxy(args.name, args.public_url, "cli", deliver if args.out else None)
    if args.out:
        print(f"registered proxy {args.name}; credential written to {args.out}")
    else:
        print(f"registered proxy {args.name}")
    _print_join_token(added["join_token"])
    return 0


def proxy_join_token(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        token = broker.new_join_token(args.name, "cli")
    _print_join_token(token)
    return 0


def _print_join_token(token: str) -> None:
    """The token last, alone on its line (scripts take the last line)."""
    print("join token (one use, valid 1 hour; on the proxy: console-proxy enroll --join-token ...):")
    print(token)


def targets_add(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"name": args.name, "host": args.host, "port": args.port}
    if args.id:
        body["id"] = args.id
    if args.password_file:
        body["password"] = read_secret_file(args.password_file)
    _tls_body(args, body)
    if args.clip:
        body["clip"] = args.clip
    return _create(args, body, schemas.TARGET_CREATE, Broker.add_target)


def _create(
    args: argparse.Namespace, body: dict[str, object], schema: Any, add: Callable[[Broker, Any, str], dict[str, Any]]
) -> int:
    """Check ``body`` with the API's own schema (the CLI and the API accept the same things),
    then add it as the actor ``cli`` and print the result."""
    try:
        checked = schemas.validate(body, schema)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    with _broker(args) as broker:
        print(json.dumps(add(broker, checked, "cli")))
    return 0


def targets_remove(args: argparse.Namespace) -> int:
    with _broker(args) as broker:
        broker.delete_target(args.id, "cli")
    print(f"removed target {args.id}")
    return 0


def _audit_source(args: argparse.Namespace) -> Callable[[int], list[dict[str, Any]]]:
    """A function (after) -> events, reading the state dir or a broker's API."""
    if args.broker:
        if not args.api_key_file:
            raise CommandError("--broker needs --api-key-file")
        client = BrokerClient(args.broker, read_secret_file(args.api_key_file))
        return lambda after: client.audit(after, args.type, 1000)
    broker = _open(args)
    return lambda after: broker.audit(after, args.type, 1000)["events"]


def audit_tail(args: argparse.Namespace) -> int:
    fetch, after = _audit_source(args), args.after
    while True:
        events = fetch(after)
        for event in events:
            print(json.dumps(event, sort_keys=True), flush=True)
            after = event["seq"]
        if not args.follow and len(events) < 1000:
            return 0
        if not events:
            time.sleep(args.interval)


def keys_init(args: argparse.Namespace) -> int:
    ring = keyfiles.create_keyring(
        keyfiles.keyring_path(args.keyring, None), clock.now(), max_ttl=args.max_ttl, force=args.force
    )
    print(f"created keyring {args.keyring}: signing {ring.active_signing}, fleet {ring.active_fleet}")
    return 0


def keys_rotate(args: argparse.Namespace) -> int:
    """On an initialised state dir, the broker's own rotation (audited ``key_rotated``, as POST /keys/rotate);
    on a bare keyring file (or a directory holding only keyring.json), the file is rotated alone."""
    if _initialised(args):
        with _broker(args) as broker:
            result = broker.rotate_keys("cli")
        active = result["active"]
        print(f"rotated (version {result['version']}): signing {active['signing']}, fleet {active['fleet']}")
        return 0
    ring = keyfiles.rotate_keyring(keyfiles.keyring_path(args.keyring, args.state_dir), clock.now())
    print(f"rotated (version {ring.version}): signing {ring.active_signing}, fleet {ring.active_fleet}")
    return 0


def _broker_keyring(args: argparse.Namespace, *, can_mint: bool) -> keyring.Keyring:
    """The keyring in the state dir's database, or a keyring file (``--keyring``, or a directory
    holding only keyring.json)."""
    if _initialised(args):
        with _broker(args) as broker:
            return broker.keyring()
    path = keyfiles.keyring_path(args.keyring, args.state_dir)
    return keyfiles.load_broker_keyring(path) if can_mint else keyring.load(path)


def keys_list(args: argparse.Namespace) -> int:
    ring = _broker_keyring(args, can_mint=False)
    print(json.dumps({"version": ring.version, "max_ttl": ring.max_ttl, "keys": ring.kids()}, indent=2))
    return 0


def keys_export(args: argparse.Namespace) -> int:
    ring = _broker_keyring(args, can_mint=True)
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
    ring = _broker_keyring(args, can_mint=True)
    if not 0 < args.ttl <= ring.max_ttl:
        raise CommandError(f"--ttl must be from 1 to the keyring's max_ttl ({ring.max_ttl}) seconds")
    password = read_secret_file(args.password_file) if args.password_file else None
    try:
        claims = token.new_claims(
            host=args.host,
            port=args.port,
            now=clock.now(),
            ttl=args.ttl,
            password=password,
            vm=args.vm,
            user=args.user,
            client_ip=args.client_ip,
            view_only=args.view_only,
            single_use=args.single_use,
            desktop_name=args.desktop_name,
            tls=_tls_claim(args),
            clip=args.clip,
        )
    except ValueError as exc:
        raise CommandError(f"invalid token request: {exc}") from None
    print(token.mint(claims, ring))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        "console-broker",
        build_parser(),
        argv,
        (KeyringError, ValueError, StoreError, VaultError, ApiError, BrokerError),
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
