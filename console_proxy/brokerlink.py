"""The proxy's link to the broker: redeem single-use tokens, heartbeat, forward session events.

The proxy stays stateless and keeps working without the broker: it keeps the last keyring it
received and goes on accepting reusable tokens; only single-use tokens need the broker, and they
fail closed (503 ``broker_unavailable``) when it cannot be asked.

Authentication: every request carries ``Authorization: Bearer <proxy_id>.<secret>`` from the
credential file that ``console-broker proxy add`` wrote (JSON ``{"proxy_id", "secret"}``).

* heartbeat (every ``interval`` seconds): ``{proxy_id, public_url, sessions, capacity, draining,
  version}`` where ``version`` is the keyring version held (0 before the first). The answer
  carries the keyring when the broker's differs (validated before use; the old one is kept on
  any error) and the revoked session ids, which :meth:`ProxyState.sweep` closes with 4410.
* events: the records of :class:`console_proxy.events.Events` are queued (bounded; the oldest
  are dropped, and counted, while the broker is away) and posted in small batches.
* watch: one long-poll ``GET /proxy/watch?since=N`` held at a time; the broker answers when a
  session is revoked (closed here at once, 4410, as the heartbeat's list does), the keys rotate
  (a heartbeat is sent at once: its answer carries them) or a proxy is removed, else after its
  hold with the current position. A failing watch is retried with backoff; heartbeats go on.

Replicas: ``--broker`` may name several (any replica serves any proxy, with the same
credential). One is used at a time; a connection failure, a timeout or a 5xx moves every call
(heartbeat, redeem, events, watch) to the next, and the failed call is tried there at once.

Never imports ``broker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from console_proxy.admission import Refusal
from console_proxy.codes import Refused
from console_proxy.hostside import is_loopback_host
from console_proxy.identity import Identity
from console_proxy.keyring import Keyring, KeyringError
from console_proxy.metrics import Gauge, LiveCounter
from console_proxy.renewal import Renewal
from console_proxy.token import Claims

if TYPE_CHECKING:
    from console_proxy.server import ProxyState

log = logging.getLogger("consolegate.proxy.broker")

API = "/api/v1"


class BrokerLinkError(Exception):
    """The broker could not be reached or answered badly; one line, never a secret."""


@dataclass(frozen=True)
class ProxyCredential:
    proxy_id: str
    secret: str = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> ProxyCredential:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            credential = cls(data["proxy_id"], data["secret"])
        except OSError as exc:
            raise BrokerLinkError(f"cannot read the proxy credential {str(path)!r}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise BrokerLinkError(f"{str(path)!r} is not a proxy credential (JSON with proxy_id and secret)") from None
        if not isinstance(credential.proxy_id, str) or not isinstance(credential.secret, str):
            raise BrokerLinkError(f"{str(path)!r} is not a proxy credential (JSON with proxy_id and secret)")
        return credential

    @property
    def authorization(self) -> str:
        return f"Bearer {self.proxy_id}.{self.secret}"


WATCH_HOLD_MAX = 25.0
"""The broker holds a watch at most this long (its ``--watch-hold``); the request's timeout adds
the link's timeout to it."""
WATCH_RETRY = (1.0, 30.0)
"""First and longest pause before a failed watch is tried again (doubling in between)."""


