"""The broker's JSON API under ``/api/v1``: Tornado handlers that authenticate, validate, delegate.

Every handler does the same three things in the same order: who is calling (401 without a valid
credential, 403 for the wrong role), what was asked (413 over :data:`MAX_BODY`, 400 for bad
JSON, wrong types or unknown members, checked against :mod:`broker.schemas`), then one call
into :class:`broker.service.Broker`. Every error, Tornado's own included, is
``{"error": CODE, "message": …}``.

Bodies are streamed (``@stream_request_body``) so that the size limit is the handler's, not
Tornado's: Tornado answers a body over its ``max_body_size`` with a bare 400 and a closed
connection, while here a declared ``Content-Length`` over the limit is refused in ``prepare()``
before a byte of the body is read, and a chunked body is refused as soon as it grows past it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

import tornado.web
from tornado.http1connection import HTTP1Connection

from broker import openapi, ratelimit, schemas
from broker.auth import Principal
from broker.ratelimit import AuthThrottle
from broker.schemas import Field
from broker.service import AUDIT_TYPES, SESSION_STATES, SESSIONS_PAGE_MAX, ApiError, Broker
from broker.store import InvalidValue, StoreError, StoreUnavailable
from broker.watch import ChangeFeed
from console_proxy import origin, strictjson, tornado_compat
from console_proxy.httperrors import error_status
from console_proxy.metrics import Counter, Gauge, Registry, add_certificate_expiry, add_process_metrics
from console_proxy.origin import Network

log = logging.getLogger("consolegate.broker.api")

MAX_BODY = 64 * 1024
"""Largest request body the API reads; larger ones get 413 before any parsing."""
_NO_TORNADO_LIMIT = sys.maxsize
"""Tornado's own body limit once a handler enforces :data:`MAX_BODY` itself (see ApiHandler.prepare)."""
PREFIX = "/api/v1"
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    429: "too_many_attempts",
    503: "unavailable",
}


class BrokerMetrics:
    def __init__(self, broker: Broker, feed: ChangeFeed | None = None) -> None:
        self.registry = Registry()
        self.responses = self.registry.add(
            Counter("consolegate_broker_responses_total", "API answers by status", ("status",))
        )
        self.minted = self.registry.add(Counter("consolegate_broker_consoles_minted_total", "consoles minted"))
        self.auth_failures = self.registry.add(
            Counter("consolegate_broker_auth_failures_total", "credentials presented and refused, by kind", ("kind",))
        )
        self.auth_throttled = self.registry.add(
            Counter(
                "consolegate_broker_auth_throttled_total",
                "requests refused 429 after too many failures, by kind",
                ("kind",),
            )
        )
        self.registry.add(
            Gauge(
                "consolegate_broker_healthy_proxies",
                "proxies with a recent heartbeat",
                lambda: float(sum(1 for p in broker.list_proxies()["proxies"] if p["healthy"])),
            )
        )
        self.registry.add(
            Gauge(
                "consolegate_broker_watches",
                "GET /proxy/watch requests held open",
                lambda: float(feed.watching if feed is not None else 0),
            )
        )
        self.certificates = add_certificate_expiry(self.registry)
        add_process_metrics(self.registry, "broker")


def parse_json(raw: bytes) -> Any:
    """Strict JSON (see console_proxy.strictjson); ValueError otherwise."""
    try:
        return strictjson.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the body is {exc}") from None


def _declared_length(header: str) -> int:
    """The Content-Length a client declared, 0 when absent or unreadable (Tornado refuses those).

    ASCII digits only (headers arrive as latin-1, where "¹" is a digit to ``str.isdigit``), and
    the first of repeated equal values ("70000, 70000"), which Tornado accepts as one."""
    first = header.split(",", 1)[0].strip()
    if not (first.isascii() and first.isdigit()):
        return 0
    significant = first.lstrip("0")
    # int() refuses over 4300 digits (a 500 before authentication); anything this long is too large
    return int(significant or "0") if len(significant) <= 18 else MAX_BODY + 1


