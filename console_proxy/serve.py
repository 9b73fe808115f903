"""``console-proxy serve``: turn command-line options into a config and run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import ssl
from pathlib import Path

import tornado.httpserver

from console_proxy import certfiles, clock, keyring, listeners, logguard, origin, server
from console_proxy.brokerlink import BrokerLink, BrokerLinkError, ProxyCredential
from console_proxy.certfiles import CertificateFiles, certificate_expiry
from console_proxy.command import CommandError, Parser
from console_proxy.config import ProxyConfig, default_static_dir
from console_proxy.configsources import Sources
from console_proxy.events import Events
from console_proxy.frontdoor import FrontDoor
from console_proxy.hostside import parse_listen, tls_files
from console_proxy.identity import Identity, IdentityError
from console_proxy.keyring import DEFAULT_SKEW, MAX_SKEW
from console_proxy.proxycerts import ProxyCertificates
from console_proxy.tlsdoor import TlsDoor

log = logging.getLogger("consolegate.proxy")

MAX_BODY = 4096
#: Seconds a connection may take to send a request head, and keep-alive connections may idle.
IDLE_CONNECTION_TIMEOUT = 60.0


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--listen",
        metavar="H:P",
        action="append",
        default=[],
        help="address and port to listen on (repeatable; [::]:PORT is IPv6 and IPv4 at once)",
    )
    serve.add_argument(
        "--keyring",
        metavar="FILE",
        help="proxy keyring (console-broker keys export-proxy); with --broker, used until the broker answers",
    )
    serve.add_argument(
        "--allow-signing-keyring",
        action="store_true",
        help="accept a --keyring holding private signing keys (the broker's own: this proxy could "
        "then mint tokens); refused by default",
    )
    serve.add_argument(
        "--broker",
        metavar="URL",
        action="append",
        help="the broker: keyring, single-use redemption, events, revocations pushed; repeat it "
        "for replicas (one used at a time, the next on failure)",
    )
    serve.add_argument("--proxy-credential", metavar="FILE", help="credential from console-broker proxy add")
    serve.add_argument(
        "--state-dir",
        metavar="D",
        help="the proxy's identity from console-proxy enroll: mutual TLS to the broker with its "
        "certificate (renewed automatically), the broker verified against its CA; --broker defaults "
        'to the one it enrolled with. Also: targets whose token says tls.ca "broker" are verified '
        "against that CA, and the proxy's certificate is its VeNCrypt client certificate there",
    )
    serve.add_argument("--heartbeat-interval", type=float, default=5.0, help="seconds between broker heartbeats")
    serve.add_argument(
        "--broker-ca", metavar="PEM", help="CA bundle that signed the broker's certificate (default: the system's)"
    )
    serve.add_argument("--public-url", metavar="URL", help="the URL browsers use to reach this proxy")
    serve.add_argument(
        "--allowed-origin",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="another page origin allowed to open consoles (repeatable)",
    )
    serve.add_argument(
        "--no-pin-host",
        action="store_true",
        help="with --public-url, accept websockets addressed to any Host (default: only the "
        "public URL's and the allowed origins' hosts, against DNS rebinding)",
    )
    serve.add_argument(
        "--trusted-proxy",
        metavar="CIDR",
        action="append",
        default=[],
        help="a load balancer whose X-Forwarded-* headers are believed (repeatable)",
    )
    serve.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="connections from --trusted-proxy peers must begin with a PROXY protocol v1/v2 header "
        "(HAProxy send-proxy[-v2]) naming the client, before TLS with --tls-cert; other peers must "
        "not send one",
    )
    serve.add_argument("--tls-cert", metavar="F")
    serve.add_argument("--tls-key", metavar="F")
    serve.add_argument("--max-sessions", type=int, default=2000)
    serve.add_argument("--idle-timeout", type=float, default=900.0, help="seconds without input; 0 disables")
    serve.add_argument(
        "--ping-interval",
        type=float,
        default=20.0,
        help="seconds between keepalive websocket Pings to each browser, so proxies in between "
        "(nginx: 60 s) keep idle consoles open; not input for --idle-timeout; 0 disables",
    )
    serve.add_argument("--handshake-timeout", type=float, default=15.0)
    serve.add_argument("--max-message-size", type=int, default=1 << 20, help="largest websocket message, bytes")
    serve.add_argument(
        "--max-cut-text",
        type=int,
        default=256 * 1024,
        help="longest clipboard text a browser may send to the VM, bytes; longer ones are dropped "
        "and counted (consolegate_proxy_cut_text_dropped_total), the session goes on (default 256 KiB; "
        "a websocket frame above --max-message-size still closes the connection, 1009)",
    )
    serve.add_argument("--end-at-expiry", action="store_true", help="close sessions (4410) when the token expires")
    serve.add_argument("--expiry-grace", type=float, default=0.0, help="seconds after exp, with --end-at-expiry")
    serve.add_argument("--drain-grace", type=float, default=30.0, help="seconds open sessions get after SIGTERM")
    serve.add_argument(
        "--no-force-shared",
        action="store_true",
        help="pass the browser's ClientInit shared flag instead of forcing it on",
    )
    serve.add_argument(
        "--no-upstream-pipelining",
        action="store_true",
        help="always wait for the hypervisor's version and security types before answering, "
        "instead of sending the answers an earlier handshake with it taught (for servers that "
        "read in lock-step; such a server is found and left alone after one failed open anyway)",
    )
    serve.add_argument(
        "--upstream-ca",
        metavar="PEM",
        help="CA bundle that verifies VeNCrypt X.509 targets whose token names no CA (not a "
        "demand for TLS: plain targets still work; a token's tls.require demands TLS)",
    )
    serve.add_argument(
        "--allow-anonymous-tls",
        action="store_true",
        help="accept VeNCrypt TLSNone/TLSVnc (no certificate, interceptable) for targets whose "
        "token pins nothing; never for a token with tls.ca or tls.require",
    )
    serve.add_argument("--skew", type=int, default=DEFAULT_SKEW, help="clock-skew allowance, seconds")
    serve.add_argument("--frame-ancestors", default="'none'", help="CSP frame-ancestors for the viewer page")
    serve.add_argument(
        "--static-dir",
        metavar="DIR",
        help="the viewer's files (default: the viewer installed with the package; static/ in a checkout)",
    )
    logguard.add_options(serve)
    serve.set_defaults(handler=run)
    Sources(serve, "console-proxy serve")


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path!r}: {exc}") from None


def build_config(args: argparse.Namespace) -> ProxyConfig:
    for name in ("max_sessions", "max_message_size", "max_cut_text"):
        if getattr(args, name) <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive")
    if args.ping_interval < 0:
        raise CommandError("--ping-interval must be 0 (off) or positive")
    if not 0 <= args.skew <= MAX_SKEW:
        raise CommandError(f"--skew must be from 0 to {MAX_SKEW} seconds")
    if args.proxy_protocol and not args.trusted_proxy:
        raise CommandError("--proxy-protocol needs --trusted-proxy (the balancers allowed to send the header)")
    try:
        policy = origin.OriginPolicy.build(args.public_url, args.allowed_origin, pin_host=not args.no_pin_host)
        trusted = origin.parse_networks(args.trusted_proxy)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return ProxyConfig(
        origin_policy=policy,
        trusted_proxies=trusted,
        public_url=args.public_url,
        proxy_protocol=args.proxy_protocol,
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        handshake_timeout=args.handshake_timeout,
        max_message_size=args.max_message_size,
        max_cut_text=args.max_cut_text,
        shared=not args.no_force_shared,
        pipeline_upstream=not args.no_upstream_pipelining,
        end_at_expiry=args.end_at_expiry,
        expiry_grace=args.expiry_grace,
        skew=args.skew,
        drain_grace=args.drain_grace,
        ping_interval=args.ping_interval,
        upstream_ca_pem=_read_text(args.upstream_ca),
        allow_anonymous_tls=args.allow_anonymous_tls,
        own_certificates=ProxyCertificates(Path(args.state_dir)) if args.state_dir else None,
        static_dir=Path(args.static_dir) if args.static_dir else default_static_dir(),
        frame_ancestors=args.frame_ancestors,
    )


def run(args: argparse.Namespace) -> int:
    logguard.setup(args.log_level, args.log_format)  # first: no line, Tornado's included, may carry a secret
    config = build_config(args)
    link = _broker_link(args)
    ring = load_proxy_keyring(args.keyring, allow_signing=args.allow_signing_keyring) if args.keyring else None
    if not args.listen:
        raise CommandError("give --listen HOST:PORT (or listen in --config, or CONSOLEGATE_LISTEN)")
    addresses = [parse_listen(value) for value in args.listen]
    tls = tls_files(args.tls_cert, args.tls_key, "wss")
    sockets = listeners.bind_all(addresses)  # before the broker hears of us: all bound, or no start
    try:
        asyncio.run(serve(config, ring, sockets, tls, link=link))
    finally:
        for sock in sockets:
            sock.close()
    return 0


def load_proxy_keyring(path: str, *, allow_signing: bool) -> keyring.Keyring:
    """The proxy's keyring file. The broker's own keyring also verifies, but its private signing
    keys would let anyone who reads this host's files mint tokens: refused unless asked for."""
    ring = keyring.load(path)
    private = sorted(kid for kid, key in ring.signing.items() if key.seed is not None)
    if private and not allow_signing:
        raise CommandError(
            f"{path!r} holds private signing keys ({', '.join(private)}): this proxy could mint "
            "tokens. Give it the proxy keyring (console-broker keys export-proxy), or pass "
            "--allow-signing-keyring"
        )
    if private:
        log.warning(
            "--keyring %s holds private signing keys (--allow-signing-keyring): this proxy can mint tokens", path
        )
        return ring.for_proxy()
    return ring


