"""``console-broker serve``: open the state directory and run the API, plus its housekeeping."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
from collections.abc import Callable

import tornado.httpserver
from tornado.ioloop import PeriodicCallback

from broker import api, ca, hypervisors, ratelimit
from broker.enrollment import DEFAULT_CERT_LIFETIME, MIN_CERT_LIFETIME
from broker.hostcerts import split_names
from broker.service import DEFAULT_SESSION_RETENTION, MIN_SESSION_RETENTION, Broker, BrokerConfig
from broker.store import StoreError
from broker.tlsauto import TlsAuto
from broker.watch import POLL_POSTGRESQL, POLL_SQLITE, WATCH_HOLD, ChangeFeed, PgListener
from console_proxy import certfiles, origin
from console_proxy.certfiles import CertificateFiles
from console_proxy.command import CommandError, Parser
from console_proxy.configsources import Sources
from console_proxy.hostside import is_loopback_host, parse_listen, tls_files
from console_proxy.logguard import add_options as add_log_options
from console_proxy.logguard import setup as guard_logging

log = logging.getLogger("consolegate.broker")


DATABASE_HELP = (
    "the broker's database: sqlite:///PATH (default: <state-dir>/broker.db) or "
    "postgresql://USER@HOST:PORT/DB, shared by replicas (password from the URL, PGPASSWORD or "
    "~/.pgpass; never logged)"
)


def add_state_options(parser: argparse.ArgumentParser) -> None:
    """``--state-dir`` and ``--database``: every broker command that opens the broker's state."""
    parser.add_argument(
        "--state-dir",
        metavar="D",
        default="./var",
        help="broker state directory (default: %(default)s, relative to the current directory)",
    )
    add_database_option(parser)


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", metavar="URL", help=DATABASE_HELP)


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    serve = commands.add_parser("serve", help="run the broker API")
    add_state_options(serve)
    serve.add_argument(
        "--migrate",
        action="store_true",
        help="apply missing schema migrations first (a SQLite state dir is always migrated; "
        "a PostgreSQL database otherwise only by console-broker migrate)",
    )
    serve.add_argument("--listen", metavar="H:P", default="127.0.0.1:8700")
    serve.add_argument("--default-ttl", type=int, default=60, help="console lifetime when not asked, seconds")
    serve.add_argument("--max-ttl", type=int, default=3600, help="longest console lifetime a request may ask")
    serve.add_argument(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        help="the proxies' heartbeat interval; healthy = a heartbeat within 3 intervals",
    )
    serve.add_argument(
        "--cleanup-interval",
        type=float,
        default=60.0,
        help="how often expired redeemed-token rows and old sessions are deleted, seconds",
    )
    serve.add_argument(
        "--session-retention",
        type=float,
        default=DEFAULT_SESSION_RETENTION,
        metavar="SECONDS",
        help="how long a session's row outlives its end (the audit log keeps it for good); "
        f"at least {MIN_SESSION_RETENTION:.0f}, default {DEFAULT_SESSION_RETENTION:.0f}",
    )
    serve.add_argument(
        "--watch-hold",
        type=float,
        default=WATCH_HOLD,
        metavar="SECONDS",
        help=f"longest a proxy's GET /proxy/watch is held without a change (default {WATCH_HOLD:g})",
    )
    serve.add_argument("--tls-cert", metavar="F", help="serve HTTPS: heartbeat answers carry the fleet keys")
    serve.add_argument("--tls-key", metavar="F")
    serve.add_argument(
        "--tls-auto",
        action="store_true",
        help="serve HTTPS with a certificate from the broker's own CA (for the --tls-san names), "
        "issued at start and renewed at two thirds of --cert-lifetime without a restart",
    )
    serve.add_argument(
        "--tls-san",
        metavar="NAME",
        action="append",
        default=[],
        help="with --tls-auto: a DNS name or IP address clients reach the broker by (repeatable; the first is the CN)",
    )
    serve.add_argument(
        "--cert-lifetime",
        type=float,
        default=DEFAULT_CERT_LIFETIME,
        metavar="SECONDS",
        help="lifetime of the certificates this broker issues and renews (renewed at two thirds; "
        f"at least {MIN_CERT_LIFETIME:g}, default {DEFAULT_CERT_LIFETIME:g} = 7 days)",
    )
    serve.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="listen without TLS on a non-loopback address (API keys then cross the network readable)",
    )
    serve.add_argument(
        "--auth-burst",
        type=int,
        default=ratelimit.DEFAULT_BURST,
        metavar="N",
        help="failed authentications an address may make before it is answered 429 "
        f"(default {ratelimit.DEFAULT_BURST})",
    )
    serve.add_argument(
        "--auth-refill",
        type=float,
        default=ratelimit.DEFAULT_REFILL,
        metavar="SECONDS",
        help=f"one more failed authentication allowed per this many seconds (default {ratelimit.DEFAULT_REFILL:g})",
    )
    serve.add_argument(
        "--trusted-proxy",
        metavar="CIDR",
        action="append",
        default=[],
        help="a reverse proxy whose X-Forwarded-For names the client whose failed "
        "authentications are counted (repeatable)",
    )
    serve.add_argument(
        "--hypervisor-timeout",
        type=float,
        default=hypervisors.LOOKUP_TIMEOUT,
        metavar="SECONDS",
        help="how long a mint naming a hypervisor waits for libvirt before 503 hypervisor_unavailable",
    )
    serve.add_argument(
        "--require-mtls",
        action="store_true",
        help="proxies authenticate only with a client certificate of the broker's CA "
        "(their bearer credentials are refused: 401 mtls_required); needs --tls-cert",
    )
    add_log_options(serve)
    serve.set_defaults(handler=run)
    Sources(serve, "console-broker serve")