class Throttled(ApiError):
    """429 too_many_attempts, with the whole seconds a client should wait (its Retry-After)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            "too_many_attempts",
            "too many failed authentication attempts from this address; "
            f"retry in {retry_after} second{'' if retry_after == 1 else 's'}",
        )
        self.retry_after = retry_after


def body_too_large() -> ApiError:
    """One refusal for both places a body can be too large: its declared length, or its growth."""
    return ApiError(413, "body_too_large", f"request bodies are limited to {MAX_BODY} bytes")


@tornado.web.stream_request_body
class ApiHandler(tornado.web.RequestHandler):
    """Authentication, body limits and parsing, JSON answers and errors."""

    def initialize(
        self, broker: Broker, metrics: BrokerMetrics, throttle: AuthThrottle, trusted: tuple[Network, ...]
    ) -> None:
        self.broker, self.metrics, self.throttle, self.trusted = broker, metrics, throttle, trusted
        self._body = bytearray()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def prepare(self) -> None:
        """Runs once the headers are in, before any of the body is read.

        Tornado's own limit is lifted for this request because past it Tornado writes a bare 400
        (even after this handler's 413); :meth:`data_received` enforces :data:`MAX_BODY` instead.
        """
        if isinstance(self.request.connection, HTTP1Connection):
            self.request.connection.set_max_body_size(_NO_TORNADO_LIMIT)
        if _declared_length(self.request.headers.get("Content-Length", "")) > MAX_BODY:
            raise body_too_large()

    def data_received(self, chunk: bytes) -> None:
        """Buffer the body up to :data:`MAX_BODY`; past it (chunked bodies), answer 413 at once.

        Once the answer is sent Tornado stops delivering the body, closes the connection after the
        answer, and never calls the verb method: nothing is stored or audited.
        """
        if len(self._body) + len(chunk) > MAX_BODY:
            self._body.clear()
            error = body_too_large()
            self.send_error(413, exc_info=(type(error), error, None))
            return
        self._body += chunk

    def on_finish(self) -> None:
        self.metrics.responses.inc(str(self.get_status()))

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Path and query arguments as Tornado decodes them (invalid UTF-8 is its 400), without
        NUL: PostgreSQL's text cannot hold one, so neither engine is asked (the same 400 on both)."""
        decoded = super().decode_argument(value, name)
        if "\x00" in decoded:
            raise ApiError(400, "bad_request", "the URL must not contain NUL characters")
        return decoded

    def caller(self, *roles: str) -> Principal:
        """The authenticated caller, who must hold one of ``roles`` ("admin" may do everything).

        A throttled address is refused before its credential is looked at (broker.ratelimit);
        a presented credential that fails counts against its address."""
        proxy = roles == ("proxy",)
        kind, address, now = "proxy" if proxy else "apikey", self.client_address(), time.monotonic()
        self.check_throttle(kind, address, now)
        if proxy and (mtls := self.proxy_certificate()) is not None:
            return mtls
        authorization = self.request.headers.get("Authorization")
        if proxy and self.broker.config.require_mtls:
            raise ApiError(
                401, "mtls_required", "this broker accepts proxies by their client certificate only (--require-mtls)"
            )
        principal = self.broker.authenticate(authorization, proxy=proxy)
        if principal is None and authorization is not None:
            self.throttle.failed(kind, address, now)
            self.metrics.auth_failures.inc(kind)
        if principal is None:
            what = "a proxy credential" if proxy else "an API key"
            raise ApiError(401, "unauthorized", f"this endpoint needs {what} as a Bearer token")
        if principal.role not in roles and not (principal.role == "admin" and not proxy):
            raise ApiError(403, "forbidden", f"this endpoint needs the role {' or '.join(roles)}")
        return principal

    def proxy_certificate(self) -> Principal | None:
        """The proxy named by the TLS client certificate (verified against the broker's CA in the
        handshake; its revocation, expiry and proxy checked here on every request), or None
        without one. A certificate that fails is refused, never passed over for a bearer."""
        der = self.request.get_ssl_certificate(binary_form=True) if self.request.protocol == "https" else None
        if not der:
            return None
        try:
            return self.broker.authenticate_certificate(bytes(der))
        except ApiError:
            self.throttle.failed("proxy", self.client_address(), time.monotonic())
            self.metrics.auth_failures.inc("proxy")
            raise

    def client_address(self) -> str:
        """The peer, or the client a trusted reverse proxy names in X-Forwarded-For (``--trusted-proxy``;
        the same right-to-left walk as the console proxy's, so a client cannot pick its address)."""
        return origin.client_address(
            self.request.remote_ip or "", self.request.headers.get("X-Forwarded-For"), self.trusted
        )

    def check_throttle(self, kind: str, address: str, now: float) -> None:
        """429 while the address is throttled; the episode's first refusal is logged and audited."""
        verdict = self.throttle.check(kind, address, now)
        if not verdict.throttled:
            return
        self.metrics.auth_throttled.inc(kind)
        if verdict.first:
            where = ratelimit.client_key(address)
            log.warning("authentication throttled for %s (%s credentials): too many failures", where, kind)
            try:
                self.broker.record_throttled(where, kind, verdict.retry_after)
            except StoreError as exc:  # the 429 stands; the log line above says it
                log.warning("the auth_throttled audit event could not be written: %s", exc)
        raise Throttled(verdict.retry_after)

    def body(self, fields: dict[str, Field]) -> dict[str, Any]:
        raw = bytes(self._body)
        if not raw.strip() and not any(f.required for f in fields.values()):
            return {}
        try:
            return schemas.validate(parse_json(raw), fields)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get_query_argument(name, None)
        if value is None:
            return default
        digits = value.lstrip("0") or "0"  # int() refuses over 4300 digits: never ask it for more than high's
        if (
            not (value.isascii() and value.isdigit())
            or len(digits) > len(str(high))  # "²" is a digit
            or not low <= int(digits) <= high
        ):
            raise ApiError(400, "bad_request", f"query parameter {name!r} must be an integer from {low} to {high}")
        return int(digits)

    def query_choice(self, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.get_query_argument(name, None)
        if value is None:
            return default
        if value not in choices:
            raise ApiError(400, "bad_request", f"query parameter {name!r} must be one of {', '.join(choices)}")
        return value

    def answer(self, status: int, body: dict[str, Any] | None = None) -> None:
        self.set_status(status)
        if body is None:
            self.clear_header("Content-Type")
            self.finish()
        else:
            self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """A database that cannot be used is one line, not a traceback per request: a WARNING
        (disk full, a lock held too long), or DEBUG during an outage the broker logged already."""
        if isinstance(value, StoreUnavailable):
            during_outage = self.broker.store.unreachable
            log.log(
                logging.DEBUG if during_outage else logging.WARNING,
                "%s %s: 503 storage_unavailable: %s",
                self.request.method,
                self.request.path,
                value,
            )
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, ApiError):
            body = {"error": error.code, "message": error.message}
            if error.status == 413:  # the rest of the body is never read: this connection ends here
                self.set_header("Connection", "close")
            elif error.status == 401:  # here, not where it is raised: send_error clears earlier headers
                self.set_header("WWW-Authenticate", 'Bearer realm="consolegate"')
            elif isinstance(error, Throttled):
                self.set_header("Retry-After", str(error.retry_after))
        elif isinstance(error, InvalidValue):
            self.set_status(400)
            body = {"error": "bad_request", "message": str(error)}
        elif isinstance(error, StoreUnavailable):
            self.set_status(503)
            self.set_header("Retry-After", "1")
            body = {
                "error": "storage_unavailable",
                "message": "the broker cannot use its database right now (unreachable, or its disk full); "
                "nothing was changed: retry later",
            }
        elif error_status(status_code, error) != status_code:  # input a check missed: logged, but a 400
            self.set_status(400)
            body = {"error": "bad_request", "message": "the request holds a value the broker cannot handle"}
        elif status_code >= 500:
            body = {"error": "internal_error", "message": "the broker failed to answer; see its log"}
        else:
            body = {"error": _STATUS_CODES.get(status_code, "error"), "message": tornado_compat.response_reason(self)}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))


