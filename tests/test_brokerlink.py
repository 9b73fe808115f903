"""The proxy's link to the broker, in process: what it shows an operator in ``/metrics``.

A stand-in broker is used because the real one cannot be made to reject a valid batch of
events on cue; everything else here (queue, posting, metrics rendering) is the real code.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from console_proxy.brokerlink import API, BrokerLink, BrokerLinkError, ProxyCredential, check_broker_url
from console_proxy.config import ProxyConfig
from console_proxy.keyring import Keyring
from console_proxy.server import ProxyState
from console_proxy.token import new_claims

RING = Keyring.generate(time.time()).for_proxy()


class RejectingEvents(tornado.web.RequestHandler):
    """The broker's answer to events it will never accept (a 4xx other than 401/408/429)."""

    def post(self) -> None:
        self.set_status(400)
        self.write({"error": "bad_request"})


def metric_lines(state: ProxyState, prefix: str) -> dict[str, str]:
    found = {}
    for line in state.metrics.render().splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            found[name] = value
    return found


def test_events_the_broker_never_sees_are_counted_by_reason() -> None:
    """A full queue drops the oldest events; a batch the broker rejects is dropped too. Both are
    counted in /metrics by reason, next to the queue's length and the broker's reachability."""

    async def scenario() -> tuple[dict[str, str], dict[str, str], bool]:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(tornado.web.Application([(API + "/proxy/events", RejectingEvents)]))
        server.add_sockets(sockets)
        try:
            link = BrokerLink(
                f"http://127.0.0.1:{sockets[0].getsockname()[1]}",
                ProxyCredential("proxy-1", "s" * 40),
                queue_limit=3,
                batch=2,
            )
            state = ProxyState(ProxyConfig(), RING)
            link.attach(state)
            for n in range(5):
                link.forward({"event": "session_closed", "n": n})
            before = metric_lines(state, "consolegate_proxy_broker")
            flushed = await link.flush()
            return before, metric_lines(state, "consolegate_proxy_broker"), flushed
        finally:
            server.stop()

    before, after, flushed = asyncio.run(scenario())
    assert before == {
        "consolegate_proxy_broker_reachable": "1",
        "consolegate_proxy_broker_replica": "0",
        "consolegate_proxy_broker_events_queued": "3",
        'consolegate_proxy_broker_events_dropped_total{reason="queue_full"}': "2",
        'consolegate_proxy_broker_events_dropped_total{reason="rejected"}': "0",
    }
    assert flushed  # rejected batches are let go, not retried forever
    assert after["consolegate_proxy_broker_events_queued"] == "0"
    assert after['consolegate_proxy_broker_events_dropped_total{reason="rejected"}'] == "3"
    assert after['consolegate_proxy_broker_events_dropped_total{reason="queue_full"}'] == "2"


USER_INFO = "must not carry user info: the proxy authenticates with its credential file"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://px1:hunter2-secret@broker.example:8443", f"--broker 'https://broker.example:8443' {USER_INFO}"),
        ("http://ops:hunter2-secret@192.0.2.10", f"--broker 'http://192.0.2.10' {USER_INFO}"),
        ("http://[::1", "--broker is not a URL (https://HOST[:PORT])"),
        ("https://broker.example:99999", "--broker is not a URL (https://HOST[:PORT])"),
        ("https://broker.example:0", "--broker is not a URL (https://HOST[:PORT])"),
        (
            "ftp://broker.example",
            "--broker 'ftp://broker.example' must be an https:// URL (plain http only to this host)",
        ),
    ],
)
def test_a_refused_broker_url_is_one_line_without_user_info(url: str, message: str) -> None:
    """The message may reach logs and terminals: it names scheme, host and port, never a password."""
    with pytest.raises(BrokerLinkError) as info:
        check_broker_url(url)
    assert str(info.value) == message
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://broker.example",
        "https://broker.example:8443/base",
        "http://127.0.0.1:8700",
        "http://[::1]:8700",
        "http://localhost:8700",
    ],
)
def test_https_anywhere_and_http_to_this_host_are_accepted(url: str) -> None:
    check_broker_url(url)


class Unavailable(tornado.web.RequestHandler):
    """A replica whose database is away: 503 storage_unavailable to everything."""

    def post(self) -> None:
        self.set_status(503)
        self.write({"error": "storage_unavailable"})


class Redeemed(tornado.web.RequestHandler):
    calls = 0

    def post(self) -> None:
        Redeemed.calls += 1
        self.write({"redeemed": True})


def test_a_replica_answering_5xx_is_left_for_the_next_and_a_4xx_is_not() -> None:
    """``--broker A --broker B``: A answers 503, so the redeem is tried at B at once and B is used
    from then on; a 4xx is the request's answer (another replica would say the same), not a
    reason to move. (A stand-in: a real broker answers 503 only with its database away.)"""

    async def scenario() -> tuple[str, str, int, str]:
        servers, urls = [], []
        for handler in (Unavailable, Redeemed):
            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            server = tornado.httpserver.HTTPServer(
                tornado.web.Application([(API + "/proxy/redeem", handler), (API + "/proxy/events", RejectingEvents)])
            )
            server.add_sockets(sockets)
            servers.append(server)
            urls.append(f"http://127.0.0.1:{sockets[0].getsockname()[1]}")
        try:
            link = BrokerLink(urls, ProxyCredential("proxy-1", "s" * 40))
            state = ProxyState(ProxyConfig(), RING)
            link.attach(state)
            first = link.base
            await link.redeem(new_claims(host="127.0.0.1", port=5900, now=time.time(), ttl=60, single_use=True))
            moved = link.base
            link.forward({"event": "closed"})
            await link.flush()  # B rejects it (400): B stays in use
            replica = metric_lines(state, "consolegate_proxy_broker_replica")["consolegate_proxy_broker_replica"]
            return first, moved, Redeemed.calls if link.base == moved else -1, replica
        finally:
            for server in servers:
                server.stop()

    first, moved, calls, replica = asyncio.run(scenario())
    assert first.endswith(API) and moved != first and calls == 1 and replica == "1"
