"""Shared fixtures: real Xvnc servers (tests/xvnc.py), keyrings, a real proxy process, and the
broker's two database engines (a throwaway PostgreSQL cluster per session: tests/pgcluster.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgcluster import PgCluster
from proxyproc import ProxyProcess, start_proxy
from xvnc import other_pki, test_pki, xvnc_factory, xvnc_none, xvnc_vncauth, xvnc_x509  # noqa: F401

from console_proxy import keyring, token
from console_proxy.keyring import Keyring


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes a minute or more by its nature (runs in the normal suite)")


@pytest.fixture(scope="module")
def broker_ring(tmp_path_factory: pytest.TempPathFactory) -> tuple[Keyring, Path]:
    """A broker keyring and the path of its exported proxy keyring."""
    ring = Keyring.generate(time.time())
    path = tmp_path_factory.mktemp("keys") / "proxy-keyring.json"
    keyring.save(ring, path, public_only=True)
    return ring, path


@pytest.fixture(scope="module")
def mint(broker_ring: tuple[Keyring, Path]) -> Callable[..., str]:
    """mint(host=..., port=..., ttl=60, password=..., **claims) -> token, minted now."""
    ring, _ = broker_ring

    def _mint(*, ttl: int = 60, now: float | None = None, **options: object) -> str:
        claims = token.new_claims(now=time.time() if now is None else now, ttl=ttl, **options)  # type: ignore[arg-type]
        return token.mint(claims, ring)

    return _mint


@pytest.fixture(scope="module")
def proxy(broker_ring: tuple[Keyring, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy process shared by a module's tests (default options)."""
    process = start_proxy(tmp_path_factory.mktemp("proxy"), broker_ring[1])
    yield process
    process.stop()


@pytest.fixture
def proxy_factory(broker_ring: tuple[Keyring, Path], tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start proxies with extra options; all are stopped after the test."""
    started: list[ProxyProcess] = []

    def _start(*extra: str) -> ProxyProcess:
        process = start_proxy(tmp_path, broker_ring[1], *extra)
        started.append(process)
        return process

    yield _start
    for process in started:
        process.stop()


ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One real PostgreSQL 15 server for the whole session, started on first use (~1 s)."""
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database(engine: str, request: pytest.FixtureRequest) -> str | None:
    """The ``--database`` for a test on ``engine``: None (the state dir's SQLite file) or the URL
    of a fresh, empty PostgreSQL database."""
    if engine == "sqlite":
        return None
    return request.getfixturevalue("pg_cluster").new_database()  # type: ignore[no-any-return]