class TargetsHandler(ApiHandler):
    def post(self) -> None:
        who = self.caller("admin")
        self.answer(201, self.broker.add_target(self.body(schemas.TARGET_CREATE), who.actor))

    def get(self) -> None:
        self.caller("admin")
        self.answer(200, self.broker.list_targets())


class TargetHandler(ApiHandler):
    def get(self, target_id: str) -> None:
        self.caller("admin")
        self.answer(200, self.broker.get_target(target_id))

    def delete(self, target_id: str) -> None:
        who = self.caller("admin")
        self.broker.delete_target(target_id, who.actor)
        self.answer(204)


class ConsolesHandler(ApiHandler):
    async def post(self) -> None:
        who = self.caller("issuer")
        body = self.body(schemas.CONSOLE_CREATE)
        result = await self.broker.create_console(who, body)  # libvirt off the event loop, with a deadline
        self.metrics.minted.inc()
        self.answer(201, result)


class SessionsHandler(ApiHandler):
    def get(self) -> None:
        who = self.caller("issuer")
        state = self.query_choice("state", (*SESSION_STATES, "all"), "all")
        limit = self.query_int("limit", SESSIONS_PAGE_MAX, 1, SESSIONS_PAGE_MAX)
        cursor = self.get_query_argument("cursor", None)  # opaque; the broker checks it (400)
        self.answer(200, self.broker.list_sessions(who, state or "all", limit=limit, cursor=cursor))