def run(args: argparse.Namespace) -> int:
    guard_logging(args.log_level, args.log_format)  # first: no line, Tornado's included, may carry a secret
    if not 0 < args.default_ttl <= args.max_ttl:
        raise CommandError("--default-ttl must be positive and at most --max-ttl")
    if args.heartbeat_interval <= 0 or args.cleanup_interval <= 0 or not 0 < args.watch_hold <= WATCH_HOLD:
        raise CommandError(f"intervals must be positive (--watch-hold at most {WATCH_HOLD:g})")
    if args.hypervisor_timeout <= 0:
        raise CommandError("--hypervisor-timeout must be positive")
    check_retention(args.session_retention)
    if not args.cert_lifetime >= MIN_CERT_LIFETIME:  # NaN too
        raise CommandError(f"--cert-lifetime must be at least {MIN_CERT_LIFETIME:g} seconds")
    throttle, trusted = auth_limits(args)
    config = BrokerConfig(
        default_ttl=args.default_ttl,
        max_ttl=args.max_ttl,
        heartbeat_interval=args.heartbeat_interval,
        cleanup_interval=args.cleanup_interval,
        session_retention=args.session_retention,
        hypervisor_timeout=args.hypervisor_timeout,
        watch_hold=args.watch_hold,
        cert_lifetime=args.cert_lifetime,
        require_mtls=args.require_mtls,
    )
    check_tls_auto(args)
    host, port = parse_listen(args.listen)
    check_plaintext(host, bool(args.tls_cert) or args.tls_auto, allow_insecure=args.allow_insecure_http)
    if args.require_mtls and not (args.tls_cert or args.tls_auto):
        raise CommandError("--require-mtls needs HTTPS (--tls-cert and --tls-key, or --tls-auto)")
    broker = Broker(args.state_dir, config, database=args.database, migrate=True if args.migrate else None)
    try:

        def prepare(context: ssl.SSLContext) -> None:
            ask_client_certificates(context, broker)

        tls = tls_files(args.tls_cert, args.tls_key, "https", prepare=prepare)
        auto = TlsAuto(broker, args.tls_san, args.cert_lifetime, prepare=prepare) if args.tls_auto else None
        if auto is not None:
            tls = auto.start()
        asyncio.run(serve(broker, host, port, tls, throttle, trusted, auto=auto))
    finally:
        broker.close()
    return 0


def ask_client_certificates(context: ssl.SSLContext, broker: Broker) -> None:
    """Ask every HTTPS client for a certificate of the broker's CA, without requiring one
    (CERT_OPTIONAL): browsers and API clients connect as before, a proxy presenting its
    certificate is authenticated by it (api.ApiHandler.proxy_certificate), and a certificate
    from another CA, or an expired one, fails the handshake."""
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=ca.cert_pem(broker.ca.certificate()))


def check_tls_auto(args: argparse.Namespace) -> None:
    """``--tls-auto`` replaces ``--tls-cert``/``--tls-key`` and needs the names to certify."""
    if not args.cert_lifetime >= MIN_CERT_LIFETIME:  # NaN too
        raise CommandError(f"--cert-lifetime must be at least {MIN_CERT_LIFETIME:g} seconds")
    if not args.tls_auto:
        if args.tls_san:
            raise CommandError("--tls-san goes with --tls-auto")
        return
    if args.tls_cert or args.tls_key:
        raise CommandError("give --tls-auto or --tls-cert/--tls-key, not both")
    if not args.tls_san:
        raise CommandError("--tls-auto needs --tls-san NAME (the DNS names or addresses clients use)")
    try:
        split_names(args.tls_san)
    except ValueError as exc:
        raise CommandError(f"--tls-san: {exc}") from None


BODY_TIMEOUT = 30.0
"""Seconds a request body (at most 64 KiB) may take to arrive."""
IDLE_CONNECTION_TIMEOUT = 60.0
"""Seconds a kept-alive connection may wait for its next request (heartbeats come every few)."""


