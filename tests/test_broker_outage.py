"""The outage circuit on its own (broker/outage.py): fail at once while down, probe in the
background, close only once a probe and the recovery both succeeded."""

from __future__ import annotations

import threading

import pytest

from broker.outage import DatabaseDown, Outage


class Server:
    """A stand-in for the database's answers: the circuit never touches a driver itself."""

    def __init__(self) -> None:
        self.up = False
        self.probes = 0
        self.recoveries = 0

    def probe(self) -> None:
        self.probes += 1
        if not self.up:
            raise ConnectionRefusedError("connection refused")

    def recover(self) -> None:
        self.recoveries += 1


def test_calls_fail_at_once_while_down_and_go_through_once_a_probe_succeeds() -> None:
    server = Server()
    outage = Outage("db", server.probe, server.recover, interval=0.01)
    try:
        outage.check()  # closed: nothing raised
        outage.begin(ConnectionResetError("server closed the connection unexpectedly"))
        outage.begin("found again by another request")  # one probing thread, not two
        with pytest.raises(DatabaseDown, match="unreachable"):
            outage.check()
        assert outage.down and not outage.wait_up(0.1) and server.probes >= 1
        server.up = True
        assert outage.wait_up(5)
        assert not outage.down and server.recoveries == 1
        outage.check()
    finally:
        outage.close()


def test_a_failing_recovery_keeps_the_circuit_open() -> None:
    server, attempts = Server(), threading.Semaphore(0)
    server.up = True

    def recover() -> None:
        attempts.release()
        raise TimeoutError("pool not ready")

    outage = Outage("db", server.probe, recover, interval=0.01)
    try:
        outage.begin("gone")
        assert attempts.acquire(timeout=5) and attempts.acquire(timeout=5)  # tried again, still down
        assert outage.down
    finally:
        outage.close()


def test_a_closed_engine_does_not_start_probing() -> None:
    server = Server()
    outage = Outage("db", server.probe, server.recover, interval=0.01)
    outage.close()
    outage.begin("gone")
    assert not outage.down and server.probes == 0