class SessionHandler(ApiHandler):
    def delete(self, session_id: str) -> None:
        who = self.caller("admin")
        self.broker.revoke_session(session_id, who.actor)
        self.answer(202, {"session_id": session_id, "state": "revoked"})


class ViewersHandler(ApiHandler):
    """Share a session: a view-only console on the same VM for another person (Broker.share_console)."""

    async def post(self, session_id: str) -> None:
        who = self.caller("issuer")
        body = self.body(schemas.VIEWER_CREATE)
        result = await self.broker.share_console(who, session_id, body)  # libvirt off the loop
        self.metrics.minted.inc()
        self.answer(201, result)


class AuditHandler(ApiHandler):
    def get(self) -> None:
        self.caller("admin")
        after = self.query_int("after", 0, 0, 2**62)
        limit = self.query_int("limit", 100, 1, 1000)
        self.answer(200, self.broker.audit(after, self.query_choice("type", AUDIT_TYPES, None), limit))


class KeysHandler(ApiHandler):
    def get(self) -> None:
        self.caller("admin")
        self.answer(200, self.broker.list_keys())


class KeysRotateHandler(ApiHandler):
    def post(self) -> None:
        who = self.caller("admin")
        self.body(schemas.EMPTY)
        self.answer(200, self.broker.rotate_keys(who.actor))


class ProxiesHandler(ApiHandler):
    def get(self) -> None:
        self.caller("admin")
        self.answer(200, self.broker.list_proxies())


class HeartbeatHandler(ApiHandler):
    def post(self) -> None:
        who = self.caller("proxy")
        self.answer(200, self.broker.heartbeat(who, self.body(schemas.HEARTBEAT)))


class CaHandler(ApiHandler):
    """The CA certificate and its fingerprint: public, what a join token pins."""

    def get(self) -> None:
        self.answer(200, self.broker.ca_answer())


class EnrollHandler(ApiHandler):
    """A join token and a CSR for a proxy's first certificate (no credential: the token is it).
    Failures count against the address like a wrong credential's."""

    def post(self) -> None:
        address, now = self.client_address(), time.monotonic()
        self.check_throttle("proxy", address, now)
        body = self.body(schemas.ENROLL)
        try:
            answer = self.broker.enroll(body)
        except ApiError as refused:
            if refused.status in (401, 403, 409):
                self.throttle.failed("proxy", address, now)
                self.metrics.auth_failures.inc("join")
            raise
        self.answer(200, answer)


class RenewHandler(ApiHandler):
    """The next certificate, for a proxy authenticated by its current one (never a bearer)."""

    def post(self) -> None:
        who = self.caller("proxy")
        if who.certificate is None:
            raise ApiError(403, "mtls_required", "renewal needs the proxy's current client certificate (mutual TLS)")
        self.answer(200, self.broker.renew_certificate(who, self.body(schemas.RENEW)))


class RedeemHandler(ApiHandler):
    def post(self) -> None:
        who = self.caller("proxy")
        self.answer(200, self.broker.redeem(who, self.body(schemas.REDEEM)))