def auth_limits(args: argparse.Namespace) -> tuple[ratelimit.AuthThrottle, tuple[origin.Network, ...]]:
    """The failed-authentication throttle and the reverse proxies believed about client addresses."""
    try:
        throttle = ratelimit.AuthThrottle(args.auth_burst, args.auth_refill)
    except ValueError:
        raise CommandError("--auth-burst must be at least 1 and --auth-refill a positive number of seconds") from None
    try:
        return throttle, origin.parse_networks(args.trusted_proxy)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def check_retention(seconds: float) -> None:
    """Refuse, rather than silently raise, a retention shorter than the revocation bound: a session
    row deleted earlier would read as "not revoked" to redeem and drop off the proxies' lists."""
    if not seconds >= MIN_SESSION_RETENTION:  # NaN included
        raise CommandError(
            f"--session-retention must be at least {MIN_SESSION_RETENTION:.0f} seconds: a revoked "
            "session must be remembered while any proxy could still accept its token"
        )


def check_plaintext(host: str, tls: bool, *, allow_insecure: bool) -> None:
    """Fail closed: API keys, proxy secrets and the fleet keys in heartbeat answers must not cross
    a network in clear, so plain http is for loopback addresses unless explicitly allowed."""
    if tls or is_loopback_host(host):
        return
    if not allow_insecure:
        raise CommandError(
            f"refusing to serve plain http on non-loopback address {host!r}: give --tls-cert and "
            "--tls-key, or --allow-insecure-http"
        )
    log.warning(
        "serving plain http on non-loopback address %s (--allow-insecure-http): API keys, proxy "
        "credentials and fleet keys cross the network unencrypted",
        host,
    )


async def serve(
    broker: Broker,
    host: str,
    port: int,
    tls: CertificateFiles | None = None,
    throttle: ratelimit.AuthThrottle | None = None,
    trusted: tuple[origin.Network, ...] = (),
    *,
    auto: TlsAuto | None = None,
) -> None:
    # The API handlers stream bodies and enforce api.MAX_BODY themselves, answering 413 in JSON
    # (see api.ApiHandler.prepare); this limit only guards requests refused before that point.
    # Bodies are read before the caller is authenticated: a client trickling one, or idling on a
    # kept-alive connection, must not hold a connection and its buffers for ever.
    feed, stop_feed = start_feed(broker)
    metrics = api.BrokerMetrics(broker, feed)
    if tls is not None:
        metrics.certificates["https"] = lambda: tls.not_after
    metrics.certificates["ca"] = lambda: broker.ca.certificate().not_valid_after_utc.timestamp()
    app = api.make_app(broker, throttle, trusted, feed, metrics)
    http = tornado.httpserver.HTTPServer(
        app,
        max_body_size=api.MAX_BODY,
        xheaders=False,
        ssl_options=tls.listener if tls else None,
        body_timeout=BODY_TIMEOUT,
        idle_connection_timeout=IDLE_CONNECTION_TIMEOUT,
    )
    try:
        http.listen(port, host)
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    certfiles.on_sighup([tls] if tls else [])
    cleaner = PeriodicCallback(lambda: _cleanup(broker), broker.config.cleanup_interval * 1000)
    cleaner.start()
    _cleanup(broker)
    renewal = asyncio.get_running_loop().create_task(auto.run()) if auto is not None else None
    log.info(
        "console-broker listening on %s:%d (%s, state %s, database %s)",
        host,
        port,
        "https" if tls else "http",
        broker.root,
        broker.store.description,
    )
    await stopped.wait()
    if renewal is not None:
        renewal.cancel()
    cleaner.stop()
    stop_feed()
    http.stop()
    log.info("console-broker stopped")


def start_feed(broker: Broker) -> tuple[ChangeFeed, Callable[[], None]]:
    """The process's watch feed (broker.watch), woken by its own commits, by PostgreSQL's
    notifications through a listening thread, and by a slow poll; returns it and its stop."""
    feed = ChangeFeed(broker.latest_change)
    feed.bind()
    forget = broker.store.on_change(feed.poke)
    listener = None
    if broker.store.url.engine == "postgresql":
        listener = PgListener(broker.store.url.conninfo or "", feed.poke)
        listener.start()
    poll = POLL_POSTGRESQL if listener is not None else POLL_SQLITE
    poller = PeriodicCallback(feed.refresh, poll * 1000)
    poller.start()

    def stop() -> None:
        poller.stop()
        forget()
        if listener is not None:
            listener.stop()

    return feed, stop


def _cleanup(broker: Broker) -> None:
    """One batch per table per tick: cleanup runs on the event loop, so a large backlog (after an
    upgrade) is worked off over several ticks instead of stalling mints and redeems meanwhile.
    A failure (a locked database) is logged and retried at the next tick, never fatal. On
    PostgreSQL the tick runs under an advisory lock: one replica cleans at a time, the others
    skip their tick."""
    try:
        with broker.store.exclusive() as turn:  # one replica at a time
            if turn:
                broker.cleanup(max_batches=1)  # logs what it removed
            else:
                log.debug("cleanup skipped: another replica is running its tick")
    except (*broker.store.engine.errors, StoreError) as exc:
        log.warning("cleanup skipped, retried in %.0f s: %s", broker.config.cleanup_interval, exc)
