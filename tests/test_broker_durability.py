"""Durability: SIGKILL the broker while a client mints in a loop; every 201 survives, with its audit."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from brokerproc import BrokerState, start_broker

from broker.client import BrokerError

ENOUGH = 30


def _all_audit(client) -> list[dict]:  # type: ignore[no-untyped-def]
    events, after = [], 0
    while batch := client.audit(after, "minted", 1000):
        events += batch
        after = batch[-1]["seq"]
    return events


def test_every_201_survives_a_sigkill(tmp_path: Path) -> None:
    state = BrokerState.create(tmp_path / "state")
    credential = json.loads(state.add_proxy("dur", "http://127.0.0.1:1").read_text())
    broker = start_broker(state, heartbeat_interval=600)
    broker.client().request(
        "POST",
        "/proxy/heartbeat",
        {"proxy_id": "dur", "public_url": None, "sessions": 0, "capacity": 10**6, "draining": False, "version": 0},
        authorization=f"Bearer {credential['proxy_id']}.{credential['secret']}",
    )
    target = broker.admin.add_target(name="durable", host="127.0.0.1", port=5900)
    minted: list[str] = []
    enough, done = threading.Event(), threading.Event()

    def mint_forever() -> None:
        issuer = broker.issuer
        try:
            while True:
                minted.append(issuer.mint(target["id"])["session_id"])
                if len(minted) >= ENOUGH:
                    enough.set()
        except BrokerError:
            pass  # the broker is gone: the last request got no 201
        finally:
            enough.set()
            done.set()

    threading.Thread(target=mint_forever, daemon=True).start()
    assert enough.wait(60)
    broker.kill()
    assert done.wait(30)
    assert len(minted) >= ENOUGH

    with sqlite3.connect(state.root / "broker.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    restarted = start_broker(state, heartbeat_interval=600)
    try:
        sessions = {s["session_id"] for s in restarted.admin.sessions("all")}
        audited = {e["session_id"] for e in _all_audit(restarted.admin)}
        missing = [sid for sid in minted if sid not in sessions or sid not in audited]
        assert not missing, f"{len(missing)} of {len(minted)} minted consoles lost"
    finally:
        restarted.stop()