def _broker_link(args: argparse.Namespace) -> BrokerLink | None:
    """``--broker URL --proxy-credential FILE``, or ``--state-dir D`` (mutual TLS), or None;
    one of them or ``--keyring`` is needed. With ``--keyring`` alone or ``--proxy-credential``, a state
    dir only lends its certificates to targets whose token pins the broker's CA (no mutual TLS)."""
    state_dir = getattr(args, "state_dir", None)
    if state_dir and not args.proxy_credential and (args.broker or not args.keyring):
        return _enrolled_link(args, state_dir)
    if not args.broker:
        if args.proxy_credential:
            raise CommandError("--proxy-credential goes with --broker")
        if not args.keyring:
            raise CommandError(
                "give --keyring FILE, --state-dir D (console-proxy enroll), "
                "or --broker URL with --proxy-credential FILE"
            )
        return None
    if not args.proxy_credential:
        raise CommandError("--broker needs --proxy-credential FILE (or --state-dir D from console-proxy enroll)")
    if args.heartbeat_interval <= 0:
        raise CommandError("--heartbeat-interval must be positive")
    try:
        credential = ProxyCredential.load(args.proxy_credential)
        return BrokerLink(args.broker, credential, interval=args.heartbeat_interval, ca_file=args.broker_ca)
    except BrokerLinkError as exc:
        raise CommandError(str(exc)) from None


