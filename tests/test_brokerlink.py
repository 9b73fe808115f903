"""The proxy's link to the broker, in process: what it shows an operator in ``/metrics``.

A stand-in broker is used because the real one cannot be made to reject a valid batch of
events on cue; everything else here (queue, posting, metrics rendering) is the real code.
"""

from __future__ import annotations

import asyncio
import time

import tornado.httpserver
import tornado.netutil
import tornado.web

from console_proxy.brokerlink import API, BrokerLink, ProxyCredential
from console_proxy.config import ProxyConfig
from console_proxy.keyring import Keyring
from console_proxy.server import ProxyState

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
            link = BrokerLink(f"http://127.0.0.1:{sockets[0].getsockname()[1]}",
                              ProxyCredential("proxy-1", "s" * 40), queue_limit=3, batch=2)
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
        "consolegate_proxy_broker_events_queued": "3",
        'consolegate_proxy_broker_events_dropped_total{reason="queue_full"}': "2",
        'consolegate_proxy_broker_events_dropped_total{reason="rejected"}': "0",
    }
    assert flushed  # rejected batches are let go, not retried forever
    assert after["consolegate_proxy_broker_events_queued"] == "0"
    assert after['consolegate_proxy_broker_events_dropped_total{reason="rejected"}'] == "3"
    assert after['consolegate_proxy_broker_events_dropped_total{reason="queue_full"}'] == "2"