class BrokerLink:
    """One per proxy process; :meth:`attach` it to the ProxyState, then :meth:`start` it."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        credential: ProxyCredential | Identity,
        *,
        interval: float = 5.0,
        timeout: float = 3.0,
        queue_limit: int = 1000,
        batch: int = 50,
        ca_file: str | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise BrokerLinkError("--broker needs a URL")
        for url in urls:
            check_broker_url(url)
        self.bases = [url.rstrip("/") + API for url in urls]
        self._current = 0
        self.ca_file = ca_file
        self.credential, self.interval, self.timeout, self.batch = credential, interval, timeout, batch
        self.proxy_id = credential.proxy_id
        self.renewal: Renewal | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if isinstance(credential, Identity):  # mutual TLS with the CA's certificate; renewed in place
            self.ssl_context = credential.client_context(ca_file)
            self.renewal = Renewal(self, credential)
        self.state: ProxyState | None = None
        self.queue: deque[dict[str, Any]] = deque(maxlen=queue_limit)
        self.dropped = {"queue_full": 0, "rejected": 0}  # events the broker will never see
        self._wake = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reachable = True
        self._pushed: set[str] = set()  # revoked ids the watch brought since the last heartbeat was sent
        self.watch_position: int | None = None

    def attach(self, state: ProxyState) -> None:
        """Serve the proxy's state to the broker, and this link's health in its ``/metrics``."""
        self.state = state
        add = state.metrics.registry.add
        add(
            Gauge(
                "consolegate_proxy_broker_reachable",
                "1 while the last call to the broker succeeded.",
                lambda: float(self._reachable),
            )
        )
        add(
            Gauge(
                "consolegate_proxy_broker_replica",
                "Which --broker is in use: 0 for the first, 1 the next, ...",
                lambda: float(self._current),
            )
        )
        add(
            Gauge(
                "consolegate_proxy_broker_events_queued",
                "Events waiting to be posted to the broker.",
                lambda: float(len(self.queue)),
            )
        )
        add(
            LiveCounter(
                "consolegate_proxy_broker_events_dropped_total",
                "Events the broker will never see: the queue was full, or the broker rejected them.",
                ["reason"],
                lambda: {(reason,): float(n) for reason, n in self.dropped.items()},
            )
        )

    @property
    def base(self) -> str:
        """The replica in use (its API root)."""
        return self.bases[self._current]

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, json.dumps(body), self.timeout)

    async def _call(self, method: str, path: str, body: str | None, timeout: float) -> Any:
        """One call, at the replica in use; when that replica fails (unreachable, timeout, 5xx)
        the next one is used from now on and the call is tried there, each replica once."""
        for attempt in range(len(self.bases)):
            index = self._current
            headers = {}
            if isinstance(self.credential, ProxyCredential):
                headers["Authorization"] = self.credential.authorization
            if body is not None:
                headers["Content-Type"] = "application/json"
            request = HTTPRequest(
                self.bases[index] + path,
                method=method,
                body=body,
                headers=headers,
                connect_timeout=self.timeout,
                request_timeout=timeout,
                follow_redirects=False,
                ca_certs=None if self.ssl_context is not None else self.ca_file,
                ssl_options=self.ssl_context,  # read per call: a renewal's new context serves the next one
            )  # a redirect must not carry the secret
            try:
                response = await AsyncHTTPClient().fetch(request)
            except Exception as exc:
                if not replica_failed(exc) or attempt == len(self.bases) - 1:
                    raise
                self._fail_over(index, exc)
                continue
            return json.loads(response.body)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _fail_over(self, index: int, exc: BaseException) -> None:
        """Move to the replica after ``index`` (unless a concurrent call already moved on)."""
        if self._current != index:
            return
        self._current = (index + 1) % len(self.bases)
        log.warning(
            "broker replica %s failed (%s); using %s",
            _origin(self.bases[index]),
            _describe(exc),
            _origin(self.bases[self._current]),
        )

    # --- single use ---------------------------------------------------------------------

    async def redeem(self, claims: Claims) -> None:
        """Return once the broker recorded the first use; Refusal otherwise (fail closed)."""
        try:
            # The broker keeps the redeemed jti until this "exp": the last moment *this* proxy
            # would still accept the token (its skew included), so a replay cannot outlive it.
            skew = self.state.config.skew if self.state is not None else 0
            await self._post("/proxy/redeem", {"jti": claims.jti, "session_id": claims.sid, "exp": claims.exp + skew})
        except HTTPClientError as exc:
            if exc.code == 409:
                raise Refusal(Refused.TOKEN_USED, reason=_error_code(exc) or "token_used", claims=claims) from None
            raise Refusal(Refused.BROKER_UNAVAILABLE, reason=f"redeem failed: HTTP {exc.code}", claims=claims) from None
        except Exception as exc:
            raise Refusal(
                Refused.BROKER_UNAVAILABLE, reason=f"redeem failed: {type(exc).__name__}", claims=claims
            ) from None

    # --- heartbeat ----------------------------------------------------------------------

    def _report(self, state: ProxyState | None, capacity: int, public_url: str | None) -> dict[str, Any]:
        return {
            "proxy_id": self.proxy_id,
            "public_url": public_url,
            "sessions": len(state.sessions) if state else 0,
            "capacity": capacity,
            "draining": state.draining if state else False,
            "version": state.keyring.version if state else 0,
        }

    async def first_keyring(self, capacity: int, public_url: str | None) -> Keyring:
        """The keyring from a first heartbeat, before the proxy serves; BrokerLinkError if none,
        naming the cause (TLS handshake, refused, timed out; never Tornado's "HTTP 599")."""
        try:
            answer = await self._post("/proxy/heartbeat", self._report(None, capacity, public_url))
            return Keyring.from_jwks(answer["keyring"])
        except HTTPClientError as exc:
            if exc.code != CLIENT_SIDE_FAILURE:
                raise BrokerLinkError(f"the broker refused the heartbeat: HTTP {exc.code} {_error_code(exc)}") from None
            failure: BaseException = exc
        except (TimeoutError, OSError, ValueError, KeyError, TypeError, KeyringError) as exc:
            failure = exc
        raise BrokerLinkError(f"no keyring from the broker at {self.base}: {_describe(failure)}")

    async def heartbeat(self) -> None:
        """One heartbeat; applies a new keyring and the revoked session ids."""
        state = self.state
        assert state is not None
        self._pushed.clear()
        answer = await self._post(
            "/proxy/heartbeat", self._report(state, state.config.max_sessions, state.config.public_url)
        )
        if "keyring" in answer:
            self._apply_keyring(state, answer["keyring"])
        # The broker sends every id revoked in the last day each time: replacing the set keeps
        # it bounded, and new ids are closed at once rather than at the next sweep. Ids the watch
        # brought while this heartbeat was under way may be newer than the list: they stay.
        revoked = {sid for sid in answer.get("revoked") or [] if isinstance(sid, str)} | self._pushed
        new = revoked - state.revoked
        state.revoked = revoked
        if new:
            state.sweep()

    @staticmethod
    def _apply_keyring(state: ProxyState, data: Any) -> None:
        try:
            ring = Keyring.from_jwks(data)
        except KeyringError as exc:
            log.warning("kept the old keyring: the broker sent an invalid one (%s)", exc)
            return
        if ring.version != state.keyring.version:
            log.info("keyring version %d -> %d", state.keyring.version, ring.version)
        state.keyring = ring

    async def _heartbeats(self) -> None:
        while not self._stopping:  # a flag, not only cancel: 3.11's wait_for can swallow a cancel
            try:
                await self.heartbeat()
                self._set_reachable(True, "")
            except Exception as exc:
                self._set_reachable(False, _describe(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.interval)
            self._beat_now.clear()

    def nudge(self) -> None:
        """Heartbeat now (e.g. draining began: the broker should stop sending consoles here)."""
        self._beat_now.set()

    def _set_reachable(self, reachable: bool, why: str) -> None:
        if reachable != self._reachable:
            if reachable:
                log.info("broker reachable again")
            else:
                log.warning("broker unreachable (%s): keeping the last keyring; single-use tokens fail closed", why)
        self._reachable = reachable

    # --- watch --------------------------------------------------------------------------

    async def watch_once(self) -> None:
        """One long-poll from :attr:`watch_position` (none yet: a snapshot), applied."""
        query = "" if self.watch_position is None else f"?since={self.watch_position}"
        answer = await self._call("GET", "/proxy/watch" + query, None, WATCH_HOLD_MAX + self.timeout)
        position, revoked, version = _watch_answer(answer)
        state = self.state
        if state is not None:
            new = revoked - state.revoked
            if new:
                self._pushed |= new
                state.revoked |= new
                log.info("the broker revoked %d session(s): closing them", len(new))
                state.sweep()
            if version != state.keyring.version:
                self.nudge()  # the heartbeat's answer carries the keys
        self.watch_position = position

    async def _watches(self) -> None:
        pause = WATCH_RETRY[0]
        while not self._stopping:
            try:
                await self.watch_once()
                pause = WATCH_RETRY[0]
            except Exception as exc:
                log.warning(
                    "the broker watch failed (%s); revocations come with heartbeats until it works, next try in %.0f s",
                    _describe(exc),
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, WATCH_RETRY[1])

    # --- events -------------------------------------------------------------------------

    def forward(self, record: dict[str, Any]) -> None:
        """Queue one event record for the broker (the Events ``forward`` hook); never blocks."""
        if len(self.queue) == self.queue.maxlen:
            self.dropped["queue_full"] += 1
            full = self.dropped["queue_full"]
            if full == 1 or full % 100 == 0:
                log.warning("event queue full: %d events to the broker dropped so far", full)
        self.queue.append(record)
        self._wake.set()

    async def flush(self) -> bool:
        """Post queued events in batches; False (events kept) when the broker is unreachable."""
        while self.queue:
            batch = [self.queue[i] for i in range(min(self.batch, len(self.queue)))]
            try:
                await self._post("/proxy/events", {"events": batch})
            except HTTPClientError as exc:
                if exc.code is not None and 400 <= exc.code < 500 and exc.code not in (401, 408, 429):
                    log.warning(
                        "the broker rejected %d events (HTTP %d %s); dropped", len(batch), exc.code, _error_code(exc)
                    )
                    self.dropped["rejected"] += len(batch)
                    self._drop(len(batch))
                    continue
                return False
            except (TimeoutError, OSError, ValueError):
                return False
            self._drop(len(batch))
        return True

    def _drop(self, count: int) -> None:
        for _ in range(min(count, len(self.queue))):
            self.queue.popleft()

    async def _events(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if not await self.flush():
                await asyncio.sleep(self.interval)
                self._wake.set()

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeats()),
            loop.create_task(self._events()),
            loop.create_task(self._watches()),
        ]
        if self.renewal is not None:
            self._tasks.append(loop.create_task(self.renewal.run()))

    async def stop(self) -> None:
        """Stop the loops; tell the broker we are gone (draining) and send the last events."""
        self._stopping = True
        if self.renewal is not None:
            self.renewal.stop()  # its loop ends even if the cancel below is lost (renewloop)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._last_words(), self.timeout)
        except Exception:
            log.warning("could not send the last heartbeat and events to the broker")

    async def _last_words(self) -> None:
        if self.state is not None:
            await self.heartbeat()
        await self.flush()


def check_broker_url(url: str) -> None:
    """https, or plain http to this host only: heartbeat answers carry the fleet keys, which
    decrypt every token (passwords included), and a forged redeem answer defeats single use."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.port == 0:  # reading it also refuses a port out of range here, not at the first heartbeat
            raise ValueError("port 0")
    except ValueError:
        raise BrokerLinkError("--broker is not a URL (https://HOST[:PORT])") from None
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # never echo user info
    if parts.username is not None or parts.password is not None:
        raise BrokerLinkError(
            f"--broker {shown!r} must not carry user info: the proxy authenticates with its credential file"
        )
    if host and (parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(host))):
        return
    raise BrokerLinkError(f"--broker {shown!r} must be an https:// URL (plain http only to this host)")


def replica_failed(exc: BaseException) -> bool:
    """A failure of the replica, not of the request: another replica may answer it."""
    if isinstance(exc, HTTPClientError):
        return exc.code == 599 or exc.code >= 500
    return isinstance(exc, OSError | TimeoutError)


def _watch_answer(answer: Any) -> tuple[int, set[str], int]:
    """(position, revoked ids, keyring version) from a watch answer; ValueError if malformed."""
    if not isinstance(answer, dict):
        raise ValueError("the watch answer is not an object")
    position, revoked, version = answer.get("seq"), answer.get("revoked"), answer.get("keyring_version")
    if (
        not isinstance(position, int)
        or isinstance(position, bool)
        or position < 0
        or not isinstance(version, int)
        or isinstance(version, bool)
        or not isinstance(revoked, list)
    ):
        raise ValueError("the watch answer lacks seq, revoked or keyring_version")
    return position, {sid for sid in revoked if isinstance(sid, str)}, version


def _origin(base: str) -> str:
    """scheme://host:port of a replica, for log lines."""
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _error_code(exc: HTTPClientError) -> str:
    try:
        body = json.loads(exc.response.body) if exc.response is not None else {}
        return str(body.get("error", ""))
    except (ValueError, AttributeError):
        return ""


CLIENT_SIDE_FAILURE = 599
"""Tornado's code for "no HTTP answer at all" (timeout, closed stream): never show it as one."""

_PLAIN_HTTP_HINT = "is the broker serving plain http? then use an http:// URL (loopback only) or give it --tls-cert"


def _describe(exc: BaseException) -> str:
    """The real cause of a failed call, in an operator's words: TLS handshake, refused, timed out."""
    if isinstance(exc, HTTPTimeoutError):
        if "handshake" in str(exc):
            return f"TLS handshake failed: timed out ({_PLAIN_HTTP_HINT})"
        return "timed out waiting for the broker"
    if isinstance(exc, HTTPStreamClosedError):
        return "the connection was closed before an answer (TLS handshake failed, or the broker stopped)"
    if isinstance(exc, HTTPClientError):
        return f"HTTP {exc.code}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: the broker's certificate is not trusted ({exc.verify_message}; see --broker-ca)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}; {_PLAIN_HTTP_HINT})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running, on that address and port?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host name ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the broker"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def describe_failure(exc: BaseException) -> str:
    """A failed call in an operator's words, with the broker's refusal code when it gave one."""
    if isinstance(exc, HTTPClientError) and exc.code != CLIENT_SIDE_FAILURE:
        return f"HTTP {exc.code} {_error_code(exc)}".strip()
    return _describe(exc)