def _enrolled_link(args: argparse.Namespace, state_dir: str) -> BrokerLink:
    """The link of an enrolled proxy: its certificate instead of a bearer credential."""
    if args.proxy_credential:
        raise CommandError("give --state-dir or --proxy-credential, not both")
    if args.heartbeat_interval <= 0:
        raise CommandError("--heartbeat-interval must be positive")
    try:
        enrolled = Identity.load(state_dir)
        if enrolled.not_after <= clock.now():
            raise CommandError(
                f"the certificate in {state_dir!r} has expired: the broker refuses it. Make a new join token "
                f"(console-broker proxy join-token {enrolled.proxy_id}) and run console-proxy enroll again"
            )
        urls = args.broker or list(enrolled.brokers)
        return BrokerLink(urls, enrolled, interval=args.heartbeat_interval, ca_file=args.broker_ca)
    except (BrokerLinkError, IdentityError, ssl.SSLError, OSError) as exc:
        raise CommandError(str(exc)) from None


async def _first_keyring(link: BrokerLink, config: ProxyConfig, ring: keyring.Keyring | None) -> keyring.Keyring:
    try:
        return await link.first_keyring(config.max_sessions, config.public_url)
    except BrokerLinkError as exc:
        if ring is None:
            raise CommandError(f"cannot start: {exc}") from None
        log.warning("starting with the --keyring file: %s", exc)
        return ring