class WatchHandler(ApiHandler):
    """The long-poll (broker.watch): at once when a watched change is newer than ``since``,
    else when one commits, else after the hold with the current position."""

    # Tornado passes a route's dict as keywords: this route's adds the feed to ApiHandler's, a
    # signature mypy cannot see as compatible (one more required argument), hence the ignore.
    def initialize(self, feed: ChangeFeed, **options: Any) -> None:  # type: ignore[override]
        super().initialize(**options)
        self.feed, self.gone = feed, asyncio.Event()

    async def get(self) -> None:
        who = self.caller("proxy")
        since = self.query_int("since", -1, 0, 2**62)
        answer, changed = self.broker.watch(who, None if since < 0 else since)
        if not changed:
            await self.feed.wait(who.id, since, self.broker.config.watch_hold, self.gone)
            if self.gone.is_set():
                return
            answer, _ = self.broker.watch(who, since)
        self.answer(200, answer)

    def on_connection_close(self) -> None:
        self.gone.set()


class ProxyEventsHandler(ApiHandler):
    def post(self) -> None:
        who = self.caller("proxy")
        self.answer(200, self.broker.proxy_events(who, self.body(schemas.EVENTS)["events"]))


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.answer(200, openapi.document())


class HealthHandler(ApiHandler):
    """Liveness: the process answers. It does not touch the database, so an outage of a shared
    PostgreSQL does not get every replica restarted; readiness is /readyz."""

    def get(self) -> None:
        self.answer(200, {"status": "ok"})


class ReadyHandler(ApiHandler):
    """Readiness: 200 while the database answers, 503 storage_unavailable (at once) while not."""

    def get(self) -> None:
        self.broker.store.ready()
        self.answer(200, {"status": "ready"})


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.metrics.registry.render())


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        super().prepare()  # the body limit first: an oversized body gets 413 here too
        raise ApiError(404, "not_found", "no such endpoint")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log: method, path (never the query or headers), status, time."""
    request = handler.request
    logging.getLogger("tornado.access").info(
        "%d %s %s (%s) %.1fms",
        handler.get_status(),
        request.method,
        request.path,
        request.remote_ip,
        1000.0 * request.request_time(),
    )


def make_app(
    broker: Broker,
    throttle: AuthThrottle | None = None,
    trusted: tuple[Network, ...] = (),
    feed: ChangeFeed | None = None,
    metrics: BrokerMetrics | None = None,
) -> tornado.web.Application:
    """The API; ``throttle`` limits failed authentication per client address (the defaults of
    broker.ratelimit if None), believing X-Forwarded-For only from the ``trusted`` proxies.
    ``feed`` wakes the watches (one per process; made here, woken in-process only, if None);
    ``metrics`` is given by a caller that adds to them (serve: the certificates' expiry)."""
    throttle = throttle if throttle is not None else AuthThrottle()
    if feed is None:
        feed = ChangeFeed(broker.latest_change)
        broker.store.on_change(feed.poke)
    options = {
        "broker": broker,
        "metrics": metrics or BrokerMetrics(broker, feed),
        "throttle": throttle,
        "trusted": trusted,
    }
    routes: list[Any] = [
        (PREFIX + path, handler, options)
        for path, handler in (
            ("/targets", TargetsHandler),
            ("/targets/([^/]+)", TargetHandler),
            ("/consoles", ConsolesHandler),
            ("/sessions", SessionsHandler),
            ("/sessions/([^/]+)", SessionHandler),
            ("/sessions/([^/]+)/viewers", ViewersHandler),
            ("/audit", AuditHandler),
            ("/keys", KeysHandler),
            ("/keys/rotate", KeysRotateHandler),
            ("/proxies", ProxiesHandler),
            ("/proxy/heartbeat", HeartbeatHandler),
            ("/proxy/redeem", RedeemHandler),
            ("/proxy/events", ProxyEventsHandler),
            ("/proxy/enroll", EnrollHandler),
            ("/proxy/renew", RenewHandler),
            ("/ca", CaHandler),
            ("/openapi.json", OpenApiHandler),
        )
    ]
    routes.append((PREFIX + "/proxy/watch", WatchHandler, {**options, "feed": feed}))
    routes += [
        ("/healthz", HealthHandler, options),
        ("/readyz", ReadyHandler, options),
        ("/metrics", MetricsHandler, options),
    ]
    return tornado.web.Application(
        routes, default_handler_class=NotFoundHandler, default_handler_args=options, log_function=_log_request
    )