def _reload(files: CertificateFiles) -> None:
    """A renewal hook: the wss certificate read again (kept as it was if the files are unusable)."""
    files.reload()


def _certificate_metrics(state: server.ProxyState, tls: CertificateFiles | None) -> None:
    """Every certificate the proxy uses, for consolegate_certificate_expiry_timestamp_seconds."""
    if tls is not None:
        state.metrics.certificates["wss"] = lambda: tls.not_after
    own = state.config.own_certificates
    if own is not None:
        state.metrics.certificates["client"] = lambda: certificate_expiry(str(own.cert_path))
        state.metrics.certificates["ca"] = lambda: certificate_expiry(str(own.ca_path))


async def serve(
    config: ProxyConfig,
    ring: keyring.Keyring | None,
    sockets: list[socket.socket],
    tls: CertificateFiles | None,
    *,
    link: BrokerLink | None = None,
) -> None:
    if link is not None:
        ring = await _first_keyring(link, config, ring)
    assert ring is not None
    state = server.ProxyState(config, ring, broker=link, events=Events(forward=link.forward) if link else None)
    _certificate_metrics(state, tls)
    if link is not None:
        link.attach(state)
        if tls is not None and link.renewal is not None:
            # --tls-cert may be the enrolled certificate (its server name is the public URL's host)
            link.renewal.hooks.append(lambda _identity: _reload(tls))
        link.start()
    # No proxy endpoint takes a body; without these limits Tornado buffers ~100 MiB per request.
    http = tornado.httpserver.HTTPServer(
        server.make_app(state, upgrades=tls is not None),  # plain: the front door upgrades
        ssl_options=tls.listener if tls else None,
        max_body_size=MAX_BODY,
        body_timeout=10,
        idle_connection_timeout=IDLE_CONNECTION_TIMEOUT,
    )
    door = None if tls else FrontDoor(state, http, IDLE_CONNECTION_TIMEOUT)
    tls_door = TlsDoor(state, http, tls.listener, IDLE_CONNECTION_TIMEOUT) if tls and config.proxy_protocol else None
    if tls_door is not None:
        tls_door.listen_on(sockets)
    elif door is None:
        http.add_sockets(sockets)
    else:
        await door.listen_on(sockets)
    server.install_signal_handlers(state)
    certfiles.on_sighup([tls] if tls else [])
    sweeper = server.start_sweeper(state)
    pinger = server.start_pinger(state)
    log.info("console-proxy listening on %s (%s)", listeners.addresses_of(sockets), "https" if tls else "http")
    await state.stopped.wait()
    sweeper.stop()
    if pinger is not None:
        pinger.stop()
    http.stop()
    if door is not None:
        door.close()
    if tls_door is not None:
        tls_door.close()
    if link is not None:
        await link.stop()
    log.info("console-proxy stopped")
